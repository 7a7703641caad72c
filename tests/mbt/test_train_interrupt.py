"""A real 2-process gloo run under `python -m mbt.launch` (torchrun) stopped by SIGINT (Ctrl-C: the terminal signals
the whole process group) or SIGTERM (a scheduler) sent to its process group: every rank stops after the same step,
one line says where and how to resume, no traceback, and the shell's exit status for the signal."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from test_train import train_args
from test_train_dist import REPO, worker_env

from mbt.checkpoint import checkpoint_path, latest_checkpoint

pytestmark = pytest.mark.slow  # torchrun: processes and rendezvous, tens of seconds

TIMEOUT_S = 300
# 1 clip per rank per step, 4 steps per epoch, 200 in all: the run is stopped long before its end.
RUN = ["--epochs", "50", "--checkpoint_every_steps", "5", "--eval_every_epochs", "100"]
# What a run prints as it goes (progress, evaluation); anything else after the signal is about stopping.
PROGRESS = re.compile(r"^(step \d+/\d+ |evaluate \d+/\d+ |step \d+ epoch \d+: )")


def wait_for_step(log: Path, proc: subprocess.Popen, step: int) -> None:
    """Until the run has logged `step` (it trains: ranks started, rendezvous done)."""
    deadline = time.monotonic() + TIMEOUT_S
    while not re.search(rf"^step {step}/", log.read_text(), re.M):
        assert proc.poll() is None and time.monotonic() < deadline, log.read_text()[-4000:]
        time.sleep(0.5)


@pytest.mark.parametrize(
    "signum, workers", [(signal.SIGINT, "1"), (signal.SIGTERM, "0")], ids=["SIGINT-loader-worker", "SIGTERM"]
)
def test_a_signal_to_the_process_group_stops_every_rank_with_one_line(
    train_shards: Path, eval_shards: Path, tmp_path: Path, signum: int, workers: str
) -> None:
    out, log = tmp_path / "run", tmp_path / "launch.log"
    args = train_args(train_shards, eval_shards, out, *RUN, "--num_workers", workers)
    cmd = [sys.executable, "-m", "mbt.launch", "--standalone", "--nproc_per_node=2", "-m", "mbt.train", *args]
    with open(log, "w") as f:
        proc = subprocess.Popen(
            cmd, cwd=REPO, env=worker_env(), stdout=f, stderr=subprocess.STDOUT, start_new_session=True
        )
    try:
        wait_for_step(log, proc, 6)  # a checkpoint at step 5 exists
        before = len(log.read_text().splitlines())
        os.killpg(proc.pid, signum)
        code = proc.wait(timeout=60)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
    output = log.read_text()
    after = [line for line in output.splitlines()[before:] if not PROGRESS.match(line)]
    assert code == 128 + signum, output[-4000:]
    assert "Traceback" not in output and "\r" not in output
    (line,) = after  # rank 0's line; rank 1 and the launcher say nothing
    if signum == signal.SIGINT:
        found = re.fullmatch(
            r"interrupted at step (\d+); last checkpoint step (\d+); rerun the same command to resume", line
        )
        assert found, output[-4000:]
        step, saved = map(int, found.groups())
        assert saved == step // 5 * 5 and latest_checkpoint(out) == checkpoint_path(out, saved)
    else:  # preempted: the ranks save where they stopped
        found = re.fullmatch(
            r"stopped by SIGTERM at step (\d+); saved checkpoint step \1; rerun the same command to resume", line
        )
        assert found, output[-4000:]
        assert latest_checkpoint(out) == checkpoint_path(out, int(found.group(1)))
    assert step_lines_end_at(output, int(found.group(1)))


def step_lines_end_at(output: str, step: int) -> bool:
    """Whether the last progress line is that of `step`: no rank trained past where the run says it stopped."""
    return re.findall(r"^step (\d+)/", output, re.M)[-1] == str(step)
