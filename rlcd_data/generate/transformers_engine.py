"""Sampling from a causal LM with a continuously refilled batch.

Requests are queued longest first (an out-of-memory error shows at once),
requests that share a prefix next to each other, and decoded in one batch
where each sequence finishes at its own stop: end-of-sequence, the start of
the next ``Human`` turn, or the token limit. A finished row leaves the batch
at once (its cohort's last row moves into its slot); once ``refill_at`` of the
batch (an eighth) has finished, the freed slots are refilled from the queue,
so the batch stays full instead of waiting for its longest sequence. Requests
the caller adds while the call runs (retries of failed outputs) join the same
queue.

Rows admitted together form a cohort with its own key/value cache, as wide as
its longest row; the model runs on all rows at once and attention reads each
row's cohort. Admitting rows copies no other cohort's cache, and a short row
is not padded to the longest row of the whole batch (memory and attention
follow the rows' own lengths). The cache grows in place (a buffer with room at
the end) instead of being copied at every step.

Prefill does no repeated work: identical prompts are prefilled once; a prefix
that several prompts of the call share (p+ and p- are identical up to their
first descriptor) is prefilled once and each prompt runs only its own rest;
a retry of a row that just finished continues from that row's prompt states;
prompts are prefilled in groups of similar length, so padding stays small.
Every request samples with its own random generator, so its output depends on
its seed, not on which requests share its batch. Results come back in the
caller's order.

Models with sliding-window attention (Mistral, Gemma 3, ...) are supported:
when a sequence may outgrow the window, prompts are prefilled whole (no shared
prefix, so a row holds no padding between its tokens) and each sliding layer
attends to the last ``window`` columns of its cohort. Attention logit
soft-capping (Gemma 2) and chunked attention are refused with an RlcdError.
"""

from __future__ import annotations

import contextlib
import functools
from collections import Counter, deque
from collections.abc import Sequence
from dataclasses import dataclass, field

from ..conversation import STOP_STRINGS
from ..errors import RlcdError
from . import Completion, ProgressCallback, SamplingSettings, banned_token_ids

# Tokens decoded at each step to look for a stop string; longer than any stop string.
STOP_WINDOW = 8


class TransformersGenerator:
    """Sampling with a transformers causal LM (any dtype or quantization it was loaded with).

    Args:
        batch_size: sequences decoded together.
        refill_at: refill once this fraction of the batch has finished
            (a prefill per refill; 0 < refill_at <= 1).
    """

    def __init__(self, model, tokenizer, batch_size: int = 16, description: str = "", refill_at: float = 0.125):
        self.model = model
        self.tokenizer = tokenizer
        self.batch_size = batch_size
        self.refill_at = refill_at
        self.description = description or getattr(model, "name_or_path", "model")
        config = model.config.get_text_config()
        for name in ("attn_logit_softcapping", "attention_chunk_size"):
            if getattr(config, name, None):
                raise RlcdError(f"{self.description}: its attention uses {name}, which the generator does not support")
        self.window = getattr(config, "sliding_window", None)
        self._banned: dict[str, object] = {}  # banned characters -> token ids (a tensor)

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
        if settings.banned_characters not in self._banned:
            ids = banned_token_ids(self.tokenizer, settings.banned_characters)
            self._banned[settings.banned_characters] = torch.tensor(ids, dtype=torch.long, device=self.model.device)
        banned = self._banned[settings.banned_characters]
        # Shared prefill states put padding inside rows (up to a prompt's length) and a sliding window
        # counts columns: share only if no row, padding included, can outgrow the window (then it hides
        # nothing). Requests added during the call are retries of these prompts.
        longest = max(map(len, encoded), default=0)
        window = self.window if self.window and 2 * longest + settings.max_new_tokens > self.window else None
        prefixes = _PrefixStore(encoded, share=window is None)
        # Longest first (an out-of-memory error shows at once), requests sharing a prefix next to each other.
        queue = deque(sorted(range(len(prompts)), key=lambda i: prefixes.order(encoded[i])))
        results: list[Completion | None] = [None] * len(prompts)
        batch: _Batch | None = None
        refill_below = max(1, int(self.batch_size * (1 - self.refill_at)))
        with torch.inference_mode(), _ragged_attention(self.model), _packed_linears(self.model, self.batch_size):
            while queue or batch is not None:
                active = batch.active if batch else 0
                if queue and active < self.batch_size and (active == 0 or active <= refill_below):
                    new = [queue.popleft() for _ in range(min(self.batch_size - active, len(queue)))]
                    ids, row_seeds = [encoded[i] for i in new], [seeds[i] for i in new]
                    batch = self._admit(batch or _Batch(window), new, ids, row_seeds, prefixes)
                done = batch.sample(settings, self.tokenizer, banned)
                for i, completion in done:
                    results[i] = completion
                more = on_progress(done, batch.active) if on_progress else None  # one new token per live row
                finished = {encoded[i]: i for i, _ in done}
                for prompt, seed in more or ():
                    x = tuple(self.tokenizer(prompt, add_special_tokens=False)["input_ids"])
                    encoded.append(x)
                    seeds.append(seed)
                    results.append(None)
                    prefixes.add(x)
                    if x in finished and x not in prefixes.kept and len(x) > 1 and window is None:
                        # A retry of a row that just finished: keep that row's prompt states (all but the
                        # last token) and admit it at the next refill, so they are not held for long.
                        prefixes.kept[x] = batch.prompt_states(finished[x], len(x) - 1)
                        queue.appendleft(len(encoded) - 1)
                    else:
                        queue.append(len(encoded) - 1)
                batch.finish({i for i, _ in done})
                if batch.active:
                    batch.forward(self.model)
                else:
                    batch = None
        return results  # type: ignore[return-value]

    def _admit(self, batch: _Batch, rows: list[int], ids: list[tuple], seeds: list[int], prefixes) -> _Batch:
        """Prefill new prompts; each group prefilled together joins the running batch as a cohort."""
        import torch

        # Identical prompts (attempts of one output, run side by side) share one prefill.
        unique = list(dict.fromkeys(ids))
        prefixes.states.update(self._prefill_prefixes(prefixes.missing(unique)))
        parts = []
        for group in _prefill_groups(unique, prefixes):
            part = self._prefill(group, [prefixes.shared_states(x) for x in group])
            position = {x: r for r, x in enumerate(part.prompts)}
            mine = [k for k, x in enumerate(ids) if x in position]  # its requests, one row each
            if [position[ids[k]] for k in mine] != list(range(len(part))):
                part.select([position[ids[k]] for k in mine])
            part.rows = [rows[k] for k in mine]
            part.generated = [[] for _ in mine]
            part.generators = [torch.Generator().manual_seed(seeds[k]) for k in mine]
            part.prompt_ids = [ids[k] for k in mine]
            parts.append(part)
        for x in ids:
            prefixes.admitted(x)
        batch.add(parts)
        return batch

    def _prefill(self, prompts: list[tuple], shared: list) -> _Part:
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
        cache.layers = [_GrowingLayer() for _ in cache.layers]
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
            use_cache=True,
            logits_to_keep=1,
            **{_cache_argument(type(self.model)): cache},
        )  # the model fills `cache` in place
        return _Part(layers=cache.layers, mask=mask.to(device), logits=out.logits[:, -1].float(), prompts=list(prompts))

    def _prefill_prefixes(self, todo: list[tuple]) -> dict[tuple, list[tuple]]:
        """Key/value states of each prefix, [1, heads, length, dim] per layer, without padding."""
        states = {}
        for group in _length_groups(sorted(todo, key=len, reverse=True), len):
            part = self._prefill(group, [None] * len(group))
            length = part.mask.shape[1]
            for r, x in enumerate(group):
                start = length - len(x)
                states[x] = [(layer.keys[r : r + 1, :, start:].clone(), layer.values[r : r + 1, :, start:].clone())
                             for layer in part.layers]
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

    def __init__(self, prompts: Sequence[tuple], share: bool = True):
        ordered = sorted(set(prompts))
        common = [0] + [_common_length(a, b) if share else 0 for a, b in zip(ordered, ordered[1:])] + [0]
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
        self.kept: dict[tuple, list] = {}  # prompt -> states of all its tokens but the last, until admitted

    def add(self, x: tuple) -> None:
        """A request added during the call: it shares the prefix of an identical earlier prompt, if any."""
        self.length.setdefault(x, 0)
        self.users[self.key(x)] = self.users.get(self.key(x), 0) + 1

    def key(self, x: tuple) -> tuple:
        """The prefix ``x`` shares with other prompts (empty if none)."""
        return x[: self.length[x]]

    def group(self, x: tuple) -> tuple:
        return self.key(x) or x

    def missing(self, prompts: list[tuple]) -> list[tuple]:
        """Shared prefixes of ``prompts`` still to be prefilled."""
        keys = (self.key(x) for x in prompts if x not in self.kept)
        return list(dict.fromkeys(k for k in keys if k and k not in self.states))

    def shared_states(self, x: tuple):
        """States ``x`` continues from: its own kept states, its shared prefix's, or None."""
        return self.kept[x] if x in self.kept else self.states.get(self.key(x))

    def shared_length(self, x: tuple) -> int:
        return len(x) - 1 if x in self.kept else self.length[x]

    def order(self, x: tuple) -> tuple:
        """Queue order: longest first, the prompts of one prefix next to each other."""
        return (-self.longest[self.group(x)], self.group(x), -len(x))

    def admitted(self, x: tuple) -> None:
        self.kept.pop(x, None)
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


def _GrowingLayer(keys=None, values=None, spare: int = 64):
    return _growing_layer_class()(keys, values, spare)


# What a batch keeps per row, in row order.
ROW_FIELDS = ("rows", "generated", "generators", "prompt_ids")


@dataclass
class _Part:
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
            self.layers[i] = _GrowingLayer(layer.keys[index, :, first:], layer.values[index, :, first:])

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

    def merge(self, other: _Part) -> _Part:
        """Append ``other``'s rows, left-padding the narrower cache and mask."""
        import torch
        import torch.nn.functional as F

        length = max(self.mask.shape[1], other.mask.shape[1])

        def left_pad(t, dim_from_end):
            missing = length - t.shape[-dim_from_end]
            return t if missing == 0 else F.pad(t, (0, 0) * (dim_from_end - 1) + (missing, 0))

        for i, (mine, theirs) in enumerate(zip(self.layers, other.layers)):
            self.layers[i] = _GrowingLayer(torch.cat([left_pad(mine.keys, 2), left_pad(theirs.keys, 2)]),
                                           torch.cat([left_pad(mine.values, 2), left_pad(theirs.values, 2)]))
        self.mask = torch.cat([left_pad(self.mask, 1), left_pad(other.mask, 1)])
        self.logits = torch.cat([self.logits, other.logits])
        for name in ("prompts", *ROW_FIELDS):
            setattr(self, name, getattr(self, name) + getattr(other, name))
        return self


# Cohorts of the running batch; beyond this many, the two that waste least padding together merge.
MAX_COHORTS = 8


class _Batch:
    """Sequences decoded together. Each cohort (rows admitted together) keeps its own key/value cache,
    as wide as its longest row: admitting rows copies no other cache, and attention reads each row's
    cohort, not the whole batch padded to its longest row. The model runs on all rows at once."""

    def __init__(self, window: int | None = None):
        self.window = window  # sliding layers attend to this many last columns (rows hold no inner padding)
        self.cohorts: list[_Part] = []
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

    def add(self, parts: list[_Part]) -> None:
        """Join ``parts`` as new cohorts."""
        def change():
            self.cohorts.extend(parts)
            while len(self.cohorts) > MAX_COHORTS:
                self._merge_closest()

        self._restructure(change)

    def _merge_closest(self) -> None:
        def waste(a: _Part, b: _Part) -> int:
            return abs(a.mask.shape[1] - b.mask.shape[1]) * (len(a) if a.mask.shape[1] < b.mask.shape[1] else len(b))

        pairs = [(i, j) for i in range(len(self.cohorts)) for j in range(i + 1, len(self.cohorts))]
        i, j = min(pairs, key=lambda ij: waste(self.cohorts[ij[0]], self.cohorts[ij[1]]))
        self.cohorts[i].merge(self.cohorts.pop(j))

    def sample(self, settings: SamplingSettings, tokenizer, banned) -> list[tuple[int, Completion]]:
        """Sample one token per row, never one of ``banned`` (token ids); return the rows that finished,
        with their completions."""
        import torch

        logits = _warp(self.logits, settings, banned, self.prompt_ids, self.generated)
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
        cache = _ragged_cache_class()(self.cohorts, model.config, self.window)
        out = model(
            input_ids=last,
            attention_mask=cache.placeholder_mask,
            position_ids=torch.cat([c.mask.sum(-1, keepdim=True) - 1 for c in self.cohorts]),
            use_cache=True,
            **{_cache_argument(type(model)): cache},
        )
        self.logits = out.logits[:, -1].float()


def _warp(logits, settings: SamplingSettings, banned, prompt_ids: list, generated: list):
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


@functools.cache
def _cache_argument(model_class) -> str:
    """The name of the forward's key/value cache argument: ``past_key_values`` until transformers renamed it
    ``cache`` (the old name is accepted with a warning until 5.40)."""
    import inspect

    return "cache" if "cache" in inspect.signature(model_class.forward).parameters else "past_key_values"


class _Ragged:
    """Keys/values of a decoding step, per cohort: (first row, end row, keys, values, mask)."""

    def __init__(self, parts: list, window: int | None):
        self.parts = parts
        self.window = window


# Name under which the attention that understands _Ragged is registered with transformers.
RAGGED_ATTENTION = "rlcd_ragged_sdpa"


@functools.cache
def _ragged_cache_class():
    import torch
    from transformers import DynamicCache

    class RaggedCache(DynamicCache):
        """The batch's cohorts seen as one cache: each layer's update writes every cohort's new token
        in place and hands the attention a _Ragged instead of one padded tensor."""

        def __init__(self, cohorts: list[_Part], config, window: int | None):
            super().__init__(config=config)
            self.cohorts, self.window = cohorts, window
            # Additive masks, made once per step (SDPA would turn a boolean mask into one in every layer).
            dtype = cohorts[0].layers[0].keys.dtype
            self.masks = [torch.zeros(c.mask.shape, dtype=dtype, device=c.mask.device)
                          .masked_fill_(c.mask == 0, float("-inf"))[:, None, None, :] for c in cohorts]
            # transformers takes a 4-D mask as already prepared; the attention uses self.masks instead.
            self.placeholder_mask = cohorts[0].mask.new_ones(sum(map(len, cohorts)), 1, 1, 1, dtype=bool)

        def update(self, key_states, value_states, layer_idx, *args, **kwargs):
            parts, start = [], 0
            for c, mask in zip(self.cohorts, self.masks):
                end = start + len(c)
                keys, values = c.layers[layer_idx].update(key_states[start:end], value_states[start:end])
                parts.append((start, end, keys, values, mask))
                start = end
            ragged = _Ragged(parts, self.window)
            return ragged, ragged

    return RaggedCache


@functools.cache
def _register_ragged_attention() -> str:
    import torch
    import torch.nn.functional as F
    from transformers import AttentionInterface
    from transformers.integrations.sdpa_attention import sdpa_attention_forward
    from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

    def attention(module, query, key, value, attention_mask, scaling=None, **kwargs):
        if not isinstance(key, _Ragged):
            return sdpa_attention_forward(module, query, key, value, attention_mask, scaling=scaling, **kwargs)
        # One new token per row: a key/value head's query heads attend as that many query positions
        # (what transformers' sdpa path does for one token), so keys/values are not repeated per head.
        rows, heads, _, dim = query.shape
        groups = key.parts[0][2].shape[1]
        query = query.reshape(rows, groups, heads // groups, dim)
        # A sliding layer sees the last `window` tokens, its own included: the last columns of its cohort.
        w = -kwargs["sliding_window"] if key.window and kwargs.get("sliding_window") else 0
        out = torch.cat([F.scaled_dot_product_attention(query[a:b], k[:, :, w:], v[:, :, w:], attn_mask=m[..., w:],
                                                        scale=scaling) for a, b, k, v, m in key.parts])
        return out.reshape(rows, 1, heads, dim), None

    AttentionInterface.register(RAGGED_ATTENTION, attention)
    AttentionMaskInterface.register(RAGGED_ATTENTION, sdpa_mask)
    return RAGGED_ATTENTION


@contextlib.contextmanager
def _ragged_attention(model):
    """The model attends with _register_ragged_attention()'s function (SDPA) while decoding."""
    before = model.config._attn_implementation
    model.set_attn_implementation(_register_ragged_attention())
    try:
        yield
    finally:
        model.set_attn_implementation(before)


@contextlib.contextmanager
def _packed_linears(model, batch_size: int):
    """On CPU, the model's plain float linear layers run on oneDNN with their weights packed once into
    its blocked layout (what torch.compile's CPU weight prepacking does). On this kind of CPU that is
    2-3x faster than the default kernel, and it is exact fp32/bf16 arithmetic. The packed copies live
    only while generating; meanwhile they stand in for the layers' own weights, which are freed and
    restored exactly from them afterwards (weights shared with another layer, such as a tied output
    layer, are kept), so the model is not held twice. Anything else (GPU, quantized or hooked layers,
    no oneDNN) is left as is."""
    import torch

    packed = {}
    if model.device.type == "cpu" and torch.backends.mkldnn.is_available():
        for module in model.modules():
            weight = getattr(module, "weight", None)
            if type(module) is torch.nn.Linear and "forward" not in vars(module) and \
                    weight.dtype in (torch.float32, torch.bfloat16):
                packed[module] = _packed_forward(weight.detach(), module.bias, batch_size)
        if not all(packed.values()):  # oneDNN cannot run them here
            packed = {}
    uses = Counter(id(p) for _, p in model.named_parameters(remove_duplicate=False))
    freed = [m for m in packed if uses[id(m.weight)] == 1]
    with torch.inference_mode(False):
        for module, forward in packed.items():
            module.forward = forward
        for module in freed:
            module.weight.data = module.weight.new_empty(0)
        if freed:  # the others may still point into the checkpoint's file mapping: with copies of their
            for p in model.parameters():  # own, the mapping, and with it the freed weights, is released
                if p.numel():
                    p.data = p.data.clone()
    try:
        yield
    finally:
        with torch.inference_mode(False):  # trainable again afterwards
            for module in freed:
                module.weight.data = packed[module].weight.to_dense()
                del module.forward, packed[module]  # one at a time: never two full copies
            for module in packed:
                del module.forward


def _packed_forward(weight, bias, batch_size: int):
    """``F.linear(x, weight, bias)`` on a oneDNN-packed copy of ``weight``, or None if that fails here."""
    import torch

    linear = torch.ops.mkldnn._linear_pointwise
    try:
        w = torch.ops.mkldnn._reorder_linear_weight(weight, batch_size)
        b = None if bias is None else bias.detach()
        x = torch.ones(2, weight.shape[1], dtype=weight.dtype)
        expected = torch.nn.functional.linear(x, weight, b).float()
        if (linear(x, w, b, "none", [None], "").float() - expected).abs().max() > 1e-2 * (1 + expected.abs().max()):
            return None  # not the same function: keep the default kernel
    except (RuntimeError, AttributeError):
        return None

    def forward(x):
        if x.shape[:-1].numel() == 1:  # oneDNN runs one row on another kernel: run it as two rows, so
            return linear(x.expand(*x.shape[:-2], 2, x.shape[-1]), w, b, "none", [None], "")[..., :1, :]
        return linear(x, w, b, "none", [None], "")  # that a row's result does not depend on its batch

    forward.weight = w
    return forward

