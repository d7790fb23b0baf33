"""SFT recipe for the context-distillation baseline: TRL's SFTTrainer on prompt-completion data.

Reads ``prompt``/``completion`` datasets (what ``rlcd-data build --method
context-distillation`` writes) and also RLCD pair datasets, whose ``chosen``
column holds the p+ outputs: distilling those is the paper's context
distillation. The loss is on the completion only (TRL's default for
prompt-completion data).

    rlcd-data train sft --dataset out/harmless --model smollm2-135m-instruct --output_dir out/sft
"""

from __future__ import annotations

from dataclasses import dataclass, field

from ..errors import RlcdError
from . import common


@dataclass
class SFTScriptArguments(common.ScriptArguments):
    dataset: str = field(
        default=None,
        metadata={"help": "prompt/completion dataset, or a pair dataset (its `chosen` = p+ outputs are used)."},
    )


def make_parser():
    from trl import ModelConfig, SFTConfig, TrlParser

    parser = TrlParser((SFTScriptArguments, SFTConfig, ModelConfig), prog="rlcd-data train sft")
    parser.set_defaults_with_config(output_dir="sft-model", report_to="none")
    common.cpu_defaults(parser)
    return parser


def main(argv: list[str] | None = None) -> dict:
    parser = make_parser()
    (script, config, model_args), preset = common.parse(parser, argv)
    return train(script, config, model_args, argv=argv, preset=preset)


def prompt_completion(table):
    """Prompt-completion rows from a prompt/completion or a pair dataset.

    Raises:
        RlcdError: neither ``completion`` nor ``chosen`` is present, or no ``prompt``.
    """
    from ..tasks.conversation import as_completion

    columns = table.column_names
    if "prompt" not in columns or not ({"completion", "chosen"} & set(columns)):
        raise RlcdError(
            f"not a prompt-completion or pair dataset: need `prompt` and `completion` (or `chosen`); "
            f"columns: {', '.join(columns)}"
        )
    source = "completion" if "completion" in columns else "chosen"

    def convert(row):
        completion = row[source]
        if isinstance(completion, str):
            completion = as_completion(row["prompt"], completion)
        return {"prompt": row["prompt"], "completion": completion}

    return table.map(convert, remove_columns=columns)


def train(script: SFTScriptArguments, config, model_args, argv=None, preset=None) -> dict:
    """Fine-tune and save the model, tokenizer and a model card to ``config.output_dir``."""
    from transformers import AutoTokenizer
    from trl import SFTTrainer, get_peft_config, get_quantization_config

    from ..sources.pairs import load_table

    base, path = common.base_model("sft", script, model_args)
    table = load_table(script.dataset, script.split)
    if script.limit is not None:
        table = table.select(range(min(script.limit, len(table))))
    dataset = prompt_completion(table)
    tokenizer = AutoTokenizer.from_pretrained(path)
    config.model_init_kwargs = {"dtype": model_args.dtype} if model_args.dtype else None
    trainer = SFTTrainer(
        model=path,
        args=config,
        train_dataset=dataset,
        processing_class=tokenizer,
        peft_config=get_peft_config(model_args),
        quantization_config=get_quantization_config(model_args),
    )
    result, seconds = common.run(trainer)
    trainer.save_model(config.output_dir)
    metrics = {
        "examples": len(dataset),
        "steps": result.global_step,
        "seconds_per_step": round(seconds / max(result.global_step, 1), 3),
        "train_loss": round(result.training_loss, 4),
    }
    return common.finish(config.output_dir, recipe="sft", base=base, dataset=script.dataset, metrics=metrics,
                         configs=(script, config, model_args), preset=preset, argv=argv, pipeline_tag="text-generation")

