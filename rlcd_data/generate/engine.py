"""What the build asks of an engine, whichever engine runs it.

An engine (`TransformersGenerator` here, `VLLMGenerator` in `.vllm_engine`)
samples one completion per (prompt, seed) with the same settings and the same
stops: end-of-sequence, the start of the next ``Human`` turn, or the token
limit. Every request has its own seed, so an output depends on its seed, not
on its batch. Engines report finished requests as they go and take more
requests (retries) during a call.
"""


from __future__ import annotations

import random
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Protocol

# Tokens containing any of these characters are never sampled: the paper banned backslashes and backticks.
PAPER_BANNED_CHARACTERS = "\\`"


@dataclass(frozen=True)
class SamplingSettings:
    max_new_tokens: int = 300
    temperature: float = 1.0
    banned_characters: str = PAPER_BANNED_CHARACTERS
    top_p: float = 1.0  # 1 = off
    top_k: int = 0  # 0 = off
    repetition_penalty: float = 1.0  # 1 = off; over the prompt's and the output's tokens, as in vLLM


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


def banned_token_ids(tokenizer, characters: str) -> list[int]:
    """Ids of the tokens whose text contains any of ``characters`` (special tokens are never banned)."""
    if not characters:
        return []
    special = set(tokenizer.all_special_ids)
    texts = tokenizer.batch_decode([[i] for i in range(len(tokenizer))])
    return [i for i, text in enumerate(texts) if i not in special and any(c in text for c in characters)]


def end_of_sequence_ids(tokenizer, generation_config) -> list[int]:
    """The tokens that end an output: the tokenizer's end-of-sequence and any the model's
    generation_config.json lists (e.g. ``<|eot_id|>`` beside ``<|end_of_text|>``), as vLLM stops."""
    listed = getattr(generation_config, "eos_token_id", None)
    listed = [listed] if isinstance(listed, int) else list(listed or [])
    return sorted({tokenizer.eos_token_id, *listed} - {None})


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
