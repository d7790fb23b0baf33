"""`rlcd-data build TASK`: simulate a preference dataset.

Options are parsed with transformers' `HfArgumentParser` from `BuildConfig`,
`RunOptions` and `Publish`, like the training recipes, so every option has both
spellings (``--max-new-tokens`` and ``--max_new_tokens``). Values are layered:
defaults < ``--config FILE.yaml`` < command-line flags.
"""

from __future__ import annotations

import argparse
import signal
import sys
from dataclasses import dataclass, field

from ..errors import RlcdError
from ..pipeline.config import BuildConfig, read_config_file
from ..pipeline.run_options import RunOptions
from .push import report

DESCRIPTION = ("Render p+/p- prompts for each source prompt, sample both with a model, and write the pairs as a "
               "Hugging Face dataset folder with its card.")


@dataclass
class Publish:
    push_to_hub: str | None = field(
        default=None, metadata={"help": "Dataset repo on the Hub (NAMESPACE/NAME, created if missing) to push to."}
    )
    private: bool = field(default=False, metadata={"help": "Create the repo as private."})
    token: str | None = field(default=None, metadata={"help": "Hub token (default: $HF_TOKEN, then the saved login)."})


def add_parser(sub) -> None:
    parser = sub.add_parser(
        "build", help="Simulate an RLCD preference dataset into a Hub-ready folder.", description=DESCRIPTION,
        add_help=False, prefix_chars="\0",  # every word after `build`, --help included, goes to `parse`
    )
    parser.add_argument("options", nargs=argparse.REMAINDER, help="TASK and options (see `rlcd-data build --help`).")


class _Help(argparse.ArgumentDefaultsHelpFormatter):
    """Shows a default only where there is one to show."""

    def _get_help_string(self, action):
        return action.help if action.default in (None, False) else super()._get_help_string(action)


def make_parser():
    """The build's option parser (HfArgumentParser); errors are one-line `RlcdError`s."""
    from transformers import HfArgumentParser

    parser = HfArgumentParser((BuildConfig, RunOptions, Publish), prog="rlcd-data build", description=DESCRIPTION,
                              usage="rlcd-data build TASK [options]", formatter_class=_Help)
    parser.add_argument("--config", metavar="FILE.yaml", help="Read options from a YAML file; flags win.")
    parser._option_string_actions["--task"].required = False  # TASK may come first, or from --config

    def one_line_error(message: str):
        raise RlcdError(f"build: {message} (see --help)")

    parser.error = one_line_error
    return parser


def parse(argv: list[str]) -> tuple[BuildConfig, RunOptions, Publish]:
    """Parse ``rlcd-data build`` options; a leading bare word is the task.

    Raises:
        RlcdError: an unknown option, a bad value, an unreadable --config file.
    """
    argv = list(argv)
    if argv and not argv[0].startswith("-"):
        argv[:1] = ["--task", argv[0]]
    parser = make_parser()
    if "--config" in argv[:-1]:
        parser.set_defaults(**read_config_file(argv[argv.index("--config") + 1], BuildConfig))
    config, options, publish, _, unknown = parser.parse_args_into_dataclasses(argv, return_remaining_strings=True)
    if unknown:
        raise RlcdError(f"build: unknown option(s) {' '.join(unknown)} (see --help)")
    return config, options, publish


def _interrupt(signum, frame):
    raise KeyboardInterrupt


def run(args) -> int:
    from ..pipeline.run import build

    config, options, publish = parse(args.options)
    if publish.push_to_hub:
        from ..hub import check_can_push

        check_can_push(publish.token)  # fail before hours of generation, not after
    previous = signal.signal(signal.SIGTERM, _interrupt)  # a scheduler's TERM stops like Ctrl-C
    try:
        result = build(config, options)
    except KeyboardInterrupt:
        print(
            f"rlcd-data: interrupted; completed pairs are kept in {config.output}/.rlcd-build/. "
            f"Continue with the same command plus --resume (without --overwrite).",
            file=sys.stderr,
        )
        return 130
    finally:
        signal.signal(signal.SIGTERM, previous)
    s = result.stats
    if result.complete_before:
        print(f"{result.output}: the dataset is already complete ({s.pairs} pairs); nothing to resume")
        print(f"load it with: {result.load_line()}")
        return 0
    if result.shard is not None:
        index, count = result.shard
        print(
            f"shard {index} of {count}: {s.pairs} pairs in {result.output}/.rlcd-build/ "
            f"({s.examples_dropped} dropped, {s.seconds:.0f} s); when all {count} shards are done: "
            f"rlcd-data merge {result.output}"
        )
        return 0
    print(
        f"wrote {s.pairs} pairs to {result.output} "
        f"({', '.join(f'{k}: {v}' for k, v in result.splits.items())}); "
        f"dropped {s.examples_dropped} after retries, {s.outputs_retried} outputs re-generated, "
        f"{s.prompts_dropped_empty + s.prompts_dropped_duplicate} empty/duplicate prompts skipped; "
        f"{s.seconds:.0f} s, {s.pairs / max(s.seconds, 1e-9):.2f} pairs/s"
    )
    print(f"load it with: {result.load_line()}")
    if publish.push_to_hub:
        from ..hub import push

        report(push(result.output, publish.push_to_hub, private=publish.private, token=publish.token))
    return 0


