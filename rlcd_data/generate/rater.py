"""The direct-RLAIF rater (Lee et al. 2023, d-RLAIF): a language model's 1-10 rating of a response.

A rating prompt (``rate.jinja`` of the task) shows the conversation, one
response and the rating instruction, and ends with ``The rating is: (``. The
rating is the expected score under the model's next-token distribution
restricted to the score tokens, renormalised; the reward maps it linearly
from [1, 10] to [-1, 1]. Tokenizers that write every score as one token are
read in one step. Tokenizers that split numbers into digits (SmolLM2, Gemma,
Llama 2) write 10 as ``1`` then ``0``: the digits 1-9 are read after the
prompt, and the probability of ``0`` after ``1`` splits the mass of ``1``
between the scores 1 and 10 (the same forward pass reads both positions).
"""

from __future__ import annotations

import math
import statistics
import time
from collections.abc import Sequence

from ..errors import RlcdError
from ..tasks.task import RATING_START
from .labeller import forward_last
from .openai_engine import NextTokenReader

SCORES = tuple(range(1, 11))


def score_token_ids(tokenizer, prefix: str = RATING_START) -> tuple[list[int], int | None]:
    """The token ids of the scores after ``prefix``: (ids of 1..10, None) when each score is one token,
    or (ids of 1..9, id of ``0``) when 10 is written as ``1`` then ``0``.

    Raises:
        RlcdError: the scores do not encode either way (the rating would not be a next-token choice).
    """
    base = tokenizer(prefix, add_special_tokens=False)["input_ids"]

    def after(text: str) -> list[int] | None:
        full = tokenizer(prefix + text, add_special_tokens=False)["input_ids"]
        return full[len(base) :] if full[: len(base)] == base else None

    encoded = {s: after(str(s)) for s in SCORES}
    single = [e[0] if e is not None and len(e) == 1 else None for e in encoded.values()]
    if None not in single and len(set(single)) == 10:
        return single, None
    digits, ten = single[:9], encoded[10]
    if None not in digits and len(set(digits)) == 9 and ten is not None and len(ten) == 2 and ten[0] == digits[0]:
        return digits, ten[1]
    raise RlcdError(f"the tokenizer does not encode the scores 1 to 10 after {prefix!r} as single tokens (or 10 as "
                    "1 then 0); the rater reads the score as the next token")


def to_reward(score: float) -> float:
    """An expected score in [1, 10] mapped linearly to [-1, 1]."""
    return (score - 5.5) / 4.5


class LLMRater:
    """Expected 1-10 ratings from a causal LM's next-token logits over the score tokens.

    Args:
        model, tokenizer: a loaded causal LM (any size, 8-/4-bit included).
        batch_size: prompts per forward pass.
    """

    def __init__(self, model, tokenizer, batch_size: int = 16):
        self.model = model
        self.tokenizer = tokenizer
        self.batch_size = batch_size
        self.score_ids, self.zero_id = score_token_ids(tokenizer)

    def expected_scores(self, prompts: Sequence[str], on_rows=None) -> list[float]:
        """The expected score of each rating prompt (each ends where the score comes next); ``on_rows(n)``
        after each batch of ``n`` prompts."""
        import torch

        encoded = [self.tokenizer(p, add_special_tokens=False)["input_ids"] for p in prompts]
        if self.zero_id is None:
            def read(logits):
                probabilities = torch.softmax(logits[:, -1, self.score_ids].float(), dim=-1)
                return (probabilities @ torch.tensor(SCORES, dtype=torch.float)).tolist()

            return forward_last(self.model, self.tokenizer, encoded, self.batch_size, read, on_rows)
        one = self.score_ids[0]

        def read_split(logits):  # position -2: the score's first digit; -1: what follows a "1"
            digits = torch.softmax(logits[:, -2, self.score_ids].float(), dim=-1)
            zero = torch.softmax(logits[:, -1].float(), dim=-1)[:, self.zero_id]
            expected = digits @ torch.arange(1, 10, dtype=torch.float)
            return (expected + 9 * digits[:, 0] * zero).tolist()  # P(10) = P(1) P(0 | 1): it scores 10, not 1

        return forward_last(self.model, self.tokenizer, [ids + [one] for ids in encoded], self.batch_size, read_split,
                            on_rows)

    def rewards(self, prompts: Sequence[str]) -> list[float]:
        """Expected scores mapped to [-1, 1]."""
        return [to_reward(s) for s in self.expected_scores(prompts)]


class OpenAIRater(NextTokenReader):
    """The d-RLAIF rater on a server (`.server`): the expected 1-10 score after each rating prompt, read as
    `LLMRater` reads it, from the server's log-probabilities of the score tokens."""

    def __init__(self, server, tokenizer):
        super().__init__(server, tokenizer)
        if server.api == "chat":  # the scores as texts: 10 counts where the server writes it as one token
            self.score_ids, self.zero_id = [str(s) for s in SCORES], None
        else:
            self.score_ids, self.zero_id = score_token_ids(tokenizer)

    def expected_scores(self, prompts: Sequence[str], on_rows=None) -> list[float]:
        digits = self.distributions(prompts, self.score_ids)
        if self.zero_id is None:
            scores = [sum(p * s for p, s in zip(d, SCORES)) for d in digits]
        else:  # 10 is "1" then "0": P(0 | "1") over the whole vocabulary splits the mass of 1
            one = self.tokenizer.decode([self.score_ids[0]])
            zero = self._zero_after_one([p + one for p in prompts])
            scores = [sum(p * s for p, s in zip(d, range(1, 10))) + 9 * d[0] * z for d, z in zip(digits, zero)]
        if on_rows:
            on_rows(len(prompts))
        return scores

    def _zero_after_one(self, prompts: list[str]) -> list[float]:
        return self.server.gather([self._probability(p, self.zero_id) for p in prompts])

    async def _probability(self, prompt: str, token_id: int) -> float:
        found = await self._logprobs(prompt, [token_id])
        return 0.0 if found is None else math.exp(found[0])

    def rewards(self, prompts: Sequence[str]) -> list[float]:
        return [to_reward(s) for s in self.expected_scores(prompts)]


class LLMRewards:
    """An `LLMRater` as PPO's reward (``train ppo --reward_llm``): each response's rating prompt is the
    task's rate.jinja; the reward is the expected score mapped to [-1, 1]."""

    def __init__(self, rater: LLMRater, task, chat=None):
        self.rater, self.task, self.chat = rater, task, chat
        self.model = getattr(rater, "model", None)  # None: a rater on a server

    def score_responses(self, prompts: list[str], responses: list[str]) -> list[float]:
        return self.rater.rewards([self.task.render_rating(p, r, self.chat) for p, r in zip(prompts, responses)])


def rate_pairs(rater: LLMRater, task, pairs, chat=None, progress: bool = False) -> dict:
    """Rate the chosen and the rejected response of every pair (a `datasets.Dataset` of pairs).

    Args:
        progress: show a progress bar (responses rated, rate, ETA) on stderr.

    Returns:
        pairs, agreement (share of pairs whose chosen response is rated higher; a tie counts one half),
        ties, mean expected score of each side, and seconds per pair.
    """
    from tqdm.auto import tqdm

    from ..sources.pairs import pair_responses

    prompts: list[str] = []
    for row in pairs:
        prompt, chosen, rejected = pair_responses(row)
        prompts += [task.render_rating(prompt, chosen, chat), task.render_rating(prompt, rejected, chat)]
    start = time.perf_counter()
    with tqdm(total=len(prompts), unit="response", desc="rating", disable=not progress) as bar:
        scores = rater.expected_scores(prompts, on_rows=bar.update)
    seconds = time.perf_counter() - start
    chosen, rejected = scores[0::2], scores[1::2]
    wins = sum(1.0 if c > r else 0.5 if c == r else 0.0 for c, r in zip(chosen, rejected))
    return {
        "pairs": len(chosen),
        "agreement": wins / len(chosen),
        "ties": sum(c == r for c, r in zip(chosen, rejected)),
        "mean_score_chosen": statistics.fmean(chosen),
        "mean_score_rejected": statistics.fmean(rejected),
        "seconds_per_pair": seconds / len(chosen),
    }


def open_rater(model: str, quantization: str = "none", dtype: str = "auto", batch_size: int = 16,
               prompt_format: str = "text", base_url: str | None = None, tokenizer: str | None = None,
               api_key_env: str = "OPENAI_API_KEY", server_api: str = "completions") -> tuple[LLMRater, object]:
    """A rater on ``model`` (a folder, a Hub id or an embedded model; 8-/4-bit with ``quantization``; or the
    model a server at ``base_url`` serves under that name, its ``tokenizer`` at hand; through its chat
    completions API with ``server_api`` chat) and the chat renderer of its prompts (None in the text format;
    ``auto``: chat when the model has a template; always chat messages on a chat API).

    Raises:
        RlcdError: the model cannot be loaded or reached, or does not write the scores as next tokens.
    """
    from ..tasks.chat import ChatRenderer, MessagesRenderer, resolve_format
    from .models import load_causal_lm, resolve_dtype

    if base_url:
        from .backends import open_served

        server, loaded_tokenizer = open_served(model, base_url, tokenizer, api_key_env, api=server_api)
        rater = OpenAIRater(server, loaded_tokenizer)
        if server_api == "chat":  # the server applies the template: prompt_format does not apply
            return rater, MessagesRenderer(model)
    else:
        loaded, loaded_tokenizer, _ = load_causal_lm(model, quantization, resolve_dtype(dtype, quantization))
        rater = LLMRater(loaded, loaded_tokenizer, batch_size)
    resolved = resolve_format(prompt_format, True, loaded_tokenizer, "rate", model)
    return rater, ChatRenderer(loaded_tokenizer, model) if resolved == "chat" else None
