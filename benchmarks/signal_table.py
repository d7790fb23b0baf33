"""Signal per CPU-hour of finished builds: the table that chooses the default simulator configuration.

For each build folder: pairs/s (from the card's counts; a resumed build's time covers its last run
only), the share of outputs that pass the filters, lexical separability, length bias, the agreement of a
judge reward model with the labels and, with --train-rm, the agreement with the human validation pairs of
a MiniLM reward model trained on the build (`rlcd-data train reward`, then `eval reward-model`).

    .venv/bin/python benchmarks/signal_table.py out/h300-text out/h300-chat --judge out/judge-rm \\
        --validation ../shared/data/hh-rlhf/harmless-base-validation.jsonl --train-rm

With --base-url, it first builds the table's configurations with a model on an OpenAI-compatible server
(`rlcd-data build --base-url`, the text and the chat format, 300 prompts by default), so a 7B simulator's
rows come from one command:

    .venv/bin/python benchmarks/signal_table.py --base-url http://127.0.0.1:8000/v1 --model Qwen/Qwen2.5-7B-Instruct \
        --judge out/judge-rm --validation ../shared/data/hh-rlhf/harmless-base-validation.jsonl --train-rm

Run it alone: the reward models train on the same two cores.
"""

from __future__ import annotations

import argparse
import json
import re
import subprocess
import sys
from pathlib import Path

import yaml

CARD_COUNTS = {
    "prompts used": "prompts_used",
    "pairs written": "pairs",
    "outputs re-generated": "outputs_retried",
    "tokens generated": "generated_tokens",
    "build time": "seconds",
}


def card_counts(folder: Path) -> dict:
    """The build's counts, read back from the table in its card."""
    counts = {}
    for line in (folder / "README.md").read_text().splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if len(cells) == 2 and cells[0] in CARD_COUNTS:
            counts[CARD_COUNTS[cells[0]]] = float(re.sub(r"[^0-9.]", "", cells[1]))
        elif len(cells) == 2 and cells[0].startswith("examples dropped after"):
            counts["examples_dropped"] = float(cells[1])
    return counts


def reward_model_agreement(folder: Path, validation: str, work: Path) -> float:
    """Train the MiniLM reward model on a build; its agreement with the human validation pairs."""
    out = work / f"rm-{folder.name}"
    cli = [sys.executable, "-m", "rlcd_data"]
    subprocess.run(cli + ["train", "reward", "--dataset", str(folder), "--model", "minilm-l6", "--preset",
                          "reward-cpu-small", "--output_dir", str(out)], check=True, stdout=subprocess.DEVNULL)
    result = subprocess.run(cli + ["eval", "reward-model", "--reward-model", str(out), "--pairs", validation, "--json"],
                            check=True, capture_output=True, text=True)
    return json.loads(result.stdout)["accuracy"]


def row(folder: Path, judge: str | None, validation: str | None, work: Path) -> dict:
    from rlcd_data.quality.report import inspect_dataset

    config = yaml.safe_load((folder / "rlcd_build.yaml").read_text())
    counts = card_counts(folder)
    report = inspect_dataset(str(folder), judge=judge)
    attempts = 2 * counts["prompts_used"] + counts["outputs_retried"]
    result = {
        "build": folder.name,
        "model": config["model"],
        "format": config.get("prompt_format", "text"),
        "temperature": config["temperature"],
        "pairs": int(counts["pairs"]),
        "pairs_per_s": counts["pairs"] / counts["seconds"] if counts.get("seconds", 0) >= 60 else None,
        # An output fails when it runs to the token limit without ending or is empty; the last failure of a
        # dropped example is not re-generated, hence its count is added back.
        "outputs_passing": 1 - (counts["outputs_retried"] + counts.get("examples_dropped", 0)) / attempts,
        "lexical_separability": report["lexical_separability"]["accuracy"],
        "lexical_ci95": report["lexical_separability"]["ci95"],
        "longer_is_chosen": report["lengths"]["longer_is_chosen_accuracy"],
    }
    if report.get("judge"):
        result["judge_agreement"] = report["judge"]["accuracy"]
        result["judge_ci95"] = report["judge"]["ci95"]
    if validation:
        result["rm_validation_agreement"] = reward_model_agreement(folder, validation, work)
    return result


def markdown(rows: list[dict]) -> str:
    def pct(x):
        return "-" if x is None else f"{100 * x:.1f}%"

    def ci(pair):
        return "" if not pair else f" [{100 * pair[0]:.0f}, {100 * pair[1]:.0f}]"

    lines = ["| build | model | format | T | pairs | pairs/s | outputs passing | lexical sep. | longer = chosen "
             "| judge agreement | RM on human val. |", "|" + "---|" * 11]
    for r in rows:
        rate = "-" if r["pairs_per_s"] is None else f"{r['pairs_per_s']:.3f}"
        lines.append(
            f"| {r['build']} | {r['model']} | {r['format']} | {r['temperature']} | {r['pairs']} | {rate} | "
            f"{pct(r['outputs_passing'])} | {pct(r['lexical_separability'])}{ci(r['lexical_ci95'])} | "
            f"{pct(r['longer_is_chosen'])} | {pct(r.get('judge_agreement'))}{ci(r.get('judge_ci95'))} | "
            f"{pct(r.get('rm_validation_agreement'))} |"
        )
    return "\n".join(lines)


def served_builds(args) -> list[Path]:
    """Build each --formats configuration through the server into --work (resumed if interrupted)."""
    folders = []
    for prompt_format in args.formats:
        out = args.work / f"{re.sub(r'[^A-Za-z0-9.-]+', '-', args.model)}-{args.limit}-{prompt_format}"
        command = [sys.executable, "-m", "rlcd_data", "build", "harmless", "--prompts", args.prompts, "--limit",
                   str(args.limit), "--base-url", args.base_url, "--model", args.model, "--prompt-format",
                   prompt_format, "--output", str(out)]
        if args.tokenizer:
            command += ["--tokenizer", args.tokenizer]
        if (out / ".rlcd-build").is_dir():
            command.append("--resume")
        subprocess.run(command, check=True)
        folders.append(out)
    return folders


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("builds", nargs="*", type=Path)
    parser.add_argument("--base-url", help="Build the configurations first with the model this server serves.")
    parser.add_argument("--model", help="With --base-url: the served model's name.")
    parser.add_argument("--tokenizer", help="With --base-url: the served model's tokenizer (default: --model).")
    parser.add_argument("--prompts", default=str(Path(__file__).resolve().parent.parent.parent / "shared" / "data" /
                                                 "hh-rlhf" / "harmless-base-prompts.jsonl"))
    parser.add_argument("--limit", type=int, default=300)
    parser.add_argument("--formats", nargs="+", default=["text", "chat"], choices=["text", "chat"])
    parser.add_argument("--judge", help="Reward model folder judging the labels (e.g. trained on human pairs).")
    parser.add_argument("--validation", help="Human-labelled pairs for --train-rm.")
    parser.add_argument("--train-rm", action="store_true", help="Train a MiniLM reward model on each build.")
    parser.add_argument("--work", type=Path, default=Path("out"), help="Where the reward models go.")
    parser.add_argument("--json", type=Path, help="Also write the rows here.")
    args = parser.parse_args()
    if args.train_rm and not args.validation:
        parser.error("--train-rm needs --validation")
    if args.base_url:
        if not args.model:
            parser.error("--base-url needs --model (the served model's name)")
        args.builds += served_builds(args)
    if not args.builds:
        parser.error("give build folders, or --base-url and --model to build them")
    rows = [row(b, args.judge, args.validation if args.train_rm else None, args.work) for b in args.builds]
    if args.json:
        args.json.write_text(json.dumps(rows, indent=2) + "\n")
    print(markdown(rows))


if __name__ == "__main__":
    main()
