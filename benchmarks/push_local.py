"""What `rlcd-data push` sends for a 1,000-pair dataset, against the fake Hub on 127.0.0.1.

    .venv/bin/python benchmarks/push_local.py [--pairs 1000]

Builds 1,000 pairs with a fake generator (no model), pushes them twice, and prints
the files, bytes and requests of each push and how long it took.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))
os.environ.update(HF_HUB_DISABLE_XET="1", HF_HUB_OFFLINE="0", HF_HOME=tempfile.mkdtemp())

from conftest import FakeGenerator  # noqa: E402  (sets HF_HUB_OFFLINE=1 for the tests)
from fake_hub import FakeHub  # noqa: E402
from huggingface_hub import constants  # noqa: E402

constants.HF_HUB_OFFLINE = False  # only loopback is reached: the fake Hub's endpoint is passed explicitly

from rlcd_data.hub import push  # noqa: E402
from rlcd_data.pipeline.config import BuildConfig  # noqa: E402
from rlcd_data.pipeline.run import build  # noqa: E402


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--pairs", type=int, default=1000)
    args = parser.parse_args(argv)
    work = Path(tempfile.mkdtemp())
    prompts = work / "prompts.jsonl"
    prompts.write_text("".join(json.dumps({"prompt": f"Question {i}: how do I do thing {i}?"}) + "\n"
                               for i in range(args.pairs)))
    reply = lambda prompt, n: ("A response of ordinary length that says a few sentences. " * 4, True)  # noqa: E731
    config = BuildConfig(task="harmless", prompts=str(prompts), output=str(work / "out"))
    build(config, generator=FakeGenerator(reply), progress=False)
    local = {str(p.relative_to(work / "out")): p.stat().st_size for p in (work / "out").rglob("*") if p.is_file()}
    print("folder:", json.dumps(local))
    with FakeHub("hf_bench") as hub:
        for attempt in (1, 2):
            hub.requests.clear()
            start = time.perf_counter()
            push(work / "out", "bench/rlcd-1k", token="hf_bench", endpoint=hub.endpoint)
            seconds = time.perf_counter() - start
            kinds = Counter(f"{m} {p.split('?')[0].replace('bench/rlcd-1k', 'NS/NAME')}" for m, p, _ in hub.requests)
            sent = sum(len(body) for _, _, body in hub.requests)
            print(f"push {attempt}: {seconds:.2f} s, {len(hub.requests)} requests, {sent} request-body bytes")
            for kind, n in sorted(kinds.items()):
                print(f"  {n} x {kind}")
        print("repo files:", json.dumps({p: len(b) for p, b in sorted(hub.repos["bench/rlcd-1k"].items())}))


if __name__ == "__main__":
    main()
