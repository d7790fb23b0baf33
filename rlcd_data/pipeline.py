"""`rlcd-data build`: prompts -> contrast pairs -> generations -> a Hub-ready dataset folder."""

from __future__ import annotations

import json
import os
import time
from dataclasses import dataclass, field
from pathlib import Path

from .config import BuildConfig
from .conversation import extract_response
from .errors import RlcdError
from .generate import Generator, SamplingSettings
from .prompts import PromptSet, load_prompts
from .tasks import ContrastPair, Task, load_task

STAGING = ".rlcd-build"  # completed pairs land here as the build goes


@dataclass
class BuildStats:
    prompts_read: int = 0
    prompts_dropped_empty: int = 0
    prompts_dropped_duplicate: int = 0
    prompts_used: int = 0
    pairs: int = 0
    examples_dropped: int = 0  # an output still failed after max_retries re-generations
    outputs_retried: int = 0  # re-generations of failed outputs
    generated_tokens: int = 0
    seconds: float = 0.0
    dropped_source_indices: list[int] = field(default_factory=list)


@dataclass
class BuildResult:
    output: Path
    config: BuildConfig
    stats: BuildStats
    splits: dict[str, int]
    model: str

    def load_line(self) -> str:
        return f'datasets.load_dataset("{self.output}")'


def check_output(out: Path, overwrite: bool) -> None:
    if out.exists() and not out.is_dir():
        raise RlcdError(f"{out}: output exists and is not a folder")
    if out.is_dir() and any(out.iterdir()) and not overwrite:
        raise RlcdError(f"{out}: output folder exists and is not empty (pass --overwrite to replace it)")


def prepare(config: BuildConfig) -> tuple[Task, PromptSet, list[ContrastPair]]:
    """Everything that can fail on bad input, done before any model is loaded.

    Raises:
        RlcdError: unknown task, bad templates, bad prompt source.
    """
    task = load_task(config.task, config.templates)
    source = config.prompts or task.bundled_prompts
    if source is None:
        raise RlcdError(f"task {task.name!r} has no bundled prompts; pass --prompts")
    prompt_set = load_prompts(
        source, task_input=task.input, column=config.prompt_column, split=config.split, limit=config.limit
    )
    pairs = [task.render_pair(p.text, p.source_index, config.seed) for p in prompt_set.prompts]
    return task, prompt_set, pairs


def build(config: BuildConfig, generator: Generator | None = None, progress: bool = True) -> BuildResult:
    """Build an RLCD preference dataset into ``config.output``.

    Args:
        config: what to build.
        generator: the model to sample from; default: load ``config.model``.
        progress: show a progress bar on stderr.

    Returns:
        BuildResult with the output folder, counts and split sizes.

    Raises:
        RlcdError: bad input (before any model is loaded) or an unavailable model.
        KeyboardInterrupt: pairs completed so far stay in ``OUTPUT/.rlcd-build/``.
    """
    from . import output

    started = time.monotonic()
    check_output(Path(config.output), config.overwrite)
    task, prompt_set, pairs = prepare(config)
    if generator is None:
        from .generate import TransformersGenerator
        from .models import load_causal_lm

        model, tokenizer, source = load_causal_lm(config.model, config.quantization, config.dtype)
        generator = TransformersGenerator(model, tokenizer, config.batch_size, source.description)

    stats = BuildStats(
        prompts_read=prompt_set.read,
        prompts_dropped_empty=prompt_set.dropped_empty,
        prompts_dropped_duplicate=prompt_set.dropped_duplicate,
        prompts_used=len(pairs),
    )
    out = Path(config.output)
    staging = out / STAGING
    staging.mkdir(parents=True, exist_ok=True)
    rows = _generate_rows(pairs, generator, config, stats, staging, progress)
    stats.seconds = time.monotonic() - started
    splits = output.write_dataset_folder(out, rows, config=config, task=task, stats=stats, model=generator.description)
    return BuildResult(out, config, stats, splits, generator.description)


def _generate_rows(
    pairs: list[ContrastPair],
    generator: Generator,
    config: BuildConfig,
    stats: BuildStats,
    staging: Path,
    progress: bool,
) -> list[dict]:
    from tqdm.auto import tqdm

    settings = SamplingSettings(config.max_new_tokens, config.temperature)
    # A chunk is a few batches of pairs: long enough to sort by length, short enough to checkpoint often.
    chunk = max(1, 2 * config.batch_size)
    rows: list[dict] = []
    bar = tqdm(total=len(pairs), unit="pair", disable=not progress, dynamic_ncols=True, desc=f"rlcd {config.task}")
    clock = time.monotonic()

    def on_batch(sequences: int, tokens: int) -> None:
        stats.generated_tokens += tokens
        elapsed = max(time.monotonic() - clock, 1e-9)
        bar.set_postfix_str(f"{stats.generated_tokens / elapsed:.0f} tok/s, {stats.outputs_retried} retried")

    try:
        for start in range(0, len(pairs), chunk):
            part = pairs[start : start + chunk]
            new_rows = _generate_chunk(part, generator, settings, config, stats, start, on_batch)
            _write_part(staging / f"part-{start // chunk:06d}.jsonl", new_rows)
            rows.extend(new_rows)
            bar.update(len(part))
    finally:
        bar.close()
    return rows


def _generate_chunk(part, generator, settings, config, stats, chunk_start, on_batch) -> list[dict]:
    """Generate p+ and p- for each pair, re-generating failed outputs up to max_retries times."""
    responses: dict[tuple[int, str], str] = {}
    pending = [(i, side) for i in range(len(part)) for side in ("chosen", "rejected")]
    for attempt in range(1 + config.max_retries):
        if not pending:
            break
        if attempt:
            stats.outputs_retried += len(pending)
        texts = [part[i].p_plus if side == "chosen" else part[i].p_minus for i, side in pending]
        completions = generator.generate(texts, settings, seed=hash((config.seed, chunk_start, attempt)), on_batch=on_batch)
        failed = []
        for key, completion in zip(pending, completions):
            response = extract_response(completion.text, completion.ended)
            if response is None:
                failed.append(key)
            else:
                responses[key] = response
        pending = failed
    rows = []
    for i, pair in enumerate(part):
        if (i, "chosen") in responses and (i, "rejected") in responses:
            chosen, rejected = responses[i, "chosen"], responses[i, "rejected"]
            rows.append(
                {
                    "prompt": pair.prompt,
                    "chosen": chosen,
                    "rejected": rejected,
                    "p_plus": pair.p_plus,
                    "p_minus": pair.p_minus,
                    "descriptor_index": pair.descriptor_index,
                    "positive_descriptor": pair.descriptors.positive,
                    "negative_descriptor": pair.descriptors.negative,
                    "source_index": pair.source_index,
                    "chosen_tokens": generator.count_tokens(chosen),
                    "rejected_tokens": generator.count_tokens(rejected),
                }
            )
        else:
            stats.examples_dropped += 1
            stats.dropped_source_indices.append(pair.source_index)
    stats.pairs += len(rows)
    return rows


def _write_part(path: Path, rows: list[dict]) -> None:
    """Write completed rows atomically: a killed process leaves either the whole file or none."""
    tmp = path.with_suffix(".tmp")
    with open(tmp, "w", encoding="utf-8") as f:
        for row in rows:
            f.write(json.dumps(row, ensure_ascii=False) + "\n")
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
