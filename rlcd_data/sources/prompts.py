"""Prompt sources: HH-RLHF files, plain JSONL/Parquet/CSV, `datasets` folders, Hub datasets.

Every source yields texts with their position in the source; `load_prompts`
normalises them for the task, drops empty and duplicate prompts (counting
them) and applies ``limit``.
"""

from __future__ import annotations

import gzip
import json
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from ..errors import RlcdError
from ..tasks.conversation import parse_prompt, to_prompt

DEFAULT_COLUMNS = ("chosen", "prompt")


@dataclass(frozen=True)
class SourcePrompt:
    source_index: int  # position in the source (0-based), recorded in the output
    text: str  # normalised prompt (conversation ending with the Assistant tag, or a premise)


@dataclass
class PromptSet:
    prompts: list[SourcePrompt]
    source: str
    column: str
    read: int = 0
    dropped_empty: int = 0
    dropped_duplicate: int = 0


def load_prompts(
    source: str | Path,
    *,
    task_input: str,
    column: str | None = None,
    split: str = "train",
    limit: int | None = None,
) -> PromptSet:
    """Read, normalise and de-duplicate prompts.

    Args:
        source: a file, a local `datasets` folder, or a Hub dataset name.
        task_input: ``conversation`` (texts become prompts ending with
            ``\\n\\nAssistant:``) or ``premise`` (texts are used as they are).
        column: the column to read; default ``chosen`` if present, else ``prompt``.
        split: split of a `datasets` folder or Hub dataset.
        limit: keep the first ``limit`` usable prompts.

    Raises:
        RlcdError: missing or empty file, malformed line (with file:line),
            unknown column, unreadable dataset.
    """
    rows, column = _open_source(str(source), column, split)
    result = PromptSet(prompts=[], source=str(source), column=column)
    seen: set[str] = set()
    for index, (where, value) in enumerate(rows):
        result.read += 1
        text = _normalise(value, task_input, where)
        if text is None:
            result.dropped_empty += 1
            continue
        if text in seen:
            result.dropped_duplicate += 1
            continue
        seen.add(text)
        result.prompts.append(SourcePrompt(index, text))
        if limit is not None and len(result.prompts) >= limit:
            break
    if result.read == 0:
        raise RlcdError(f"{source}: no prompts (the source is empty)")
    if not result.prompts:
        raise RlcdError(f"{source}: all {result.read} prompts are empty")
    return result


def _normalise(value, task_input: str, where: str) -> str | None:
    if value is None:
        return None
    if not isinstance(value, str):
        raise RlcdError(f"{where}: expected text, got {type(value).__name__}")
    if not value.strip():
        return None
    if task_input == "premise":
        return value.strip()
    prompt = to_prompt(value)
    try:
        turns = parse_prompt(prompt)
    except ValueError as e:
        raise RlcdError(f"{where}: not a Human/Assistant conversation ({e})") from None
    return prompt if any(t.text.strip() for t in turns) else None


def _open_source(source: str, column: str | None, split: str) -> tuple[Iterator[tuple[str, object]], str]:
    """(where, value) for every row of the prompt column, read through `datasets` (`pairs.load_table`).
    JSON lines are checked first, so a malformed line is named by file and line."""
    from .pairs import load_table, looks_like_path

    path = Path(source).expanduser()
    lines = _json_lines(path) if path.is_file() and path.name.endswith((".jsonl", ".jsonl.gz")) else None
    if (path.is_file() and path.stat().st_size == 0) or lines == []:
        raise RlcdError(f"{path}: no prompts (the file is empty)")
    if not path.exists() and looks_like_path(source):
        raise RlcdError(f"{source}: no such file")
    table = load_table(source, split)
    if lines is None:
        col = _pick_column(source, table.column_names, column)
        return ((f"{source}: row {i + 1}", v) for i, v in enumerate(table[col])), col
    col = _pick_column(f"{path}:{lines[0][0]}", table.column_names, column)
    for lineno, keys in lines:
        if col not in keys:
            raise RlcdError(f"{path}:{lineno}: no column {col!r} (columns: {', '.join(keys) or 'none'})")
    return ((f"{path}:{lineno}", v) for (lineno, _), v in zip(lines, table[col])), col


def _json_lines(path: Path) -> list[tuple[int, list[str]]]:
    """The line number and keys of every record of a JSON-lines file.

    Raises:
        RlcdError: an unreadable file, or a line that is not a JSON object (``file:line``).
    """
    opener = gzip.open if path.name.endswith(".gz") else open
    records = []
    try:
        with opener(path, "rt", encoding="utf-8") as f:
            for lineno, line in enumerate(f, 1):
                if not line.strip():
                    continue
                try:
                    row = json.loads(line)
                except json.JSONDecodeError as e:
                    raise RlcdError(f"{path}:{lineno}: not valid JSON ({e.msg})") from None
                if not isinstance(row, dict):
                    raise RlcdError(f"{path}:{lineno}: expected a JSON object, got {type(row).__name__}")
                records.append((lineno, list(row)))
    except (OSError, UnicodeDecodeError) as e:
        raise RlcdError(f"{path}: cannot read ({e})") from None
    return records


def _pick_column(where: str, columns: list[str], column: str | None) -> str:
    if column is not None:
        if column not in columns:
            raise RlcdError(f"{where}: no column {column!r} (columns: {', '.join(columns) or 'none'})")
        return column
    for candidate in DEFAULT_COLUMNS:
        if candidate in columns:
            return candidate
    raise RlcdError(
        f"{where}: no `chosen` or `prompt` column (columns: {', '.join(columns) or 'none'}); pass --prompt-column"
    )
