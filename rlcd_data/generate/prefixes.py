"""Prompts of one generate() call that share a prefix (p+ and p- up to their descriptors), and the
groups of prompts prefilled together (similar lengths, little padding)."""

from __future__ import annotations

from collections.abc import Sequence

# Prompts prefilled in one forward: at most this many tokens including padding.
PREFILL_TOKENS = 4096
# A prefix shared by several prompts of one call is prefilled once if it is at least this long.
MIN_SHARED_PREFIX = 16


def length_groups(items: list, length) -> list[list]:
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


def prefill_groups(unique: list[tuple], prefixes: PrefixStore) -> list[list[tuple]]:
    """Groups of prompts prefilled together, by the length each runs after its shared prefix."""
    def rest(x: tuple) -> int:
        return len(x) - prefixes.shared_length(x)

    return length_groups(sorted(unique, key=rest, reverse=True), rest)


class PrefixStore:
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
