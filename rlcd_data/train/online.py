"""What the online recipes (PPO, GRPO) share: the reward they optimise, a reward model or an LLM rater (direct
RLAIF), and the policy with its prompts."""

from __future__ import annotations

from dataclasses import dataclass, field

from ..errors import RlcdError


@dataclass
class OnlineArguments:
    reward_model: str = field(default=None, metadata={"help": "Reward model folder (`rlcd-data train reward`)."})
    reward_llm: str | None = field(
        default=None,
        metadata={"help": "Direct RLAIF instead of --reward_model: this causal LM rates each response 1-10 with the "
                          "task's rate.jinja; the reward is its expected score mapped to [-1, 1] (Lee et al. 2023)."},
    )
    rater_task: str = field(default="harmless", metadata={"help": "--reward_llm: the task whose rate.jinja it reads."})
    rater_quantization: str = field(default="none", metadata={"help": "--reward_llm: none, 8bit or 4bit."})
    rater_prompt_format: str = field(
        default="text", metadata={"help": "--reward_llm: text, chat or auto (chat when the rater has a template)."}
    )
    rater_base_url: str | None = field(
        default=None, metadata={"help": "--reward_llm: rate with the model an OpenAI-compatible server at this URL "
                                        "serves under that name (e.g. http://127.0.0.1:8000/v1)."},
    )
    rater_tokenizer: str | None = field(
        default=None, metadata={"help": "--rater_base_url: the served rater's tokenizer (default: --reward_llm)."}
    )
    rater_api_key_env: str = field(
        default="OPENAI_API_KEY", metadata={"help": "--rater_base_url: the environment variable holding the API key."}
    )
    rater_server_api: str = field(
        default="completions",
        metadata={"help": "--rater_base_url: completions (the rendered rating prompt; needs the tokenizer) or chat "
                          "(the rating question as a user message to the chat completions API, for chat-only "
                          "servers; --rater_prompt_format does not apply).",
                  "choices": ["completions", "chat"]},
    )
    policy: str = field(
        default=None,
        metadata={"help": "Policy to improve: a folder, a Hub id, or `smollm2-135m-instruct` (the embedded model)."},
    )
    prompts: str = field(
        default=None, metadata={"help": "Prompts: any source `rlcd-data build --prompts` accepts."}
    )
    prompt_column: str | None = field(default=None, metadata={"help": "Column with the prompts."})
    prompt_split: str = field(default="train", metadata={"help": "Split of a dataset folder or Hub dataset."})
    limit: int | None = field(default=None, metadata={"help": "Use the first N prompts."})
    penalty_reward: float = field(
        default=-1.0,
        metadata={"help": "Reward for a response that does not end (next Human turn or EOS) or is empty."},
    )
    prompt_format: str = field(
        default="auto",
        metadata={"help": "How rollouts see a prompt: text (Human/Assistant text), chat (the policy's chat "
                          "template), auto (chat when the policy's tokenizer has one). Recorded for `eval policy`."},
    )
    reward_max_length: int = field(default=512, metadata={"help": "Tokens of prompt + response the reward model sees."})


def load_conversations(script: OnlineArguments, recipe: str) -> list[str]:
    """The prompt source's conversations as Human/Assistant text (what the reward scores after), the prompt
    format checked first.

    Raises:
        RlcdError: an unknown ``--prompt_format``; a missing, empty or malformed prompt source (file and line).
    """
    from ..sources.prompts import load_prompts
    from ..tasks.chat import FORMATS

    if script.prompt_format not in FORMATS:
        raise RlcdError(f"train {recipe}: unknown --prompt_format {script.prompt_format!r} "
                        f"(choose from: {', '.join(FORMATS)})")
    prompt_set = load_prompts(script.prompts, task_input="conversation", column=script.prompt_column,
                              split=script.prompt_split, limit=script.limit)
    return [p.text for p in prompt_set.prompts]


def open_reward(script: OnlineArguments, recipe: str):
    """The reward ``recipe`` optimises: the reward model, or the LLM rater of direct RLAIF (``--reward_llm``).

    Raises:
        RlcdError: none or both of them, a folder that is not a one-output classifier, a task without a rater.
    """
    from .reward_model import RewardModel

    if bool(script.reward_model) == bool(script.reward_llm):
        raise RlcdError(f"train {recipe}: give --reward_model or --reward_llm (one of them)")
    if script.reward_model:
        return RewardModel.load(script.reward_model, max_length=script.reward_max_length)
    from ..generate.rater import LLMRewards, open_rater
    from ..tasks.catalog import load_task

    task = load_task(script.rater_task)
    if not task.has_rater:
        raise RlcdError(f"train {recipe}: task {task.name!r} has no rate.jinja; pick another --rater_task")
    rater, chat = open_rater(script.reward_llm, script.rater_quantization, prompt_format=script.rater_prompt_format,
                             base_url=script.rater_base_url, tokenizer=script.rater_tokenizer,
                             api_key_env=script.rater_api_key_env, server_api=script.rater_server_api)
    return LLMRewards(rater, task, chat)


def cut_and_score(scorer, conversations: list[str], texts: list[str], ended: list[bool],
                  penalty: float) -> list[float]:
    """The online recipes' reward of each generated text: cut at the next Human turn (the paper's
    post-processing, `extract_response`) and scored by ``scorer.score_responses`` after the conversation it
    answers; ``penalty`` for a text that did not end (next Human turn or end-of-sequence) or is empty."""
    from ..tasks.conversation import extract_response

    rewards = [float(penalty)] * len(texts)
    rows, asked, responses = [], [], []
    for row, (conversation, text, done) in enumerate(zip(conversations, texts, ended)):
        response = extract_response(text, done)
        if response is not None:
            rows.append(row)
            asked.append(conversation)
            responses.append(response)
    if rows:
        for row, score in zip(rows, scorer.score_responses(asked, responses)):
            rewards[row] = float(score)
    return rewards


def describe_reward(script: OnlineArguments) -> str:
    """The reward as a model card and the metrics name it."""
    if script.reward_model:
        return f"reward model {script.reward_model}"
    return f"LLM rater {script.reward_llm} ({script.rater_task}/rate.jinja, expected 1-10 score in [-1, 1])"
