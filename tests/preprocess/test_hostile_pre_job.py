"""The shard job on hostile inputs: a clip with NaN audio, playlists and FIFOs among the videos, decodes past their
time, a SIGKILL while ffmpeg runs, a full disk, two jobs on one folder, damaged state and record files."""

from __future__ import annotations

import csv
import errno
import json
import os
import re
import shutil
import signal
import subprocess
import time
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
from conftest import audioset_args, load_tool, tool_command
from media import hostile_lists, make_long_clip, mux_with_video, tone, write_float_wav

import preprocess.decode as decode
import shards.writer as shard_writer
from preprocess.job_state import STATE_DIR, record_path
from shards.atomic import exclusive_lock
from shards.manifest import load_manifest
from shards.schema import FAILURES_NAME
from shards.tar import iter_tar_samples

shard_audioset = load_tool("shard_audioset")
FINISHED_KEPT = "free space, then rerun the same command (finished shards are kept)"


def demo_ytids(demo) -> list[str]:
    return [line.split(",")[0] for line in demo.train_csv.read_text().splitlines()[3:]]


def copy_videos(demo, tmp_path: Path) -> Path:
    videos = tmp_path / "videos"
    shutil.copytree(demo.videos_dir, videos)
    return videos


def keys_in(out: Path) -> Counter[str]:
    """How many times each key is stored in the split's shards."""
    return Counter(key for s in load_manifest(out).shards for key, _ in iter_tar_samples(out / s.name))


def args_with_videos(demo, out: Path, videos: Path, *extra: str) -> list[str]:
    args = audioset_args(demo, out, *extra)
    args[args.index("--videos") + 1] = str(videos)
    return args


def test_nan_audio_is_recorded_and_the_statistics_stay_finite(demo, tmp_path, capsys):
    videos = copy_videos(demo, tmp_path)
    bad = demo_ytids(demo)[0]
    (videos / f"{bad}.mp4").unlink()
    samples = tone()
    samples[5000:5007] = np.nan
    mux_with_video(videos / f"{bad}.mkv", write_float_wav(tmp_path / "nan.wav", samples))
    out = tmp_path / "out"
    assert shard_audioset.main(args_with_videos(demo, out, videos, "--shard-size", "4", "--workers", "2")) == 0
    assert "skipped: 1 non_finite_audio" in capsys.readouterr().out
    manifest = load_manifest(out)
    (failure,) = manifest.failures
    assert failure["key"] == f"{bad}_0" and failure["reason"] == "non_finite_audio"
    assert re.search(r"^7 of \d+ decoded audio samples are NaN or infinite", failure["message"])
    assert set(keys_in(out)) == {f"{y}_0" for y in demo_ytids(demo)[1:]} and max(keys_in(out).values()) == 1
    assert np.isfinite(manifest.logmel.mean) and np.isfinite(manifest.logmel.std) and manifest.logmel.count > 0


def test_playlists_fifos_and_devices_among_the_videos_are_recorded(demo, tmp_path, capsys):
    videos = copy_videos(demo, tmp_path)
    ytids = demo_ytids(demo)
    lists = hostile_lists(videos)  # clip0.m3u8, clip0.mp4, clip1.m3u8, clip1.mp4
    for ytid, path in zip(ytids[:4], lists, strict=True):
        (videos / f"{ytid}.mp4").unlink()
        path.rename(videos / f"{ytid}{path.suffix}")
    (videos / f"{ytids[4]}.mp4").unlink()
    os.mkfifo(videos / f"{ytids[4]}.mp4")
    start = time.monotonic()
    assert shard_audioset.main(args_with_videos(demo, tmp_path / "out", videos)) == 0
    assert time.monotonic() - start < 120
    reasons = {f["key"]: f["reason"] for f in load_manifest(tmp_path / "out").failures}
    assert reasons == {**{f"{y}_0": "not_media" for y in ytids[:4]}, f"{ytids[4]}_0": "missing_file"}
    assert set(keys_in(tmp_path / "out")) == {f"{y}_0" for y in ytids[5:]}


def test_decode_timeout_is_a_failure_and_not_part_of_the_identity(demo, tmp_path, capsys):
    out = tmp_path / "out"
    assert shard_audioset.main(audioset_args(demo, out, "--limit", "3", "--decode-timeout", "0.001")) == 0
    assert "skipped: 3 timeout" in capsys.readouterr().out
    assert all("--decode-timeout" in f["message"] for f in load_manifest(out).failures)
    assert shard_audioset.main(audioset_args(demo, out, "--limit", "3", "--decode-timeout", "30")) == 0
    assert "nothing to do" in capsys.readouterr().out  # another timeout resumes the same folder


def processes_mentioning(text: str) -> list[str]:
    """Command lines of live processes whose command line or an open file holds `text` (ffmpeg reads its input as
    /dev/fd/N; zombies have neither)."""
    found = []
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            cmdline = Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
            files = [os.readlink(f"/proc/{pid}/fd/{fd}") for fd in os.listdir(f"/proc/{pid}/fd")]
        except OSError:
            continue
        if any(text in s for s in [cmdline, *files]):
            found.append(f"{pid}: {cmdline}")
    return found


@pytest.mark.slow
def test_sigkilled_job_leaves_no_ffmpeg_and_a_second_job_is_refused_meanwhile(demo, tmp_path, capsys):
    unique = f"killme-{os.getpid()}-{time.monotonic_ns()}"
    videos = tmp_path / unique
    videos.mkdir()
    make_long_clip(videos / "longclip_aaa.mp4", seconds=600)  # ffmpeg takes several seconds over it
    segments = tmp_path / "long_segments.csv"
    segments.write_text('# long\n#\n# YTID, start_seconds, end_seconds, positive_labels\nlongclip_aaa, 0, 600, ""\n')
    args = ["--segments", str(segments), "--labels", str(demo.class_labels_csv), "--videos", str(videos),
            "--out", str(tmp_path / "out"), "--segment-seconds", "600", "--frames", "8", "--workers", "1",
            "--quiet"]  # fmt: skip
    job = subprocess.Popen(tool_command("shard_audioset", *args))
    deadline = time.monotonic() + 60
    while not any(" ffmpeg " in p for p in processes_mentioning(unique)) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert any(" ffmpeg " in p for p in processes_mentioning(unique)), "ffmpeg never started"
    assert shard_audioset.main(args) == 1
    err = capsys.readouterr().err
    assert f"another job (pid {job.pid} on" in err and str(tmp_path / "out") in err
    job.send_signal(signal.SIGKILL)  # the job's main process only: its workers and their ffmpeg must follow
    job.wait()
    deadline = time.monotonic() + 5
    while processes_mentioning(unique) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert not processes_mentioning(unique)
    with exclusive_lock(tmp_path / "out" / STATE_DIR / "part-0.lock"):  # the kernel dropped the dead job's lock
        pass
    decode.remove_stale_scratch()  # what the next job on this host does with the killed worker's frames


@pytest.mark.slow
def test_parts_of_a_partitioned_job_run_at_once_but_one_part_only_once(demo, tmp_path, capsys):
    out = tmp_path / "out"
    part0 = audioset_args(demo, out, "--shard-size", "2", "--workers", "1", "--num-jobs", "2", "--job-index", "0")
    job = subprocess.Popen(tool_command("shard_audioset", *part0))
    lock = out / STATE_DIR / "part-0.lock"
    deadline = time.monotonic() + 60
    while not (lock.is_file() and f"pid {job.pid}" in lock.read_text()) and time.monotonic() < deadline:
        time.sleep(0.02)
    assert shard_audioset.main(part0) == 1
    assert f"another job (pid {job.pid} on" in capsys.readouterr().err
    part1 = [*part0[:-1], "1"]
    assert shard_audioset.main(part1) == 0
    assert job.wait(timeout=120) == 0
    assert shard_audioset.main(part1) == 0
    counts = keys_in(out)
    assert len(counts) == 9 and set(counts.values()) == {1}


class FullDisk:
    """A file whose writes fail with ENOSPC once `room` bytes are in (in-process: the parent writes the shards)."""

    def __init__(self, path: Path, mode: str, room: int) -> None:
        self._file = open(path, mode)  # noqa: SIM115 - closed by close()
        self._room = room

    def write(self, data: bytes) -> int:
        if len(data) > self._room:
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        self._room -= len(data)
        return self._file.write(data)

    def close(self) -> None:
        self._file.close()


def fail_fsync_of(monkeypatch, name: str) -> None:
    """os.fsync raises ENOSPC for files whose path holds `name` (a full disk found at the flush)."""
    real_fsync = os.fsync

    def fsync(fd: int) -> None:
        if name in os.readlink(f"/proc/self/fd/{fd}"):
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        real_fsync(fd)

    monkeypatch.setattr(os, "fsync", fsync)


@pytest.mark.slow
@pytest.mark.parametrize(
    ("where", "named"),
    [
        ("tar", "shard-000001.tar"),
        ("shard-000001.idx", "shard-000001.idx"),
        ("_state/shard-000001.json", "shard-000001.json"),
        ("manifest.json", "manifest.json"),
        ("failures.csv", "failures.csv"),
        ("_state/job.json", "job.json"),
    ],
)
def test_full_disk_stops_the_job_cleanly_and_a_rerun_completes(demo, tmp_path, capsys, monkeypatch, where, named):
    out = tmp_path / "out"
    args = audioset_args(demo, out, "--shard-size", "2", "--limit", "5", "--workers", "1")
    if where == "tar":
        writes = iter([1 << 30, 20_000])  # shard 0 fits, shard 1 fills the disk mid-way
        monkeypatch.setattr(shard_writer, "open", lambda p, m: FullDisk(p, m, next(writes)), raising=False)
    else:
        fail_fsync_of(monkeypatch, where)
    assert shard_audioset.main(args) == 1
    err = capsys.readouterr().err
    assert f"cannot write {out}" in err and f"{named}: No space left on device; {FINISHED_KEPT}" in err
    assert not list(out.rglob("*.tmp"))
    monkeypatch.undo()
    assert shard_audioset.main(args) == 0
    counts = keys_in(out)
    assert len(counts) == 5 and set(counts.values()) == {1} and not list(out.rglob("*.tmp"))


@pytest.mark.slow
def test_a_real_full_disk_stops_the_job_and_the_rerun_makes_the_uninterrupted_shards(
    demo, train_shards, full_disk, capsys
):
    out = full_disk.folder / "train"
    args = audioset_args(demo, out, "--shard-size", "2")  # the arguments that made train_shards
    full_disk.fill(leave_bytes=200 << 10)  # the state files and one shard of ~140 KB fit
    assert shard_audioset.main(args) == 1
    err = capsys.readouterr().err
    named = rf"{re.escape(str(out))}/shard-00000[1-4]\.(tar|idx)"
    assert re.fullmatch(rf"error: cannot write {named}: No space left on device; {re.escape(FINISHED_KEPT)}\n", err)
    assert not list(out.rglob("*.tmp")) and (out / "shard-000000.tar").is_file()
    full_disk.free()
    assert shard_audioset.main(args) == 0
    assert load_manifest(out).shards == load_manifest(train_shards).shards
    assert all((out / s.name).read_bytes() == (train_shards / s.name).read_bytes() for s in load_manifest(out).shards)


@pytest.mark.slow
def test_a_full_scratch_disk_stops_the_job_instead_of_failing_its_clips(demo, tmp_path, full_disk, capsys, monkeypatch):
    """ffmpeg cannot write the frames it decodes: on main every clip was recorded as 'unreadable', for good."""
    out = tmp_path / "out"
    args = audioset_args(demo, out, "--shard-size", "2", "--limit", "4", "--workers", "1")
    monkeypatch.setattr(decode, "_scratch_dir", lambda: str(full_disk.folder))  # the forked workers' too
    full_disk.fill()
    assert shard_audioset.main(args) == 1
    scratch = f"{full_disk.folder} (the scratch folder of ffmpeg's decoded frames)"
    assert capsys.readouterr().err == f"error: cannot write {scratch}: No space left on device; {FINISHED_KEPT}\n"
    assert not list((out / STATE_DIR).glob("shard-*.json")) and not list(out.glob("shard-*"))
    full_disk.free()
    assert shard_audioset.main(args) == 0
    manifest = load_manifest(out)
    assert manifest.num_samples == 4 and manifest.failures == []


@pytest.mark.parametrize(
    ("name", "content", "says"),
    [
        ("job.json", b"{not json", "restore it, or delete"),
        ("job.json", b"\xff\xfe\x00garbage", "restore it, or delete"),
        ("job.json", b"[1, 2]", "a JSON list, not an object"),
        ("partition.json", b"{not json", "delete it and run every part with the same --num-jobs"),
        ("partition.json", b'{"num_jobs": "two"}', "num_jobs 'two' is not a count"),
        ("partition.json", b'"x"', "a JSON str, not an object"),
    ],
)
def test_damaged_state_file_is_an_error_naming_it(demo, tmp_path, capsys, name, content, says):
    out = tmp_path / "out"
    assert shard_audioset.main(audioset_args(demo, out, "--limit", "2")) == 0
    (out / STATE_DIR / name).write_bytes(content)
    capsys.readouterr()
    assert shard_audioset.main(audioset_args(demo, out, "--limit", "2")) == 1
    err = capsys.readouterr().err
    assert f"{out / STATE_DIR / name}" in err and says in err and "Traceback" not in err


@pytest.mark.parametrize(
    ("make", "says"),
    [
        (lambda out: out.write_text("x"), "cannot write {out} (File exists); fix that"),
        (
            lambda out: (out.mkdir(), (out / STATE_DIR).write_text("x")),
            "cannot write {out}/_state (File exists); fix that",
        ),
        (
            lambda out: (out.mkdir(), (out / STATE_DIR / "part-0.lock").mkdir(parents=True)),
            "cannot write {out}/_state/part-0.lock (Is a directory)",
        ),
    ],
)
def test_output_paths_taken_by_other_files_are_errors(demo, tmp_path, capsys, make, says):
    out = tmp_path / "out"
    make(out)
    assert shard_audioset.main(audioset_args(demo, out, "--limit", "2")) == 1
    assert says.format(out=out) in capsys.readouterr().err


def test_state_file_that_is_a_fifo_does_not_hang(demo, tmp_path, capsys):
    out = tmp_path / "out"
    (out / STATE_DIR).mkdir(parents=True)
    os.mkfifo(out / STATE_DIR / "job.json")
    assert shard_audioset.main(audioset_args(demo, out, "--limit", "2")) == 1
    assert "not a regular file" in capsys.readouterr().err


@pytest.mark.slow
@pytest.mark.parametrize(
    "damage",
    [
        lambda r: {**r, "logmel": {**r["logmel"], "sum": float("nan")}},  # an old run summed a NaN clip
        lambda r: {**r, "shard": {**r["shard"], "name": "../../elsewhere.tar"}},
        lambda r: {**r, "failures": [{"key": 1}]},
        lambda r: {**r, "index": 7},
        lambda r: [r],
    ],
)
def test_damaged_shard_record_makes_its_shard_be_redone(demo, tmp_path, damage):
    out = tmp_path / "out"
    args = audioset_args(demo, out, "--shard-size", "2", "--limit", "4")
    assert shard_audioset.main(args) == 0
    record = record_path(out, 1)
    record.write_text(json.dumps(damage(json.loads(record.read_text()))))
    (out / "manifest.json").unlink()
    assert shard_audioset.main(args) == 0
    assert json.loads(record.read_text())["shard"]["name"] == "shard-000001.tar"
    counts = keys_in(out)
    assert len(counts) == 4 and set(counts.values()) == {1}
    assert np.isfinite(load_manifest(out).logmel.mean)


def test_undecodable_file_name_does_not_break_failures_csv(demo, tmp_path):
    videos = copy_videos(demo, tmp_path)
    ytid = demo_ytids(demo)[0]
    (videos / f"{ytid}.mp4").unlink()
    bad_name = os.fsdecode(os.fsencode(f"{ytid}.") + b"\xff")
    (videos / bad_name).write_text("not a video")
    out = tmp_path / "out"
    assert shard_audioset.main(args_with_videos(demo, out, videos, "--limit", "3")) == 0
    with open(out / FAILURES_NAME, encoding="utf-8") as f:
        (row,) = list(csv.DictReader(f))
    assert row["reason"] == "unreadable" and row["file"] == f"{ytid}.\\xff"
    assert len(keys_in(out)) == 2


def test_scratch_folders_of_dead_workers_are_removed():
    dead = subprocess.Popen(["true"])
    dead.wait()
    scratch = Path(decode._scratch_dir())
    stale = scratch / f"{decode.SCRATCH_PREFIX}{dead.pid}-test"
    live = scratch / f"{decode.SCRATCH_PREFIX}{os.getpid()}-test"
    for folder in (stale, live):
        folder.mkdir()
        (folder / "00.jpg").write_bytes(b"frame")
    try:
        assert decode.remove_stale_scratch() == [str(stale)]
        assert not stale.exists() and live.is_dir()
    finally:
        shutil.rmtree(live)


@pytest.mark.slow
def test_a_worker_killed_by_the_system_stops_the_job_instead_of_hanging(demo, tmp_path, capsys, monkeypatch):
    """Pool.imap waited for ever on a worker the OOM killer took; now the job stops and a rerun resumes."""
    out = tmp_path / "train"
    real = decode.decode_clip
    calls = tmp_path / "calls"
    calls.mkdir()

    def dies_on_the_fourth(*args, **kwargs):
        (calls / str(os.getpid() * 1000 + len(list(calls.iterdir())))).touch()
        if len(list(calls.iterdir())) == 4:
            os.kill(os.getpid(), signal.SIGKILL)
        return real(*args, **kwargs)

    monkeypatch.setattr("preprocess.clip.decode_clip", dies_on_the_fourth)
    start = time.monotonic()
    assert shard_audioset.main(audioset_args(demo, out, "--shard-size", "2", "--workers", "2")) == 1
    assert "a decoding worker died" in capsys.readouterr().err and time.monotonic() - start < 120
    monkeypatch.setattr("preprocess.clip.decode_clip", real)
    assert shard_audioset.main(audioset_args(demo, out, "--shard-size", "2", "--workers", "2")) == 0
    assert sorted(keys_in(out).values()) == [1] * 9


@pytest.mark.slow
@pytest.mark.parametrize("num_rows", [0, 10**12])
def test_a_job_file_claiming_absurd_row_counts_is_named(demo, tmp_path, capsys, num_rows):
    out = tmp_path / "train"
    assert shard_audioset.main(audioset_args(demo, out, "--shard-size", "4")) == 0
    path = out / STATE_DIR / "job.json"
    data = json.loads(path.read_text())
    data["num_rows"] = num_rows
    path.write_text(json.dumps(data))
    assert load_tool("merge_manifests").main([str(out)]) == 1
    assert f"{path} is damaged (num_rows, shard_size, seed are not counts in range)" in capsys.readouterr().err
