"""Partitioned shard jobs: N parts run in any order (or at once) into one folder give exactly the 1-job split."""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path

import pytest
import yaml
from conftest import REPO, audioset_args, load_tool, tool_command

from preprocess.cli import partition
from preprocess.job import JobSummary
from preprocess.job_state import JobError
from shards.manifest import load_manifest

shard_audioset = load_tool("shard_audioset")
merge_manifests = load_tool("merge_manifests")


def part(demo, out, num_jobs: int, index: int) -> list[str]:
    """shard_audioset.py arguments for part `index` of `num_jobs` (shards of 2 samples)."""
    return audioset_args(demo, out, "--shard-size", "2", "--num-jobs", str(num_jobs), "--job-index", str(index))


def same_split(a, b) -> None:
    """Same manifest (apart from the folder names) and byte-identical shards and index files."""
    text_a = (a / "manifest.json").read_text().replace(str(a), "")
    assert text_a == (b / "manifest.json").read_text().replace(str(b), "")
    for shard in load_manifest(a).shards:
        assert (a / shard.name).read_bytes() == (b / shard.name).read_bytes()
        assert (a / shard.index_name).read_bytes() == (b / shard.index_name).read_bytes()


@pytest.fixture(scope="module")
def one_job(demo, tmp_path_factory):
    out = tmp_path_factory.mktemp("one") / "train"
    assert shard_audioset.main(audioset_args(demo, out, "--shard-size", "2")) == 0
    return out


@pytest.mark.slow
def test_three_parts_in_any_order_equal_one_job(demo, one_job, tmp_path, capsys):
    out = tmp_path / "train"
    for index, waiting in ((2, "waiting for 2 parts; 1 done"), (0, "waiting for 1 part; 2 done")):
        assert shard_audioset.main(part(demo, out, 3, index)) == 0
        assert waiting in capsys.readouterr().out
    assert not (out / "manifest.json").exists()
    assert merge_manifests.main([str(out)]) == 1
    assert "of parts [1]" in capsys.readouterr().err
    assert shard_audioset.main(part(demo, out, 3, 1)) == 0
    assert "9 samples in 5 shards" in capsys.readouterr().out  # the last part merged
    same_split(out, one_job)
    manifest, reference = load_manifest(out), load_manifest(one_job)
    assert manifest.logmel == reference.logmel  # exact sums, merged from the parts' records
    assert merge_manifests.main([str(out)]) == 0


@pytest.mark.slow
def test_parts_running_at_once(demo, one_job, tmp_path):
    out = tmp_path / "train"
    command = tool_command("shard_audioset", *audioset_args(demo, out, "--shard-size", "2", "--workers", "1"))
    procs = []
    for task in (1, 2):  # a SLURM array with ids 1..2
        array = {"SLURM_ARRAY_TASK_COUNT": "2", "SLURM_ARRAY_TASK_ID": str(task), "SLURM_ARRAY_TASK_MIN": "1"}
        env = {**os.environ, **array}
        procs.append(subprocess.Popen(command, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True))
    for proc in procs:
        _, err = proc.communicate(timeout=300)
        assert proc.returncode == 0, err
    same_split(out, one_job)


def test_parts_must_agree_on_n(demo, tmp_path, capsys):
    out = tmp_path / "train"
    assert shard_audioset.main(part(demo, out, 3, 0)) == 0
    assert shard_audioset.main(part(demo, out, 2, 1)) == 1
    assert "being sharded as 3 jobs" in capsys.readouterr().err
    assert json.loads((out / "_state" / "partition.json").read_text()) == {"num_jobs": 3}


def test_partition_from_flags_and_slurm():
    assert partition(None, None, {}) == (1, 0)
    assert partition(4, 3, {}) == (4, 3)
    slurm = {"SLURM_ARRAY_TASK_COUNT": "4", "SLURM_ARRAY_TASK_ID": "7", "SLURM_ARRAY_TASK_MIN": "5"}
    assert partition(None, None, slurm) == (4, 2)
    assert partition(2, 1, slurm) == (2, 1)  # flags win
    with pytest.raises(JobError, match=r"not in 0\.\.3"):
        partition(4, 4, {})


def test_partition_from_kubernetes_and_aws_batch():
    assert partition(4, None, {"JOB_COMPLETION_INDEX": "3"}) == (4, 3)
    assert partition(4, None, {"AWS_BATCH_JOB_ARRAY_INDEX": "2"}) == (4, 2)
    assert partition(4, 1, {"AWS_BATCH_JOB_ARRAY_INDEX": "2"}) == (4, 1)  # flags win
    for name in ("JOB_COMPLETION_INDEX", "AWS_BATCH_JOB_ARRAY_INDEX"):
        with pytest.raises(JobError, match=f"{name} is set .* pass --num-jobs N"):
            partition(None, None, {name: "0"})  # neither engine tells a task the array's size
    with pytest.raises(JobError, match="JOB_COMPLETION_INDEX='x' is not an integer"):
        partition(4, None, {"JOB_COMPLETION_INDEX": "x"})


def test_waiting_parts_are_counted_not_listed(tmp_path):
    summary = JobSummary(tmp_path, 0, 0, {}, 2048, 4, 9.0, False, missing_parts=list(range(1, 1000)), num_jobs=1000)
    text = summary.describe()
    assert "waiting for 999 parts; 1 done" in text and len(text) < 300 + len(str(tmp_path))


def run_launch(demo, out: Path, command: list[str], env_name: str, num_jobs: int) -> None:
    """Run `command` (a launch file's, its paths and size replaced by the demo's) as an array engine would: one
    process per index, all at once, the index in `env_name`."""
    args = [*command[2:], *part(demo, out, num_jobs, 0)[:-2], "--workers", "1"]  # the later flags win
    assert command[:2] == [".venv/bin/python", "tools/shard_audioset.py"]
    procs = [
        subprocess.Popen(
            tool_command("shard_audioset", *args), env={**os.environ, env_name: str(i)}, stderr=subprocess.PIPE
        )
        for i in range(num_jobs)
    ]
    for proc in procs:
        _, err = proc.communicate(timeout=300)
        assert proc.returncode == 0, err


@pytest.mark.slow
def test_kubernetes_indexed_job_launch(demo, one_job, tmp_path):
    job = yaml.safe_load((REPO / "tools/kubernetes/shard_audioset.yaml").read_text())
    assert job["spec"]["completionMode"] == "Indexed"
    command = job["spec"]["template"]["spec"]["containers"][0]["command"]
    assert f"--num-jobs={job['spec']['completions']}" in command
    run_launch(demo, tmp_path / "train", command, "JOB_COMPLETION_INDEX", 2)
    same_split(tmp_path / "train", one_job)


@pytest.mark.slow
def test_aws_batch_array_launch(demo, one_job, tmp_path):
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    fake_aws = bin_dir / "aws"  # records what would be submitted
    fake_aws.write_text(f"#!/bin/sh\nprintf '%s\\0' \"$@\" > {tmp_path / 'submitted'}\n")
    fake_aws.chmod(0o755)
    env = {**os.environ, "PATH": f"{bin_dir}:{os.environ['PATH']}", "QUEUE": "q", "DEFINITION": "d", "NUM_JOBS": "2"}
    subprocess.run(["bash", str(REPO / "tools/aws_batch/shard_audioset.sh")], env=env, check=True)
    submitted = (tmp_path / "submitted").read_text().split("\0")
    assert submitted[:2] == ["batch", "submit-job"]
    assert submitted[submitted.index("--array-properties") + 1] == "size=2"
    command = json.loads(submitted[submitted.index("--container-overrides") + 1])["command"]
    assert command[command.index("--num-jobs") + 1] == "2"
    run_launch(demo, tmp_path / "train", command, "AWS_BATCH_JOB_ARRAY_INDEX", 2)
    same_split(tmp_path / "train", one_job)
