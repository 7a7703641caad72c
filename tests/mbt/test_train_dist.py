"""Training under torchrun with gloo on CPU (tests/dist_train_check.py runs `mbt.train.main` and records each rank's
clips and final parameters): two processes on one node, two "nodes" on localhost with a c10d rendezvous, a rank
killed mid-run that torchrun's `--max-restarts` brings back to resume from the last checkpoint, and a full disk at
rank 0's checkpoint that every rank leaves at once."""

from __future__ import annotations

import json
import os
import re
import signal
import socket
import subprocess
import sys
import uuid
from pathlib import Path
from typing import Any

import pytest
from dist_train_check import CRASH_MARKER, FILL_AT_STEP, FILL_DISK, param_digest
from full_disk import FullDisk
from test_train import RANDOM, losses_by_step, read_rows, train_args

from mbt.checkpoint import checkpoint_path, latest_checkpoint, load_checkpoint

pytestmark = pytest.mark.slow  # torchrun: processes and rendezvous, tens of seconds each

REPO = Path(__file__).resolve().parents[2]
SCRIPT = Path(__file__).parents[1] / "support" / "dist_train_check.py"
TIMEOUT_S = 300
# Global batch 2 over 2 ranks: 1 clip per rank per step, 9 // 2 = 4 steps per epoch; 2 epochs, checkpoints every 2.
STEPS_PER_EPOCH, EPOCHS = 4, 2
TOTAL_STEPS = STEPS_PER_EPOCH * EPOCHS
RUN = ["--epochs", str(EPOCHS), "--checkpoint_every_steps", "2", *RANDOM]


def torchrun(*args: str) -> list[str]:
    return [sys.executable, "-m", "torch.distributed.run", *args]


def worker_env(**extra: str) -> dict[str, str]:
    """One thread per worker (2 cores), and none of torchrun's own variables inherited."""
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR")}
    return {**env, "OMP_NUM_THREADS": "1", **extra}


def launch(cmd: list[str], log: Path, **extra_env: str) -> subprocess.Popen:
    """torchrun in its own process group (so that a timeout ends its workers too), output to `log`."""
    with open(log, "w") as f:
        return subprocess.Popen(
            cmd, cwd=REPO, env=worker_env(**extra_env), stdout=f, stderr=subprocess.STDOUT, start_new_session=True
        )


def wait_all(procs: list[subprocess.Popen], logs: list[Path]) -> None:
    """Wait for every launch to exit 0; on a timeout or failure end what is left and show the logs."""
    try:
        codes = [proc.wait(timeout=TIMEOUT_S) for proc in procs]
    except subprocess.TimeoutExpired:
        codes = None
    finally:
        for proc in procs:
            if proc.poll() is None:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()
    assert codes == [0] * len(procs), "\n".join(log.read_text()[-4000:] for log in logs)


def run(cmd: list[str], log: Path, **extra_env: str) -> str:
    """Run one torchrun launch to exit 0; its output."""
    wait_all([launch(cmd, log, **extra_env)], [log])
    return log.read_text()


def records(record_dir: Path, world_size: int) -> list[dict[str, Any]]:
    found = [json.loads((record_dir / f"rank-{r}.json").read_text()) for r in range(world_size)]
    assert [r["rank"] for r in found] == list(range(world_size))
    assert all(r["world_size"] == world_size and r["exit"] == 0 for r in found)
    return found


def assert_ranks_read_different_clips(found: list[dict[str, Any]], steps: int) -> None:
    """Each rank trained on one clip a step, and within an epoch no clip was read twice over the ranks."""
    for rec in found:
        assert len(rec["keys"]) == steps and all(len(k) == 1 for k in rec["keys"])
    for start in range(0, steps, STEPS_PER_EPOCH):
        epoch = [k for rec in found for (k,) in rec["keys"][start : start + STEPS_PER_EPOCH]]
        assert len(set(epoch)) == len(epoch) == STEPS_PER_EPOCH * len(found), epoch


def assert_parameters_synchronised(found: list[dict[str, Any]], run_dir: Path) -> None:
    """Every rank holds the weights rank 0 saved in the final checkpoint."""
    saved = param_digest(load_checkpoint(latest_checkpoint(run_dir))["model"])
    assert [rec["digest"] for rec in found] == [saved] * len(found)


@pytest.fixture(scope="module")
def two_process_run(train_shards: Path, eval_shards: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """`torchrun --standalone --nproc_per_node=2` training RUN uninterrupted; the run directory holds the records."""
    out = tmp_path_factory.mktemp("dist") / "run"
    run(torchrun("--standalone", "--nproc_per_node=2", str(SCRIPT), str(out / "ranks"),
                 *train_args(train_shards, eval_shards, out, *RUN)), out.with_name("torchrun.log"))  # fmt: skip
    return out


def test_two_processes_train_and_evaluate(two_process_run: Path) -> None:
    assert latest_checkpoint(two_process_run) == checkpoint_path(two_process_run, TOTAL_STEPS)
    assert sorted(losses_by_step(two_process_run)) == list(range(1, TOTAL_STEPS + 1))
    assert (two_process_run / "config.yaml").is_file() and (two_process_run / "curves.png").is_file()
    assert json.loads((two_process_run / "eval" / "metrics.json").read_text())["num_samples"] == 3
    state = load_checkpoint(latest_checkpoint(two_process_run))
    assert len(state["rng"]) == 2  # each rank's dropout stream
    found = records(two_process_run / "ranks", 2)
    assert_ranks_read_different_clips(found, TOTAL_STEPS)
    assert_parameters_synchronised(found, two_process_run)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_two_nodes_on_localhost(train_shards: Path, eval_shards: Path, tmp_path: Path) -> None:
    out = tmp_path / "run"
    rendezvous = [
        "--nnodes=2", "--nproc_per_node=1", "--rdzv_backend=c10d", f"--rdzv_endpoint=127.0.0.1:{free_port()}",
        f"--rdzv_id=mbt-{uuid.uuid4().hex[:8]}",
    ]  # fmt: skip
    args = [str(SCRIPT), str(out / "ranks"), *train_args(train_shards, eval_shards, out, "--epochs", "1", *RANDOM)]
    logs = [tmp_path / f"node-{n}.log" for n in range(2)]
    wait_all([launch(torchrun(*rendezvous, f"--node_rank={n}", *args), log) for n, log in enumerate(logs)], logs)
    found = records(out / "ranks", 2)
    assert_ranks_read_different_clips(found, STEPS_PER_EPOCH)
    assert_parameters_synchronised(found, out)
    assert [row["step"] for row in read_rows(out) if "loss" in row] == list(range(1, STEPS_PER_EPOCH + 1))


def test_failed_rank_restarts_and_resumes(
    two_process_run: Path, train_shards: Path, eval_shards: Path, tmp_path: Path
) -> None:
    out = tmp_path / "run"
    marker = tmp_path / "crashed"
    output = run(
        torchrun("--standalone", "--nproc_per_node=2", "--max-restarts=1", str(SCRIPT), str(out / "ranks"),
                 *train_args(train_shards, eval_shards, out, *RUN)),
        tmp_path / "torchrun.log",
        # torchrun's agents share their rendezvous store with the workers by default, and a restarted group can read
        # the dead group's gloo addresses from it (pytorch/pytorch#135712): a store per attempt avoids that.
        **{CRASH_MARKER: str(marker), "TORCH_DISABLE_SHARE_RDZV_TCP_STORE": "1"},
    )  # fmt: skip
    assert marker.exists(), "rank 1 did not crash"
    assert f"resumed from {checkpoint_path(out, 2)} at step 2" in output, output[-4000:]
    assert latest_checkpoint(out) == checkpoint_path(out, TOTAL_STEPS)
    found = records(out / "ranks", 2)  # written by the restarted workers: the steps after the resume
    for rec in found:
        assert len(rec["keys"]) == TOTAL_STEPS - 2
    assert_parameters_synchronised(found, out)
    # The restarted run ends where the uninterrupted one did.
    reference, resumed = losses_by_step(two_process_run), losses_by_step(out)
    assert sorted(resumed) == list(range(1, TOTAL_STEPS + 1))
    for step in range(3, TOTAL_STEPS + 1):
        assert resumed[step] == pytest.approx(reference[step], rel=0, abs=1e-6), f"step {step}"
    assert found[0]["digest"] == records(two_process_run / "ranks", 2)[0]["digest"]


def test_a_full_disk_at_rank_0s_checkpoint_stops_every_rank_at_once(
    train_shards: Path, eval_shards: Path, full_disk: FullDisk, tmp_path: Path
) -> None:
    """Rank 0 cannot write the checkpoint of step 4: every rank raises its error within seconds (on main rank 1
    waited at the barrier, or died of a broken connection), and a rerun would resume from step 2."""
    out = full_disk.folder / "run"
    # torchrun looks at its workers every 5 s, not 0.1 s: rank 1 returns and records its exit before it is ended.
    cmd = torchrun("--standalone", "--nproc_per_node=2", "--monitor-interval=5", str(SCRIPT), str(tmp_path / "ranks"),
                   *train_args(train_shards, eval_shards, out, *RUN))  # fmt: skip
    log = tmp_path / "torchrun.log"
    proc = launch(cmd, log, **{FILL_DISK: str(full_disk.folder), FILL_AT_STEP: "4"})
    try:
        assert proc.wait(timeout=TIMEOUT_S) != 0
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
    output = log.read_text()
    found = [json.loads((tmp_path / "ranks" / f"rank-{r}.json").read_text()) for r in range(2)]
    assert [rec["exit"] for rec in found] == [1, 1], output[-4000:]
    filled_at = full_disk.filler.stat().st_mtime
    assert all(rec["exited_at"] - filled_at < 30 for rec in found), output[-4000:]
    message = (
        f"error: cannot write {checkpoint_path(out, 4)}: No space left on device; free space, then rerun the same "
        f"command (it resumes from {checkpoint_path(out, 2)})"
    )
    assert re.findall(r"error: [^\r\n]*", output) == [message]  # printed once, by rank 0
    assert latest_checkpoint(out) == checkpoint_path(out, 2) and not list(out.rglob("*.tmp"))
