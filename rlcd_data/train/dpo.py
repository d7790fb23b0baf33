"""DPO recipe: TRL's DPOTrainer on any pair dataset, with soft labels when present.

DPO (Rafailov et al., 2023) trains the policy on the pairs directly: no reward
model, no rollouts. Hard labels (RLCD: chosen/rejected by construction, or
human labels) train with TRL's sigmoid loss ``-log sigmoid(beta h)``, where
``h = (log pi(c) - log ref(c)) - (log pi(r) - log ref(r))``.

Soft labels (RLAIF's ``chosen_probability`` p, the labeller's P(chosen is
better)) train with conservative DPO (Mitchell, 2023) at a per-pair label
smoothing of ``1 - p``, the DPO form of the reward recipe's binary
cross-entropy::

    loss = -(p log sigmoid(beta h) + (1 - p) log sigmoid(-beta h))
         = -log sigmoid(beta h) + (1 - p) beta h

A pair at p = 1 is a hard pair; at p = 0.5 the loss is the same with chosen
and rejected swapped and its gradient is zero at h = 0: it prefers neither
response. ``--hard_labels`` ignores the column.

    rlcd-data train dpo --dataset out/harmless --model smollm2-135m-instruct --output_dir out/dpo
"""

from __future__ import annotations

import functools
from dataclasses import dataclass, field

from ..errors import RlcdError
from ..sources.pairs import SOFT_LABEL_COLUMN
from . import common
from .soft_labels import SoftLabelColumn, pair_dataset, soft_label_collator


@dataclass
class DPOScriptArguments(common.ScriptArguments):
    soft_label_column: str = field(
        default=SOFT_LABEL_COLUMN,
        metadata={"help": "Column with the probability that `chosen` is better; if present, train with "
                          "conservative DPO at label smoothing 1 - p (see the module docstring)."},
    )
    hard_labels: bool = field(default=False, metadata={"help": "Ignore the soft-label column: plain DPO."})


@functools.cache
def soft_label_classes():
    """(SoftLabelDPOTrainer, SoftLabelCollator), defined on first use so importing this module stays light."""
    from trl import DPOTrainer
    from trl.trainer.dpo_trainer import DataCollatorForPreference
    from trl.trainer.utils import selective_log_softmax

    class SoftLabelDPOTrainer(SoftLabelColumn, DPOTrainer):
        """DPOTrainer whose loss adds ``(1 - p) beta h`` per pair when the batch carries soft labels.

        TRL computes the sigmoid loss and its logging on the same forward pass; the
        reference log-probabilities are precomputed, so ``h`` needs the policy's only.
        """

        def compute_ref_log_probs(self, model, inputs):
            return super().compute_ref_log_probs(model, _without(inputs, self.soft_label_column))

        def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
            probability = inputs.get(self.soft_label_column)
            inputs = _without(inputs, self.soft_label_column)
            loss, outputs = super().compute_loss(model, inputs, return_outputs=True)
            if probability is not None:
                logps = sequence_logps(model, outputs, inputs)
                chosen, rejected = logps.chunk(2, dim=0)
                h = (chosen - inputs["ref_chosen_logps"]) - (rejected - inputs["ref_rejected_logps"])
                loss = loss + ((1 - probability.to(h.dtype)) * self.beta * h).mean()
            return (loss, outputs) if return_outputs else loss

    def sequence_logps(model, outputs, inputs):
        """Summed log-probabilities of each sequence's completion tokens, as TRL's DPO computes them, from the
        logits of its forward pass. trl >= 1.13 projects through a fused head whose logits carry no gradient:
        then the policy runs once more for them."""
        import torch

        logits = outputs.logits
        if torch.is_grad_enabled() and not logits.requires_grad:
            logits = model(input_ids=inputs["input_ids"], attention_mask=inputs["attention_mask"], use_cache=False).logits
        per_token = selective_log_softmax(logits[..., :-1, :], inputs["input_ids"][..., 1:])
        return (per_token * inputs["completion_mask"][..., 1:]).sum(dim=1)

    return SoftLabelDPOTrainer, soft_label_collator(DataCollatorForPreference)


def _without(inputs: dict, key: str) -> dict:
    return {k: v for k, v in inputs.items() if k != key}


def make_parser():
    from trl import DPOConfig, ModelConfig, TrlParser

    parser = TrlParser((DPOScriptArguments, DPOConfig, ModelConfig), prog="rlcd-data train dpo")
    parser.set_defaults_with_config(output_dir="dpo-policy", report_to="none")
    common.cpu_defaults(parser)
    return parser


def default_preset() -> str:
    import torch

    return "dpo-paper" if torch.cuda.is_available() else "dpo-cpu"


def main(argv: list[str] | None = None) -> dict:
    """Parse options (see `make_parser`) and train; returns the metrics written to the card."""
    parser = make_parser()
    (script, config, model_args), preset = common.parse(parser, argv, default_preset=default_preset())
    return train(script, config, model_args, argv=argv, preset=preset)


def check_soft_labels(dataset, column: str) -> None:
    """Raises a one-line `RlcdError` unless every value of ``column`` is a probability."""
    import math

    bad = next(((i, p) for i, p in enumerate(dataset[column])
                if p is None or not isinstance(p, (int, float)) or math.isnan(p) or not 0 <= p <= 1), None)
    if bad is not None:
        raise RlcdError(f"train dpo: {column} of row {bad[0]} is {bad[1]!r}, not a probability in [0, 1] "
                        f"(or pass --hard_labels)")


def make_trainer(script: DPOScriptArguments, config, model_args):
    """The DPO trainer for these options, its dataset tokenized (and reference log-probabilities computed for
    soft labels); returns (trainer, tokenizer, base as given, soft labels used, conversational data).

    Raises:
        RlcdError: missing dataset or model, not a pair dataset, soft labels out of [0, 1], soft labels with
            a loss other than TRL's sigmoid.
    """
    from trl import get_peft_config

    base, path = common.base_model("dpo", script, model_args)
    dataset, soft = pair_dataset(script, check_soft_labels)
    if soft:
        if list(config.loss_type) != ["sigmoid"] or config.f_divergence_type != "reverse_kl" or config.ld_alpha:
            raise RlcdError("train dpo: soft labels train with the sigmoid loss of standard DPO only; "
                            "pass --hard_labels to use another --loss_type")
        config.precompute_ref_log_probs = True  # the soft term reads the reference log-probabilities
    conversational = isinstance(dataset[0]["chosen"], list)
    tokenizer = common.pad_with(common.load_tokenizer(base, path))
    config.model_init_kwargs = {"dtype": model_args.dtype} if model_args.dtype else None
    quantization = common.quantization_config(model_args)
    trainer_cls, collator_cls = soft_label_classes()
    trainer = trainer_cls(
        model=path,
        args=config,
        train_dataset=dataset,
        processing_class=tokenizer,
        data_collator=collator_cls(pad_token_id=tokenizer.pad_token_id, max_length=config.max_length,
                                   truncation_mode=config.truncation_mode, soft_label_column=script.soft_label_column),
        peft_config=get_peft_config(model_args),
        quantization_config=quantization,
        soft_label_column=script.soft_label_column,
    )
    if quantization is not None and config.use_cpu:
        common.trainable_in_float32(trainer)
    return trainer, tokenizer, base, soft, conversational


def train(script: DPOScriptArguments, config, model_args, argv=None, preset=None) -> dict:
    """Train a policy with DPO and save it, with its tokenizer and a model card, to ``config.output_dir``.

    Returns:
        metrics: pairs, label type, steps, seconds per step, final loss and reward accuracy.

    Raises:
        RlcdError: as `make_trainer`.
    """
    trainer, tokenizer, base, soft, conversational = make_trainer(script, config, model_args)
    result, seconds = common.run(trainer)
    common.save_trained(trainer, tokenizer, config.output_dir,
                        quantized=bool(model_args.load_in_8bit or model_args.load_in_4bit))

    history = [h for h in trainer.state.log_history if "loss" in h]
    metrics = {
        "pairs": len(trainer.train_dataset),
        "label_type": "soft (conservative DPO at smoothing 1 - chosen_probability)" if soft else "hard (DPO)",
        "beta": config.beta,
        "steps": result.global_step,
        "seconds_per_step": round(seconds / max(result.global_step, 1), 3),
        "train_loss": round(result.training_loss, 4),
    }
    if history:
        metrics["loss_first_log"] = round(history[0]["loss"], 4)
        metrics["loss_last_log"] = round(history[-1]["loss"], 4)
        if "rewards/accuracies" in history[-1]:
            metrics["reward_accuracy_last_log"] = round(history[-1]["rewards/accuracies"], 4)
    # `eval policy` samples the policy in the format its training prompts had.
    return common.finish(config.output_dir, recipe="dpo", base=base, dataset=script.dataset, metrics=metrics,
                         configs=(script, config, model_args), preset=preset, argv=argv,
                         pipeline_tag="text-generation", settings={"prompt_format": "chat" if conversational else "text"})
