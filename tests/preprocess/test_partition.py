"""Partitioned shard jobs: N parts run in any order (or at once) into one folder give exactly the 1-job split."""

from __future__ import annotations

import json
import os
import subprocess

import pytest
from conftest import audioset_args, load_tool, tool_command

from preprocess.cli import partition
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
    for index in (2, 0):
        assert shard_audioset.main(part(demo, out, 3, index)) == 0
        assert "waiting for parts" in capsys.readouterr().out
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
