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

from collections import deque
from collections.abc import Sequence

from ..errors import RlcdError
from . import Completion, ProgressCallback, SamplingSettings, banned_token_ids
from .attention import cache_argument, ragged_attention
from .batch import Batch, GrowingLayer, Part
from .onednn import packed_linears
from .prefixes import PrefixStore, length_groups, prefill_groups


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
        prefixes = PrefixStore(encoded, share=window is None)
        # Longest first (an out-of-memory error shows at once), requests sharing a prefix next to each other.
        queue = deque(sorted(range(len(prompts)), key=lambda i: prefixes.order(encoded[i])))
        results: list[Completion | None] = [None] * len(prompts)
        batch: Batch | None = None
        refill_below = max(1, int(self.batch_size * (1 - self.refill_at)))
        with torch.inference_mode(), ragged_attention(self.model), packed_linears(self.model, self.batch_size):
            while queue or batch is not None:
                active = batch.active if batch else 0
                if queue and active < self.batch_size and (active == 0 or active <= refill_below):
                    new = [queue.popleft() for _ in range(min(self.batch_size - active, len(queue)))]
                    ids, row_seeds = [encoded[i] for i in new], [seeds[i] for i in new]
                    batch = self._admit(batch or Batch(window), new, ids, row_seeds, prefixes)
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

    def _admit(self, batch: Batch, rows: list[int], ids: list[tuple], seeds: list[int], prefixes) -> Batch:
        """Prefill new prompts; each group prefilled together joins the running batch as a cohort."""
        import torch

        # Identical prompts (attempts of one output, run side by side) share one prefill.
        unique = list(dict.fromkeys(ids))
        prefixes.states.update(self._prefill_prefixes(prefixes.missing(unique)))
        parts = []
        for group in prefill_groups(unique, prefixes):
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

    def _prefill(self, prompts: list[tuple], shared: list) -> Part:
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
        cache.layers = [GrowingLayer() for _ in cache.layers]
        if past:
            layers = []
            for layer in range(len(cache.layers)):
                keys, values = (
                    torch.cat([left_pad(kv[layer][j] if kv else None, past, like=first_states(shared)[layer][j])
                               for kv in shared])
                    for j in (0, 1)
                )
                layers.append(GrowingLayer(keys, values, spare=length))
            cache.layers = layers
        out = self.model(
            input_ids=input_ids.to(device),
            attention_mask=mask.to(device),
            position_ids=(mask.cumsum(-1) - 1).clamp(min=0)[:, past:].to(device),
            use_cache=True,
            logits_to_keep=1,
            **{cache_argument(type(self.model)): cache},
        )  # the model fills `cache` in place
        return Part(layers=cache.layers, mask=mask.to(device), logits=out.logits[:, -1].float(), prompts=list(prompts))

    def _prefill_prefixes(self, todo: list[tuple]) -> dict[tuple, list[tuple]]:
        """Key/value states of each prefix, [1, heads, length, dim] per layer, without padding."""
        states = {}
        for group in length_groups(sorted(todo, key=len, reverse=True), len):
            part = self._prefill(group, [None] * len(group))
            length = part.mask.shape[1]
            for r, x in enumerate(group):
                start = length - len(x)
                states[x] = [(layer.keys[r : r + 1, :, start:].clone(), layer.values[r : r + 1, :, start:].clone())
                             for layer in part.layers]
        return states


def first_states(states: list):
    return next(kv for kv in states if kv is not None)


def left_pad(t, length: int, like):
    """``t`` ([1, heads, n, dim]) left-padded with zeros to ``length``; None becomes all padding."""
    import torch.nn.functional as F

    if t is None:
        return like.new_zeros(*like.shape[:2], length, like.shape[-1])
    return F.pad(t, (0, 0, length - t.shape[-2], 0))
