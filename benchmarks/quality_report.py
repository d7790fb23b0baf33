"""Time the model-free quality report (`rlcd-data inspect`) on a large pair dataset.

Makes N pairs from HH-RLHF's validation pairs (each chosen response with the
rejected response of another pair, so texts are real and pairs distinct),
then times loading, the report, and the plots, each once.

    .venv/bin/python benchmarks/quality_report.py [--pairs 10000]
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

HH = Path(__file__).resolve().parent.parent.parent / "shared" / "data" / "hh-rlhf" / "harmless-base-validation.jsonl"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--pairs", type=int, default=10_000)
    parser.add_argument("--source", default=str(HH), help="HH-RLHF-style pairs to draw the texts from.")
    args = parser.parse_args()

    rows = [json.loads(line) for line in Path(args.source).read_text().splitlines() if line.strip()]
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp) / "pairs"
        (folder / "data").mkdir(parents=True)
        with (folder / "data" / "train.jsonl").open("w") as f:
            for i in range(args.pairs):
                a, b = rows[i % len(rows)], rows[(i * 7 + 1 + i // len(rows)) % len(rows)]
                f.write(json.dumps({"chosen": a["chosen"], "rejected": b["rejected"]}) + "\n")

        from rlcd_data.quality import measures as quality
        from rlcd_data.quality import plots
        from rlcd_data.quality.report import load

        start = time.perf_counter()
        _, data = load(str(folder))
        loaded = time.perf_counter()
        result = quality.report(data)
        reported = time.perf_counter()
        plots.write_report_plots(data, folder)
        plotted = time.perf_counter()
    # The texts repeat across pairs, so the report's figures mean nothing here: only its time does.
    print(f"{len(data)} pairs: load {loaded - start:.1f} s, report {reported - loaded:.1f} s "
          f"({result['lexical_separability']['folds']}-fold separability included), plots {plotted - reported:.1f} s; "
          f"total {plotted - start:.1f} s")


if __name__ == "__main__":
    main()
