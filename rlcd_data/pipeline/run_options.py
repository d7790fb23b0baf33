"""How one run of a build goes (`RunOptions`): overwrite, resume, which shard. Never saved with the dataset."""

from __future__ import annotations

from dataclasses import dataclass, field

from ..errors import RlcdError


@dataclass
class RunOptions:
    """How one run of a build goes; not part of what it builds, never saved with the dataset.

    Raises:
        RlcdError: on construction, for options that exclude each other or an out-of-range shard.
    """

    overwrite: bool = field(default=False, metadata={"help": "Replace an existing, non-empty output folder."})
    resume: bool = field(
        default=False,
        metadata={"help": "Continue an interrupted build in the same --output folder, keeping its completed pairs "
                          "(a finished one with the same configuration is left as it is)."},
    )
    num_shards: int | None = field(
        default=None,
        metadata={
            "help": "Split the prompts into N disjoint shards (example i goes to shard i mod N); each process "
            "builds one into the shared --output folder, then `rlcd-data merge` assembles them. "
            "Default: WORLD_SIZE under accelerate launch / torchrun, else 1."
        },
    )
    shard_index: int | None = field(
        default=None, metadata={"help": "Which shard this process builds (0-based). Default: RANK under a launcher."}
    )

    def __post_init__(self) -> None:
        if self.overwrite and self.resume:
            raise RlcdError("--overwrite and --resume exclude each other")
        if (self.num_shards is None) != (self.shard_index is None):
            raise RlcdError("--num-shards and --shard-index go together")
        if self.num_shards is not None and not (self.num_shards >= 1 and 0 <= self.shard_index < self.num_shards):
            raise RlcdError(f"--shard-index must be in 0..{self.num_shards - 1} for --num-shards {self.num_shards}")

    def shard(self) -> tuple[int, int] | None:
        """(index, count) of this process's shard, from the flags or a launcher's RANK/WORLD_SIZE; None if unsharded."""
        import os

        if self.num_shards is not None:
            return (self.shard_index, self.num_shards) if self.num_shards > 1 else None
        world = int(os.environ.get("WORLD_SIZE", "1"))
        if world > 1:
            return int(os.environ.get("RANK", "0")), world
        return None
