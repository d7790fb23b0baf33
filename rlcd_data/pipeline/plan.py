"""Planning a build: its inputs checked and rendered before any model loads, and what an earlier run of
it left in the output folder (a finished dataset, or the engine an interrupted one ran on)."""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from ..errors import RlcdError
from ..generate.models import load_tokenizer
from ..sources.prompts import PromptSet, load_prompts
from ..tasks.catalog import load_task
from ..tasks.chat import ChatRenderer, MessagesRenderer, resolve_format
from ..tasks.task import ContrastPair, Task
from .config import CONFIG_FILENAME, BuildConfig, read_config_file
from .methods import supported
from .results import BuildResult, BuildStats
from .staging import STAGING, STATE_FILE


@dataclass
class Plan:
    """A build's inputs, checked and rendered: everything that can fail on bad input."""

    config: BuildConfig  # its prompt format (and so the default temperature) resolved
    task: Task
    prompt_set: PromptSet
    pairs: list[ContrastPair]
    chat: ChatRenderer | None  # the simulator's chat template, in the chat format


def prepare(config: BuildConfig, tokenizer: Callable[[], object] | None = None) -> Plan:
    """Check the task and prompts and render every contrast pair, before any model is loaded.

    Args:
        tokenizer: returns the simulator's tokenizer (or None), asked only when the chat format
            may apply; default: load the tokenizer of ``config.model``.

    Raises:
        RlcdError: unknown task, bad templates, bad prompt source, a chat format that cannot apply.
    """
    task = load_task(config.task, config.templates)
    if config.method not in supported(task):
        raise RlcdError(
            f"task {task.name!r} does not support --method {config.method} (it has no compare.jinja for the "
            f"A/B labeller; supported: {', '.join(supported(task))})"
        )
    source = config.prompts or task.bundled_prompts
    if source is None:
        raise RlcdError(f"task {task.name!r} has no bundled prompts; pass --prompts")
    prompt_set = load_prompts(
        source, task_input=task.input, column=config.prompt_column, split=config.split, limit=config.limit
    )
    messages = config.server_api == "chat"  # the server applies the template: no tokenizer needed here
    loaded = None
    if config.prompt_format != "text" and task.has_chat and not messages:
        loaded = tokenizer() if tokenizer is not None else load_tokenizer(config.tokenizer or config.model)
    resolved = resolve_format(config.prompt_format, task.has_chat, loaded, task.name, config.model, messages)
    config = config.with_prompt_format(resolved)
    chat = None
    if resolved == "chat":
        chat = MessagesRenderer(config.model) if messages else ChatRenderer(loaded, config.model)
    pairs = []
    for prompt in prompt_set.prompts:
        try:
            pairs.append(task.render_pair(prompt.text, prompt.source_index, config.seed, chat))
        except RlcdError as e:
            if not messages:
                raise
            raise RlcdError(f"{source}: prompt {prompt.source_index} (0-based): {e}") from None
    return Plan(config, task, prompt_set, pairs, chat)


def finished_build(out: Path, config: BuildConfig) -> BuildResult | None:
    """The build already finished in ``out``, if it has one and no interrupted one.

    Raises:
        RlcdError: the finished build's configuration differs from ``config``.
    """
    import pyarrow.parquet as pq

    if (out / STAGING / STATE_FILE).is_file() or not (out / CONFIG_FILENAME).is_file() or not (out / "data").is_dir():
        return None
    saved = read_config_file(out / CONFIG_FILENAME)
    differ = [
        f"{k}: {saved[k]!r} -> {v!r}" for k, v in config.output_fields().items()
        if k in saved and saved[k] != v and not (k == "backend" and v == "auto")  # auto: whichever ran
    ]
    if differ:
        raise RlcdError(f"{out}: holds a finished build with another configuration ({', '.join(differ)}); "
                        "pass --overwrite to replace it")
    splits = {p.name.split("-")[0]: pq.ParquetFile(p).metadata.num_rows for p in sorted((out / "data").glob("*.parquet"))}
    stats = BuildStats(pairs=sum(splits.values()))
    return BuildResult(out, config, stats, splits, model=str(saved.get("model")), complete_before=True)


def interrupted_backend(staging: Path) -> str | None:
    """The engine an interrupted build in ``staging`` recorded, if any."""
    path = staging / STATE_FILE
    backend = json.loads(path.read_text())["config"].get("backend") if path.is_file() else None
    return backend if backend in ("transformers", "vllm", "openai") else None
