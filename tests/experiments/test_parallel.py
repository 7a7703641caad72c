"""Several demo runs at once (`experiments.parallel`, `--jobs`; the rows and logs of two at a time are tested with the
demo's summary in test_demo.py): a failed run named with the end of its log, and Ctrl-C, on the session's demo
shards (2 s clips)."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from tiny_demo import tiny_base

from experiments.demo import run_variant
from experiments.parallel import Run, RunFailedError, run_all
from mbt.config import ConfigError

SAME = ("mAP", "ap_cross", "ap_single", "forward_gflops", "num_eval_clips")


@pytest.mark.slow
def test_a_failed_run_is_named_with_the_end_of_its_log(demo_shards: Path, tmp_path: Path) -> None:
    base = tiny_base()
    good = base.replace(train_shards=str(demo_shards / "train"), eval_shards=str(demo_shards / "eval"))
    bad = good.replace(train_shards=str(tmp_path / "nowhere"), out_dir=str(tmp_path / "runs" / "bad"))
    good = good.replace(out_dir=str(tmp_path / "runs" / "good"))
    runs = [Run("bad", "the bad run", bad), Run("good", "the good run", good)]
    with pytest.raises(RunFailedError) as caught:
        list(run_all(runs, 2, run_variant))
    message = str(caught.value)
    assert message.startswith(f"run bad exited 1; its log {tmp_path / 'runs' / 'bad.log'} ends:\n")
    assert "error: " in message and "nowhere" in message


def test_jobs_must_be_at_least_one() -> None:
    with pytest.raises(ConfigError, match="--jobs must be at least 1, got 0"):
        list(run_all([], 0, run_variant))


@pytest.mark.slow
def test_ctrl_c_stops_every_run_with_one_line(demo_shards: Path, tmp_path: Path) -> None:
    out = tmp_path / "runs"
    command = [sys.executable, "-m", "experiments.demo", "--shards", str(demo_shards), "--out", str(out)]
    command += ["--epochs", "500"]
    demo = subprocess.Popen(
        [*command, "--variants", "bottleneck,audio,late", "--jobs", "2"],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True,
    )  # fmt: skip
    logs = [out / "bottleneck.log", out / "audio.log"]
    deadline = time.monotonic() + 120
    while not all(log.is_file() and "\nstep " in log.read_text() for log in logs):
        assert demo.poll() is None and time.monotonic() < deadline, demo.communicate()
        time.sleep(0.5)
    os.killpg(demo.pid, signal.SIGINT)  # as Ctrl-C does: to every process of the terminal's group
    stdout, stderr = demo.communicate(timeout=90)
    assert demo.returncode == 128 + signal.SIGINT
    assert stderr == "interrupted during the demo; run it again: it trains every variant from scratch\n"
    assert "log: " in stdout and not (out / "late.log").exists()  # the third never started
    for log in logs:
        assert "interrupted at step " in log.read_text()
    deadline = time.monotonic() + 10  # multiprocessing's resource tracker ends when it sees its pipe closed
    while left := subprocess.run(["pgrep", "-a", "-s", str(demo.pid)], capture_output=True, text=True).stdout:
        assert time.monotonic() < deadline, left  # no run, no loader worker left behind
        time.sleep(0.2)
