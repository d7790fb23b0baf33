"""The running batch of the transformers engine: rows in cohorts (rows admitted together, each with its
own growing key/value cache), per-row sampling with per-request generators, and the stops."""

from __future__ import annotations

import functools
from dataclasses import dataclass, field

from ..conversation import STOP_STRINGS
from . import Completion, SamplingSettings
from .attention import cache_argument, ragged_cache_class

# Tokens decoded at each step to look for a stop string; longer than any stop string.
STOP_WINDOW = 8


@functools.cache
def growing_layer_class():
    from transformers.cache_utils import DynamicLayer

    class GrowingLayer(DynamicLayer):
        """A cache layer whose keys/values are views of buffers with room at the end: each decoding
        step writes its token in place instead of copying the whole cache (DynamicLayer concatenates)."""

        def __init__(self, keys=None, values=None, spare: int = 64):
            super().__init__()
            if keys is not None:
                self.dtype, self.device, self.is_initialized = keys.dtype, keys.device, True
                self._store(keys, values, spare)

        def _store(self, keys, values, spare: int) -> None:
            n = keys.shape[-2]
            self._k = keys.new_empty(*keys.shape[:2], n + spare, keys.shape[-1])
            self._v = values.new_empty(*values.shape[:2], n + spare, values.shape[-1])
            self._k[:, :, :n] = keys
            self._v[:, :, :n] = values
            self.keys, self.values = self._k[:, :, :n], self._v[:, :, :n]

        def move_row(self, source: int, target: int) -> None:
            n = self.keys.shape[-2]
            self._k[target, :, :n] = self._k[source, :, :n]
            self._v[target, :, :n] = self._v[source, :, :n]

        def narrow(self, rows: int, first: int) -> None:
            """Keep the first ``rows`` rows and the columns from ``first`` on (views: nothing is copied)."""
            n = self.keys.shape[-2] - first
            self._k, self._v = self._k[:rows, :, first:], self._v[:rows, :, first:]
            self.keys, self.values = self._k[:, :, :n], self._v[:, :, :n]

        def update(self, key_states, value_states, *args, **kwargs):
            if not self.is_initialized:  # the first update (a prefill) writes into the buffer directly
                self.dtype, self.device, self.is_initialized = key_states.dtype, key_states.device, True
                self._store(key_states[:, :, :0], value_states[:, :, :0], key_states.shape[-2] + 64)
            n, add = self.keys.shape[-2], key_states.shape[-2]
            if n + add > self._k.shape[-2]:
                self._store(self.keys, self.values, add + 64)
            self._k[:, :, n : n + add] = key_states
            self._v[:, :, n : n + add] = value_states
            self.keys, self.values = self._k[:, :, : n + add], self._v[:, :, : n + add]
            return self.keys, self.values

    return GrowingLayer


def GrowingLayer(keys=None, values=None, spare: int = 64):
    return growing_layer_class()(keys, values, spare)


# What a batch keeps per row, in row order.
ROW_FIELDS = ("rows", "generated", "generators", "prompt_ids")


@dataclass
class Part:
    """Rows sharing one dense key/value cache, left-padded to the longest row: the result of a prefill,
    or a cohort of the running batch (rows admitted together, which then grow in step)."""

    layers: list  # GrowingLayer per model layer, [rows, heads, width, dim]
    mask: object  # [rows, width] attention mask, left-padded
    logits: object  # [rows, vocab] next-token logits (held by the batch while decoding)
    prompts: list = field(default_factory=list)  # token ids per row, while prefilling
    rows: list = field(default_factory=list)  # request index per row
    generated: list = field(default_factory=list)
    generators: list = field(default_factory=list)  # torch.Generator per row
    prompt_ids: list = field(default_factory=list)  # the prompt's token ids per row (for the repetition penalty)

    def __len__(self) -> int:
        return self.mask.shape[0]

    def select(self, index) -> None:
        """Keep rows ``index`` (in that order), then drop the left columns no row uses."""
        import torch

        index = torch.as_tensor(index, device=self.mask.device)
        self.mask = self.mask[index]
        self.logits = self.logits[index]
        for name in ROW_FIELDS:
            if getattr(self, name):
                setattr(self, name, [getattr(self, name)[r] for r in index.tolist()])
        first = int((self.mask.sum(0) > 0).nonzero()[0])
        self.mask = self.mask[:, first:]
        for i, layer in enumerate(self.layers):  # one layer at a time: at most one layer is held twice
            self.layers[i] = GrowingLayer(layer.keys[index, :, first:], layer.values[index, :, first:])

    def remove(self, gone: list[int]) -> None:
        """Remove rows ``gone``: the last row moves into each freed slot (a row's copy, not the cohort's),
        then the caches shrink to the rows and to the columns the remaining rows use (views)."""
        n = len(self)
        for r in sorted(gone, reverse=True):
            n -= 1
            if r != n:
                for layer in self.layers:
                    layer.move_row(n, r)
                self.mask[r] = self.mask[n]
                for name in ROW_FIELDS:
                    getattr(self, name)[r] = getattr(self, name)[n]
        for name in ROW_FIELDS:
            del getattr(self, name)[n:]
        first = int((self.mask[:n].sum(0) > 0).nonzero()[0])
        self.mask = self.mask[:n, first:]
        for layer in self.layers:
            layer.narrow(n, first)

    def merge(self, other: Part) -> Part:
        """Append ``other``'s rows, left-padding the narrower cache and mask."""
        import torch
        import torch.nn.functional as F

        length = max(self.mask.shape[1], other.mask.shape[1])

        def left_pad(t, dim_from_end):
            missing = length - t.shape[-dim_from_end]
            return t if missing == 0 else F.pad(t, (0, 0) * (dim_from_end - 1) + (missing, 0))

        for i, (mine, theirs) in enumerate(zip(self.layers, other.layers)):
            self.layers[i] = GrowingLayer(torch.cat([left_pad(mine.keys, 2), left_pad(theirs.keys, 2)]),
                                           torch.cat([left_pad(mine.values, 2), left_pad(theirs.values, 2)]))
        self.mask = torch.cat([left_pad(self.mask, 1), left_pad(other.mask, 1)])
        self.logits = torch.cat([self.logits, other.logits])
        for name in ("prompts", *ROW_FIELDS):
            setattr(self, name, getattr(self, name) + getattr(other, name))
        return self


# Cohorts of the running batch; beyond this many, the two that waste least padding together merge.
MAX_COHORTS = 8


class Batch:
    """Sequences decoded together. Each cohort (rows admitted together) keeps its own key/value cache,
    as wide as its longest row: admitting rows copies no other cache, and attention reads each row's
    cohort, not the whole batch padded to its longest row. The model runs on all rows at once."""

    def __init__(self, window: int | None = None):
        self.window = window  # sliding layers attend to this many last columns (rows hold no inner padding)
        self.cohorts: list[Part] = []
        self.logits = None  # [rows, vocab], cohorts in order
        self._flatten()

    @property
    def active(self) -> int:
        return len(self.rows)

    def _flatten(self) -> None:
        for name in ROW_FIELDS:
            setattr(self, name, [x for c in self.cohorts for x in getattr(c, name)])

    def _restructure(self, change) -> None:
        """Apply ``change`` to the cohorts, each holding its slice of the logits meanwhile."""
        import torch

        if self.cohorts:
            for c, chunk in zip(self.cohorts, self.logits.split([len(c) for c in self.cohorts])):
                c.logits = chunk
        change()
        self.logits = torch.cat([c.logits for c in self.cohorts]) if self.cohorts else None
        for c in self.cohorts:
            c.logits = None
        self._flatten()

    def add(self, parts: list[Part]) -> None:
        """Join ``parts`` as new cohorts."""
        def change():
            self.cohorts.extend(parts)
            while len(self.cohorts) > MAX_COHORTS:
                self._merge_closest()

        self._restructure(change)

    def _merge_closest(self) -> None:
        def waste(a: Part, b: Part) -> int:
            return abs(a.mask.shape[1] - b.mask.shape[1]) * (len(a) if a.mask.shape[1] < b.mask.shape[1] else len(b))

        pairs = [(i, j) for i in range(len(self.cohorts)) for j in range(i + 1, len(self.cohorts))]
        i, j = min(pairs, key=lambda ij: waste(self.cohorts[ij[0]], self.cohorts[ij[1]]))
        self.cohorts[i].merge(self.cohorts.pop(j))

    def sample(self, settings: SamplingSettings, tokenizer, banned) -> list[tuple[int, Completion]]:
        """Sample one token per row, never one of ``banned`` (token ids); return the rows that finished,
        with their completions."""
        import torch

        logits = warp(self.logits, settings, banned, self.prompt_ids, self.generated)
        # Inverse-CDF sampling: one uniform draw per row from that row's own generator,
        # then one batched search (torch.multinomial per row costs ~1 ms each).
        probs = torch.softmax(logits, dim=-1).cpu()
        cdf = probs.cumsum_(dim=-1)
        u = torch.cat([torch.rand(1, generator=g) for g in self.generators]) * cdf[:, -1]
        tokens = torch.searchsorted(cdf, u[:, None]).clamp_(max=cdf.shape[1] - 1)[:, 0].tolist()
        eos = tokenizer.eos_token_id
        done = []
        for row, ids, token in zip(self.rows, self.generated, tokens):
            ids.append(token)
            if token == eos:
                done.append((row, Completion(tokenizer.decode(ids[:-1], skip_special_tokens=True), len(ids), True)))
            elif len(ids) >= settings.max_new_tokens or any(
                s in tokenizer.decode(ids[-STOP_WINDOW:]) for s in STOP_STRINGS
            ):
                done.append((row, Completion(tokenizer.decode(ids, skip_special_tokens=True), len(ids), False)))
        return done

    def prompt_states(self, row: int, n: int) -> list[tuple]:
        """Keys/values of the first ``n`` tokens of request ``row``, [1, heads, n, dim] per layer."""
        c = next(c for c in self.cohorts if row in c.rows)
        r = c.rows.index(row)
        columns = c.mask[r].nonzero()[:n, 0]
        return [(layer.keys[r : r + 1, :, columns], layer.values[r : r + 1, :, columns]) for layer in c.layers]

    def finish(self, finished: set[int]) -> None:
        """Remove finished rows (by request index) at once: they are not decoded any further."""
        if not finished:
            return
        kept = []
        for c in self.cohorts:
            gone = [r for r, i in enumerate(c.rows) if i in finished]
            if len(gone) < len(c):
                if gone:
                    c.remove(gone)
                kept.append(c)
        self.cohorts = kept
        self.logits = None  # rows moved; the next forward() makes them
        self._flatten()

    def forward(self, model) -> None:
        """Feed each row's last token; update the caches and the next-token logits."""
        import torch

        last = torch.tensor([[ids[-1]] for ids in self.generated], device=self.cohorts[0].mask.device)
        for c in self.cohorts:
            c.mask = torch.cat([c.mask, torch.ones_like(c.mask[:, :1])], dim=1)
        cache = ragged_cache_class()(self.cohorts, model.config, self.window)
        out = model(
            input_ids=last,
            attention_mask=cache.placeholder_mask,
            position_ids=torch.cat([c.mask.sum(-1, keepdim=True) - 1 for c in self.cohorts]),
            use_cache=True,
            **{cache_argument(type(model)): cache},
        )
        self.logits = out.logits[:, -1].float()


def warp(logits, settings: SamplingSettings, banned, prompt_ids: list, generated: list):
    """Next-token logits as sampled from, in vLLM's order: repetition penalty (over the prompt and the
    output so far), temperature, banned tokens, top-k, top-p; transformers' own processors do each step."""
    import torch
    from transformers import RepetitionPenaltyLogitsProcessor, TopKLogitsWarper, TopPLogitsWarper

    if settings.repetition_penalty != 1.0:
        seen = [list(p) + g for p, g in zip(prompt_ids, generated)]
        width = max(map(len, seen))
        seen = torch.tensor([s + s[:1] * (width - len(s)) for s in seen], device=logits.device)  # repeats: no effect
        logits = RepetitionPenaltyLogitsProcessor(settings.repetition_penalty)(seen, logits)
    logits = (logits / settings.temperature).index_fill_(1, banned, float("-inf"))
    if settings.top_k:
        logits = TopKLogitsWarper(settings.top_k)(None, logits)
    if settings.top_p < 1.0:
        logits = TopPLogitsWarper(settings.top_p)(None, logits)
    return logits
