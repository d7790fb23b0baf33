"""Sharded builds: shard k of n builds examples k, k + n, ...; `merge` assembles the finished shards."""

from __future__ import annotations

import json
from pathlib import Path

from ..errors import RlcdError
from ..tasks.catalog import load_task
from .config import BuildConfig
from .results import BuildResult, BuildStats
from .staging import DONE_FILE, STAGING, STATE_FILE, read_parts


def merge_when_all_done(out: Path, result: BuildResult) -> BuildResult:
    """Under accelerate launch / torchrun: wait for every rank, then rank 0 merges the shards."""
    from datetime import timedelta

    import torch
    from accelerate import PartialState

    # Shards finish at different times; the rendezvous must outwait the slowest one.
    state = PartialState(cpu=not torch.cuda.is_available(), timeout=timedelta(days=7))
    state.wait_for_everyone()
    if state.is_main_process:
        return merge(out)
    return result


def merge(out: str | Path) -> BuildResult:
    """Assemble the finished shards in ``out`` into the final dataset folder and card.

    Raises:
        RlcdError: no shards, a shard missing or unfinished, or shards built
            with different configurations, templates or prompts.
    """
    from . import output

    out = Path(out)
    dirs = sorted((out / STAGING).glob("shard-*-of-*"))
    if not dirs:
        raise RlcdError(f"{out}: no shards to merge (no {STAGING}/shard-* folders)")
    counts = {int(d.name.rsplit("-", 1)[1]) for d in dirs}
    if len(counts) > 1:
        raise RlcdError(f"{out}: shards of different --num-shards ({', '.join(map(str, sorted(counts)))}) in one folder")
    n = counts.pop()
    records, states = {}, set()
    for d in dirs:
        index = int(d.name.split("-")[1])
        if (d / DONE_FILE).is_file():
            records[index] = json.loads((d / DONE_FILE).read_text())
            states.add((d / STATE_FILE).read_text())
    missing = [i for i in range(n) if i not in records]
    if missing:
        raise RlcdError(
            f"{out}: shard(s) {', '.join(map(str, missing))} of {n} not finished; build them "
            f"(--num-shards {n} --shard-index I, with --resume if started) and merge again"
        )
    if len(states) > 1:
        raise RlcdError(f"{out}: the shards were built with different configurations, templates or prompts")
    rows, dropped = [], []
    for d in dirs:
        parts = read_parts(d)
        rows += parts.rows
        dropped += parts.dropped
    rows.sort(key=lambda r: r["source_index"])
    first = records[0]
    # (shards built before run options were kept apart recorded them too)
    known = BuildConfig.field_names()
    config = BuildConfig(**{**{k: v for k, v in first["config"].items() if k in known}, "output": str(out)})
    shard_stats = [BuildStats(**r["stats"]) for r in records.values()]
    stats = BuildStats(
        prompts_read=shard_stats[0].prompts_read,
        prompts_dropped_empty=shard_stats[0].prompts_dropped_empty,
        prompts_dropped_duplicate=shard_stats[0].prompts_dropped_duplicate,
        prompts_used=sum(s.prompts_used for s in shard_stats),
        pairs=len(rows),
        examples_dropped=len(dropped),
        outputs_retried=sum(s.outputs_retried for s in shard_stats),
        generated_tokens=sum(s.generated_tokens for s in shard_stats),
        seconds=max(s.seconds for s in shard_stats),  # the shards ran side by side
        dropped_source_indices=sorted(dropped),
    )
    if not rows:
        raise RlcdError(f"{out}: no pairs in any shard")
    task = load_task(config.task, config.templates)
    splits = output.write_dataset_folder(out, rows, config=config, task=task, stats=stats, model=first["model"])
    return BuildResult(out, config, stats, splits, first["model"])
