"""Sampling with transformers' own ``generate``: the compatible path beside vLLM.

vLLM is the fast engine (continuous batching, prefix caching). This path runs
what vLLM cannot: bitsandbytes 8-/4-bit, architectures vLLM lacks, machines
without vLLM. It is ``model.generate`` with two hooks of ours:

- `SeededSampler`, a logits processor that samples each row with its request's
  own random generator, so an output depends on its seed, not on its batch;
- `Stops`, a stopping criterion that ends each row at end-of-sequence, the
  start of the next ``Human`` turn or the token limit, and reports finished
  rows as they finish (progress, and retries the caller adds).

On a CPU, models on transformers' ``sdpa`` attention decode with `sdpa_grouped_kv`,
which is the same attention without per-head copies of grouped key/value heads
(2.5x the pairs/s for SmolLM2).

Requests run in batches of ``batch_size``, longest first (similar lengths
share a batch, and an out-of-memory error shows at once); requests the caller
adds during the call (retries of failed outputs) run in a later batch.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Sequence

from ..tasks.conversation import STOP_STRINGS
from .engine import Completion, ProgressCallback, SamplingSettings, banned_token_ids, end_of_sequence_ids

# Tokens decoded at each step to look for a stop string; longer than any stop string.
STOP_WINDOW = 8


class TransformersGenerator:
    """Sampling with a transformers causal LM (any dtype or quantization it was loaded with).

    Args:
        batch_size: sequences decoded together.
    """

    def __init__(self, model, tokenizer, batch_size: int = 16, description: str = ""):
        self.model = model
        self.tokenizer = tokenizer
        self.batch_size = batch_size
        self.description = description or getattr(model, "name_or_path", "model")
        self._banned: dict[str, list[int]] = {}  # banned characters -> token ids
        self.eos_ids = end_of_sequence_ids(tokenizer, model.generation_config)

    def count_tokens(self, text: str) -> int:
        return len(self.tokenizer(text, add_special_tokens=False)["input_ids"])

    def generate(
        self,
        prompts: Sequence[str],
        seeds: Sequence[int],
        settings: SamplingSettings,
        on_progress: ProgressCallback | None = None,
    ) -> list[Completion]:
        if settings.banned_characters not in self._banned:
            self._banned[settings.banned_characters] = banned_token_ids(self.tokenizer, settings.banned_characters)
        encoded = [self.tokenizer(p, add_special_tokens=False)["input_ids"] for p in prompts]
        seeds = list(seeds)
        results: list[Completion | None] = [None] * len(prompts)
        queue = deque(sorted(range(len(prompts)), key=lambda i: -len(encoded[i])))

        def report(done: list[tuple[int, Completion]], tokens: int) -> None:
            for i, completion in done:
                results[i] = completion
            for prompt, seed in (on_progress(done, tokens) if on_progress else None) or ():
                encoded.append(self.tokenizer(prompt, add_special_tokens=False)["input_ids"])
                seeds.append(seed)
                results.append(None)
                queue.append(len(encoded) - 1)

        while queue:
            rows = [queue.popleft() for _ in range(min(self.batch_size, len(queue)))]
            self._run(rows, [encoded[i] for i in rows], [seeds[i] for i in rows], settings, report)
        return results  # type: ignore[return-value]

    def _run(self, rows: list[int], ids: list[list[int]], seeds: list[int], settings: SamplingSettings, report):
        """One ``generate`` call over a left-padded batch."""
        import torch
        from transformers import GenerationConfig, LogitsProcessorList, StoppingCriteriaList

        width = max(map(len, ids))
        pad = self.tokenizer.pad_token_id if self.tokenizer.pad_token_id is not None else self.tokenizer.eos_token_id
        input_ids = torch.tensor([[pad] * (width - len(x)) + x for x in ids], device=self.model.device)
        mask = torch.tensor([[0] * (width - len(x)) + [1] * len(x) for x in ids], device=self.model.device)
        config = GenerationConfig(
            do_sample=False, max_new_tokens=settings.max_new_tokens, pad_token_id=pad, eos_token_id=self.eos_ids,
        )
        banned = torch.tensor(self._banned[settings.banned_characters], dtype=torch.long, device=self.model.device)
        sampler = SeededSampler(seeds, settings, banned, [len(x) for x in ids])
        stops = Stops(self.tokenizer, self.eos_ids, rows, width, settings.max_new_tokens, report)
        # generate() fills each setting left unset with the model's generation_config.json (a repetition penalty,
        # no_repeat_ngram_size, a minimum length...): with an empty one there, only our settings shape the
        # samples, as on vLLM, which takes nothing but end-of-sequence ids from that file.
        model_defaults, self.model.generation_config = self.model.generation_config, GenerationConfig()
        attention = self.model.config._attn_implementation
        grouped = attention == "sdpa" and self.model.device.type == "cpu"
        try:
            if grouped:
                self.model.set_attn_implementation(register_grouped_sdpa())
            with torch.inference_mode():
                self.model.generate(
                    input_ids=input_ids, attention_mask=mask, generation_config=config,
                    logits_processor=LogitsProcessorList([sampler]), stopping_criteria=StoppingCriteriaList([stops]),
                )
        finally:
            self.model.generation_config = model_defaults
            if grouped:
                self.model.set_attn_implementation(attention)


class SeededSampler:
    """A logits processor that samples each row's next token with that row's own generator and
    leaves it the only finite logit, so greedy decoding takes it."""

    def __init__(self, seeds: list[int], settings: SamplingSettings, banned, prompt_lengths: list[int]):
        import torch

        self.generators = [torch.Generator().manual_seed(s) for s in seeds]
        self.settings = settings
        self.banned = banned  # token ids, a tensor on the model's device
        self.prompt_lengths = prompt_lengths

    def __call__(self, input_ids, scores):
        import torch

        seen = None
        if self.settings.repetition_penalty != 1.0:  # each row's own tokens: its prompt without padding, its output
            width = max(self.prompt_lengths)
            seen = [input_ids[r, width - n:] for r, n in enumerate(self.prompt_lengths)]
        logits = warp(scores.float(), self.settings, self.banned, seen)
        # Inverse-CDF sampling: one uniform draw per row from that row's own generator,
        # then one batched search (torch.multinomial per row costs ~1 ms each).
        cdf = torch.softmax(logits, dim=-1).cpu().cumsum_(dim=-1)
        u = torch.cat([torch.rand(1, generator=g) for g in self.generators]) * cdf[:, -1]
        tokens = torch.searchsorted(cdf, u[:, None]).clamp_(max=cdf.shape[1] - 1).to(scores.device)
        return torch.full_like(scores, float("-inf")).scatter_(1, tokens, 0.0)


GROUPED_SDPA = "sdpa_grouped_kv"


def register_grouped_sdpa() -> str:
    """Register `sdpa_grouped_kv` with transformers' attention and mask interfaces; returns its name."""
    from transformers import AttentionInterface
    from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS, AttentionMaskInterface

    AttentionInterface.register(GROUPED_SDPA, sdpa_grouped_kv)
    AttentionMaskInterface.register(GROUPED_SDPA, ALL_MASK_ATTENTION_FUNCTIONS["sdpa"])
    return GROUPED_SDPA


def sdpa_grouped_kv(module, query, key, value, attention_mask, dropout: float = 0.0, scaling=None, **kwargs):
    """transformers' sdpa attention, except that a masked grouped-query attention (padded rows, every
    decoding step of a batch) reads the shared key/value heads in place instead of copying them per head.

    transformers copies them whenever there is a mask, because CUDA's kernels fall back to the math
    kernel for a masked ``enable_gqa``; torch's CPU kernels take it. For SmolLM2 (9 query heads on 3
    key/value heads), 32 rows and 500 cached tokens: 25 ms per layer with the copies, 1.3 ms without
    (the same output), which was two thirds of a decoding step (docs/generator.md). Anything else
    (no mask, no groups, position biases, paged caches, a soft cap) goes to transformers' own function.
    """
    import torch
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    special = any(kwargs.get(k) is not None for k in ("position_bias", "cache", "softcap"))
    if attention_mask is None or getattr(module, "num_key_value_groups", 1) == 1 or special:
        return sdpa_attention_forward(module, query, key, value, attention_mask, dropout=dropout, scaling=scaling,
                                      **kwargs)
    out = torch.nn.functional.scaled_dot_product_attention(
        query, key, value, attn_mask=attention_mask, dropout_p=dropout, scale=scaling, enable_gqa=True
    )
    return out.transpose(1, 2).contiguous(), None


class Stops:
    """A stopping criterion: each row stops at end-of-sequence, a stop string or the token limit;
    finished rows are passed to ``report`` (with the tokens generated in the step) as they finish."""

    def __init__(self, tokenizer, eos_ids: list[int], rows: list[int], width: int, max_new_tokens: int, report):
        self.tokenizer = tokenizer
        self.eos_ids = set(eos_ids)
        self.rows = rows
        self.width = width
        self.max_new_tokens = max_new_tokens
        self.report = report
        self.finished = [False] * len(rows)

    def __call__(self, input_ids, scores, **kwargs):
        import torch

        new = input_ids[:, self.width:]
        step = new.shape[1]
        active = self.finished.count(False)
        done = []
        for r, row in enumerate(self.rows):
            if self.finished[r]:
                continue
            ended = int(new[r, -1]) in self.eos_ids  # its text, if it is no special token, stays (as on vLLM)
            if ended or step >= self.max_new_tokens or any(
                s in self.tokenizer.decode(new[r, -STOP_WINDOW:]) for s in STOP_STRINGS
            ):
                done.append((r, Completion(self.tokenizer.decode(new[r], skip_special_tokens=True), step, ended)))
        for r, _ in done:
            self.finished[r] = True
        self.report([(self.rows[r], c) for r, c in done], active)
        return torch.tensor(self.finished, device=input_ids.device)


def warp(logits, settings: SamplingSettings, banned, seen: list | None = None):
    """Next-token logits as sampled from, in vLLM's order: repetition penalty (over ``seen``, each row's
    prompt and output so far), temperature, banned tokens, top-k, top-p; transformers' own processors do each step."""
    import torch
    from transformers import RepetitionPenaltyLogitsProcessor, TopKLogitsWarper, TopPLogitsWarper

    if settings.repetition_penalty != 1.0:
        width = max(map(len, seen))
        seen = torch.stack([torch.cat([s, s[:1].expand(width - len(s))]) for s in seen])  # repeats: no effect
        logits = RepetitionPenaltyLogitsProcessor(settings.repetition_penalty)(seen.to(logits.device), logits)
    logits = (logits / settings.temperature).index_fill_(1, banned, float("-inf"))
    if settings.top_k:
        logits = TopKLogitsWarper(settings.top_k)(None, logits)
    if settings.top_p < 1.0:
        logits = TopPLogitsWarper(settings.top_p)(None, logits)
    return logits
