"""The `rlcd-data` command line: argument parsing only; the library does the work."""

from __future__ import annotations

import argparse
import sys

from ..errors import RlcdError
from . import build, compare, inspect, ls, merge, preview, push, score, train, view
from . import eval as eval_

COMMANDS = {
    "build": build, "push": push, "preview": preview, "ls": ls, "merge": merge, "train": train, "eval": eval_,
    "inspect": inspect, "compare": compare, "score": score, "view": view,
}


class Parser(argparse.ArgumentParser):
    """argparse, with its errors on one line (no usage dump); `--help` shows the usage. Every long option
    takes both spellings, ``--prompt-format`` and ``--prompt_format``, as the build and the recipes do."""

    def add_argument(self, *names, **kwargs):
        both = [n for name in names for n in dict.fromkeys((name, "--" + name[2:].replace("-", "_")))
                if name.startswith("--")]
        return super().add_argument(*[n for n in names if not n.startswith("--")], *both, **kwargs)

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
    from ..generate.models import drop_optional_kernel_notice

    drop_optional_kernel_notice()
    try:
        args = make_parser().parse_args(argv)
    except SystemExit as e:  # --help (0) or a bad flag (2), already printed
        return e.code if isinstance(e.code, int) else 2
    try:
        return COMMANDS[args.command].run(args) or 0
    except SystemExit as e:  # a command's own parser: --help (0)
        return e.code if isinstance(e.code, int) else 2
    except RlcdError as e:
        print(f"rlcd-data: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("rlcd-data: interrupted", file=sys.stderr)
        return 130


def entry() -> None:
    sys.exit(main())
