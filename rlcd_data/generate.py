"""Batched sampling from a causal LM, lm-eval style.

Requests are sorted by prompt length (longest first, so an out-of-memory
error shows at once), left-padded, generated batch by batch with each
sequence stopping at the next Human turn or end-of-sequence, and returned in
the caller's order.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Protocol

from .conversation import STOP_STRINGS


@dataclass(frozen=True)
class SamplingSettings:
    max_new_tokens: int = 300
    temperature: float = 1.0


@dataclass(frozen=True)
class Completion:
    text: str  # decoded new tokens, special tokens removed
    num_tokens: int  # new tokens generated for this sequence
    ended: bool  # stopped at end-of-sequence (not at a stop string or the token limit)


# Called after each batch with (sequences done, new tokens generated) in that batch.
BatchCallback = Callable[[int, int], None]


class Generator(Protocol):
    """What the build needs from a model; tests substitute a fake."""

    description: str

    def generate(
        self, prompts: Sequence[str], settings: SamplingSettings, seed: int, on_batch: BatchCallback | None = None
    ) -> list[Completion]: ...

    def count_tokens(self, text: str) -> int: ...


class TransformersGenerator:
    """Sampling with a transformers causal LM (any quantization it was loaded with)."""

    def __init__(self, model, tokenizer, batch_size: int = 16, description: str = ""):
        self.model = model
        self.tokenizer = tokenizer
        self.batch_size = batch_size
        self.description = description or getattr(model, "name_or_path", "model")

    def count_tokens(self, text: str) -> int:
        return len(self.tokenizer(text, add_special_tokens=False)["input_ids"])

    def generate(
        self, prompts: Sequence[str], settings: SamplingSettings, seed: int, on_batch: BatchCallback | None = None
    ) -> list[Completion]:
        import torch

        encoded = [self.tokenizer(p, add_special_tokens=False)["input_ids"] for p in prompts]
        order = sorted(range(len(prompts)), key=lambda i: -len(encoded[i]))
        results: list[Completion | None] = [None] * len(prompts)
        for start in range(0, len(order), self.batch_size):
            batch = order[start : start + self.batch_size]
            # One seed per batch, derived from the caller's seed and the batch's content.
            torch.manual_seed(hash((seed, tuple(batch))) & 0x7FFFFFFF)
            completions = self._generate_batch([encoded[i] for i in batch], settings)
            for i, completion in zip(batch, completions):
                results[i] = completion
            if on_batch:
                on_batch(len(batch), sum(c.num_tokens for c in completions))
        return results  # type: ignore[return-value]

    def _generate_batch(self, batch: list[list[int]], settings: SamplingSettings) -> list[Completion]:
        import torch

        tok = self.tokenizer
        padded = tok.pad({"input_ids": batch}, padding=True, return_tensors="pt")
        device = self.model.device
        with torch.inference_mode():
            out = self.model.generate(
                input_ids=padded["input_ids"].to(device),
                attention_mask=padded["attention_mask"].to(device),
                do_sample=True,
                temperature=settings.temperature,
                top_k=0,
                top_p=1.0,
                max_new_tokens=settings.max_new_tokens,
                stop_strings=list(STOP_STRINGS),
                tokenizer=tok,
                pad_token_id=tok.pad_token_id,
                eos_token_id=tok.eos_token_id,
            )
        new = out[:, padded["input_ids"].shape[1] :].tolist()
        completions = []
        for ids in new:
            # After a sequence finishes, generate() fills it with pad (= EOS here).
            finished = [j for j, t in enumerate(ids) if t in (tok.eos_token_id, tok.pad_token_id)]
            n = finished[0] if finished else len(ids)
            text = tok.decode(ids[:n], skip_special_tokens=True)
            ended = bool(finished) and ids[n] == tok.eos_token_id and not any(s in text for s in STOP_STRINGS)
            completions.append(Completion(text, n + int(ended), ended))
        return completions
