"""`inspect` and `compare`: the quality report of pair datasets, as a table, JSON, card section and plots.

    from rlcd_data.quality.report import inspect_dataset
    result = inspect_dataset("out/harmless", judge="out/judge-rm", write_card=True)
"""

from __future__ import annotations

import re
from pathlib import Path

from ..errors import RlcdError
from . import measures

CARD_TEMPLATE = "quality.md"
BEGIN, END = "<!-- rlcd-data:quality -->", "<!-- /rlcd-data:quality -->"
_SECTION = re.compile(re.escape(BEGIN) + r".*?" + re.escape(END), re.DOTALL)


def load(source: str, split: str = "train", limit: int | None = None):
    """(table, PairData) for any pair source; a build folder's token limit comes from its config."""
    from ..sources.pairs import build_setting, load_pairs

    table = load_pairs(source, split, limit)
    if len(table) == 0:
        raise RlcdError(f"{source}: no pairs")
    return table, measures.pair_data(table, max_new_tokens=build_setting(source, "max_new_tokens"))


def inspect_dataset(
    source: str,
    *,
    split: str = "train",
    limit: int | None = None,
    threshold: float = measures.NEAR_IDENTICAL,
    folds: int = measures.FOLDS,
    judge: str | None = None,
    reward_model_separability: bool = False,
    write_card: bool = False,
    annotations: str | Path | None = None,
) -> dict:
    """The quality report of one pair dataset.

    Args:
        judge: a reward model folder; adds its agreement with the labels.
        reward_model_separability: also run the k-fold reward-model figure (trains ``folds`` MiniLM models).
        write_card: write the plots to ``source/images/`` and the report into
            ``source/README.md`` (replacing an earlier report; a folder only).
        annotations: the folder whose ``annotations/`` hold people's judgments of these pairs (`rlcd-data view`);
            default: ``source`` when it is a folder. Adds their agreement with the labels.

    Raises:
        RlcdError: not a pair dataset, no pairs, a judge that is not a reward
            model, ``write_card`` on something that is not a folder.
    """
    if write_card and not Path(source).is_dir():
        raise RlcdError(f"{source}: --write-card needs a dataset folder")
    table, data = load(source, split, limit)
    result = measures.report(data, threshold=threshold, folds=folds)
    result["human"] = human_figure(annotations or source, data, split)
    if judge:
        from .model_measures import judge_agreement

        result["judge"] = judge_agreement(table, judge)
    if reward_model_separability:
        from .model_measures import reward_model_separability as rm_separability

        result["reward_model_separability"] = rm_separability(table, folds=folds)
    result["verdicts"] = verdicts(result)
    if write_card:
        from .plots import write_report_plots

        images = write_report_plots(data, Path(source))
        write_card_section(Path(source) / "README.md", card_section(result, images))
        result["images"] = images
    return result


def human_figure(folder: str | Path, data: measures.PairData, split: str = "train") -> dict | None:
    """People's agreement with the labels of ``split`` from the judgments in ``folder/annotations/``, or None
    (none there)."""
    from . import annotations

    return annotations.human_agreement(annotations.read(folder, split), data) if Path(folder).is_dir() else None


def card_section(result: dict, images: list[str], matched: str | None = None) -> str:
    """The report as a Markdown card section, between markers that a later `inspect --write-card` replaces."""
    from ..resources import resource_dir
    from ..tasks.task import JINJA

    body = JINJA.from_string((resource_dir("cards") / CARD_TEMPLATE).read_text()).render(
        r=result, s=result["shape"], l=result["lengths"], sep=result["lexical_separability"],
        verdicts=result.get("verdicts") or verdicts(result), images=images, matched=matched,
    )
    return f"{BEGIN}\n{body.strip()}\n{END}\n"


def write_card_section(card: Path, section: str) -> None:
    """Put ``section`` into the card: in place of an earlier report, else before its Citation, else at the end."""
    text = card.read_text() if card.is_file() else ""
    if _SECTION.search(text):
        text = _SECTION.sub(lambda _: section.rstrip("\n"), text, count=1)
    elif "\n## Citation" in text:
        head, tail = text.split("\n## Citation", 1)
        text = f"{head.rstrip()}\n\n{section}\n## Citation{tail}"
    else:
        text = f"{text.rstrip()}\n\n{section}" if text.strip() else section
    card.write_text(text)


def compare_datasets(sources: list[str], *, split: str = "train", folds: int = measures.FOLDS,
                     judge: str | None = None, plot: str | Path | None = None, match: bool = True) -> dict:
    """The report of several datasets side by side.

    Datasets that all carry ``source_index`` (builds from the same prompt
    source) are restricted to the prompts they have in common, so the figures
    compare the same prompts; ``match=False`` keeps every pair.

    People's agreement with the labels (`rlcd-data view`) covers every pair they judged, matched or not.

    Returns:
        ``{"matched_prompts": n or None, "datasets": {name: report}}``;
        ``plot`` receives the overlay of each dataset's length differences.
    """
    if len(sources) < 2:
        raise RlcdError("compare needs at least two datasets")
    loaded = {_name(s, sources): load(s, split) for s in sources}
    # people's judgments name rows of the whole dataset: their figure is taken before any matching
    humans = {name: human_figure(source, data, split) for (name, (_, data)), source in zip(loaded.items(), sources)}
    matched = None
    if match and all(data.source_index is not None for _, data in loaded.values()):
        common = set.intersection(*(set(data.source_index) for _, data in loaded.values()))
        if not common:
            raise RlcdError("the datasets share no source_index: they were built from different prompts "
                            "(pass --no-match to compare them whole)")
        matched = len(common)
        for name, (table, data) in loaded.items():
            keep = [i for i, s in enumerate(data.source_index) if s in common]
            loaded[name] = (table.select(keep), data.select(keep))
    reports = {}
    for name, (table, data) in loaded.items():
        result = measures.report(data, folds=folds)
        result["human"] = humans[name]
        if judge:
            from .model_measures import judge_agreement

            result["judge"] = judge_agreement(table, judge)
        result["verdicts"] = verdicts(result)
        reports[name] = result
    if plot:
        from .plots import length_differences

        length_differences({name: data for name, (_, data) in loaded.items()}, Path(plot))
    return {"matched_prompts": matched, "datasets": reports}


def _name(source: str, sources: list[str]) -> str:
    """A short, unique column name for a dataset: its folder or file name, else the whole path."""
    name = Path(source).name or source
    return name if sum(Path(s).name == name for s in sources) == 1 else source


def text_table(named: dict[str, dict]) -> str:
    """The headline figures of one or more reports as an aligned plain-text table (datasets as columns)."""

    def fmt_ci(x):
        return "n/a" if x is None else f"{x['accuracy']:.3f} [{x['ci95'][0]:.3f}, {x['ci95'][1]:.3f}]"

    def per_side(d):
        return "n/a" if d is None else f"{d['chosen']} / {d['rejected']}"

    rows = [
        ("pairs", lambda r: str(r["pairs"])),
        ("identical / near-identical", lambda r: f"{r['shape']['identical']} / {r['shape']['near_identical']}"),
        ("empty (chosen / rejected)", lambda r: per_side(r["shape"]["empty"])),
        ("at token limit (c / r)", lambda r: per_side(r["shape"]["at_token_limit"])),
        ("ends mid-sentence (c / r)", lambda r: per_side(r["shape"]["unfinished"])),
        ("length unit", lambda r: r["lengths"]["unit"]),
        ("chosen length mean / median", lambda r: _mm(r["lengths"]["chosen"])),
        ("rejected length mean / median", lambda r: _mm(r["lengths"]["rejected"])),
        ("chosen is longer", lambda r: f"{r['lengths']['chosen_longer']:.1%}"),
        ("longer-is-chosen accuracy", lambda r: f"{r['lengths']['longer_is_chosen_accuracy']:.3f}"),
        ("lexical separability [95%]", lambda r: fmt_ci(r["lexical_separability"])),
        ("  sd over folds", lambda r: "n/a" if not r["lexical_separability"] else f"{r['lexical_separability']['sd']:.3f}"),
        ("reward-model separability", lambda r: fmt_ci(r.get("reward_model_separability"))),
        ("judge agreement [95%]", lambda r: fmt_ci(r.get("judge"))),
        ("human agreement [95%], n", lambda r: _human(r.get("human"))),
        ("mean chosen_probability", lambda r: "n/a" if not r.get("soft_labels") else f"{r['soft_labels']['mean']:.3f}"),
        ("labels below 0.6", lambda r: "n/a" if not r.get("soft_labels") else f"{r['soft_labels']['near_half']:.1%}"),
        ("top chosen words", lambda r: _words(r["words"]["chosen"])),
        ("top rejected words", lambda r: _words(r["words"]["rejected"])),
    ]
    header = ["", *named]
    body = [[label, *(value(r) for r in named.values())] for label, value in rows]
    widths = [max(len(row[i]) for row in [header, *body]) for i in range(len(header))]
    lines = ["  ".join(cell.ljust(w) for cell, w in zip(row, widths)).rstrip() for row in [header, *body]]
    return "\n".join(lines)


def _human(human: dict | None) -> str:
    if not human or not human["n"]:
        return "n/a"
    return f"{human['agreement']:.3f} [{human['interval'][0]:.3f}, {human['interval'][1]:.3f}], {human['n']}"


def _mm(summary: dict) -> str:
    return f"{summary['mean']:.1f} / {summary['median']:g}"


def _words(words: list[dict], n: int = 5) -> str:
    return ", ".join(w["word"] for w in words[:n]) or "none"


def verdicts(result: dict) -> list[str]:
    """Plain sentences on what the report says about training on the data."""
    lines = []
    sep = result.get("lexical_separability")
    if sep is None:
        lines.append("Too few pairs to estimate lexical separability.")
    elif sep["ci95"][0] <= 0.5:
        lines.append(
            f"No lexical signal: a bag-of-words classifier tells chosen from rejected in {sep['accuracy']:.0%} of "
            f"held-out pairs (95% interval {sep['ci95'][0]:.0%}-{sep['ci95'][1]:.0%}), not above chance. "
            "A reward model may learn nothing from these labels."
        )
    else:
        lines.append(
            f"Lexical signal: a bag-of-words classifier tells chosen from rejected in {sep['accuracy']:.0%} of "
            f"held-out pairs (95% interval {sep['ci95'][0]:.0%}-{sep['ci95'][1]:.0%}); the most characteristic "
            "words of each side show whether that signal is the attribute."
        )
    lengths = result["lengths"]
    rule = lengths["longer_is_chosen_accuracy"]
    if abs(rule - 0.5) >= 0.15:
        side = "longer" if rule > 0.5 else "shorter"
        lines.append(
            f"Length bias: the {side} response is chosen in {max(rule, 1 - rule):.0%} of pairs; "
            "a reward model trained on this data may learn length."
        )
    judge = result.get("judge")
    if judge is not None:
        low, high = judge["ci95"]
        verdict = "agrees with the labels beyond chance" if low > 0.5 else (
            "disagrees with the labels" if high < 0.5 else "does not agree with the labels beyond chance")
        lines.append(f"The judge {verdict}: {judge['accuracy']:.0%} (95% interval {low:.0%}-{high:.0%}).")
    human = result.get("human")
    if human and human["n"]:
        low, high = human["interval"]
        verdict = "agree with the labels beyond chance" if low > 0.5 else (
            "disagree with the labels" if high < 0.5 else "do not agree with the labels beyond chance")
        lines.append(f"People {verdict}: {human['agreement']:.0%} of {human['n']} decisive judgments "
                     f"(95% interval {low:.0%}-{high:.0%}; {human['ties']} more were \"can't tell\").")
    shape_ = result["shape"]
    same = shape_["identical"] + shape_["near_identical"]
    if result["pairs"] and same / result["pairs"] >= 0.05:
        lines.append(f"{same} pairs ({same / result['pairs']:.0%}) are identical or near-identical: they carry no label.")
    return lines
