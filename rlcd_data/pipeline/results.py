"""What a build reports: its counts (`BuildStats`) and its result (`BuildResult`)."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from .config import BuildConfig


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
    requests_retried: int = 0  # a server's requests sent again (429, 5xx, timeouts, dropped connections)
    labels_missing_tokens: int = 0  # a server's labels with a label token missing from its log-probabilities
    seconds: float = 0.0
    dropped_source_indices: list[int] = field(default_factory=list)


@dataclass
class BuildResult:
    output: Path
    config: BuildConfig
    stats: BuildStats
    splits: dict[str, int]
    model: str
    shard: tuple[int, int] | None = None  # a shard's result: its rows wait in OUTPUT/.rlcd-build for `merge`
    complete_before: bool = False  # --resume found the dataset already finished: nothing was generated

    def load_line(self) -> str:
        return f'datasets.load_dataset("{self.output}")'
