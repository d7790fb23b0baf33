"""People's judgments of pairs (the spot-check of `rlcd-data view`) and the figure they give: agreement with the
dataset's labels, the paper's yardstick (its Table 5 protocol, on the dataset itself).

A judgment is one JSON line of ``annotations/<annotator>.jsonl`` in the dataset folder::

    {"row": 17, "seed": 0, "left": "rejected", "choice": "right", "time": "2026-12-08T10:00:00+00:00",
     "split": "train"}

``row`` is the pair's index in ``split``, ``seed`` the spot-check sample's, ``left`` the side shown on the left,
``choice`` what the person picked: ``left``, ``right`` or ``tie`` ("can't tell"). The person agrees with the label
when the response they preferred is the dataset's ``chosen``. A later judgment of the same row by the same
annotator replaces the earlier one.
"""

from __future__ import annotations

import datetime
import json
import os
import re
import threading
from dataclasses import asdict, dataclass
from pathlib import Path

from ..errors import RlcdError
from .measures import PairData, wilson_interval

ANNOTATIONS = "annotations"
ANNOTATOR = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,63}")
CHOICES = ("left", "right", "tie")
SIDES = ("chosen", "rejected")
CONFIDENCE_EDGES = (0.5, 0.6, 0.7, 0.8, 0.9, 1.0)
_write_lock = threading.Lock()


class NotSaved(RlcdError):
    """A judgment could not be written (read-only folder, full disk); the file holds the earlier ones."""


@dataclass(frozen=True)
class Judgment:
    row: int
    seed: int
    left: str  # the side shown on the left: chosen or rejected
    choice: str  # left, right or tie
    time: str
    split: str = "train"

    def __post_init__(self):
        if self.left not in SIDES or self.choice not in CHOICES or self.row < 0:
            raise ValueError(f"not a judgment: {self}")

    @property
    def preferred(self) -> str | None:
        """The side the person preferred (chosen or rejected), None for "can't tell"."""
        if self.choice == "tie":
            return None
        other = SIDES[1 - SIDES.index(self.left)]
        return self.left if self.choice == "left" else other


def now() -> str:
    return datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")


def annotator_file(folder: str | Path, annotator: str) -> Path:
    """``folder/annotations/<annotator>.jsonl``; RlcdError for a name that is not 1-64 letters, digits, ``_.-``."""
    if not ANNOTATOR.fullmatch(annotator or ""):
        raise RlcdError(f"annotator {annotator!r}: use 1-64 letters, digits, '_', '.' or '-', starting with a letter "
                        "or digit")
    return Path(folder) / ANNOTATIONS / f"{annotator}.jsonl"


def record(folder: str | Path, annotator: str, judgment: Judgment) -> None:
    """Add one judgment to the annotator's file, atomically: the file is rewritten beside itself and renamed over,
    so a kill at any moment leaves either the old file or the new one.

    Raises:
        NotSaved: the file cannot be written (read-only folder, full disk): one line; the old file is intact.
    """
    path = annotator_file(folder, annotator)
    line = json.dumps(asdict(judgment)) + "\n"
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}-{threading.get_ident()}")
    with _write_lock:
        try:
            path.parent.mkdir(exist_ok=True)
            old = path.read_bytes() if path.exists() else b""
            with open(tmp, "wb") as f:
                f.write(old + line.encode())
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, path)
        except OSError as e:
            tmp.unlink(missing_ok=True)
            raise NotSaved(f"{path}: cannot save the judgment ({e.strerror or e}); nothing else was lost") from None


def read(folder: str | Path, split: str = "train") -> dict[str, dict[int, Judgment]]:
    """Every annotator's judgments of ``split`` in ``folder``: ``{annotator: {row: its latest judgment}}`` (empty
    without any).

    A line that is not a judgment (a file edited by hand) is an RlcdError naming the file and line.
    """
    out: dict[str, dict[int, Judgment]] = {}
    for path in sorted((Path(folder) / ANNOTATIONS).glob("*.jsonl")):
        rows: dict[int, Judgment] = {}
        for number, text in enumerate(path.read_text().splitlines(), 1):
            if not text.strip():
                continue
            try:
                judgment = Judgment(**json.loads(text))
            except (ValueError, TypeError) as e:
                raise RlcdError(f"{path}, line {number}: not a judgment ({str(e).splitlines()[0]})") from None
            if judgment.split == split:
                rows[judgment.row] = judgment
        if rows:
            out[path.stem] = rows
    return out


def _share(agree: int, n: int) -> dict:
    low, high = wilson_interval(agree, n)
    return {"n": n, "agreement": agree / n if n else None, "interval": [low, high]}


def human_agreement(judgments: dict[str, dict[int, Judgment]], data: PairData) -> dict | None:
    """The agreement of people's judgments with the labels of ``data`` (the pairs they judged), or None without any.

    Every annotator's judgment counts once (two people on one row: two judgments); "can't tell" is counted apart,
    not as agreement. Returns n, ties, the agreement among decisive judgments with its 95% Wilson interval, the
    same per annotator, per descriptor pair and, for soft labels, per bin of ``chosen_probability``; and, where two
    annotators judged the same rows, how often they made the same choice.
    """
    pooled = [(name, j) for name, rows in judgments.items() for j in rows.values() if j.row < len(data)]
    if not pooled:
        return None

    def figure(items) -> dict:
        decisive = [j for _, j in items if j.preferred]
        out = _share(sum(j.preferred == "chosen" for j in decisive), len(decisive))
        return {**out, "judgments": len(items), "ties": len(items) - len(decisive)}

    result = {**figure(pooled), "annotators": {name: figure([(name, j) for j in rows.values() if j.row < len(data)])
                                               for name, rows in judgments.items()},
              "per_descriptor": None, "by_confidence": None}
    if data.descriptor_index is not None:
        groups: dict[str, list] = {}
        for item in pooled:
            groups.setdefault(data.descriptors.get(data.descriptor_index[item[1].row], ""), []).append(item)
        result["per_descriptor"] = {pair: figure(items) for pair, items in sorted(groups.items())}
    if data.probabilities is not None:
        bins = []
        for low, high in zip(CONFIDENCE_EDGES, CONFIDENCE_EDGES[1:]):
            items = [i for i in pooled if low <= data.probabilities[i[1].row] < high or
                     (high == 1.0 and data.probabilities[i[1].row] == 1.0)]
            bins.append({"bin": [low, high], **figure(items)})
        result["by_confidence"] = bins
    result["between_annotators"] = _between_annotators(judgments)
    return result


def _between_annotators(judgments: dict[str, dict[int, Judgment]]) -> list[dict]:
    """For each two annotators with rows in common: on how many they made the same choice."""
    names = sorted(judgments)
    out = []
    for i, a in enumerate(names):
        for b in names[i + 1:]:
            common = sorted(set(judgments[a]) & set(judgments[b]))
            if common:
                same = sum(judgments[a][r].preferred == judgments[b][r].preferred for r in common)
                out.append({"annotators": [a, b], "rows": len(common), "same_choice": same / len(common)})
    return out
