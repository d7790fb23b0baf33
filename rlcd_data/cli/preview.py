"""`rlcd-data preview TASK`: print rendered prompts, exactly as the model sees them, without loading a model."""

from __future__ import annotations

import dataclasses

from ..pipeline.config import DEFAULT_MODEL, PROMPT_FORMATS, BuildConfig


def add_parser(sub) -> None:
    parser = sub.add_parser("preview", help="Print rendered p+/p- prompts for a few prompts (no model).")
    parser.add_argument("task", metavar="TASK")
    parser.add_argument("--prompts", help="Prompt source (default: the task's bundled prompts).")
    parser.add_argument("--prompt-column", help="Column holding the prompt.")
    parser.add_argument("--split", default="train", help="Split of a datasets folder or Hub dataset.")
    parser.add_argument("--templates", help="Folder of user task folders.")
    parser.add_argument("--seed", type=int, default=0, help="Seed for the descriptor draws.")
    parser.add_argument("-n", "--limit", type=int, default=3, help="How many prompts (default: 3).")
    parser.add_argument("--model", default=DEFAULT_MODEL, help="Simulator (its tokenizer renders the chat format).")
    parser.add_argument("--prompt-format", choices=PROMPT_FORMATS, default="auto",
                        help="text, chat or auto (chat when the task and the model's tokenizer have one).")


def run(args) -> int:
    from ..pipeline.plan import prepare

    names = {f.name for f in dataclasses.fields(BuildConfig)}
    config = BuildConfig(**{k: v for k, v in vars(args).items() if k in names})
    plan = prepare(config)
    print(f"# prompt format: {plan.config.prompt_format}, temperature {plan.config.temperature}")
    for pair in plan.pairs:
        print(f"=== source {pair.source_index}, descriptor pair {pair.descriptor_index}")
        print(f"--- p+ ({pair.descriptors.positive})\n{pair.p_plus}")
        print(f"--- p- ({pair.descriptors.negative})\n{pair.p_minus}")
    return 0
