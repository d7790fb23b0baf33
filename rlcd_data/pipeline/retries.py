"""Retry bookkeeping: which attempt of which output to sample next, and which attempt wins.

An output may take up to ``1 + max_retries`` attempts, each with its own seed.
Its result is what a sequential retry loop gives: the first attempt (lowest
number) that passed, every earlier one having failed; an output whose attempts
all failed is dropped. Attempts run out of order to keep a batch full (later
attempts of a pending output fill free slots), but the result never depends on
the order in which they finish.
"""

from __future__ import annotations

from collections.abc import Hashable, Iterable
from dataclasses import dataclass, field

PENDING = object()  # an output's result is not known yet
DROPPED = None  # every attempt of the output failed


@dataclass
class _Output:
    outcomes: dict[int, str | None] = field(default_factory=dict)  # attempt -> response (None: failed)
    in_flight: set[int] = field(default_factory=set)  # attempts requested, not reported yet


class RetryScheduler:
    """Attempt bookkeeping for outputs identified by hashable keys.

    Args:
        max_retries: re-generations after a failed first attempt.
        batch_size: how many attempts the engine runs together; later attempts
            of pending outputs fill a batch up to this size.
    """

    def __init__(self, max_retries: int, batch_size: int):
        self.max_retries = max_retries
        self.batch_size = batch_size
        self._outputs: dict[Hashable, _Output] = {}
        self._running = 0  # attempts in flight

    def add(self, keys: Iterable[Hashable]) -> None:
        """New outputs, each to be tried from attempt 0."""
        for key in keys:
            self._outputs.setdefault(key, _Output())

    def result(self, key: Hashable):
        """The winning response, `DROPPED`, or `PENDING` while an earlier attempt may still win."""
        outcomes = self._outputs[key].outcomes
        for attempt in range(self.max_retries + 1):
            if attempt not in outcomes:
                return PENDING
            if outcomes[attempt] is not None:
                return outcomes[attempt]
        return DROPPED

    def retries(self, key: Hashable) -> int:
        """Re-generations a sequential retry loop made for the output so far: its attempts before the
        winning one, all but the last of a dropped output's, and the failed ones before a pending one."""
        outcomes = self._outputs[key].outcomes
        failed = 0
        while outcomes.get(failed, "") is None:
            failed += 1
        return min(failed, self.max_retries)

    def pending(self) -> list[Hashable]:
        return [k for k in self._outputs if self.result(k) is PENDING]

    def in_flight(self) -> int:
        return self._running

    def start_call(self) -> list[tuple[Hashable, int]]:
        """The attempts of a new engine call: the next one of every pending output; then, while the
        batch has free slots, later ones round-robin."""
        requests = [r for key in self.pending() for r in self._next(key)]
        return requests + self._top_up(len(requests))

    def record(self, key: Hashable, attempt: int, response: str | None) -> list[tuple[Hashable, int]]:
        """An attempt's outcome (None: it failed). Returns the attempts to add to the call under way:
        the next one of this output when all of its attempts so far failed."""
        output = self._outputs.get(key)
        if output is None:  # a later attempt of an output already finished
            return []
        if attempt in output.in_flight:
            output.in_flight.discard(attempt)
            self._running -= 1
        output.outcomes[attempt] = response
        if response is None and not output.in_flight and self.result(key) is PENDING:
            return self._next(key)
        return []

    def fill(self) -> list[tuple[Hashable, int]]:
        """At a call's tail, when fewer attempts than a batch run: later attempts of the outputs still
        waiting for one, so free slots do not wait for earlier attempts to fail."""
        return self._top_up(self.in_flight())

    def _top_up(self, running: int) -> list[tuple[Hashable, int]]:
        """Later attempts of the hopeful outputs, one per output per round, while the batch has room."""
        requests: list[tuple[Hashable, int]] = []
        while running + len(requests) < self.batch_size:
            added = False
            for key in self._hopeful():
                if running + len(requests) >= self.batch_size:
                    break
                more = self._next(key)
                requests += more
                added = added or bool(more)
            if not added:
                break
        return requests

    def end_call(self) -> None:
        """The call is over: attempts it did not run (an engine that takes no requests during a call)
        are requested again by the next call."""
        for output in self._outputs.values():
            output.in_flight.clear()
        self._running = 0

    def forget(self, key: Hashable) -> None:
        """Drop a finished output's bookkeeping."""
        self._running -= len(self._outputs.pop(key).in_flight)

    def _hopeful(self) -> list[Hashable]:
        """Pending outputs with attempts in flight and none passed yet."""
        return [
            k for k, o in self._outputs.items()
            if o.in_flight and all(r is None for r in o.outcomes.values()) and self.result(k) is PENDING
        ]

    def _next(self, key: Hashable) -> list[tuple[Hashable, int]]:
        """Request the output's lowest attempt neither run nor in flight (none past the last)."""
        output = self._outputs[key]
        attempt = next(a for a in range(self.max_retries + 2) if a not in output.outcomes and a not in output.in_flight)
        if attempt > self.max_retries:
            return []
        output.in_flight.add(attempt)
        self._running += 1
        return [(key, attempt)]
