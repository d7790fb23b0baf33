"""Sampling from a causal LM with a continuously refilled batch.

Requests are queued longest first (an out-of-memory error shows at once),
requests that share a prefix next to each other, and decoded in one batch
where each sequence finishes at its own stop: end-of-sequence, the start of
the next ``Human`` turn, or the token limit. Once ``refill_at`` of the batch
(a quarter) has finished, those rows are removed and the freed slots refilled
from the queue, so the batch stays full instead of waiting for its longest
sequence. Requests the caller adds while the call runs (retries of failed
outputs) join the same queue.

Prefill does no repeated work: identical prompts are prefilled once; a prefix
that several prompts of the call share (p+ and p- are identical up to their
first descriptor) is prefilled once and each prompt runs only its own rest;
prompts are prefilled in groups of similar length, so padding stays small.
The key/value cache grows in place (a buffer with room at the end) instead of
being copied at every step. Every request samples with its own random
generator, so its output depends on its seed, not on which requests share its
batch. Results come back in the caller's order.
"""

from __future__ import annotations

import functools
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
# caller's prompts, Completion), and the number of new tokens generated in it. It may return
# more requests, (prompt, seed) pairs (e.g. the retry of a failed output), which the call runs
# too: they take the next indices, and their completions are appended to the call's result.
ProgressCallback = Callable[[list[tuple[int, "Completion"]], int], "Sequence[tuple[str, int]] | None"]


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

        encoded = [tuple(self.tokenizer(p, add_special_tokens=False)["input_ids"]) for p in prompts]
        seeds = list(seeds)
        prefixes = _PrefixStore(encoded)
        # Longest first (an out-of-memory error shows at once), requests sharing a prefix next to each other.
        queue = deque(sorted(range(len(prompts)), key=lambda i: prefixes.order(encoded[i])))
        results: list[Completion | None] = [None] * len(prompts)
        batch: _Batch | None = None
        refill_below = max(1, int(self.batch_size * (1 - self.refill_at)))
        with torch.inference_mode():
            while queue or batch is not None:
                active = batch.active if batch else 0
                if queue and active < self.batch_size and (active == 0 or active <= refill_below):
                    new = [queue.popleft() for _ in range(min(self.batch_size - active, len(queue)))]
                    batch = self._admit(batch, new, [encoded[i] for i in new], [seeds[i] for i in new], prefixes)
                done = batch.sample(settings, self.tokenizer)
                for i, completion in done:
                    results[i] = completion
                more = on_progress(done, batch.active) if on_progress else None  # one new token per live row
                for prompt, seed in more or ():
                    encoded.append(tuple(self.tokenizer(prompt, add_special_tokens=False)["input_ids"]))
                    seeds.append(seed)
                    results.append(None)
                    prefixes.add(encoded[-1])
                    queue.append(len(encoded) - 1)
                batch.finish({i for i, _ in done}, self.refill_at)
                if batch.active:
                    batch.forward(self.model)
                else:
                    batch = None
        return results  # type: ignore[return-value]

    def _admit(self, batch: _Batch | None, rows: list[int], ids: list[tuple], seeds: list[int], prefixes) -> _Batch:
        """Prefill new prompts and merge them into the running batch."""
        import torch

        # Identical prompts (attempts of one output, run side by side) share one prefill.
        unique = list(dict.fromkeys(ids))
        missing = list(dict.fromkeys(k for k in map(prefixes.key, unique) if k and k not in prefixes.states))
        prefixes.states.update(self._prefill_prefixes(missing))
        parts = [
            self._prefill(group, [prefixes.states.get(prefixes.key(x)) for x in group])
            for group in _prefill_groups(unique, prefixes)
        ]
        new = parts[0]
        for part in parts[1:]:
            new.merge(part)
        if new.prompts != ids:  # duplicates or another order: one row per request, in request order
            position = {u: r for r, u in enumerate(new.prompts)}
            new.select(torch.tensor([position[x] for x in ids], device=new.mask.device))
        new.rows = rows
        new.generated = [[] for _ in rows]
        new.generators = [torch.Generator().manual_seed(s) for s in seeds]
        for x in ids:
            prefixes.admitted(x)
        if batch is None:
            return new
        batch.compact()
        return batch.merge(new)

    def _prefill(self, prompts: list[tuple], shared: list) -> _Batch:
        """One forward over ``prompts``, each row continuing from its shared prefix's states (or None).

        A row is laid out as [padding][prefix][padding][rest of the prompt]; the mask hides both paddings.
        """
        import torch
        from transformers import DynamicCache

        lengths = [0 if kv is None else kv[0][0].shape[-2] for kv in shared]
        rests = [x[n:] for x, n in zip(prompts, lengths)]
        past, length = max(lengths), max(map(len, rests))
        pad = self.tokenizer.pad_token_id
        input_ids = torch.tensor([[pad] * (length - len(x)) + list(x) for x in rests])
        mask = torch.tensor([[0] * (past - n) + [1] * n + [0] * (length - len(x)) + [1] * len(x)
                             for n, x in zip(lengths, rests)])
        device = self.model.device
        cache = DynamicCache(config=self.model.config)
        if past:
            layers = []
            for layer in range(len(cache.layers)):
                keys, values = (
                    torch.cat([_left_pad(kv[layer][j] if kv else None, past, like=_first(shared)[layer][j])
                               for kv in shared])
                    for j in (0, 1)
                )
                layers.append(_GrowingLayer(keys, values, spare=length))
            cache.layers = layers
        out = self.model(
            input_ids=input_ids.to(device),
            attention_mask=mask.to(device),
            position_ids=(mask.cumsum(-1) - 1).clamp(min=0)[:, past:].to(device),
            past_key_values=cache,
            use_cache=True,
            logits_to_keep=1,
        )
        cache = out.past_key_values
        if not past:
            for i, layer in enumerate(cache.layers):
                cache.layers[i] = _GrowingLayer(layer.keys, layer.values)
        return _Batch(rows=[], generated=[], generators=[], cache=cache, mask=mask.to(device),
                      logits=out.logits[:, -1].float(), prompts=list(prompts))

    def _prefill_prefixes(self, todo: list[tuple]) -> dict[tuple, list[tuple]]:
        """Key/value states of each prefix, [1, heads, length, dim] per layer, without padding."""
        states = {}
        for group in _length_groups(sorted(todo, key=len, reverse=True), len):
            batch = self._prefill(group, [None] * len(group))
            length = batch.mask.shape[1]
            for r, x in enumerate(group):
                start = length - len(x)
                states[x] = [(layer.keys[r : r + 1, :, start:].clone(), layer.values[r : r + 1, :, start:].clone())
                             for layer in batch.cache.layers]
        return states


# Prompts prefilled in one forward: at most this many tokens including padding.
PREFILL_TOKENS = 4096
# A prefix shared by several prompts of one call is prefilled once if it is at least this long.
MIN_SHARED_PREFIX = 16


def _length_groups(items: list, length) -> list[list]:
    """Consecutive runs of ``items`` (sorted by length, either way) prefilled together: padding stays
    under a quarter of the tokens and a run under PREFILL_TOKENS."""
    groups: list[list] = []
    for x in items:
        group = groups[-1] if groups else None
        if group:
            longest = max(length(x), max(map(length, group)))
            total = sum(map(length, group)) + length(x)
            if longest * (len(group) + 1) <= min(PREFILL_TOKENS, 1.25 * total):
                group.append(x)
                continue
        groups.append([x])
    return groups


def _prefill_groups(unique: list[tuple], prefixes: _PrefixStore) -> list[list[tuple]]:
    """Groups of prompts prefilled together, by the length each runs after its shared prefix."""
    def rest(x: tuple) -> int:
        return len(x) - prefixes.shared_length(x)

    return _length_groups(sorted(unique, key=rest, reverse=True), rest)


class _PrefixStore:
    """Prefixes shared by distinct prompts of one generate() call (the p+ and p- of a pair, up to
    their descriptors), prefilled once and kept until the last request using them is admitted."""

    def __init__(self, prompts: Sequence[tuple]):
        ordered = sorted(set(prompts))
        common = [0] + [_common_length(a, b) for a, b in zip(ordered, ordered[1:])] + [0]
        self.length: dict[tuple, int] = {}
        for i, x in enumerate(ordered):
            n = min(max(common[i], common[i + 1]), len(x) - 1)  # the last token runs per prompt, for its logits
            self.length[x] = n if n >= MIN_SHARED_PREFIX else 0
        self.users: dict[tuple, int] = {}  # prefix -> requests still to be admitted
        self.longest: dict[tuple, int] = {}  # prefix (or unshared prompt) -> its longest prompt
        for x in prompts:
            self.users[self.key(x)] = self.users.get(self.key(x), 0) + 1
            self.longest[self.group(x)] = max(self.longest.get(self.group(x), 0), len(x))
        self.states: dict[tuple, list] = {}  # prefix -> [(keys, values)] per layer, [1, heads, n, dim]

    def add(self, x: tuple) -> None:
        """A request added during the call: it shares the prefix of an identical earlier prompt, if any."""
        self.length.setdefault(x, 0)
        self.users[self.key(x)] = self.users.get(self.key(x), 0) + 1

    def key(self, x: tuple) -> tuple:
        """The prefix ``x`` shares with other prompts (empty if none)."""
        return x[: self.length[x]]

    def group(self, x: tuple) -> tuple:
        return self.key(x) or x

    def shared_length(self, x: tuple) -> int:
        return self.length[x]

    def order(self, x: tuple) -> tuple:
        """Queue order: longest first, the prompts of one prefix next to each other."""
        return (-self.longest[self.group(x)], self.group(x), -len(x))

    def admitted(self, x: tuple) -> None:
        key = self.key(x)
        self.users[key] -= 1
        if key and not self.users[key]:
            self.states.pop(key, None)


def _common_length(a: tuple, b: tuple) -> int:
    n = 0
    for x, y in zip(a, b):
        if x != y:
            break
        n += 1
    return n


def _first(states: list):
    return next(kv for kv in states if kv is not None)


def _left_pad(t, length: int, like):
    """``t`` ([1, heads, n, dim]) left-padded with zeros to ``length``; None becomes all padding."""
    import torch.nn.functional as F

    if t is None:
        return like.new_zeros(*like.shape[:2], length, like.shape[-1])
    return F.pad(t, (0, 0, length - t.shape[-2], 0))


@functools.cache
def _growing_layer_class():
    from transformers.cache_utils import DynamicLayer

    class GrowingLayer(DynamicLayer):
        """A cache layer whose keys/values are views of buffers with room at the end: each decoding
        step writes its token in place instead of copying the whole cache (DynamicLayer concatenates)."""

        def __init__(self, keys, values, spare: int = 64):
            super().__init__()
            self.dtype, self.device, self.is_initialized = keys.dtype, keys.device, True
            self._store(keys, values, spare)

        def _store(self, keys, values, spare: int) -> None:
            n = keys.shape[-2]
            self._k = keys.new_empty(*keys.shape[:2], n + spare, keys.shape[-1])
            self._v = values.new_empty(*values.shape[:2], n + spare, values.shape[-1])
            self._k[:, :, :n] = keys
            self._v[:, :, :n] = values
            self.keys, self.values = self._k[:, :, :n], self._v[:, :, :n]

        def update(self, key_states, value_states, *args, **kwargs):
            n, add = self.keys.shape[-2], key_states.shape[-2]
            if n + add > self._k.shape[-2]:
                self._store(self.keys, self.values, add + 64)
            self._k[:, :, n : n + add] = key_states
            self._v[:, :, n : n + add] = value_states
            self.keys, self.values = self._k[:, :, : n + add], self._v[:, :, : n + add]
            return self.keys, self.values

    return GrowingLayer


def _GrowingLayer(keys, values, spare: int = 64):
    return _growing_layer_class()(keys, values, spare)


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
    prompts: list = field(default_factory=list)  # token ids per row, while prefilling

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

        self.select(torch.tensor(keep, device=self.mask.device))

    def select(self, index) -> None:
        """Keep the tensors' rows ``index`` (in that order), then drop the left columns no row uses."""
        self.mask = self.mask[index]
        self.logits = self.logits[index]
        first = int((self.mask.sum(0) > 0).nonzero()[0])
        self.mask = self.mask[:, first:]
        layers = self.cache.layers
        for i, layer in enumerate(layers):  # one layer at a time: at most one layer is held twice
            layers[i] = _GrowingLayer(layer.keys[index, :, first:], layer.values[index, :, first:])

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

        layers = self.cache.layers
        for i, (mine, theirs) in enumerate(zip(layers, other.cache.layers)):
            layers[i] = _GrowingLayer(torch.cat([left_pad(mine.keys, 2), left_pad(theirs.keys, 2)]),
                                      torch.cat([left_pad(mine.values, 2), left_pad(theirs.values, 2)]))
        self.mask = torch.cat([left_pad(self.mask, 1), left_pad(other.mask, 1)])
        self.logits = torch.cat([self.logits, other.logits])
        self.rows += other.rows
        self.generated += other.generated
        self.generators += other.generators
        self.prompts += other.prompts
        return self
