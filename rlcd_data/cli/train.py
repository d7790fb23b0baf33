"""`rlcd-data train {reward,ppo,grpo,dpo,sft} ...`: the training recipes (options: TRL's names, see --help)."""

from __future__ import annotations

import argparse

RECIPES = {
    "reward": "a reward model on a pair dataset (TRL RewardTrainer; soft labels when present)",
    "ppo": "a policy against a reward model or an LLM rater (TRL PPO, trl <= 1.12)",
    "grpo": "a policy against a reward model or an LLM rater, no value model (TRL GRPO)",
    "dpo": "a policy on a pair dataset directly, no reward model (TRL DPO; soft labels when present)",
    "sft": "supervised fine-tuning on prompt-completion data (context distillation)",
}


def add_parser(sub) -> None:
    parser = sub.add_parser(
        "train",
        help="Train a reward model, a PPO, GRPO or DPO policy, or an SFT model (`rlcd-data train RECIPE --help`).",
        description="\n".join(f"  {k:<7} {v}" for k, v in RECIPES.items()),
        formatter_class=argparse.RawDescriptionHelpFormatter,
        add_help=False,
    )
    parser.add_argument("recipe", choices=RECIPES, help="Which recipe to run.")
    parser.add_argument("args", nargs=argparse.REMAINDER, help="Options of the recipe (see RECIPE --help).")


def run(args) -> int:
    import importlib
    import json

    module = importlib.import_module(f"rlcd_data.train.{args.recipe}")
    result = module.main(args.args)
    for metrics in result if isinstance(result, list) else [result]:
        print(json.dumps(metrics, default=str))
    return 0
