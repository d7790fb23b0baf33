"""Time `rlcd-data view` on a large pair dataset: the server's start, the first page, and later pages.

Makes N pairs from HH-RLHF's validation pairs (each chosen response with the rejected response of another pair,
with a soft label and a descriptor, so texts are real, pairs distinct and every filter has something to read),
starts `rlcd-data view` on them as a user would, and times over HTTP on 127.0.0.1:

- until the server answers (loading the rows and preparing search and filters);
- the page itself and the first page of rows;
- pages of rows further in, a text search, a filtered page, a spot-check sample, and a judgment (POST, written
  to disk atomically) (median of several), while the report is computed in the background;
- until the report (and the rows' flags) are ready.

    .venv/bin/python benchmarks/view.py [--pairs 100000]
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

HH = Path(__file__).resolve().parent.parent.parent / "shared" / "data" / "hh-rlhf" / "harmless-base-validation.jsonl"


def make_pairs(source: Path, n: int, folder: Path) -> None:
    rows = [json.loads(line) for line in source.read_text().splitlines() if line.strip()]
    (folder / "data").mkdir(parents=True)
    with (folder / "data" / "train.jsonl").open("w") as f:
        for i in range(n):
            a, b = rows[i % len(rows)], rows[(i * 7 + 1 + i // len(rows)) % len(rows)]
            f.write(json.dumps({
                "chosen": a["chosen"], "rejected": b["rejected"], "chosen_probability": 0.5 + (i % 50) / 100,
                "descriptor_index": i % 16, "positive_descriptor": f"good {i % 16}",
                "negative_descriptor": f"bad {i % 16}",
            }) + "\n")


def timed(url: str, body: dict | None = None) -> float:
    request = urllib.request.Request(url, data=None if body is None else json.dumps(body).encode(),
                                     headers={"Content-Type": "application/json"})
    start = time.perf_counter()
    with urllib.request.urlopen(request, timeout=600) as response:
        response.read()
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--pairs", type=int, default=100_000)
    parser.add_argument("--source", default=str(HH), help="HH-RLHF-style pairs to draw the texts from.")
    parser.add_argument("--repeat", type=int, default=5, help="Requests per figure after the first page.")
    args = parser.parse_args()

    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp) / "pairs"
        make_pairs(Path(args.source), args.pairs, folder)
        start = time.perf_counter()
        server = subprocess.Popen([sys.executable, "-m", "rlcd_data", "view", str(folder), "--port", "0"],
                                  stdout=subprocess.PIPE, text=True)
        try:
            line = server.stdout.readline()
            url = line.split(" at ", 1)[1].strip().rstrip("/")
            listening = time.perf_counter() - start
            first = timed(url + "/") + timed(url + "/api/info") + timed(url + "/api/rows?offset=0&limit=20")
            middle = args.pairs // 2
            figures = {
                f"20 rows from the middle (rows {middle:,}-{middle + 19:,})": f"/api/rows?offset={middle}&limit=20",
                "search 'police' (first 20 matches)": "/api/rows?q=police&limit=20",
                "filter: descriptor 3, label 0.6-0.8, length >= 100": "/api/rows?descriptor=3&label_min=0.6"
                                                                      "&label_max=0.8&length_min=100&limit=20",
                "spot-check sample of 100 (blind items)": "/api/spot?seed=1&size=100",
            }
            later = {name: statistics.median(timed(url + path) for _ in range(args.repeat))
                     for name, path in figures.items()}
            with urllib.request.urlopen(url + "/api/spot?seed=1&size=100") as response:
                rows = [item["row"] for item in json.loads(response.read())["items"]]
            later["a judgment (POST /api/judge)"] = statistics.median(
                timed(url + "/api/judge", {"annotator": "bench", "seed": 1, "size": 100, "row": row, "choice": "left"})
                for row in rows[:max(args.repeat, 1)])
            while True:
                with urllib.request.urlopen(url + "/api/info") as response:
                    if json.loads(response.read())["report"]:
                        break
                time.sleep(0.5)
            report = time.perf_counter() - start
        finally:
            server.terminate()
            server.wait()
    print(f"rlcd-data view on {args.pairs:,} pairs (HH-RLHF texts), one process on 127.0.0.1:")
    print(f"  start until the server listens (load, search text)         {listening:7.2f} s")
    print(f"  then the page, /api/info and the first 20 rows                {first:7.3f} s")
    for name, seconds in later.items():
        print(f"  {name:<58}{seconds:7.3f} s (median of {args.repeat})")
    print(f"  the report and the rows' flags ready, from the start        {report:7.1f} s")


if __name__ == "__main__":
    main()
