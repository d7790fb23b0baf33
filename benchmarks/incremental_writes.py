"""The cost of crash safety: time spent writing completed pairs to disk as a build goes.

    .venv/bin/python benchmarks/incremental_writes.py [--pairs 200] [--response-chars 800]

Builds ``--pairs`` pairs with an instant fake generator (so the build is all
bookkeeping and I/O) at several batch sizes, and reports the time spent in the
atomic part writes (temp file, fsync, rename), the number of parts, and that
time as a share of a real build of the same size at a given pairs/s
(``--real-pairs-per-second``, default 0.07: SmolLM2-135M fp32 on 2 CPU cores).
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path


class InstantGenerator:
    description = "instant fake generator"

    def __init__(self, chars: int):
        self.chars = chars

    def generate(self, prompts, seeds, settings, on_progress=None):
        from rlcd_data.generate import Completion

        text = ("lorem ipsum dolor sit amet " * (self.chars // 27 + 1))[: self.chars]
        return [Completion(f"{seed % 997} {text}", self.chars // 5, True) for seed in seeds]

    def count_tokens(self, text):
        return len(text) // 5


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--pairs", type=int, default=200)
    parser.add_argument("--response-chars", type=int, default=800)
    parser.add_argument("--real-pairs-per-second", type=float, default=0.07)
    args = parser.parse_args(argv)

    from rlcd_data.pipeline import run as pipeline
    from rlcd_data.pipeline.config import BuildConfig
    from rlcd_data.pipeline.staging import PartWriter

    real_seconds = args.pairs / args.real_pairs_per_second
    with tempfile.TemporaryDirectory() as tmp:
        prompts = Path(tmp) / "prompts.jsonl"
        prompts.write_text("".join(json.dumps({"prompt": f"Question {i}?"}) + "\n" for i in range(args.pairs)))
        for batch_size in (1, 8, 32):
            spent = {"seconds": 0.0, "parts": 0, "bytes": 0}
            write_part = PartWriter.write

            def timed(writer, records, write_part=write_part, spent=spent):
                start = time.perf_counter()
                write_part(writer, records)
                spent["seconds"] += time.perf_counter() - start
                spent["parts"] += 1
                spent["bytes"] += (writer.staging / f"part-{writer.number - 1:06d}.jsonl").stat().st_size

            PartWriter.write = timed
            try:
                config = BuildConfig(task="harmless", prompts=str(prompts), output=str(Path(tmp) / f"out{batch_size}"),
                                     batch_size=batch_size)
                start = time.perf_counter()
                pipeline.build(config, generator=InstantGenerator(args.response_chars), progress=False)
                total = time.perf_counter() - start
            finally:
                PartWriter.write = write_part
            print(json.dumps({
                "pairs": args.pairs,
                "batch_size": batch_size,
                "parts": spent["parts"],
                "part_bytes": spent["bytes"],
                "write_seconds": round(spent["seconds"], 4),
                "build_seconds_without_model": round(total, 3),
                "share_of_a_real_build": f"{spent['seconds'] / real_seconds:.2e}",
            }))


if __name__ == "__main__":
    main()
