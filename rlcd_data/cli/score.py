"""`rlcd-data score --llm MODEL --pairs FILE`: rate both responses of labelled pairs with a language model.

Checks a rating prompt (the task's rate.jinja) against human labels before PPO time is spent on it
(`train ppo --reward_llm`).
"""

from __future__ import annotations

import json

from ..tasks.chat import FORMATS


def add_parser(sub) -> None:
    parser = sub.add_parser(
        "score", help="Rate the chosen and rejected responses of a pair dataset with an LLM (direct RLAIF)."
    )
    parser.add_argument("--llm", required=True, metavar="MODEL",
                        help="The rater: a causal LM folder, a Hub id or an embedded model (smollm2-135m-instruct).")
    parser.add_argument("--pairs", required=True, metavar="SOURCE",
                        help="Pair dataset: HH-RLHF .jsonl, a folder `build` wrote, any chosen/rejected dataset.")
    parser.add_argument("--task", default="harmless", help="Task whose rate.jinja asks for the rating.")
    parser.add_argument("--templates", help="Folder of user task folders.")
    parser.add_argument("--split", default="train", help="Split of a dataset folder or Hub dataset.")
    parser.add_argument("--limit", type=int, help="First N pairs only.")
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--quantization", default="none", choices=("none", "8bit", "4bit"))
    parser.add_argument("--prompt-format", default="text", choices=FORMATS,
                        help="text (the rating prompt as it is) or chat (as a user message, through the model's "
                             "chat template); auto: chat when the model has a template.")
    parser.add_argument("--base-url", help="Rate with the model a server serves as --llm (an OpenAI-compatible API "
                                           "root, e.g. http://127.0.0.1:8000/v1).")
    parser.add_argument("--tokenizer", help="With --base-url: the served model's tokenizer (default: --llm).")
    parser.add_argument("--api-key-env", default="OPENAI_API_KEY",
                        help="With --base-url: the environment variable holding the API key.")
    parser.add_argument("--server-api", default="completions", choices=("completions", "chat"),
                        help="With --base-url: completions (the rendered prompt string; needs the tokenizer) or chat "
                             "(the rating question as a user message to the chat completions API, for chat-only "
                             "servers; --prompt-format does not apply).")
    parser.add_argument("--json", action="store_true", help="Print one JSON object instead of a summary.")


def run(args) -> int:
    from ..generate.rater import open_rater, rate_pairs
    from ..sources.pairs import load_pairs
    from ..tasks.catalog import load_task

    task = load_task(args.task, args.templates)
    if not task.has_rater:
        from ..errors import RlcdError

        raise RlcdError(f"task {task.name!r} has no rate.jinja: it cannot rate responses")
    pairs = load_pairs(args.pairs, args.split, args.limit)
    rater, chat = open_rater(args.llm, args.quantization, batch_size=args.batch_size, prompt_format=args.prompt_format,
                             base_url=args.base_url, tokenizer=args.tokenizer, api_key_env=args.api_key_env,
                             server_api=args.server_api)
    report = {**rate_pairs(rater, task, pairs, chat, progress=True),
              "llm": args.llm, "prompt_format": "chat" if chat else "text"}
    if args.base_url:
        from ..generate.server import public_url

        report.update(server=public_url(args.base_url), server_api=args.server_api,
                      missing_labels=rater.missing_labels)
        rater.server.close()
    print(json.dumps(report) if args.json else
          f"{args.llm} rated {report['pairs']} pairs of {args.pairs}: agreement {report['agreement']:.1%} (chosen "
          f"rated higher), mean score chosen {report['mean_score_chosen']:.2f} vs rejected "
          f"{report['mean_score_rejected']:.2f}; {report['seconds_per_pair']:.2f} s per pair")
    return 0
