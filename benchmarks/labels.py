"""How the A/B labeller behaves on built datasets.

    .venv/bin/python benchmarks/labels.py OUT/rlcd-build [OUT/rlaif-build ...] [--limit 200] [--both-orders]

For an ``rlcd`` folder it labels the pairs exactly as ``--method rlcd-rescore``
would (same model, same instruction per descriptor pair, same shuffled A/B
order; an rlcd-rescore build generates the same texts from the same seeds) and
reports how often the labeller agrees with the label by construction and how
long labelling takes per pair. For a folder with ``chosen_probability``
(``rlaif`` / ``rlcd-rescore`` builds) it reports the label distribution.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path


def distribution(probabilities: list[float]) -> dict:
    """Of the probability that the first-listed response (chosen by construction, or sample a) is better."""
    return {
        "pairs": len(probabilities),
        "mean_chosen_probability": round(statistics.fmean(probabilities), 4),
        "within_0.4_0.6": sum(0.4 <= p <= 0.6 for p in probabilities),
        "above_0.9_or_below_0.1": sum(p > 0.9 or p < 0.1 for p in probabilities),
    }


def rescore(folder: Path, limit: int | None, both_orders: bool, batch_size: int) -> dict:
    import datasets
    import yaml

    from rlcd_data.generate.labeller import TransformersLabeller
    from rlcd_data.generate.models import load_causal_lm
    from rlcd_data.pipeline.config import BuildConfig
    from rlcd_data.pipeline.methods import METHODS, label_rows
    from rlcd_data.tasks.catalog import load_task

    config = BuildConfig(**yaml.safe_load((folder / "rlcd_build.yaml").read_text()))
    rows = datasets.load_dataset(str(folder), split="train").to_list()[:limit]
    for row in rows:  # back to the by-construction layout label_rows expects
        row["chosen_is_p_plus"] = True
    model, tokenizer, _ = load_causal_lm(config.model, "none", config.dtype)
    labeller = TransformersLabeller(model, tokenizer, batch_size)
    start = time.perf_counter()
    labelled = label_rows(rows, method=METHODS["rlcd-rescore"], task=load_task(config.task, config.templates),
                          labeller=labeller, seed=config.seed, both_orders=both_orders)
    seconds = time.perf_counter() - start
    p_plus = [r["chosen_probability"] if r["chosen_is_p_plus"] else 1 - r["chosen_probability"] for r in labelled]
    return {
        "folder": str(folder),
        "labeller": "rlcd-rescore" + (" (both orders)" if both_orders else ""),
        "agreement_with_construction": round(sum(r["chosen_is_p_plus"] for r in labelled) / len(labelled), 4),
        "p_plus_probability": distribution(p_plus),
        "labelling_seconds_per_pair": round(seconds / len(labelled), 3),
    }


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("folders", nargs="+", type=Path)
    parser.add_argument("--limit", type=int, default=200)
    parser.add_argument("--both-orders", action="store_true")
    parser.add_argument("--batch-size", type=int, default=16)
    args = parser.parse_args(argv)
    import datasets
    import yaml

    for folder in args.folders:
        method = yaml.safe_load((folder / "rlcd_build.yaml").read_text()).get("method", "rlcd")
        if method == "rlcd":
            report = rescore(folder, args.limit, args.both_orders, args.batch_size)
        else:
            rows = datasets.load_dataset(str(folder), split="train").to_list()[: args.limit]
            report = {"folder": str(folder), "method": method,
                      "chosen_probability": distribution([r["chosen_probability"] for r in rows])}
        print(json.dumps(report))


if __name__ == "__main__":
    main()
