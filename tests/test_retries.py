"""RetryScheduler: out-of-order, batched attempts give exactly what a sequential retry loop gives."""

from __future__ import annotations

import random

import pytest

from rlcd_data.pipeline.retries import DROPPED, PENDING, RetryScheduler


def sequential(keys, passes, max_retries):
    """The reference: try attempts 0, 1, ... in order; the first that passes wins."""
    results, retries = {}, {}
    for key in keys:
        winner = next((a for a in range(max_retries + 1) if passes(key, a)), None)
        results[key] = DROPPED if winner is None else f"{key}@{winner}"
        retries[key] = max_retries if winner is None else winner
    return results, retries


def drive(scheduler, keys, passes, rng, runs_added=True):
    """An engine that finishes random subsets of its running attempts in random order, and (if
    ``runs_added``) runs the attempts the scheduler adds during a call. An output's result is taken
    the moment it stops being pending, as the build does."""
    scheduler.add(keys)
    ran: list[tuple] = []
    results, retries = {}, {}
    calls = 0
    while scheduler.pending():
        calls += 1
        assert calls < 1000, "the scheduler does not converge"
        running = scheduler.start_call()
        assert running, "pending outputs but nothing to run"
        while running:
            rng.shuffle(running)
            k = rng.randint(1, len(running))
            done, running = running[:k], running[k:]
            for key, attempt in done:
                ran.append((key, attempt))
                more = scheduler.record(key, attempt, f"{key}@{attempt}" if passes(key, attempt) else None)
                running += more if runs_added else []
                if key not in results and scheduler.result(key) is not PENDING:
                    results[key], retries[key] = scheduler.result(key), scheduler.retries(key)
            more = scheduler.fill()
            running += more if runs_added else []
        scheduler.end_call()
    return results, retries, ran


@pytest.mark.parametrize("seed", range(40))
@pytest.mark.parametrize("runs_added", [True, False])
def test_results_equal_a_sequential_retry_loop(seed, runs_added):
    rng = random.Random(seed)
    max_retries = rng.randint(0, 4)
    batch_size = rng.randint(1, 12)
    rate = rng.choice([0.1, 0.5, 0.9])
    keys = [(i, side) for i in range(rng.randint(1, 20)) for side in ("p_plus", "p_minus")]
    outcome = {(k, a): random.Random(f"{seed}:{k}:{a}").random() < rate for k in keys for a in range(max_retries + 1)}

    def passes(key, attempt):
        return outcome[key, attempt]

    results, retries, ran = drive(RetryScheduler(max_retries, batch_size), keys, passes, rng, runs_added)
    assert (results, retries) == sequential(keys, passes, max_retries)
    assert all(a <= max_retries for _, a in ran)
    if runs_added:  # every attempt runs at most once when the engine runs what it is given
        assert len(ran) == len(set(ran))


def test_a_new_call_fills_the_batch_with_later_attempts_round_robin():
    scheduler = RetryScheduler(max_retries=3, batch_size=7)
    scheduler.add(["a", "b"])
    assert scheduler.start_call() == [("a", 0), ("b", 0), ("a", 1), ("b", 1), ("a", 2), ("b", 2), ("a", 3)]


def test_a_failure_adds_the_next_attempt_only_when_none_of_the_output_is_left_running():
    scheduler = RetryScheduler(max_retries=2, batch_size=1)
    scheduler.add(["a"])
    assert scheduler.start_call() == [("a", 0)]
    assert scheduler.record("a", 0, None) == [("a", 1)]
    assert scheduler.result("a") is PENDING
    assert scheduler.record("a", 1, None) == [("a", 2)]
    assert scheduler.record("a", 2, None) == []  # no attempt after the last
    assert scheduler.result("a") is DROPPED and scheduler.retries("a") == 2


def test_a_later_attempt_that_passes_waits_for_the_earlier_ones():
    scheduler = RetryScheduler(max_retries=2, batch_size=3)
    scheduler.add(["a"])
    assert scheduler.start_call() == [("a", 0), ("a", 1), ("a", 2)]
    scheduler.record("a", 2, "third")
    assert scheduler.result("a") is PENDING
    scheduler.record("a", 1, "second")
    assert scheduler.result("a") is PENDING
    scheduler.record("a", 0, None)
    assert scheduler.result("a") == "second" and scheduler.retries("a") == 1


def test_the_tail_of_a_call_takes_later_attempts_of_outputs_still_running():
    scheduler = RetryScheduler(max_retries=5, batch_size=4)
    scheduler.add(["a", "b", "c", "d"])
    assert len(scheduler.start_call()) == 4
    for key in "abc":
        scheduler.record(key, 0, "ok")
    # one attempt left running in a batch of 4: its later attempts fill the three free slots
    assert scheduler.fill() == [("d", 1), ("d", 2), ("d", 3)]
    assert scheduler.fill() == []


def test_reports_of_a_forgotten_output_are_ignored():
    scheduler = RetryScheduler(max_retries=1, batch_size=4)
    scheduler.add(["a"])
    scheduler.start_call()  # attempts 0 and 1
    scheduler.record("a", 0, "ok")
    scheduler.forget("a")
    assert scheduler.in_flight() == 0
    assert scheduler.record("a", 1, "late") == []
