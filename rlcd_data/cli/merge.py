"""`rlcd-data merge DIR`: assemble the shards of a sharded build into the final dataset folder."""

from __future__ import annotations


def add_parser(sub) -> None:
    parser = sub.add_parser(
        "merge", help="Assemble the finished shards of a sharded build (--num-shards) into the dataset and card."
    )
    parser.add_argument("folder", metavar="DIR", help="The --output folder the shards were built into.")


def run(args) -> int:
    from ..pipeline.shards import merge

    result = merge(args.folder)
    s = result.stats
    print(
        f"merged {s.pairs} pairs into {result.output} "
        f"({', '.join(f'{k}: {v}' for k, v in result.splits.items())}); dropped {s.examples_dropped} after retries"
    )
    print(f"load it with: {result.load_line()}")
    return 0
