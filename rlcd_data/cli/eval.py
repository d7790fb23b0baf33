"""`rlcd-data eval reward-model|policy`: agreement with labelled pairs; a policy against its base."""

from __future__ import annotations

import json
from pathlib import Path

from ..tasks.chat import FORMATS


def add_parser(sub) -> None:
    parser = sub.add_parser("eval", help="Evaluate a reward model (agreement with labels) or a policy (reward vs its base).")
    kinds = parser.add_subparsers(dest="kind", required=True, metavar="KIND")

    rm = kinds.add_parser("reward-model", help="Agreement with the labels of a pair dataset (e.g. HH-RLHF).")
    rm.add_argument("--reward-model", required=True, metavar="DIR", help="Reward model folder.")
    rm.add_argument("--pairs", required=True, metavar="SOURCE",
                    help="Pair dataset: HH-RLHF .jsonl, a folder `build` wrote, any chosen/rejected dataset.")
    rm.add_argument("--split", default="train", help="Split of a dataset folder or Hub dataset.")
    rm.add_argument("--limit", type=int, help="First N pairs only.")
    rm.add_argument("--batch-size", type=int, default=16)
    rm.add_argument("--max-length", type=int, default=512, help="Longer texts keep their last N tokens.")
    rm.add_argument("--json", action="store_true", help="Print one JSON object instead of a summary.")

    po = kinds.add_parser("policy", help="Rewards of a policy's responses against its base model's.")
    po.add_argument("--policy", required=True, metavar="DIR", help="Policy folder (`rlcd-data train ppo`).")
    po.add_argument("--reward-model", metavar="DIR", help="Reward model folder (with --judge, or alone).")
    po.add_argument("--judge", metavar="MODEL",
                    help="An LLM judge (causal LM folder, Hub id or embedded model) comparing the two responses with "
                         "the task's compare.jinja, in both orders (position-debiased).")
    po.add_argument("--judge-task", default="harmless", help="Task whose compare.jinja the judge reads.")
    po.add_argument("--judge-base-url", help="Judge with the model a server serves as --judge (an OpenAI-compatible "
                                             "API root, e.g. http://127.0.0.1:8000/v1).")
    po.add_argument("--judge-tokenizer", help="With --judge-base-url: the served judge's tokenizer (default: --judge).")
    po.add_argument("--api-key-env", default="OPENAI_API_KEY",
                    help="With --judge-base-url: the environment variable holding the API key.")
    po.add_argument("--judge-server-api", default="completions", choices=("completions", "chat"),
                    help="With --judge-base-url: completions (the rendered comparison; needs the tokenizer) or chat "
                         "(the comparison as a user message to the chat completions API, for chat-only servers "
                         "such as hosted APIs; --judge-prompt-format does not apply).")
    po.add_argument("--judge-quantization", default="none", choices=("none", "8bit", "4bit"))
    po.add_argument("--judge-prompt-format", default="text", choices=FORMATS,
                    help="How the judge sees the comparison (auto: chat when it has a chat template).")
    po.add_argument("--prompts", required=True, metavar="SOURCE", help="Held-out prompts (any `build` source).")
    po.add_argument("--base", help="Base model (default: the one recorded with the policy).")
    po.add_argument("--prompt-column", help="Column with the prompts.")
    po.add_argument("--split", default="train")
    po.add_argument("--limit", type=int, default=64, help="Prompts to sample (default 64).")
    po.add_argument("--max-new-tokens", type=int, default=128)
    po.add_argument("--temperature", type=float, default=1.0)
    po.add_argument("--batch-size", type=int, default=16)
    po.add_argument("--seed", type=int, default=0)
    po.add_argument("--backend", default="auto", choices=("auto", "vllm", "transformers"),
                    help="Engine that samples (auto: vLLM where installed).")
    po.add_argument("--prompt-format", default="auto", choices=FORMATS,
                    help="How both models see a prompt (auto: the format the policy was trained in, else chat "
                         "when its tokenizer has a chat template).")
    po.add_argument("--samples", help="Where to write the samples (JSONL); default: eval-samples.jsonl in the "
                                      "policy's folder (a local policy), else nowhere.")
    po.add_argument("--json", action="store_true", help="Print one JSON object instead of a summary.")


def run(args) -> int:
    if args.kind == "reward-model":
        from ..train.evaluate import evaluate_reward_model
        from ..train.reward_model import RewardModel

        reward_model = RewardModel.load(args.reward_model, max_length=args.max_length, batch_size=args.batch_size)
        report = evaluate_reward_model(reward_model, args.pairs, args.split, args.limit)
        return _report(
            args, args.reward_model, f"eval_{_name(args.pairs)}", report,
            f"{args.reward_model} on {report['pairs']} pairs of {args.pairs}: "
            f"agreement {report['accuracy']:.1%} (chosen scored above rejected), "
            f"mean chosen probability {report['mean_chosen_probability']:.3f}",
        )

    from ..train.evaluate import evaluate_policy

    samples = args.samples or (str(Path(args.policy) / "eval-samples.jsonl") if Path(args.policy).is_dir() else None)
    report = evaluate_policy(
        args.policy, args.reward_model, args.prompts, base=args.base, prompt_column=args.prompt_column,
        split=args.split, limit=args.limit, max_new_tokens=args.max_new_tokens, temperature=args.temperature,
        batch_size=args.batch_size, seed=args.seed, samples_path=samples, backend=args.backend,
        prompt_format=args.prompt_format, judge=args.judge, judge_task=args.judge_task,
        judge_quantization=args.judge_quantization, judge_prompt_format=args.judge_prompt_format,
        judge_server=(args.judge_base_url, args.judge_tokenizer, args.api_key_env, args.judge_server_api)
        if args.judge_base_url else None,
    )
    parts = [f"{report['prompts']} prompts"]
    if args.reward_model:
        parts.append(f"mean reward policy {report['policy_mean_reward']:.3f} vs base {report['base_mean_reward']:.3f}; "
                     f"policy wins {report['policy_win_rate']:.1%} by reward")
    if args.judge:
        parts.append(f"judge {args.judge}: policy wins {report['judge_win_rate']:.1%} "
                     f"[{report['judge_win_rate_ci95_low']:.1%}, {report['judge_win_rate_ci95_high']:.1%}], "
                     f"ties {report['judge_ties']:.1%}")
    parts.append(f"mean length {report['policy_mean_tokens']:.0f} vs {report['base_mean_tokens']:.0f} tokens "
                 f"({report['prompt_format']} format)" + (f"; samples in {samples}" if samples else ""))
    return _report(args, args.policy, f"eval_policy_{_name(args.prompts)}", report, "; ".join(parts))


def _report(args, model_dir: str, prefix: str, report: dict, summary: str) -> int:
    """Record the numbers in the evaluated model's card, then print them (one JSON object with --json)."""
    from ..train.common import record_evaluation

    record_evaluation(model_dir, prefix, report)
    print(json.dumps(report) if args.json else summary)
    return 0


def _name(source: str) -> str:
    """A short name for a data source in metric names (file stem or last path part)."""
    from ..sources.pairs import FILE_SUFFIXES

    name = Path(source).name
    for suffix in FILE_SUFFIXES:
        name = name.removesuffix(suffix)
    return name.replace("-", "_") or "data"
