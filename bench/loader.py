"""What the loader benchmarks share (`tools/bench_pipeline.py`, `tools/gpu_check.py`): the CPU time of this process
and its live children (a DataLoader's workers) and a loader's steady-state clips/s with its CPU cost per clip.
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

_TICKS_PER_S = os.sysconf("SC_CLK_TCK")


def _stat_fields(pid: int) -> list[str] | None:
    """The fields of /proc/<pid>/stat after the command name, or None when the process is gone."""
    try:
        text = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    return text[text.rindex(")") + 2 :].split()


def _children(pid: int) -> list[int]:
    children: list[int] = []
    for task in Path(f"/proc/{pid}/task").glob("*/children"):
        try:
            children += [int(c) for c in task.read_text().split()]
        except OSError:
            continue
    return children


def cpu_seconds_by_process(root: int | None = None) -> dict[int, float]:
    """{pid: user + system CPU seconds} of `root` (default: this process, all its threads) and every live
    descendant; empty where /proc is not readable."""
    pending, seen = [root or os.getpid()], {}
    while pending:
        pid = pending.pop()
        fields = _stat_fields(pid)
        if fields is None or pid in seen:
            continue
        seen[pid] = (int(fields[11]) + int(fields[12])) / _TICKS_PER_S  # utime, stime
        pending += _children(pid)
    return seen


def cpu_seconds_between(before: dict[int, float], after: dict[int, float]) -> float:
    """CPU seconds spent between two `cpu_seconds_by_process` snapshots by the processes alive at the second (a
    child started in between counts from 0)."""
    return sum(seconds - before.get(pid, 0.0) for pid, seconds in after.items())


@dataclass(frozen=True)
class LoaderRate:
    """A loader's steady state: clips/s, CPU core-seconds per clip (this process and its workers, over the wall
    time: `cores_busy` = cpu_s_per_clip x clips_per_s) and the seconds to its first batch."""

    clips_per_s: float
    cpu_s_per_clip: float
    first_batch_s: float
    clips: int

    @property
    def cores_busy(self) -> float:
        return self.cpu_s_per_clip * self.clips_per_s

    def to_dict(self) -> dict[str, float]:
        return {
            "clips_per_s": self.clips_per_s, "cpu_ms_per_clip": self.cpu_s_per_clip * 1e3,
            "cores_busy": self.cores_busy, "first_batch_s": self.first_batch_s, "clips": self.clips,
        }  # fmt: skip


def endless_batches(loader: Any) -> Iterator[dict[str, Any]]:
    """A loader's batches epoch after epoch (`set_epoch` where it has one), without end."""
    epoch = 0
    while True:
        if hasattr(loader, "set_epoch"):
            loader.set_epoch(epoch)
        yield from loader
        epoch += 1


def batch_clips(batch: Any) -> int:
    """Clips in a batch: a loader's dict (its keys) or a (video, audio, ...) tuple of a plain DataLoader."""
    if isinstance(batch, dict):
        return len(batch["key"])
    return len(batch[0])


def measure_loader(
    make_loader: Callable[[], Any],
    batches: int | None = None,
    seconds: float | None = None,
    sync: Callable[[], None] | None = None,
) -> LoaderRate:
    """`make_loader()`'s rate over `batches` batches or `seconds` of wall time (whichever ends first; at least one of
    them), after its first batch (workers started, pipelines built); `sync` waits for device work (CUDA) before each
    clock read. Epochs follow each other, so a small split still measures the steady state."""
    if batches is None and seconds is None:
        raise ValueError("give batches or seconds")
    wait = sync or (lambda: None)
    start = time.perf_counter()
    loader = make_loader()
    stream = endless_batches(loader)
    next(stream)
    wait()
    first_batch_s = time.perf_counter() - start
    before, steady = cpu_seconds_by_process(), time.perf_counter()
    clips, count = 0, 0
    while (batches is None or count < batches) and (seconds is None or time.perf_counter() - steady < seconds):
        clips += batch_clips(next(stream))
        count += 1
    wait()
    wall = time.perf_counter() - steady
    cpu = cpu_seconds_between(before, cpu_seconds_by_process())
    del stream, loader
    return LoaderRate(clips / wall, cpu / max(clips, 1), first_batch_s, clips)


def cuda_sync() -> Callable[[], None] | None:
    """torch.cuda.synchronize where CUDA is available, else None (for `measure_loader`'s `sync`)."""
    return torch.cuda.synchronize if torch.cuda.is_available() else None
