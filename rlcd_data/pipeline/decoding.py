"""Sampling every output of every example, with retries: the build's decoding loop."""

from __future__ import annotations

from collections.abc import Callable

from ..generate.engine import Generator, request_seed
from ..tasks.conversation import extract_response
from ..tasks.task import ContrastPair
from .config import BuildConfig
from .methods import Method
from .progress import BuildProgress
from .retries import DROPPED, PENDING, RetryScheduler

# Sampling seeds name p+ and p- as the chosen and rejected sides (as since the first release).
SEED_SIDE = {"p_plus": "chosen", "p_minus": "rejected"}
# Pairs per generate() call, per batch slot: a call's batch drains only at its end. Scored methods label
# between calls, on the model as generation leaves it: smaller calls keep labelled rows coming.
CALL_PAIRS = 64
LABELLED_CALL_PAIRS = 8


class Decoding:
    """Samples every output of every example (both sides of a pair for RLCD), retrying failed ones.

    Each output takes up to ``1 + max_retries`` attempts, attempt ``a`` with its own seed, and its
    response is the one a sequential retry loop gives (`RetryScheduler`). Finished examples go to
    ``save(finished, call_over)`` as ``(index into pairs, {side: response} or None when dropped)``:
    within a call once half a batch is ready (a kill loses about one batch of work), and at the end of
    every call with ``call_over`` True. A failed output's next attempt joins the call under way.
    """

    def __init__(self, pairs: list[ContrastPair], generator: Generator, config: BuildConfig, method: Method,
                 progress: BuildProgress, save: Callable[[list[tuple[int, dict | None]], bool], None]):
        self.pairs, self.generator, self.config, self.method = pairs, generator, config, method
        self.progress, self.save = progress, save
        # Engines with free batch slots fill them with later attempts; a server charges for every request.
        speculative = getattr(generator, "speculative_attempts", True)
        self.scheduler = RetryScheduler(config.max_retries, config.batch_size if speculative else 0)
        self.finished: set[int] = set()
        self.ready: list[tuple[int, dict | None]] = []  # finished, not saved yet
        self.retried = 0  # re-generations of failed outputs
        self.attempts: list[tuple[tuple[int, str], int]] = []  # the call under way's requests, by index
        self.reported: set[int] = set()  # indices into attempts the generator reported

    def run(self) -> int:
        """Returns the re-generations of failed outputs."""
        per_call = (LABELLED_CALL_PAIRS if self.method.scored else CALL_PAIRS) * self.config.batch_size
        start = 0
        while start < len(self.pairs) or self.scheduler.pending():
            fresh = range(start, min(start + per_call, len(self.pairs)))
            start = fresh.stop
            self.scheduler.add((i, side) for i in fresh for side in self.method.sides)
            self._call(self.scheduler.start_call())
        return self.retried

    def _call(self, attempts: list[tuple[tuple[int, str], int]]) -> None:
        self.attempts, self.reported = attempts, set()
        texts, seeds = zip(*(self._request(*r) for r in attempts))
        try:
            completions = self.generator.generate(list(texts), list(seeds), self.config.sampling(), self._on_progress)
        except BaseException:  # an interrupt, or a server gone: what the call finished is kept for --resume
            self._flush()
            raise
        for index, completion in enumerate(completions):
            if index not in self.reported:  # a generator that reports no progress
                self._record(index, completion)
        self.scheduler.end_call()  # attempts the generator did not run go into the next call
        self._flush(call_over=True)

    def _request(self, key: tuple[int, str], attempt: int) -> tuple[str, int]:
        """The prompt and sampling seed of one attempt at one output."""
        i, side = key
        seed = request_seed(self.config.seed, "sample", self.pairs[i].source_index, SEED_SIDE.get(side, side), attempt)
        return self.method.request_text(self.pairs[i], side), seed

    def _on_progress(self, done: list, tokens: int) -> list[tuple[str, int]]:
        more = [r for index, completion in done for r in self._record(index, completion)]
        more += self.scheduler.fill()  # the tail of the call: free slots take later attempts
        self.attempts.extend(more)
        if len(self.ready) >= max(1, self.config.batch_size // 2):
            self._flush()
        self.progress.update(tokens=tokens)
        return [self._request(*r) for r in more]

    def _record(self, index: int, completion) -> list[tuple[tuple[int, str], int]]:
        """An attempt's outcome; returns the attempts to add to the call (a failed output's next one)."""
        self.reported.add(index)
        key, attempt = self.attempts[index]
        more = self.scheduler.record(key, attempt, extract_response(completion.text, completion.ended))
        self._settle(key[0])
        return more

    def _settle(self, i: int) -> None:
        """Example ``i`` is finished once all its outputs are known, or one of them is dropped."""
        if i in self.finished:  # a later attempt of an output already settled
            return
        keys = [(i, side) for side in self.method.sides]
        results = [self.scheduler.result(k) for k in keys]
        if PENDING in results and DROPPED not in results:
            return
        self.finished.add(i)
        self.retried += sum(self.scheduler.retries(k) for k in keys)
        for k in keys:
            self.scheduler.forget(k)
        self.ready.append((i, None if DROPPED in results else dict(zip(self.method.sides, results))))
        self.progress.update(pairs=1, retried=self.retried)

    def _flush(self, call_over: bool = False) -> None:
        ready, self.ready = sorted(self.ready), []  # a failed save is not tried again while the error unwinds
        self.save(ready, call_over)
