"""Progress of a long loop as people read it: a tqdm bar on a terminal, plain lines in a file or a pipe (a SLURM
`.out`, `tee`, a CI log), never a carriage return into a file.

The bar is drawn on stderr when stderr is a terminal; plain lines go to stdout when stdout is not a terminal or no
bar is drawn, one flushed line at a time: `{desc} {done}/{total} {field} {value} ... eta H:MM:SS`. The shard job,
training and evaluation each say their progress through one `Progress` (imported from here, the package every
other may import).
"""

from __future__ import annotations

import math
import sys
import time
from collections.abc import Callable, Mapping
from typing import Any, TextIO

from tqdm import tqdm


def is_terminal(stream: Any) -> bool:
    """Whether `stream` is an open terminal (False for files, pipes, closed or replaced streams)."""
    try:
        return bool(stream.isatty())
    except (AttributeError, ValueError, OSError):
        return False


def format_eta(seconds: float) -> str:
    """`seconds` as H:MM:SS (`?` when it cannot be known yet)."""
    if not math.isfinite(seconds) or seconds < 0:
        return "?"
    minutes, secs = divmod(round(seconds), 60)
    return f"{minutes // 60}:{minutes % 60:02d}:{secs:02d}"


class Progress:
    """The progress of `total` items (None: unknown) named `desc`, from `initial` (a resumed loop).

    `update(n)` counts items: the bar moves, and with `every_n` items or `every_s` seconds set a plain line is
    written each time that many have passed, and at the last item. `report(fields)` writes a line now with
    `fields` ({name: formatted value}; on a terminal they follow the bar) for a caller that decides when (training,
    every `log_every_steps`). `write(text)` prints a message that must be seen whatever the output (above the bar).
    Nothing is shown when `enabled` is False (ranks other than 0, `--quiet`). `unit` adds a rate field, `unit/s`.
    """

    def __init__(
        self,
        total: int | None,
        desc: str,
        unit: str = "",
        *,
        initial: int = 0,
        enabled: bool = True,
        every_n: int = 0,
        every_s: float = 0.0,
        out: TextIO | None = None,
        err: TextIO | None = None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.out, err = out or sys.stdout, err or sys.stderr
        self.total, self.desc, self.unit, self.every_n, self.every_s = total, desc, unit, every_n, every_s
        self.done = self.initial = self._last_n = initial
        self.clock = clock
        self.start = self._last_t = clock()
        self.bar = None
        if enabled and is_terminal(err):
            self.bar = tqdm(total=total, initial=initial, desc=desc, unit=unit or "it", file=err, dynamic_ncols=True)
        self.lines = enabled and (self.bar is None or not is_terminal(self.out))
        self.enabled = enabled

    def update(self, n: int = 1) -> None:
        """Count `n` more items; a line when one is due (`every_n`, `every_s`, the last item)."""
        self.done += n
        if self.bar is not None:
            self.bar.update(n)
        if self.lines and (self.every_n or self.every_s) and self._due():
            self._line({})

    def report(self, fields: Mapping[str, str]) -> None:
        """A line now holding `fields` (on a terminal: the bar's postfix)."""
        if self.bar is not None:
            self.bar.set_postfix(fields, refresh=True)
        if self.lines:
            self._line(fields)

    def write(self, text: str) -> None:
        """Print `text` as a line of its own, above the bar on a terminal."""
        if not self.enabled:
            return
        if self.bar is not None:
            self.bar.write(text, file=self.out)
        else:
            print(text, file=self.out, flush=True)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()

    def __enter__(self) -> Progress:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def rate(self) -> float:
        """Items per second since this Progress started (items done before it excluded)."""
        elapsed = self.clock() - self.start
        return (self.done - self.initial) / elapsed if elapsed > 0 else 0.0

    def eta(self) -> str:
        """The time left at the rate so far, H:MM:SS."""
        if self.total is None:
            return "?"
        rate = self.rate()
        return format_eta((self.total - self.done) / rate if rate > 0 else math.inf)

    def _due(self) -> bool:
        now = self.clock()
        due = (
            (self.every_n and self.done - self._last_n >= self.every_n)
            or (self.every_s and now - self._last_t >= self.every_s)
            or (self.total is not None and self.done >= self.total)
        )
        return bool(due)

    def _line(self, fields: Mapping[str, str]) -> None:
        self._last_n, self._last_t = self.done, self.clock()
        parts = [self.desc, f"{self.done}/{self.total}" if self.total is not None else str(self.done)]
        parts += [f"{name} {value}" for name, value in fields.items()]
        if self.unit:
            parts.append(f"{self.unit}/s {self.rate():.3g}")
        print(" ".join([*parts, f"eta {self.eta()}"]), file=self.out, flush=True)
