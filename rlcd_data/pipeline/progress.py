"""The build's progress line on stderr: pairs done of all, rate and ETA, tokens/s and retries."""

from __future__ import annotations

import time


class BuildProgress:
    """A tqdm bar counted in pairs that redraws when a pair finishes, else at most once a second.

    A build's stderr often goes to a log file, which gets a line per redraw: never one per decoding step.

    Args:
        total: pairs of the whole build; done: those finished before this run (a resume).
        label: the bar's description; enabled: False draws nothing.
        status: returns more to show, e.g. a server's requests in flight and HTTP retries.
    """

    def __init__(self, total: int, done: int, label: str, enabled: bool = True, status=None):
        from tqdm.auto import tqdm

        self.enabled = enabled
        self.bar = tqdm(total=total, initial=done, unit="pair", disable=not enabled, dynamic_ncols=True, desc=label)
        self.started = time.monotonic()
        self.tokens = 0
        self.retried = 0
        self._drawn_at = 0.0
        self.status = status

    def update(self, pairs: int = 0, tokens: int = 0, retried: int | None = None) -> None:
        """Count finished pairs and generated tokens; ``retried``: re-generations so far."""
        self.tokens += tokens
        if retried is not None:
            self.retried = retried
        now = time.monotonic()
        if not self.enabled or not pairs and now - self._drawn_at < 1.0:
            return
        rate = self.tokens / max(now - self.started, 1e-9)
        more = f", {self.status()}" if self.status else ""
        self.bar.set_postfix_str(f"{rate:.0f} tok/s, {self.retried} retried{more}", refresh=False)
        if pairs:
            self.bar.update(pairs)  # draws when tqdm's own interval has passed
        if self.bar.last_print_n != self.bar.n or not pairs:
            self.bar.refresh()
        self._drawn_at = now

    def close(self) -> None:
        self.bar.close()
