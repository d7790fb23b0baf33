"""`rlcd-data inspect SOURCE`: the quality report of one pair dataset."""

from __future__ import annotations

import json

from ..quality.measures import FOLDS, NEAR_IDENTICAL


def add_parser(sub) -> None:
    parser = sub.add_parser(
        "inspect",
        help="Quality report of a pair dataset: length bias, separability, characteristic words, judge agreement.",
    )
    parser.add_argument("source", metavar="SOURCE",
                        help="Pair dataset: a folder `build` wrote, a Hub dataset, an HH-RLHF-style file.")
    add_report_arguments(parser)
    parser.add_argument("--limit", type=int, help="First N pairs only.")
    parser.add_argument("--threshold", type=float, default=NEAR_IDENTICAL,
                        help=f"Near-identical: cosine similarity of word 1-2-gram counts at or above this "
                             f"(default {NEAR_IDENTICAL}).")
    parser.add_argument("--separability", choices=("lexical", "reward-model"), default="lexical",
                        help="reward-model also trains a MiniLM reward model per fold (slow).")
    parser.add_argument("--write-card", action="store_true",
                        help="Write the report and its plots (images/) into the folder's README.md.")
    parser.add_argument("--annotations", metavar="DIR",
                        help="Folder whose annotations/ hold people's judgments (`rlcd-data view`); default: SOURCE "
                             "when it is a folder.")


def add_report_arguments(parser) -> None:
    parser.add_argument("--split", default="train", help="Split of a dataset folder or Hub dataset.")
    parser.add_argument("--folds", type=int, default=FOLDS, help=f"Folds of the separability estimates (default {FOLDS}).")
    parser.add_argument("--judge", metavar="DIR",
                        help="Reward model folder: the share of pairs whose chosen it prefers.")
    parser.add_argument("--json", action="store_true", help="Print one JSON object instead of a table.")


def run(args) -> int:
    from ..quality.report import inspect_dataset, text_table

    result = inspect_dataset(
        args.source, split=args.split, limit=args.limit, threshold=args.threshold, folds=args.folds,
        judge=args.judge, reward_model_separability=args.separability == "reward-model", write_card=args.write_card,
        annotations=args.annotations,
    )
    if args.json:
        print(json.dumps(result))
        return 0
    print(text_table({args.source: result}))
    print()
    print("\n".join(result["verdicts"]))
    if args.write_card:
        print(f"wrote the report into {args.source}/README.md ({', '.join(result['images'])})")
    return 0
