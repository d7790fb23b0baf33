"""Reward-model recipe: TRL's RewardTrainer on any pair dataset, with soft labels when present.

Hard labels (RLCD: chosen/rejected by construction, or human labels) train
with the usual pairwise loss ``-log sigmoid(r_chosen - r_rejected)``. A dataset
with a ``chosen_probability`` column (RLAIF's labeller probability) trains with
binary cross-entropy against that probability, as the paper does for RLAIF:
``-(p log sigmoid(d) + (1 - p) log sigmoid(-d))`` with ``d = r_chosen - r_rejected``.
The base may be a decoder (score read at the last token) or an encoder such as
BERT/MiniLM (score read from the pooled first token); encoders without an EOS
token end each text with ``[SEP]``.

    rlcd-data train reward --dataset out/harmless --model minilm-l6 --output_dir out/rm
"""

from __future__ import annotations

import functools
from dataclasses import dataclass, field

from ..sources.pairs import SOFT_LABEL_COLUMN
from . import common
from .soft_labels import SoftLabelColumn, pair_dataset, soft_label_collator


@dataclass
class RewardScriptArguments(common.ScriptArguments):
    soft_label_column: str = field(
        default=SOFT_LABEL_COLUMN,
        metadata={"help": "Column with the probability that `chosen` is better; if present, train with BCE on it."},
    )
    hard_labels: bool = field(
        default=False, metadata={"help": "Ignore the soft-label column and use the pairwise loss."}
    )
    eval_pairs: str | None = field(
        default=None,
        metadata={"help": "Pairs to measure agreement on after training (e.g. HH-RLHF validation); goes in the card."},
    )
    eval_split: str = field(default="train", metadata={"help": "Split of --eval_pairs."})
    eval_limit: int | None = field(default=None, metadata={"help": "Evaluate on the first N pairs of --eval_pairs."})


@functools.cache
def soft_label_classes():
    """(SoftLabelRewardTrainer, SoftLabelCollator), defined on first use so importing this module stays light."""
    import torch
    from trl import RewardTrainer
    from trl.trainer.reward_trainer import DataCollatorForPreference

    class SoftLabelRewardTrainer(SoftLabelColumn, RewardTrainer):
        """RewardTrainer with binary cross-entropy on soft labels when the batch carries them.

        TRL's logging (accuracy, margin, rewards) is kept: the parent computes
        it on the same forward pass; only the loss is replaced.
        """

        def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
            probability = inputs.pop(self.soft_label_column, None)
            loss, outputs = super().compute_loss(model, inputs, return_outputs=True)
            if probability is not None:
                chosen, rejected = torch.chunk(outputs.logits.squeeze(-1), chunks=2)
                loss = soft_label_loss(chosen, rejected, probability.to(chosen.dtype))
                if self.args.center_rewards_coefficient is not None:
                    loss = loss + self.args.center_rewards_coefficient * torch.mean((chosen + rejected) ** 2)
            return (loss, outputs) if return_outputs else loss

    return SoftLabelRewardTrainer, soft_label_collator(DataCollatorForPreference)


def soft_label_loss(chosen, rejected, probability):
    """Mean binary cross-entropy of ``sigmoid(chosen - rejected)`` against ``probability``."""
    from torch.nn import functional as F

    return F.binary_cross_entropy_with_logits(chosen - rejected, probability)


def make_parser():
    from trl import ModelConfig, RewardConfig, TrlParser

    parser = TrlParser((RewardScriptArguments, RewardConfig, ModelConfig), prog="rlcd-data train reward")
    parser.set_defaults_with_config(lora_task_type="SEQ_CLS", output_dir="reward-model", report_to="none")
    common.cpu_defaults(parser)
    return parser


def main(argv: list[str] | None = None) -> dict:
    """Parse options (see `make_parser`) and train; returns the metrics written to the card."""
    parser = make_parser()
    (script, training, model_args), preset = common.parse(parser, argv, default_preset="reward-paper")
    return train(script, training, model_args, argv=argv, preset=preset)


def train(script: RewardScriptArguments, training, model_args, argv=None, preset=None) -> dict:
    """Train a reward model and save it, with its tokenizer and a model card, to ``training.output_dir``.

    Returns:
        metrics: final training loss and accuracy, steps, seconds per step, and
        the agreement on ``script.eval_pairs`` when given.

    Raises:
        RlcdError: missing dataset or model, not a pair dataset.
    """
    from trl import get_peft_config

    base, path = common.base_model("reward", script, model_args)
    dataset, soft = pair_dataset(script)
    tokenizer = common.load_tokenizer(base, path)
    if tokenizer.eos_token is None:  # encoders: end every text with [SEP], as the eval does
        from .reward_model import end_token

        training.eos_token = end_token(tokenizer)
    training.model_init_kwargs = {"dtype": model_args.dtype} if model_args.dtype else None
    quantization = common.quantization_config(model_args)

    trainer_cls, collator_cls = soft_label_classes()
    common.pad_with(tokenizer, tokenizer.eos_token or training.eos_token)
    trainer = trainer_cls(
        model=path,
        args=training,
        train_dataset=dataset,
        processing_class=tokenizer,
        data_collator=collator_cls(pad_token_id=tokenizer.pad_token_id, soft_label_column=script.soft_label_column),
        quantization_config=quantization,
        peft_config=get_peft_config(model_args),
        soft_label_column=script.soft_label_column,
    )
    if quantization is not None and training.use_cpu:
        common.trainable_in_float32(trainer)
    dropped = len(dataset) - len(trainer.train_dataset)
    result, seconds = common.run(trainer)
    model = common.save_trained(trainer, tokenizer, training.output_dir, quantized=quantization is not None)

    history = [h for h in trainer.state.log_history if "loss" in h]
    metrics = {
        "pairs": len(trainer.train_dataset),
        "pairs_over_max_length": dropped,
        "label_type": "soft (BCE on chosen_probability)" if soft else "hard (pairwise)",
        "steps": result.global_step,
        "seconds_per_step": round(seconds / max(result.global_step, 1), 3),
        "train_loss": round(result.training_loss, 4),
    }
    if history and "accuracy" in history[-1]:
        metrics["train_accuracy_last_log"] = round(history[-1]["accuracy"], 4)
    if script.eval_pairs:
        from .evaluate import evaluate_reward_model
        from .reward_model import RewardModel

        reward_model = RewardModel(model, tokenizer, max_length=training.max_length or 512)
        report = evaluate_reward_model(reward_model, script.eval_pairs, script.eval_split, script.eval_limit)
        metrics.update({f"eval_{k}": v for k, v in report.items()})
    return common.finish(training.output_dir, recipe="reward", base=base, dataset=script.dataset, metrics=metrics,
                         configs=(script, training, model_args), preset=preset, argv=argv,
                         pipeline_tag="text-classification")
