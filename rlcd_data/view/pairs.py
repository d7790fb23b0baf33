"""What the page shows of a pair dataset: pages of rows under filters, and a blind spot-check sample.

Everything per row that a filter or a search reads (response texts, lengths, descriptor, soft label) is
prepared once when the source opens; a page then slices lists, so a 100k-row dataset pages in milliseconds.
The rows' flags need the pairs' similarities (10 s for 100k HH pairs): they are computed once, on first need
(the server's report thread asks first), and a row shows none until then.
"""

from __future__ import annotations

import random
import threading
from dataclasses import dataclass
from pathlib import Path

from ..errors import RlcdError
from ..quality import annotations, measures
from ..sources.pairs import build_setting, column, messages_to_text, split_prompt

PAGE_ROWS = 20
MAX_PAGE_ROWS = 200
GENERIC_QUESTION = "Which of these assistant responses is better?"


@dataclass(frozen=True)
class Filters:
    """A page's filters; None is "any"."""

    query: str = ""
    descriptor: int | None = None
    label_min: float | None = None
    label_max: float | None = None
    length_min: int | None = None
    length_max: int | None = None
    flagged: bool = False


class PairTable:
    """One split of a pair source, as the page reads it.

    Args:
        source: any pair source (`rlcd_data.sources.pairs.load_pairs`).
        annotations_dir: where judgments go: the source folder by default; a file or Hub source needs one.

    Raises:
        RlcdError: not a pair dataset, no pairs, or no folder for judgments.
    """

    def __init__(self, source: str, split: str = "train", annotations_dir: str | Path | None = None):
        from ..quality.report import load

        self.source, self.split = source, split
        self.table, self.data = load(source, split)
        if annotations_dir is None:
            if not Path(source).is_dir():
                raise RlcdError(f"{source}: not a dataset folder; name a folder for the judgments with --annotations")
            annotations_dir = source
        self.folder = Path(annotations_dir)
        self._flags: list[list[str]] | None = None
        self.similar: list[float] | None = None
        self._flags_lock = threading.Lock()
        self.prompts = prompts = _prompts(self.table)
        self.search_text = [f"{p}\n{c}\n{r}".lower() for p, c, r in zip(prompts, self.data.chosen, self.data.rejected)]
        self.lengths = [max(c, r) for c, r in zip(self.data.chosen_lengths, self.data.rejected_lengths)]
        self.question = _question(source)

    def __len__(self) -> int:
        return len(self.data)

    def flags(self) -> list[list[str]]:
        """Each row's flags (`measures.row_flags`), computed on the first call; later callers wait for it."""
        with self._flags_lock:
            if self._flags is None:
                self.similar = measures.similarities(self.data.chosen, self.data.rejected)
                self._flags = measures.row_flags(self.data, similar=self.similar)
            return self._flags

    def matching(self, filters: Filters) -> list[int]:
        """The indices of the rows that pass ``filters``, in order."""
        data, query = self.data, filters.query.lower().strip()
        rows = range(len(self))
        if query:
            rows = [i for i in rows if query in self.search_text[i]]
        if filters.descriptor is not None and data.descriptor_index is not None:
            rows = [i for i in rows if data.descriptor_index[i] == filters.descriptor]
        if data.probabilities is not None and (filters.label_min is not None or filters.label_max is not None):
            low = -1.0 if filters.label_min is None else filters.label_min
            high = 2.0 if filters.label_max is None else filters.label_max
            rows = [i for i in rows if low <= data.probabilities[i] <= high]
        if filters.length_min is not None:
            rows = [i for i in rows if self.lengths[i] >= filters.length_min]
        if filters.length_max is not None:
            rows = [i for i in rows if self.lengths[i] <= filters.length_max]
        if filters.flagged:
            flags = self.flags()
            rows = [i for i in rows if flags[i]]
        return list(rows)

    def row(self, i: int) -> dict:
        """Everything the browser shows of row ``i``."""
        data, record = self.data, self.table[i]
        out = {
            "row": i, "prompt": self.prompts[i], "chosen": data.chosen[i], "rejected": data.rejected[i],
            "chosen_length": data.chosen_lengths[i], "rejected_length": data.rejected_lengths[i], "unit": data.unit,
            "flags": None if self._flags is None else self._flags[i],
            "label": None if data.probabilities is None else data.probabilities[i],
            "descriptor": None if data.descriptor_index is None else data.descriptors.get(data.descriptor_index[i]),
        }
        for side in ("p_plus", "p_minus"):
            value = record.get(side)
            out[side] = messages_to_text(value) if isinstance(value, list) else value
        return out

    def descriptors(self) -> list[dict]:
        return [{"index": i, "pair": pair} for i, pair in sorted(self.data.descriptors.items())]

    # The spot-check: a seeded sample shown blind.

    def sample(self, size: int, seed: int) -> list[int]:
        """``size`` rows (at most all), drawn by ``seed``: the same rows in the same order for the same seed."""
        if size < 1:
            raise RlcdError(f"a spot-check needs at least 1 pair (asked for {size})")
        return random.Random(seed).sample(range(len(self)), min(size, len(self)))

    @staticmethod
    def left_side(seed: int, row: int) -> str:
        """Which response the spot-check shows on the left for ``row`` of sample ``seed`` (a coin, fixed by both)."""
        return "chosen" if random.Random(f"{seed}:{row}").random() < 0.5 else "rejected"

    def blind_item(self, seed: int, row: int) -> dict:
        """Row ``row`` as the spot-check shows it: the conversation and two responses, no label or descriptor."""
        left = self.left_side(seed, row)
        right = "rejected" if left == "chosen" else "chosen"
        texts = {"chosen": self.data.chosen[row], "rejected": self.data.rejected[row]}
        return {"row": row, "conversation": self.prompts[row], "left": texts[left], "right": texts[right]}

    def judge(self, annotator: str, seed: int, size: int, row: int, choice: str) -> annotations.Judgment:
        """Record a person's choice on ``row`` of the sample (``seed``, ``size``); the sides come from the seed.

        Raises:
            RlcdError: a row not in the sample, an unknown choice or annotator name, a folder that cannot be written.
        """
        if row not in set(self.sample(size, seed)):
            raise RlcdError(f"row {row} is not in the spot-check sample (seed {seed}, {size} pairs)")
        if choice not in annotations.CHOICES:
            raise RlcdError(f"choice {choice!r}: use one of {', '.join(annotations.CHOICES)}")
        judgment = annotations.Judgment(row, seed, self.left_side(seed, row), choice, annotations.now(), self.split)
        annotations.record(self.folder, annotator, judgment)
        return judgment

    def agreement(self) -> dict | None:
        return annotations.human_agreement(annotations.read(self.folder, self.split), self.data)


def _prompts(table) -> list[str]:
    """Each row's conversation before the responses, as text: the prompt column, or what both texts begin with."""
    def text(value) -> str:
        return messages_to_text(value) if isinstance(value, list) else value

    if "prompt" in table.column_names:
        return [text(p) for p in column(table, "prompt")]
    return [split_prompt(text(c))[0] for c in column(table, "chosen")]


def _question(source: str) -> str:
    """The task's first comparison instruction (what `compare.jinja` asks the labeller), or a generic question."""
    from ..tasks.catalog import load_task

    name = build_setting(source, "task") if Path(source).is_dir() else None
    if not name:
        return GENERIC_QUESTION
    try:
        task = load_task(name)
    except RlcdError:
        return GENERIC_QUESTION
    return task.instructions[0] if task.instructions else GENERIC_QUESTION
