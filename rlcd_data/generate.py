"""Sampling from a causal LM with a continuously refilled batch.

Requests are sorted by prompt length (longest first, so an out-of-memory
error shows at once) and decoded in one batch where each sequence finishes at
its own stop: end-of-sequence, the start of the next ``Human`` turn, or the
token limit. Once ``refill_at`` of the batch (a quarter) has finished, those rows are removed
and the freed slots refilled from the queue: new prompts are prefilled
together (identical prompts once) and their key/value cache is merged into
the running batch (left-padded to a common length), so the batch stays full
instead of waiting for its longest sequence. Every request samples with its
own random generator, so its output depends on its seed, not on which
requests share its batch. Results come back in the caller's order.
"""

from __future__ import annotations

import random
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Protocol

from .conversation import STOP_STRINGS

# Tokens decoded at each step to look for a stop string; longer than any stop string.
STOP_WINDOW = 8


@dataclass(frozen=True)
class SamplingSettings:
    max_new_tokens: int = 300
    temperature: float = 1.0


@dataclass(frozen=True)
class Completion:
    text: str  # decoded new tokens, special tokens removed
    num_tokens: int  # new tokens generated for this sequence
    ended: bool  # stopped at end-of-sequence (not at a stop string or the token limit)


# Called after each decoding step with the requests finished in it, as (index into the
# caller's prompts, Completion), and the number of new tokens generated in it.
ProgressCallback = Callable[[list[tuple[int, "Completion"]], int], None]


def request_seed(*parts: object) -> int:
    """A 63-bit seed that depends only on ``parts`` (stable across processes and runs)."""
    return random.Random(":".join(map(str, parts))).getrandbits(63)


class Generator(Protocol):
    """What the build needs from a model; tests substitute a fake."""

    description: str

    def generate(
        self,
        prompts: Sequence[str],
        seeds: Sequence[int],
        settings: SamplingSettings,
        on_progress: ProgressCallback | None = None,
    ) -> list[Completion]: ...

    def count_tokens(self, text: str) -> int: ...


class TransformersGenerator:
    """Sampling with a transformers causal LM (any dtype or quantization it was loaded with).

    Args:
        batch_size: sequences decoded together.
        refill_at: refill once this fraction of the batch has finished
            (a prefill per refill; 0 < refill_at <= 1).
    """

    def __init__(self, model, tokenizer, batch_size: int = 16, description: str = "", refill_at: float = 0.25):
        self.model = model
        self.tokenizer = tokenizer
        self.batch_size = batch_size
        self.refill_at = refill_at
        self.description = description or getattr(model, "name_or_path", "model")

    def count_tokens(self, text: str) -> int:
        return len(self.tokenizer(text, add_special_tokens=False)["input_ids"])

    def generate(
        self,
        prompts: Sequence[str],
        seeds: Sequence[int],
        settings: SamplingSettings,
        on_progress: ProgressCallback | None = None,
    ) -> list[Completion]:
        import torch

        encoded = [self.tokenizer(p, add_special_tokens=False)["input_ids"] for p in prompts]
        queue = deque(sorted(range(len(prompts)), key=lambda i: -len(encoded[i])))
        results: list[Completion | None] = [None] * len(prompts)
        batch: _Batch | None = None
        refill_below = max(1, int(self.batch_size * (1 - self.refill_at)))
        with torch.inference_mode():
            while queue or batch is not None:
                active = batch.active if batch else 0
                if queue and active < self.batch_size and (active == 0 or active <= refill_below):
                    new = [queue.popleft() for _ in range(min(self.batch_size - active, len(queue)))]
                    batch = self._admit(batch, new, [encoded[i] for i in new], [seeds[i] for i in new])
                done = batch.sample(settings, self.tokenizer)
                for i, completion in done:
                    results[i] = completion
                if on_progress:
                    on_progress(done, batch.active)  # one new token per live row
                batch.finish({i for i, _ in done}, self.refill_at)
                if batch.active:
                    batch.forward(self.model)
                else:
                    batch = None
        return results  # type: ignore[return-value]

    def _admit(self, batch: _Batch | None, rows: list[int], ids: list[list[int]], seeds: list[int]) -> _Batch:
        """Prefill new prompts and merge them into the running batch."""
        import torch
        from transformers import DynamicCache

        # Identical prompts (attempts of one output, run side by side) share one prefill.
        unique = list(dict.fromkeys(map(tuple, ids)))
        source_row = torch.tensor([unique.index(tuple(x)) for x in ids])
        ids = [list(x) for x in unique]
        length = max(map(len, ids))
        pad = self.tokenizer.pad_token_id
        input_ids = torch.tensor([[pad] * (length - len(x)) + x for x in ids])
        mask = torch.tensor([[0] * (length - len(x)) + [1] * len(x) for x in ids])
        device = self.model.device
        out = self.model(
            input_ids=input_ids.to(device),
            attention_mask=mask.to(device),
            position_ids=(mask.cumsum(-1) - 1).clamp(min=0).to(device),
            past_key_values=DynamicCache(config=self.model.config),
            use_cache=True,
            logits_to_keep=1,
        )
        cache = out.past_key_values
        if len(unique) < len(rows):
            for layer in cache.layers:
                layer.batch_select_indices(source_row.to(device))
        new = _Batch(
            rows=rows,
            generated=[[] for _ in rows],
            generators=[torch.Generator().manual_seed(s) for s in seeds],
            cache=cache,
            mask=mask[source_row].to(device),
            logits=out.logits[:, -1].float()[source_row.to(device)],
        )
        if batch is None:
            return new
        batch.compact()
        return batch.merge(new)


@dataclass
class _Batch:
    """Sequences being decoded together, with their key/value cache and next-token logits."""

    rows: list[int]  # request index per batch row
    generated: list[list[int]]
    generators: list  # torch.Generator per row
    cache: object  # DynamicCache, [rows, heads, length, dim] per layer
    mask: object  # [rows, length] attention mask, left-padded
    logits: object  # [rows, vocab] next-token logits
    # Finished rows stay in the tensors (decoded, ignored) until a refill's worth of the batch
    # has finished: removing them copies the whole cache, too costly to do for every row.
    dead: set = field(default_factory=set)

    @property
    def active(self) -> int:
        return len(self.rows) - len(self.dead)

    def sample(self, settings: SamplingSettings, tokenizer) -> list[tuple[int, Completion]]:
        """Sample one token per row; return the rows that finished, with their completions."""
        import torch

        # Inverse-CDF sampling: one uniform draw per row from that row's own generator,
        # then one batched search (torch.multinomial per row costs ~1 ms each).
        probs = torch.softmax(self.logits / settings.temperature, dim=-1).cpu()
        cdf = probs.cumsum_(dim=-1)
        u = torch.cat([torch.rand(1, generator=g) for g in self.generators]) * cdf[:, -1]
        tokens = torch.searchsorted(cdf, u[:, None]).clamp_(max=cdf.shape[1] - 1)[:, 0].tolist()
        eos = tokenizer.eos_token_id
        done = []
        for r, token in enumerate(tokens):
            if r in self.dead:
                continue
            ids = self.generated[r]
            ids.append(token)
            if token == eos:
                done.append((self.rows[r], Completion(tokenizer.decode(ids[:-1], skip_special_tokens=True), len(ids), True)))
            elif len(ids) >= settings.max_new_tokens or any(
                s in tokenizer.decode(ids[-STOP_WINDOW:]) for s in STOP_STRINGS
            ):
                done.append((self.rows[r], Completion(tokenizer.decode(ids, skip_special_tokens=True), len(ids), False)))
        return done

    def finish(self, finished: set[int], fraction: float) -> None:
        """Mark rows (by request index) finished; compact once ``fraction`` of the batch is."""
        self.dead.update(r for r, i in enumerate(self.rows) if i in finished)
        if self.dead and (len(self.dead) >= max(1, int(len(self.rows) * fraction)) or not self.active):
            self.compact()

    def compact(self) -> None:
        """Remove finished rows, then the left columns that no remaining row uses."""
        if not self.dead:
            return
        keep = [r for r in range(len(self.rows)) if r not in self.dead]
        self.dead = set()
        for name in ("rows", "generated", "generators"):
            setattr(self, name, [getattr(self, name)[r] for r in keep])
        if not keep:
            return
        import torch

        index = torch.tensor(keep, device=self.mask.device)
        self.mask = self.mask[index]
        self.logits = self.logits[index]
        first = int((self.mask.sum(0) > 0).nonzero()[0])
        self.mask = self.mask[:, first:]
        for layer in self.cache.layers:
            layer.keys = layer.keys[index, :, first:]
            layer.values = layer.values[index, :, first:]

    def forward(self, model) -> None:
        """Feed each row's last token; update the cache and the next-token logits."""
        import torch

        last = torch.tensor([[ids[-1]] for ids in self.generated], device=self.mask.device)
        self.mask = torch.cat([self.mask, torch.ones_like(last)], dim=1)
        out = model(
            input_ids=last,
            attention_mask=self.mask,
            position_ids=self.mask.sum(-1, keepdim=True) - 1,
            past_key_values=self.cache,
            use_cache=True,
        )
        self.cache = out.past_key_values
        self.logits = out.logits[:, -1].float()

    def merge(self, other: _Batch) -> _Batch:
        """Concatenate two batches, left-padding the shorter cache and mask."""
        import torch
        import torch.nn.functional as F

        length = max(self.mask.shape[1], other.mask.shape[1])

        def left_pad(t, dim_from_end):
            missing = length - t.shape[-dim_from_end]
            return t if missing == 0 else F.pad(t, (0, 0) * (dim_from_end - 1) + (missing, 0))

        for mine, theirs in zip(self.cache.layers, other.cache.layers):
            mine.keys = torch.cat([left_pad(mine.keys, 2), left_pad(theirs.keys, 2)])
            mine.values = torch.cat([left_pad(mine.values, 2), left_pad(theirs.values, 2)])
        self.mask = torch.cat([left_pad(self.mask, 1), left_pad(other.mask, 1)])
        self.logits = torch.cat([self.logits, other.logits])
        self.rows += other.rows
        self.generated += other.generated
        self.generators += other.generators
        return self
