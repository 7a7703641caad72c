"""Train several demo or ablation runs at once, each in a process of its own on one torch thread
(`experiments.demo --jobs`, `experiments.ablation --jobs`).

The demo model is tiny: a training step on one thread cannot use a second core (two threads made a step slower on the
2-core machine, docs/PERFORMANCE.md), but two trainings side by side use both, nearly twice the trainings an hour.
Each run's output (its plain log lines, its errors) goes to `<run folder>.log`, beside the run folder, so that two
trainings do not interleave on the terminal; this process prints a line as each run starts and ends, and every 30 s
the last progress line of each run going.
A run that fails stops the others (SIGTERM: each saves its checkpoint and says so in its log) and the error names
the run and its log; Ctrl-C stops them all the same way.
"""

from __future__ import annotations

import gc
import multiprocessing
import os
import signal
import sys
from collections import deque
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from multiprocessing.connection import wait
from pathlib import Path
from typing import Any

import torch

from mbt.config import ConfigError, TrainConfig
from mbt.dist import DistInfo, cleanup, init_distributed, launched_by_torchrun
from mbt.interrupt import Interrupted, SignalStop, raising_signals, stop_line
from mbt.train import EXPECTED_ERRORS

# Trains and evaluates a config in a process (a module-level function: a spawned process finds it by name); its row.
Train = Callable[[TrainConfig, DistInfo, str], dict[str, Any]]
LOG_TAIL_LINES = 5  # of a failed run's log, in the error
LOG_END_BYTES = 16384  # of a run's log read for its last lines
PROGRESS_EVERY_S = 30.0  # a line per run going, from its log
STOP_WAIT_S = 60.0  # for a stopped run to save its checkpoint and exit, before it is killed


class RunFailedError(RuntimeError):
    """A run of `run_all` ended with an error or a signal; the message names it, its log and the log's last lines."""


@dataclass(frozen=True)
class Run:
    """One training of `run_all`: `name` (the variant), `title` (printed as it starts), its config."""

    name: str
    title: str
    cfg: TrainConfig

    @property
    def folder(self) -> str:
        """The run folder's name (`bottleneck`, `bottleneck-seed1`): what the progress lines call the run."""
        return Path(self.cfg.out_dir).name

    @property
    def log(self) -> Path:
        """Where a run in a process of its own writes its output: `<run folder>.log`."""
        run_dir = Path(self.cfg.out_dir)
        return run_dir.with_name(run_dir.name + ".log")


def run_all(runs: Sequence[Run], jobs: int, train: Train) -> Iterator[tuple[int, dict[str, Any]]]:
    """Train and evaluate each of `runs` with `train` (`experiments.demo.run_variant`), `jobs` at a time; yield
    (index in `runs`, its row) as each finishes. One job, or under torchrun, trains them one after another in this
    process, its output on the terminal; more start each in a process of its own (RunFailedError when one fails)."""
    if jobs < 1:
        raise ConfigError(f"--jobs must be at least 1, got {jobs}")
    if jobs == 1 or launched_by_torchrun():
        yield from _one_by_one(runs, train)
    else:
        yield from _side_by_side(runs, jobs, train)


def _one_by_one(runs: Sequence[Run], train: Train) -> Iterator[tuple[int, dict[str, Any]]]:
    dist = init_distributed()
    try:
        for index, run in enumerate(runs):
            print(f"== {run.title}", flush=True)
            yield index, train(run.cfg, dist, run.name)
    finally:
        cleanup()


def _side_by_side(runs: Sequence[Run], jobs: int, train: Train) -> Iterator[tuple[int, dict[str, Any]]]:
    context = multiprocessing.get_context("spawn")  # no fork of a process that holds torch's threads
    waiting = deque(enumerate(runs))
    running: dict[int, Any] = {}  # sentinel -> (index, process, the end of the pipe its row comes on)
    try:
        while waiting or running:
            while waiting and len(running) < jobs:
                index, run = waiting.popleft()
                rows, sender = context.Pipe(duplex=False)
                args = (run, train, sender, multiprocessing.get_start_method())
                process = context.Process(target=_train_here, args=args, name=f"train-{run.name}")
                process.start()
                sender.close()  # the child's end: this process only reads
                running[process.sentinel] = (index, process, rows)
                print(f"== {run.title} (log: {run.log})", flush=True)
            ended = wait(list(running), timeout=PROGRESS_EVERY_S)
            if not ended:
                for index, _, _ in running.values():
                    print(f"   {runs[index].folder}: {_last_step_line(runs[index].log)}", flush=True)
            for sentinel in ended:
                index, process, rows = running.pop(sentinel)
                process.join()
                run = runs[index]
                if process.exitcode != 0 or not rows.poll():
                    raise RunFailedError(_failure(run, process.exitcode))
                row = rows.recv()
                print(f"== {run.folder} done: mAP {row['mAP']:.3f}, {row['train_s']:.0f} s", flush=True)
                yield index, row
    finally:
        _stop([process for _, process, _ in running.values()])


def _train_here(run: Run, train: Train, rows: Any, start_method: str) -> None:
    """A spawned process: output to the run's log, one torch thread, `train`, its row sent on `rows`; exit status 1
    on a config, data or file error, 128 + the signal on SIGINT/SIGTERM (each said in the log). Its loader's workers
    start as the parent's would have (`start_method`: a spawned process's default is spawn, which cannot pickle
    the loader's state)."""
    multiprocessing.set_start_method(start_method, force=True)
    run.log.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(run.log, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
    for stream in (1, 2):
        os.dup2(fd, stream)
    os.close(fd)
    sys.stdout.reconfigure(line_buffering=True)  # type: ignore[union-attr]
    torch.set_num_threads(1)
    status = 0
    try:
        with raising_signals():
            rows.send(train(run.cfg, init_distributed(run.cfg.device), run.name))
    except Interrupted as stopped:  # in the training loop: at which step, and the last checkpoint
        print(stopped, file=sys.stderr)
        status = stopped.exit_status
    except SignalStop as stopped:  # before the loop or after it
        print(stop_line(stopped.signum, f"in run {run.folder}", "it starts over when run again"), file=sys.stderr)
        status = stopped.exit_status
    except (ConfigError, *EXPECTED_ERRORS) as err:
        print(f"error: {err}", file=sys.stderr)
        status = 1
    # Out of the except blocks, the error's frames (which hold the loader) are freed, and the loader stops its
    # workers; exiting from within one, this process would wait for them at exit, for ever.
    gc.collect()
    sys.exit(status)


def _log_end(log: Path) -> list[str]:
    """The lines of the last LOG_END_BYTES of `log` (the first of them maybe cut); OSError when it cannot be read."""
    with open(log, "rb") as f:
        f.seek(max(0, f.seek(0, os.SEEK_END) - LOG_END_BYTES))
        return f.read().decode(errors="replace").splitlines()


def _last_step_line(log: Path) -> str:
    """The last plain progress line ("step 600/1200 epoch 24 loss ...") in the end of `log`, or what it is doing."""
    try:
        steps = [line for line in _log_end(log) if line.startswith(("step ", "evaluate "))]
    except OSError:
        return "starting"
    return steps[-1] if steps else "starting"


def _failure(run: Run, exitcode: int | None) -> str:
    """The error of a run that ended with `exitcode`: its name, how it ended, its log and the log's last lines."""
    how = f"was killed by {signal.Signals(-exitcode).name}" if exitcode and exitcode < 0 else f"exited {exitcode}"
    try:
        tail = _log_end(run.log)[-LOG_TAIL_LINES:]
    except OSError as err:
        tail = [f"(its log cannot be read: {err})"]
    return f"run {run.folder} {how}; its log {run.log} ends:\n" + "\n".join(f"  {line}" for line in tail)


def _stop(processes: Sequence[Any]) -> None:
    """SIGTERM to the runs still going (each saves its checkpoint), then wait; kill what has not ended."""
    for process in processes:
        if process.is_alive():
            process.terminate()
    for process in processes:
        process.join(STOP_WAIT_S)
        if process.is_alive():
            process.kill()
            process.join()
