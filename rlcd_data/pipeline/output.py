"""Writing a build as a Hub dataset repo folder: Parquet data, dataset card, build config."""

from __future__ import annotations

import json
import shutil
from importlib import metadata
from pathlib import Path

from ..quality.annotations import ANNOTATIONS
from ..quality.plots import IMAGES, write_report_plots
from ..resources import resource_dir
from ..sources.pairs import quiet_datasets, to_standard
from ..tasks.conversation import to_messages
from ..tasks.task import JINJA, Task
from .config import CONFIG_FILENAME, BuildConfig
from .methods import COT_TOKENS, METHODS
from .results import BuildStats

CARD_TEMPLATE = "dataset_card.md"
VERSIONED_PACKAGES = ("rlcd-data", "transformers", "torch", "datasets", "huggingface_hub", "bitsandbytes")


def features(fmt: str, method: str = "rlcd"):
    """The output schema: TRL's explicit-prompt formats plus provenance columns.

    Pair methods write ``prompt``/``chosen``/``rejected`` (scored ones add
    ``chosen_probability``); context distillation writes ``prompt``/``completion``.
    """
    from datasets import Features, List, Value

    text = Value("string")
    message = {"role": Value("string"), "content": Value("string")}
    main = List(message) if fmt == "conversational" else text
    descriptor = {
        "descriptor_index": Value("int32"),
        "positive_descriptor": text,
        "negative_descriptor": text,
        "source_index": Value("int64"),
    }
    if method == "context-distillation":
        return Features(
            {"prompt": main, "completion": main, "p_plus": text, **descriptor, "completion_tokens": Value("int32")}
        )
    tokens = {"chosen_tokens": Value("int32"), "rejected_tokens": Value("int32")}
    pair = {"prompt": main, "chosen": main, "rejected": main}
    if method == "rlaif":
        return Features(
            {**pair, "chosen_probability": Value("float64"), "instruction_index": Value("int32"),
             "source_index": Value("int64"), **tokens}
        )
    columns = {**pair, "p_plus": text, "p_minus": text, **descriptor, **tokens}
    if method == "rlcd-rescore":
        columns = {**pair, "chosen_probability": Value("float64"), "chosen_is_p_plus": Value("bool"),
                   **{k: v for k, v in columns.items() if k not in pair}}
    return Features(columns)


def to_conversational(row: dict) -> dict:
    out = dict(row)
    prompt, _ = to_messages(row["prompt"])
    out["prompt"] = prompt
    for column in ("chosen", "rejected", "completion"):
        if column in row:
            out[column] = to_messages(row["prompt"], row[column])[1]
    return out


def library_versions() -> dict[str, str]:
    versions = {}
    for name in VERSIONED_PACKAGES:
        try:
            versions[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            pass
    return versions


def size_category(n: int) -> str:
    for limit, label in ((1_000, "n<1K"), (10_000, "1K<n<10K"), (100_000, "10K<n<100K"), (1_000_000, "100K<n<1M")):
        if n < limit:
            return label
    return "1M<n<10M"


def write_dataset_folder(
    out: Path, rows: list[dict], *, config: BuildConfig, task: Task, stats: BuildStats, model: str
) -> dict[str, int]:
    """Write ``data/*.parquet``, ``README.md`` and the build config into ``out``.

    Old data files, card and config are replaced only once the new ones are
    complete, so a failure part-way leaves the previous folder as it was.

    Returns:
        Split name -> number of rows.
    """
    from datasets import Dataset, DatasetDict

    if config.format == "conversational":
        rows = [to_conversational(r) for r in rows]
    else:
        rows = [to_standard(r) for r in rows]
    dataset = Dataset.from_list(rows, features=features(config.format, config.method))
    if config.test_size and len(dataset) >= 2:
        test_size = int(config.test_size) if config.test_size >= 1 else config.test_size
        splits = dataset.train_test_split(test_size=test_size, seed=config.seed)
    else:
        splits = DatasetDict({"train": dataset})

    staging = out / ".rlcd-build" / "final"
    if staging.exists():
        shutil.rmtree(staging)
    (staging / "data").mkdir(parents=True)
    nbytes = {}
    for name, split in splits.items():
        with quiet_datasets():
            split.to_parquet(staging / "data" / f"{name}-00000-of-00001.parquet")
        nbytes[name] = split.data.nbytes
    download_size = sum(p.stat().st_size for p in (staging / "data").iterdir())
    quality_section = quality_report(dataset, staging, config) if METHODS[config.method].writes_pairs else ""
    card = render_card(
        config=config,
        task=task,
        stats=stats,
        model=model,
        splits={name: (len(split), nbytes[name]) for name, split in splits.items()},
        download_size=download_size,
        example=rows[0] if rows else None,
        dataset_ref=str(out),
        rows=rows,
        quality_section=quality_section,
    )
    card.save(staging / "README.md")
    (staging / CONFIG_FILENAME).write_text(config.to_yaml())

    # Swap in: data and images folders, card, config. People's judgments name rows of the data replaced: they go
    # too. Files of other names are left alone.
    for folder in ("data", IMAGES, ANNOTATIONS):
        if (out / folder).exists():
            shutil.rmtree(out / folder)
    for item in sorted(staging.iterdir()):
        item.replace(out / item.name)
    shutil.rmtree(out / ".rlcd-build")
    return {name: len(split) for name, split in splits.items()}


def quality_report(dataset, folder: Path, config: BuildConfig) -> str:
    """The model-free quality report of the pairs: plots under ``folder/images/``, the card section returned."""
    from ..quality.measures import pair_data, report
    from ..quality.report import card_section, verdicts

    data = pair_data(dataset, max_new_tokens=config.max_new_tokens)
    result = report(data, seed=config.seed)
    result["verdicts"] = verdicts(result)
    return card_section(result, write_report_plots(data, folder))


def render_card(
    *,
    config: BuildConfig,
    task: Task,
    stats: BuildStats,
    model: str,
    splits: dict[str, tuple[int, int]],
    download_size: int,
    example: dict | None,
    dataset_ref: str,
    rows: list[dict] | None = None,
    quality_section: str = "",
):
    """The dataset card: Hub YAML metadata (with `configs` and `dataset_info`) and a body from ``cards/``.

    Args:
        splits: split name -> (num_examples, num_bytes in memory).
    """
    from datasets import DatasetInfo, SplitDict, SplitInfo

    config = config.public()  # no credentials in a card
    from datasets.info import DatasetInfosDict
    from datasets.utils.metadata import MetadataConfigs
    from huggingface_hub import DatasetCard, DatasetCardData

    total = sum(n for n, _ in splits.values())
    card_data = DatasetCardData(
        license=config.license,
        language=["en"],
        pretty_name=f"{config.method} {task.name} " + ("SFT data" if config.method == "context-distillation" else "preference pairs"),
        task_categories=["text-generation"],
        tags=sorted({"rlcd", config.method, "synthetic", "preference", "dpo", "reward-modeling"}),
        size_categories=[size_category(total)],
    )
    MetadataConfigs(
        {"default": {"data_files": [{"split": s, "path": f"data/{s}-*"} for s in splits]}}
    ).to_dataset_card_data(card_data)
    split_dict = SplitDict()
    for name, (n, nbytes) in splits.items():
        split_dict.add(SplitInfo(name=name, num_bytes=nbytes, num_examples=n))
    info = DatasetInfo(
        features=features(config.format, config.method),
        splits=split_dict,
        download_size=download_size,
        dataset_size=sum(b for _, b in splits.values()),
    )
    DatasetInfosDict({"default": info}).to_dataset_card_data(card_data)

    body = JINJA.from_string((resource_dir("cards") / CARD_TEMPLATE).read_text()).render(
        config=config,
        task=task,
        stats=stats,
        model=model,
        splits={name: n for name, (n, _) in splits.items()},
        example_json=json.dumps(example, indent=2, ensure_ascii=False) if example else "",
        dataset_ref=dataset_ref,
        versions=library_versions(),
        command=build_command(config),
        method=METHODS[config.method],
        labels=label_summary(rows),
        quality=quality_section,
        cot_tokens=COT_TOKENS,
    )
    return DatasetCard(f"---\n{card_data.to_yaml()}\n---\n\n{body}")


def label_summary(rows: list[dict] | None) -> dict | None:
    """Soft-label statistics of a scored build: mean probability, pairs within 0.4-0.6, agreement with construction."""
    scored = [r for r in rows or [] if "chosen_probability" in r]
    if not scored:
        return None
    probabilities = [r["chosen_probability"] for r in scored]
    agree = [r["chosen_is_p_plus"] for r in scored if "chosen_is_p_plus" in r]
    return {
        "rows": len(scored),
        "mean_probability": sum(probabilities) / len(probabilities),
        "uncertain": sum(p < 0.6 for p in probabilities),  # chosen_probability >= 0.5 by construction
        "agreement": sum(agree) / len(agree) if agree else None,
    }


def build_command(config: BuildConfig) -> str:
    """The `rlcd-data build` command line that reproduces ``config`` (non-default options only)."""
    import dataclasses
    import shlex

    parts = ["rlcd-data", "build", config.task]
    recorded = config.to_dict()  # as recorded: the server URL without credentials
    for f in dataclasses.fields(config):
        if f.name in ("task", "output"):
            continue
        value = recorded[f.name]
        default = f.default
        if value != default:
            flag = "--" + f.name.replace("_", "-")
            parts += [flag] if value is True else [flag, str(value)]
    parts += ["--output", str(config.output)]
    return shlex.join(parts)
