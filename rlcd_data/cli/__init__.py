"""The `rlcd-data` command line: argument parsing only; the library does the work."""

from __future__ import annotations

import argparse
import sys

from ..errors import RlcdError
from . import build, compare, inspect, ls, merge, preview, push, train
from . import eval as eval_

COMMANDS = {
    "build": build, "push": push, "preview": preview, "ls": ls, "merge": merge, "train": train, "eval": eval_,
    "inspect": inspect, "compare": compare,
}


class Parser(argparse.ArgumentParser):
    """argparse, with its errors on one line (no usage dump); `--help` shows the usage."""

    def error(self, message):
        self.exit(2, f"{self.prog}: error: {message} (see --help)\n")


def make_parser() -> argparse.ArgumentParser:
    parser = Parser(
        prog="rlcd-data", description="Simulate RLCD preference datasets with a language model."
    )
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for name, module in COMMANDS.items():
        module.add_parser(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    """Run the CLI; returns the exit status (2 for bad input, 130 when interrupted)."""
    from ..models import drop_optional_kernel_notice

    drop_optional_kernel_notice()
    try:
        args = make_parser().parse_args(argv)
    except SystemExit as e:  # --help (0) or a bad flag (2), already printed
        return e.code if isinstance(e.code, int) else 2
    try:
        return COMMANDS[args.command].run(args) or 0
    except RlcdError as e:
        print(f"rlcd-data: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("rlcd-data: interrupted", file=sys.stderr)
        return 130


def entry() -> None:
    sys.exit(main())
