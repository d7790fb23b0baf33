"""Prompt sources: HH-RLHF files, plain JSONL/Parquet/CSV, `datasets` folders, Hub datasets.

Every source yields texts with their position in the source; `load_prompts`
normalises them for the task, drops empty and duplicate prompts (counting
them) and applies ``limit``.
"""

from __future__ import annotations

import csv
import gzip
import json
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from .conversation import parse_prompt, to_prompt
from .errors import RlcdError

FILE_SUFFIXES = (".jsonl", ".jsonl.gz", ".json", ".parquet", ".csv")
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
    path = Path(source)
    if path.is_file():
        return _read_file(path, column)
    if path.is_dir():
        return _read_dataset(source, column, split, local=True)
    if source.endswith(FILE_SUFFIXES) or source.startswith((".", "/", "~")):
        raise RlcdError(f"{source}: no such file")
    return _read_dataset(source, column, split, local=False)


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


def _read_file(path: Path, column: str | None) -> tuple[Iterator[tuple[str, object]], str]:
    name = path.name
    if name.endswith((".jsonl", ".jsonl.gz")):
        return _read_jsonl(path, column)
    if name.endswith(".json"):
        try:
            data = json.loads(path.read_text())
        except json.JSONDecodeError as e:
            raise RlcdError(f"{path}:{e.lineno}: not valid JSON ({e.msg})") from None
        if not isinstance(data, list) or not all(isinstance(r, dict) for r in data):
            raise RlcdError(f"{path}: expected a JSON list of objects (use .jsonl for one object a line)")
        if not data:
            raise RlcdError(f"{path}: no prompts (the file is empty)")
        col = _pick_column(str(path), list(data[0]), column)
        return ((f"{path}: item {i + 1}", _get(r, col, f"{path}: item {i + 1}")) for i, r in enumerate(data)), col
    if name.endswith(".parquet"):
        import pyarrow.parquet as pq

        try:
            schema = pq.read_schema(path)
        except Exception as e:  # pyarrow raises several types for a bad file
            raise RlcdError(f"{path}: not a readable Parquet file ({e})") from None
        col = _pick_column(str(path), schema.names, column)
        values = pq.read_table(path, columns=[col]).column(col).to_pylist()
        return ((f"{path}: row {i + 1}", v) for i, v in enumerate(values)), col
    if name.endswith(".csv"):
        return _read_csv(path, column)
    raise RlcdError(f"{path}: unsupported file type (use {', '.join(FILE_SUFFIXES)})")


def _get(row: dict, column: str, where: str):
    if column not in row:
        raise RlcdError(f"{where}: no column {column!r} (columns: {', '.join(row) or 'none'})")
    return row[column]


def _read_jsonl(path: Path, column: str | None) -> tuple[Iterator[tuple[str, object]], str]:
    opener = gzip.open if path.name.endswith(".gz") else open
    try:
        with opener(path, "rt", encoding="utf-8") as f:
            lines = f.readlines()
    except (OSError, UnicodeDecodeError) as e:
        raise RlcdError(f"{path}: cannot read ({e})") from None
    records = []
    for lineno, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as e:
            raise RlcdError(f"{path}:{lineno}: not valid JSON ({e.msg})") from None
        if not isinstance(row, dict):
            raise RlcdError(f"{path}:{lineno}: expected a JSON object, got {type(row).__name__}")
        records.append((lineno, row))
    if not records:
        raise RlcdError(f"{path}: no prompts (the file is empty)")
    col = _pick_column(f"{path}:{records[0][0]}", list(records[0][1]), column)
    return ((f"{path}:{n}", _get(r, col, f"{path}:{n}")) for n, r in records), col


def _read_csv(path: Path, column: str | None) -> tuple[Iterator[tuple[str, object]], str]:
    with open(path, newline="", encoding="utf-8") as f:
        reader = csv.DictReader(f)
        if not reader.fieldnames:
            raise RlcdError(f"{path}: no prompts (the file is empty)")
        col = _pick_column(f"{path}:1", list(reader.fieldnames), column)
        rows = [(f"{path}:{reader.line_num}", row[col]) for row in reader]
    return iter(rows), col


def _read_dataset(source: str, column: str | None, split: str, local: bool) -> tuple[Iterator, str]:
    import datasets

    try:
        if local and (Path(source) / "dataset_info.json").is_file():
            ds = datasets.load_from_disk(source)
            if isinstance(ds, datasets.DatasetDict):
                if split not in ds:
                    raise RlcdError(f"{source}: no split {split!r} (splits: {', '.join(ds)})")
                ds = ds[split]
        else:
            ds = datasets.load_dataset(source, split=split)
    except RlcdError:
        raise
    except FileNotFoundError:
        raise RlcdError(
            f"{source}: not a local file or folder, and no such dataset could be loaded"
            + (" (offline: HF_HUB_OFFLINE is set)" if datasets.config.HF_HUB_OFFLINE else "")
        ) from None
    except ValueError as e:  # e.g. an unknown split
        raise RlcdError(f"{source}: {str(e).splitlines()[0]}") from None
    except Exception as e:  # network or format failures from the Hub client
        raise RlcdError(f"{source}: cannot load dataset ({type(e).__name__}: {str(e).splitlines()[0]})") from None
    col = _pick_column(source, list(ds.column_names), column)
    return ((f"{source}: row {i + 1}", v) for i, v in enumerate(ds[col])), col
