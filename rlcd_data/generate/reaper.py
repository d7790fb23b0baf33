"""Ends an engine's child processes when the process that started them dies, however it dies.

vLLM runs its engine core and workers in child processes. They stop when the
build exits or raises, but not when it is killed outright (SIGKILL, the OOM
killer, a cluster's time limit): re-parented to init, they hold their memory
(3.9 GB for SmolLM2 on a CPU) until someone finds them. vLLM's worker watches
its engine core, but nothing watches the build.

`Reaper` starts a small watcher process before the engine starts. Until the
engine is up it records every new descendant of the build; then that set is
fixed. It checks every `POLL_SECONDS` whether the build is still its parent;
once it is not, it kills the recorded processes and exits. It also exits when
they have all ended (the engine was closed). No engine code is changed, and
any multiprocessing start method (fork on CPUs, spawn on GPUs) is covered.
"""

from __future__ import annotations

import os
import subprocess
import sys

POLL_SECONDS = 0.25


class Reaper:
    """A watcher over the processes an engine starts in this process.

    Use as ``reaper = Reaper()``, start the engine, then ``reaper.engine_started()``;
    ``reaper.close()`` when the engine has been shut down normally.
    """

    def __init__(self):
        self.process = subprocess.Popen(
            [sys.executable, "-m", "rlcd_data.generate.reaper", str(os.getpid())],
            stdin=subprocess.PIPE, stdout=subprocess.DEVNULL, text=True,
            start_new_session=True,  # a Ctrl-C at the terminal is the build's to handle, not the watcher's
        )

    def engine_started(self) -> None:
        """The engine is up: the processes recorded so far are the ones to end with this process."""
        self._say("started")

    def close(self) -> None:
        if self.process.poll() is None:
            self._say("closed")
            try:
                self.process.wait(timeout=5)
            except subprocess.TimeoutExpired:
                self.process.kill()

    def _say(self, line: str) -> None:
        try:
            self.process.stdin.write(line + "\n")
            self.process.stdin.flush()
        except (BrokenPipeError, ValueError):  # the watcher has already gone
            pass


def _descendants(parent: int, exclude: set[int]) -> dict[int, float]:
    """``{pid: create_time}`` of ``parent``'s descendants, without ``exclude``."""
    import psutil

    found = {}
    try:
        for child in psutil.Process(parent).children(recursive=True):
            if child.pid not in exclude:
                try:
                    found[child.pid] = child.create_time()
                except psutil.Error:
                    pass
    except psutil.Error:
        pass
    return found


def _alive(targets: dict[int, float]):
    """The processes of ``targets`` still running (a pid reused by another process is not one of them)."""
    import psutil

    for pid, created in targets.items():
        try:
            process = psutil.Process(pid)
            if process.create_time() == created and process.status() != psutil.STATUS_ZOMBIE:
                yield process
        except psutil.Error:
            pass


def watch(parent: int, lines=sys.stdin) -> None:
    """The watcher's loop; ``lines`` says "started" when the engine is up and "closed" when it has stopped."""
    import select
    import time

    baseline = set(_descendants(parent, set())) | {os.getpid()}
    targets: dict[int, float] = {}
    recording = listening = True
    while True:
        if recording:
            targets.update(_descendants(parent, baseline))
        if os.getppid() != parent:  # the build is gone, however it went
            for process in _alive(targets):
                try:
                    process.kill()
                except Exception:
                    pass
            return
        if not recording and not any(True for _ in _alive(targets)):
            return  # the engine stopped by itself
        if not listening:
            time.sleep(POLL_SECONDS)
            continue
        if select.select([lines], [], [], POLL_SECONDS)[0]:
            line = lines.readline()
            if line.strip() == "closed":
                return
            if line.strip() == "started" or not line:  # no more input: the targets stay as recorded
                targets.update(_descendants(parent, baseline))
                recording, listening = False, bool(line)


if __name__ == "__main__":
    watch(int(sys.argv[1]))
