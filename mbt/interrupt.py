"""A training stopped by Ctrl-C (SIGINT) or by a scheduler (SIGTERM: SLURM's preemption and time limit, torchrun
passing a signal on): every rank stops after the same step, with no traceback, and rank 0 says where it stopped and
that the same command resumes.

`StopSignals` records the first such signal a rank receives instead of raising where it lands (in a collective, a
loader, a checkpoint being written); after every step the ranks agree on it (`agreed`: one tiny all-reduce), so that
they leave together and none waits at a collective another has left. A repeated signal (torchrun forwards the one the
terminal sent it too) changes nothing. The loop then raises `Interrupted`, which `mbt.train.main` turns into one line
on rank 0 and the shell's exit status, 128 + the signal (130, 143).

Outside the loop (start-up, a command that only evaluates) there is nothing to agree on: `raising_signals` makes
both signals raise `SignalStop` where they land, which the command turns into one line (`stop_line`) and the same
exit status, not a traceback.
"""

from __future__ import annotations

import signal
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from types import FrameType
from typing import Any

from mbt.dist import all_max

SIGNALS = (signal.SIGINT, signal.SIGTERM)


class Interrupted(Exception):
    """The ranks stopped after `step` on `signum`; `saved` is the step of the last checkpoint (None: none yet)."""

    def __init__(self, signum: int, step: int, saved: int | None) -> None:
        super().__init__(signum, step, saved)
        self.signum, self.step, self.saved = signum, step, saved

    @property
    def exit_status(self) -> int:
        return 128 + self.signum

    def __str__(self) -> str:
        last = "no checkpoint yet, so it starts over" if self.saved is None else f"last checkpoint step {self.saved}"
        if self.saved == self.step and self.signum != signal.SIGINT:
            last = f"saved checkpoint step {self.saved}"
        return stop_line(self.signum, f"at step {self.step}", f"{last}; rerun the same command to resume")


class StopSignals:
    """While active (`with StopSignals() as stop:`), SIGINT and SIGTERM are recorded, not raised; the previous
    handlers come back after. Outside the main thread (where handlers cannot be set) it records nothing."""

    def __init__(self) -> None:
        self.signum = 0
        self._previous: dict[int, Any] = {}

    def __enter__(self) -> StopSignals:
        if threading.current_thread() is threading.main_thread():
            self._previous = {s: signal.signal(s, self._record) for s in SIGNALS}
        return self

    def __exit__(self, *exc: object) -> None:
        for signum, handler in self._previous.items():
            signal.signal(signum, handler)
        self._previous = {}

    def _record(self, signum: int, frame: FrameType | None) -> None:
        del frame
        self.signum = self.signum or signum

    def agreed(self) -> int:
        """The signal that any rank received (every rank must call this at the same point), or 0."""
        return all_max(self.signum)


class SignalStop(BaseException):
    """SIGINT or SIGTERM (`signum`) arrived under `raising_signals`; a BaseException, as KeyboardInterrupt is, so that
    no `except Exception` on the way swallows it."""

    def __init__(self, signum: int) -> None:
        super().__init__(signum)
        self.signum = signum

    @property
    def exit_status(self) -> int:
        return 128 + self.signum


def _raise(signum: int, frame: FrameType | None) -> None:
    del frame
    raise SignalStop(signum)


@contextmanager
def raising_signals() -> Iterator[None]:
    """While active, SIGINT and SIGTERM raise SignalStop (SIGTERM would otherwise end the process without a word);
    the previous handlers come back after. Outside the main thread it changes nothing."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = {s: signal.signal(s, _raise) for s in SIGNALS}
    try:
        yield
    finally:
        for signum, handler in previous.items():
            signal.signal(signum, handler)


def stop_line(signum: int, when: str, then: str) -> str:
    """The one line a command stopped by `signum` prints: "interrupted <when>; <then>" for SIGINT, "stopped by
    SIGTERM <when>; <then>" otherwise."""
    stopped = "interrupted" if signum == signal.SIGINT else f"stopped by {signal.Signals(signum).name}"
    return f"{stopped} {when}; {then}"
