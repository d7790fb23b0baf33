"""`rlcd-data preview TASK`: print rendered prompts without loading a model."""

from __future__ import annotations

from ..config import BuildConfig
from ._dataclass_args import config_from_args


def add_parser(sub) -> None:
    parser = sub.add_parser("preview", help="Print rendered p+/p- prompts for a few prompts (no model).")
    parser.add_argument("task", metavar="TASK")
    parser.add_argument("--prompts", help="Prompt source (default: the task's bundled prompts).")
    parser.add_argument("--prompt-column", help="Column holding the prompt.")
    parser.add_argument("--split", default="train", help="Split of a datasets folder or Hub dataset.")
    parser.add_argument("--templates", help="Folder of user task folders.")
    parser.add_argument("--seed", type=int, default=0, help="Seed for the descriptor draws.")
    parser.add_argument("-n", "--limit", type=int, default=3, help="How many prompts (default: 3).")


def run(args) -> int:
    from ..pipeline import prepare

    config = config_from_args(args, BuildConfig)
    _, _, pairs = prepare(config)
    for pair in pairs:
        print(f"=== source {pair.source_index}, descriptor pair {pair.descriptor_index}")
        print(f"--- p+ ({pair.descriptors.positive})\n{pair.p_plus}")
        print(f"--- p- ({pair.descriptors.negative})\n{pair.p_minus}")
    return 0
