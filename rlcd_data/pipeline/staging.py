"""A build's staging folder (``OUTPUT/.rlcd-build``): completed work on disk as the build goes.

Finished examples are appended as numbered part files, each written atomically
(a killed process leaves the whole file or none). A part holds records of three
kinds: a finished row; ``{"unlabelled": row}``, a decoded pair of a scored
method waiting for the labeller; ``{"dropped_source_index": k}``, an example
whose outputs all failed. A later record of an example replaces an earlier one
(its labelled row replaces the unlabelled one). ``state.json`` records what is
being built, so ``--resume`` refuses to continue with anything else.
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import json
import os
import time
from dataclasses import dataclass, field
from pathlib import Path

from ..errors import RlcdError
from ..tasks.task import COMPARE_FILE, ContrastPair, Task
from .config import BuildConfig
from .methods import METHODS

STAGING = ".rlcd-build"
STATE_FILE = "state.json"  # what an interrupted build was building, checked on --resume
ELAPSED_FILE = "elapsed.json"  # seconds the build has run, as of its last completed part
DONE_FILE = "done.json"  # a finished shard: its configuration and counts, read by `merge`


def shard_dir(out: Path, shard: tuple[int, int] | None) -> Path:
    """Where a build (or one shard of it) keeps its completed parts."""
    if shard is None:
        return out / STAGING
    return out / STAGING / f"shard-{shard[0]:05d}-of-{shard[1]:05d}"


def check_output(out: Path, overwrite: bool, resume: bool = False, shard: tuple[int, int] | None = None) -> None:
    """Refuse an output folder that holds something else, unless told to replace or continue it."""
    if out.exists() and not out.is_dir():
        raise RlcdError(f"{out}: output exists and is not a folder")
    staging = shard_dir(out, shard)
    if resume:
        if not (staging / STATE_FILE).is_file():
            what = f"shard {shard[0]} of {shard[1]}" if shard else "build"
            raise RlcdError(f"{out}: nothing to resume (no interrupted {what} in this folder)")
        return
    if shard is not None:
        # Shards share the folder: only this shard's own staging folder must be new.
        others = [p.name for p in out.iterdir() if p.name != STAGING] if out.is_dir() else []
        if (others or (staging.is_dir() and any(staging.iterdir()))) and not overwrite:
            hint = " or --resume to continue it" if (staging / STATE_FILE).is_file() else ""
            raise RlcdError(f"{out}: output folder or this shard's files exist (pass --overwrite to replace them{hint})")
        return
    if out.is_dir() and any(out.iterdir()) and not overwrite:
        hint = " or --resume to continue it" if (out / STAGING / STATE_FILE).is_file() else ""
        raise RlcdError(f"{out}: output folder exists and is not empty (pass --overwrite to replace it{hint})")


def write_atomic(path: Path, text: str) -> None:
    """Write a file so that a killed process leaves either the whole file or none."""
    tmp = path.with_name(path.name + ".tmp")
    try:
        with open(tmp, "w", encoding="utf-8") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except OSError:
        tmp.unlink(missing_ok=True)  # never leave a half-written file behind
        raise


class PartWriter:
    """Appends numbered part files to a staging folder, and the build's time so far with each.

    Args:
        staging: the folder.
        first: the next part number (after a resumed build's parts).
        started: the build's start (``time.monotonic()``, moved back by earlier runs' time).
    """

    def __init__(self, staging: Path, first: int = 0, started: float | None = None):
        self.staging = staging
        self.number = first
        self.started = started

    def write(self, records: list[dict]) -> None:
        """Raises RlcdError: the part cannot be written (disk full); the parts before it stay valid."""
        if not records:
            return
        text = "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records)
        try:
            write_atomic(self.staging / f"part-{self.number:06d}.jsonl", text)
        except OSError as e:
            raise RlcdError(
                f"{self.staging}: cannot write part {self.number} ({e.strerror or e}); the parts written before it "
                "are intact: make room and re-run with --resume"
            ) from None
        self.number += 1
        if self.started is not None:  # the time so far, for the build time of a resumed build (best effort)
            with contextlib.suppress(OSError):
                write_atomic(self.staging / ELAPSED_FILE, json.dumps({"seconds": time.monotonic() - self.started}))


@dataclass
class Parts:
    """What the part files of a staging folder hold."""

    rows: list[dict] = field(default_factory=list)  # finished rows
    unlabelled: list[dict] = field(default_factory=list)  # decoded pairs of a scored method, not labelled yet
    dropped: list[int] = field(default_factory=list)  # source indices of dropped examples
    next_part: int = 0


def read_parts(staging: Path) -> Parts:
    """The records of the completed parts, a later record of an example replacing an earlier one."""
    latest: dict[int, tuple[str, object]] = {}
    paths = sorted(staging.glob("part-*.jsonl"))
    for path in paths:
        for line in path.read_text(encoding="utf-8").splitlines():
            record = json.loads(line)
            if "dropped_source_index" in record:
                latest[record["dropped_source_index"]] = ("dropped", record["dropped_source_index"])
            elif "unlabelled" in record:
                latest[record["unlabelled"]["source_index"]] = ("unlabelled", record["unlabelled"])
            else:
                latest[record["source_index"]] = ("rows", record)
    parts = Parts(next_part=int(paths[-1].stem.split("-")[1]) + 1 if paths else 0)
    for kind, value in latest.values():
        getattr(parts, kind).append(value)
    return parts


def elapsed_before(staging: Path) -> float:
    """Seconds the interrupted runs of a build spent, up to their last completed part."""
    try:
        return float(json.loads((staging / ELAPSED_FILE).read_text())["seconds"])
    except (OSError, ValueError, KeyError):
        return 0.0  # started before this was recorded


def build_state(config: BuildConfig, task: Task, pairs: list[ContrastPair]) -> dict:
    """What a build makes, for checking a resume: its output fields, every example's rendered prompts
    (which the prompt source, templates and descriptor pairs all go into), and for scored methods the
    labeller's template and instructions. Task files that do not change the output (the README, the
    comparison template of an unscored method) may be edited while a build is interrupted."""
    prompts = json.dumps([(p.source_index, p.prompt, p.p_plus, p.p_minus) for p in pairs])
    labeller = None
    if METHODS[config.method].scored:
        compare = (task.folder / COMPARE_FILE).read_text()
        labeller = json.dumps([compare, task.instructions, task.scorer_version])
    return {
        "config": config.output_fields(),
        "prompts": hashlib.sha256(prompts.encode()).hexdigest(),
        "labeller": labeller and hashlib.sha256(labeller.encode()).hexdigest(),
    }


# What builds did before a field existed, where that is not the field's default.
BEFORE_FIELD = {"banned_characters": "", "backend": "transformers", "prompt_format": "text"}
# What each checked part of a build's state stands for, in a refused resume's message.
STATE_PARTS = {
    "prompts": "rendered prompts (prompt source, templates or descriptor pairs)",
    "labeller": f"labeller ({COMPARE_FILE} or the scorer instructions)",
}


def check_state(path: Path, state: dict) -> None:
    """Raises RlcdError: the interrupted build at ``path`` built something else than ``state``."""
    saved = json.loads(path.read_text())
    # A field added since the interrupted build was started has the value builds had before it existed.
    defaults = {f.name: f.default for f in dataclasses.fields(BuildConfig)}
    for k in state["config"]:
        saved["config"].setdefault(k, BEFORE_FIELD.get(k, defaults.get(k)))
    # A CPU build started before `auto` was recorded as what it chose saved "auto", which then meant float32.
    if saved["config"].get("dtype") == "auto" and state["config"].get("dtype") != "auto":
        import torch

        if not torch.cuda.is_available():
            saved["config"]["dtype"] = "float32"
    differ = [
        f"{k}: {saved['config'].get(k)!r} -> {state['config'].get(k)!r}"
        for k in sorted(set(saved["config"]) | set(state["config"]))
        if saved["config"].get(k) != state["config"].get(k)
    ]
    # A state written before the labeller was recorded separately (it hashed every task file instead)
    # is checked on its configuration and prompts.
    differ += [what for k, what in STATE_PARTS.items() if k in saved and saved[k] != state[k]]
    if differ:
        details = ", ".join(differ)
        raise RlcdError(f"cannot resume: the configuration differs from the interrupted build ({details})")
