"""`rlcd-data build TASK`: simulate a preference dataset."""

from __future__ import annotations

import signal
import sys

from ..config import BuildConfig
from ._dataclass_args import add_dataclass_arguments, config_from_args
from .push import add_push_arguments, report


def add_parser(sub) -> None:
    parser = sub.add_parser(
        "build",
        help="Simulate an RLCD preference dataset into a Hub-ready folder.",
        description="Render p+/p- prompts for each source prompt, sample both with a model, "
        "and write the pairs as a Hugging Face dataset folder with its card.",
    )
    add_dataclass_arguments(parser, BuildConfig, positional=("task",))
    hub = parser.add_argument_group("publishing")
    add_push_arguments(hub, repo_flag="--push-to-hub", required=False)


def _interrupt(signum, frame):
    raise KeyboardInterrupt


def run(args) -> int:
    from ..pipeline import build

    config = config_from_args(args, BuildConfig)
    if args.repo_id:
        from ..hub import check_can_push

        check_can_push(args.token)  # fail before hours of generation, not after
    previous = signal.signal(signal.SIGTERM, _interrupt)  # a scheduler's TERM stops like Ctrl-C
    try:
        result = build(config)
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
    if args.repo_id:
        from ..hub import push

        report(push(result.output, args.repo_id, private=args.private, token=args.token))
    return 0
