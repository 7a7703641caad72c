"""The shard job's state folder is data: `_state/job.json` and `partition.json` claiming counts out of bounds or
out of step with the records present are refused before anything is planned, a merge costs what the folder holds
(its peak memory measured in a child against a normal merge), and two parts started at the same instant with
different arguments cannot both pass (the check-and-write is under a folder lock)."""

from __future__ import annotations

import contextlib
import csv
import json
import multiprocessing
import re
import shutil
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
from conftest import audioset_args, load_tool, tool_command

import preprocess.job_state as job_state
from preprocess.job_state import JOB_FILE, MAX_JOBS, PARTITION_FILE, STATE_DIR
from shards.manifest import MAX_SHARDS, load_manifest

merge_manifests = load_tool("merge_manifests")
SEED_REFUSAL = "holds shards made with other inputs or arguments (differs in: seed)"  # today's message
CHILD_ADDRESS_SPACE = 4 << 30  # unbounded growth in the child fails there instead of taking the machine


def state_copy(train_shards: Path, tmp_path: Path, **job: object) -> Path:
    """A copy of the demo's finished train split (9 rows in 5 shards of 2) without its manifest, job.json edited."""
    out = Path(shutil.copytree(train_shards, tmp_path / "train"))
    (out / "manifest.json").unlink()
    path = out / STATE_DIR / JOB_FILE
    path.write_text(json.dumps({**json.loads(path.read_text()), **job}))
    return out


# Runs a tool under an address-space limit and reports the peak RSS of its own image (VmHWM after exec: a forked
# child's rusage would count the pytest process it was forked from).
_CHILD = """
import resource, runpy, sys
resource.setrlimit(resource.RLIMIT_AS, (int(sys.argv[1]), int(sys.argv[1])))
sys.argv = sys.argv[2:]
try:
    runpy.run_path(sys.argv[0], run_name="__main__")
finally:
    with open("/proc/self/status") as status:
        print("peak_rss_kib", next(l.split()[1] for l in status if l.startswith("VmHWM:")), file=sys.stderr)
"""


def merge_in_child(folder: Path, timeout_s: float = 120.0) -> tuple[int, str, int]:
    """(exit status, stderr, peak RSS in KiB) of tools/merge_manifests.py on `folder` in a child process."""
    tool = tool_command("merge_manifests")[1]
    command = [sys.executable, "-c", _CHILD, str(CHILD_ADDRESS_SPACE), tool, str(folder)]
    done = subprocess.run(command, capture_output=True, text=True, timeout=timeout_s)
    peak = re.search(r"^peak_rss_kib (\d+)$", done.stderr, re.MULTILINE)
    assert peak, done.stderr[-2000:]
    return done.returncode, done.stderr, int(peak[1])


@pytest.fixture(scope="module")
def normal_merge_rss(train_shards: Path, tmp_path_factory: pytest.TempPathFactory) -> int:
    """The peak RSS of merging the demo's train split (the manifest written again)."""
    out = state_copy(train_shards, tmp_path_factory.mktemp("normal"))
    status, err, rss = merge_in_child(out)
    assert status == 0, err
    assert load_manifest(out).num_samples == 9
    return rss


HOSTILE_JOBS = {
    "1e8_rows_in_shards_of_1": (
        {"num_rows": 10**8, "shard_size": 1},
        f"make 100000000 shards, more than a manifest lists: {MAX_SHARDS}",
    ),
    # shard 4's record holds its one planned row: done; the others hold 2 rows, not the plan's 1
    "1e7_shards_a_few_records": ({"num_rows": 10**7, "shard_size": 1}, "9999999 shards not done, of parts [0]"),
    "shards_of_1e9_rows": ({"shard_size": 10**9}, "(num_rows, shard_size, seed are not counts in range)"),
    "fewer_rows_than_recorded": ({"num_rows": 3}, "its plan has 2 shards, but shard-000004.json records shard 4"),
}


@pytest.mark.slow
@pytest.mark.parametrize("case", sorted(HOSTILE_JOBS))
def test_a_hostile_job_file_is_refused_before_anything_is_planned(
    train_shards: Path, tmp_path: Path, normal_merge_rss: int, case: str
) -> None:
    """Before: 10^8 rows in shards of 1 planned 10^8 shards (gigabytes, then minutes of stat calls); shards of 10^9
    rows or 3 rows merged a manifest of the shards that plan held, silently."""
    job, says = HOSTILE_JOBS[case]
    out = state_copy(train_shards, tmp_path, **job)
    start = time.monotonic()
    status, err, rss = merge_in_child(out)
    assert status == 1 and says in err and "Traceback" not in err, err[-2000:]
    assert time.monotonic() - start < 30
    assert rss < 2 * normal_merge_rss, (rss, normal_merge_rss)
    assert not (out / "manifest.json").exists()


def test_a_record_that_does_not_hold_its_planned_rows_is_not_done(train_shards: Path, tmp_path: Path) -> None:
    out = state_copy(train_shards, tmp_path)
    record = out / STATE_DIR / "shard-000001.json"
    data = json.loads(record.read_text())
    data["failures"].append({"key": "x_0", "source": "s.csv:9", "file": "", "reason": "missing_file", "message": ""})
    record.write_text(json.dumps(data))
    assert merge_manifests.main([str(out)]) == 1  # its shard must be redone; the manifest is not written


def test_failures_csv_cells_cannot_be_formulas(train_shards: Path, tmp_path: Path) -> None:
    out = state_copy(train_shards, tmp_path)
    record = out / STATE_DIR / "shard-000004.json"  # the shard of one row
    data = json.loads(record.read_text())
    failure = {"key": "-abc_0", "source": '=HYPERLINK("http://x","see")', "file": "@SUM(A1)", "reason": "unreadable",
               "message": "+cmd|' /C calc'!A0"}  # fmt: skip
    stats = {"mean": 0.0, "std": 1.0, "count": 0, "sum": 0.0, "sum_sq": 0.0}
    record.write_text(json.dumps({**data, "shard": None, "logmel": stats, "failures": [failure]}))
    assert merge_manifests.main([str(out)]) == 0
    with open(out / "failures.csv", newline="") as f:
        (row,) = csv.DictReader(f)
    assert row == {"key": "-abc_0", "source": "'" + failure["source"], "file": "'@SUM(A1)", "reason": "unreadable",
                   "message": "'" + failure["message"]}  # fmt: skip
    assert load_manifest(out).failures == [failure]  # the manifest keeps the text as it was


@pytest.mark.parametrize("num_jobs", [0, MAX_JOBS + 1, 10**9, "2"])
def test_a_partition_file_out_of_bounds_is_named(train_shards: Path, tmp_path: Path, capsys, num_jobs) -> None:
    out = state_copy(train_shards, tmp_path)
    (out / STATE_DIR / PARTITION_FILE).write_text(json.dumps({"num_jobs": num_jobs}))
    assert merge_manifests.main([str(out)]) == 1
    err = capsys.readouterr().err
    path = out / STATE_DIR / PARTITION_FILE
    assert f"{path} is damaged (num_jobs {num_jobs!r} is not a count in 1..{MAX_JOBS})" in err


def test_the_parts_still_to_run_are_listed_up_to_20(train_shards: Path, tmp_path: Path, capsys) -> None:
    out = state_copy(train_shards, tmp_path, num_rows=2_000_000, shard_size=512)
    (out / STATE_DIR / PARTITION_FILE).write_text(json.dumps({"num_jobs": 1000}))
    assert merge_manifests.main([str(out)]) == 1
    err = capsys.readouterr().err
    assert "3907 shards not done, of parts [0, 1, 2," in err and "19, … (980 more)] (job indices of 1000)" in err


def _racing_part(args: list[str], held_file: str, barrier, err_path: Path) -> None:
    """A part whose first read of `held_file`, finding none, waits for the other part to read it too (at most 1.5 s):
    the race of two parts started at the same instant, made certain."""
    real = job_state.read_small_file

    def read(path: Path, max_bytes: int) -> bytes:
        try:
            return real(path, max_bytes)
        except FileNotFoundError:
            if Path(path).name == held_file:
                with contextlib.suppress(threading.BrokenBarrierError):
                    barrier.wait(timeout=1.5)
            raise

    job_state.read_small_file = read
    with open(err_path, "w") as err, contextlib.redirect_stderr(err), contextlib.redirect_stdout(None):
        status = load_tool("shard_audioset").main(args)
    sys.exit(status)


@pytest.mark.slow
@pytest.mark.parametrize(
    ("held_file", "first", "second", "refusal"),
    [
        (JOB_FILE, ["--seed", "0"], ["--seed", "1"], SEED_REFUSAL),
        (
            PARTITION_FILE,
            ["--num-jobs", "2", "--job-index", "0"],
            ["--num-jobs", "3", "--job-index", "1"],
            "is being sharded as",
        ),
    ],
)
def test_two_parts_started_at_once_with_different_arguments_cannot_both_pass(
    demo, tmp_path: Path, held_file: str, first: list[str], second: list[str], refusal: str
) -> None:
    context = multiprocessing.get_context("fork")
    barrier = context.Barrier(2)
    out = tmp_path / "train"
    parts = []
    for i, extra in enumerate((first, second)):
        args = audioset_args(demo, out, "--limit", "2", "--workers", "1", *extra)
        part = context.Process(target=_racing_part, args=(args, held_file, barrier, tmp_path / f"part{i}.err"))
        part.start()
        parts.append(part)
    for part in parts:
        part.join(timeout=120)
    errors = [(tmp_path / f"part{i}.err").read_text() for i in range(2)]
    assert sorted(part.exitcode for part in parts) == [0, 1], errors
    assert sum(refusal in err for err in errors) == 1, errors
