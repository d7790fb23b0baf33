"""`rlcd-data compare A B ...`: quality reports of several pair datasets side by side."""

from __future__ import annotations

import json

from .inspect import add_report_arguments


def add_parser(sub) -> None:
    parser = sub.add_parser(
        "compare", help="Quality reports of several pair datasets side by side (e.g. rlcd vs rlaif builds)."
    )
    parser.add_argument("sources", nargs="+", metavar="SOURCE", help="Two or more pair datasets.")
    add_report_arguments(parser)
    parser.add_argument("--plot", default="compare.png",
                        help="Where to write the overlay of length differences (default compare.png; '' for none).")
    parser.add_argument("--no-match", action="store_true",
                        help="Keep every pair instead of the prompts (source_index) all datasets share.")


def run(args) -> int:
    from ..quality.report import compare_datasets, text_table

    result = compare_datasets(args.sources, split=args.split, folds=args.folds, judge=args.judge,
                              plot=args.plot or None, match=not args.no_match)
    if args.json:
        print(json.dumps(result))
        return 0
    if result["matched_prompts"] is not None:
        print(f"matched on the {result['matched_prompts']} prompts (source_index) all datasets share\n")
    print(text_table(result["datasets"]))
    for name, report in result["datasets"].items():
        print(f"\n{name}:\n  " + "\n  ".join(report["verdicts"]))
    if args.plot:
        print(f"\nplot: {args.plot}")
    return 0
