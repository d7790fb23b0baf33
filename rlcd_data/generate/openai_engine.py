"""Generation, A/B labels and 1-10 ratings from a model on an OpenAI-compatible server (`.server`).

Prompts go to the completions API as the exact strings the project renders (text or chat format, the
model's own tokenizer at hand), one request per (prompt, seed), every sampling parameter sent explicitly
(vLLM's server otherwise applies the model's ``generation_config.json`` defaults). Ended versus cut off comes
from ``finish_reason``; token counts from ``usage``.

On a vLLM server (``owned_by: vllm`` in ``/v1/models``) requests also carry vLLM's own parameters: no special
tokens added to the prompt and stop strings kept in the text (as the in-process engines do), ``top_k``,
``repetition_penalty``, and the banned characters as an ``allowed_token_ids`` whitelist. Other servers get the
OpenAI parameters only: an output with a banned character is a failed output (retried), and
``--top-k``/``--repetition-penalty`` are refused.

Labels and ratings read the next token's log-probabilities (``max_tokens`` 1) and renormalise over the label
tokens. vLLM returns those of the label tokens themselves (``logprob_token_ids``); other servers their top-k
(5, the OpenAI completions API's cap), where a label token missing is given the lowest log-probability
returned (an upper bound on its own), and all missing gives equal probabilities (0.5 for A/B);
`missing_labels` counts such answers.

With ``--server-api chat`` (``server.api == "chat"``) every prompt is a list of chat messages
(`rlcd_data.tasks.chat.MessagesRenderer`) sent to the chat completions API, which applies the model's
template; the tokenizer is optional. Token counts then come from ``usage`` alone; without a tokenizer,
banned characters are retried as on other servers. Labels and ratings read the first token of the reply
from its top 20 log-probabilities (the OpenAI API's cap), matched by text: the label's letter or number,
spaces stripped, variants of one label summed ("A" and " A"). A rating of 10 counts where the server's
tokenizer writes it as one token; where it writes "1" then "0", its mass goes to 1.
"""

from __future__ import annotations

import asyncio
import math
from collections.abc import Sequence

from ..errors import RlcdError
from ..tasks.chat import decode_messages
from ..tasks.conversation import STOP_STRINGS
from .engine import Completion, ProgressCallback, SamplingSettings, banned_token_ids
from .server import Server

TOP_LOGPROBS = 5  # the OpenAI completions API's cap; vLLM is asked for the label tokens themselves
CHAT_TOP_LOGPROBS = 20  # the OpenAI chat completions API's cap


def _has_choice(response) -> bool:
    return bool(getattr(response, "choices", None)) and isinstance(response.choices[0].text, str)


def _log_add(a: float, b: float) -> float:
    """log(exp(a) + exp(b))."""
    high = max(a, b)
    return high + math.log1p(math.exp(min(a, b) - high))


def _has_message(response) -> bool:
    choices = getattr(response, "choices", None)
    return bool(choices) and getattr(choices[0], "message", None) is not None and \
        isinstance(choices[0].message.content, str)


def _call(server: Server, prompt: str, **parameters):
    """(the request, its validity check) of ``prompt`` in the server's API: the prompt string to the
    completions API, or its messages to the chat completions API."""
    if server.api == "chat":
        messages = decode_messages(prompt)
        return (lambda: server.client.chat.completions.create(model=server.model, messages=messages,
                                                               **parameters)), _has_message
    return (lambda: server.client.completions.create(model=server.model, prompt=prompt, **parameters)), _has_choice


class OpenAIGenerator:
    """The build's `Generator` on a `Server`; ``tokenizer`` is the served model's (token ids and counts), None
    on a chat completions API without one."""

    speculative_attempts = False  # a later attempt of an output is requested only when the earlier ones failed

    def __init__(self, server: Server, tokenizer, description: str):
        self.server, self.tokenizer, self.description = server, tokenizer, description
        self._allowed: dict[str, list[int] | None] = {}
        self._usage: dict[str, int] = {}  # without a tokenizer: each output's token count, from `usage`

    def count_tokens(self, text: str) -> int:
        if self.tokenizer is None:  # the outputs this generator wrote; words for any other text
            return self._usage.get(text, len(text.split()))
        return len(self.tokenizer(text, add_special_tokens=False)["input_ids"])

    def close(self) -> None:
        self.server.close()

    def status(self) -> str:
        """For the progress line: requests in flight, and HTTP requests retried (429, 5xx, timeouts, ...)."""
        return f"{self.server.in_flight} in flight, {self.server.retried} requests retried"

    def check_settings(self, settings: SamplingSettings) -> None:
        """Raises RlcdError: a setting this server cannot apply."""
        if self.server.kind != "vllm" and (settings.top_k > 1 or settings.repetition_penalty != 1.0):
            raise RlcdError(f"the server at {self.server.url} is not vLLM: --top-k and --repetition-penalty "
                            "need vLLM's own parameters (leave them at 0 and 1)")

    def _parameters(self, settings: SamplingSettings, seed: int) -> dict:
        # top-k 1 (the --label-cot rationales) is greedy: temperature 0 in the OpenAI API
        temperature = 0.0 if settings.top_k == 1 and self.server.kind != "vllm" else settings.temperature
        parameters = dict(max_tokens=settings.max_new_tokens, temperature=temperature, top_p=settings.top_p,
                          seed=seed, stop=list(STOP_STRINGS), n=1, presence_penalty=0.0, frequency_penalty=0.0)
        if self.server.kind == "vllm":
            extra = dict(top_k=settings.top_k, min_p=0.0, repetition_penalty=settings.repetition_penalty,
                         include_stop_str_in_output=True, add_special_tokens=False, skip_special_tokens=True)
            if (allowed := self._allowed_tokens(settings.banned_characters)) is not None:
                extra["allowed_token_ids"] = allowed
            parameters["extra_body"] = extra
        return parameters

    def _allowed_tokens(self, banned_characters: str) -> list[int] | None:
        if self.tokenizer is None:
            return None
        if banned_characters not in self._allowed:
            banned = set(banned_token_ids(self.tokenizer, banned_characters))
            self._allowed[banned_characters] = [i for i in range(len(self.tokenizer)) if i not in banned] \
                if banned else None
        return self._allowed[banned_characters]

    def generate(self, prompts: Sequence[str], seeds: Sequence[int], settings: SamplingSettings,
                 on_progress: ProgressCallback | None = None) -> list[Completion]:
        self.check_settings(settings)
        return self.server.run(self._generate(list(zip(prompts, seeds)), settings, on_progress))

    async def _generate(self, requests, settings, on_progress) -> list[Completion]:
        results: dict[int, Completion] = {}
        running: dict[asyncio.Future, int] = {}

        def start(i: int, prompt: str, seed: int) -> None:
            running[asyncio.ensure_future(self._one(prompt, seed, settings))] = i

        for i, (prompt, seed) in enumerate(requests):
            start(i, prompt, seed)
        count = len(requests)
        try:
            while running:
                done, _ = await asyncio.wait(running, return_when=asyncio.FIRST_COMPLETED)
                finished, failed = [], None
                for task in done:
                    i = running.pop(task)
                    if task.exception() is not None:
                        failed = failed or task.exception()
                        continue
                    results[i] = task.result()
                    finished.append((i, results[i]))
                more = on_progress(finished, sum(c.num_tokens for _, c in finished)) if on_progress else None
                if failed is not None:  # what finished beside it is saved first
                    raise failed
                for prompt, seed in more or ():
                    start(count, prompt, seed)
                    count += 1
        finally:
            for task in running:
                task.cancel()
            await asyncio.gather(*running, return_exceptions=True)
        return [results[i] for i in range(count)]

    async def _one(self, prompt: str, seed: int, settings: SamplingSettings) -> Completion:
        server = self.server
        response = await server.request(*_call(server, prompt, **self._parameters(settings, seed)))
        choice = response.choices[0]
        text = choice.message.content if server.api == "chat" else choice.text
        tokens = response.usage.completion_tokens if response.usage else self.count_tokens(text)
        if self.tokenizer is None:
            self._usage[text] = tokens
        if (server.kind != "vllm" or self.tokenizer is None) and any(c in text for c in settings.banned_characters):
            return Completion("", tokens, False)  # a failed output: retried like any other
        if server.kind == "vllm":  # "stop" with no stop string matched is end-of-sequence
            ended = choice.finish_reason == "stop" and not isinstance(getattr(choice, "stop_reason", None), str)
            return Completion(text, tokens, ended)
        # Other servers cut the stop string from the text: "stop" is the end of the turn either way.
        return Completion(text, tokens, choice.finish_reason == "stop")


class NextTokenReader:
    """Probabilities over a few candidate next tokens, from the server's log-probabilities of the next token.

    vLLM returns the log-probabilities of exactly the tokens asked for (``logprob_token_ids``), so the
    candidates are always there; other servers return their top-k, from which a candidate may be missing.
    """

    def __init__(self, server: Server, tokenizer):
        self.server, self.tokenizer = server, tokenizer
        self.missing_labels = 0  # answers where a candidate was not among the returned log-probabilities

    def distributions(self, prompts: Sequence[str], candidates: list[int]) -> list[list[float]]:
        """For each prompt, the probabilities of ``candidates`` as its next token, renormalised over them."""
        return self.server.gather([self._distribution(p, candidates) for p in prompts])

    async def _distribution(self, prompt: str, candidates: list[int]) -> list[float]:
        found = await self._logprobs(prompt, candidates)
        if found is None:
            return [1 / len(candidates)] * len(candidates)
        weights = [math.exp(v - max(found)) for v in found]
        return [w / sum(weights) for w in weights]

    async def _logprobs(self, prompt: str, candidates: list) -> list[float] | None:
        """The log-probabilities of ``candidates`` (token ids; texts on a chat API) as the next token (over the
        whole vocabulary). A candidate missing from the answer gets the lowest one returned (an upper bound on
        its own); None: all missing."""
        server = self.server
        top = await (self._chat_top(prompt) if server.api == "chat" else self._completions_top(prompt, candidates))
        found = [top.get(self._key(t)) for t in candidates]
        if None not in found:
            return found
        self.missing_labels += 1
        if all(v is None for v in found):
            return None
        lowest = min(top.values())
        return [lowest if v is None else v for v in found]

    async def _completions_top(self, prompt: str, candidates: list[int]) -> dict[str, float]:
        server = self.server
        extra, top_k = None, TOP_LOGPROBS
        if server.kind == "vllm":
            extra = dict(add_special_tokens=False, return_tokens_as_token_ids=True, logprob_token_ids=list(candidates))
            top_k = len(candidates)
        response = await server.request(*_call(server, prompt, max_tokens=1, temperature=1.0, seed=0, logprobs=top_k,
                                                extra_body=extra))
        logprobs = response.choices[0].logprobs
        if logprobs is None or not logprobs.top_logprobs:
            raise self._no_logprobs()
        return logprobs.top_logprobs[0]

    async def _chat_top(self, prompt: str) -> dict[str, float]:
        """The reply's first token's top log-probabilities, by text (spaces stripped; variants summed)."""
        response = await self.server.request(*_call(self.server, prompt, max_tokens=1, temperature=1.0, seed=0,
                                                     logprobs=True, top_logprobs=CHAT_TOP_LOGPROBS))
        logprobs = response.choices[0].logprobs
        if logprobs is None or not logprobs.content or not logprobs.content[0].top_logprobs:
            raise self._no_logprobs()
        top: dict[str, float] = {}
        for entry in logprobs.content[0].top_logprobs:
            key = entry.token.strip()
            top[key] = entry.logprob if key not in top else _log_add(top[key], entry.logprob)
        return top

    def _no_logprobs(self) -> RlcdError:
        return RlcdError(f"the server at {self.server.url} returned no logprobs; labels and ratings read the next "
                         "token's log-probabilities (use a server that returns them, e.g. vLLM)")

    def _key(self, token) -> str:
        if self.server.api == "chat":
            return token  # a text
        if self.server.kind == "vllm":
            return f"token_id:{token}"
        return self.tokenizer.decode([token])


class OpenAILabeller(NextTokenReader):
    """The A/B labeller on a server: P(A) among the two option tokens after each comparison prompt."""

    def __init__(self, server: Server, tokenizer):
        from .labeller import OPTIONS, option_token_ids

        super().__init__(server, tokenizer)
        self.options = list(OPTIONS) if server.api == "chat" else list(option_token_ids(tokenizer))

    def first_option_probability(self, prompts: Sequence[str]) -> list[float]:
        return [d[0] for d in self.distributions(prompts, self.options)]
