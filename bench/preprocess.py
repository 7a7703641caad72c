"""The shard job against bare ffmpeg decoding of the same clips (`tools/bench_preprocess.py`): the decode floor,
the whole job with W workers, with one, and as two partitioned jobs, each run interleaved and the fastest kept, in
wall time and in CPU time (which a loaded machine inflates far less); the job's start-up on its own; the
core-hours of the full datasets at a measured rate; and what the stored frame rate costs in bytes and job speed."""

from __future__ import annotations

import os
import resource
import shutil
import subprocess
import sys
import tempfile
import time
import traceback
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from bench.photo_clips import PHOTOS, make_photo_clips
from preprocess.datasets import read_audioset_classes, read_audioset_segments
from preprocess.decode import decode_command
from preprocess.job import JobSpec, run_job
from preprocess.videos import AUDIOSET_NAME_TEMPLATES, VideoIndex
from shards.manifest import load_manifest
from shards.schema import FeatureParams
from shards.tar import iter_tar_samples

AUDIOSET_2M_SEGMENTS = 2_041_789  # unbalanced_train_segments.csv
VGGSOUND_SEGMENTS = 200_000  # about: vggsound.csv lists ~200k clips


@dataclass(frozen=True)
class Cost:
    """What a run took: wall seconds, and CPU seconds (user + system) of every process it ran."""

    wall_s: float
    cpu_s: float


def _children_cpu_s() -> float:
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


def bare_decode_cost(paths: list[Path], segment_s: float, params: FeatureParams, workers: int) -> Cost:
    """Decoding every clip with ffmpeg (outputs discarded), `workers` ffmpeg processes at once."""

    def decode(path: Path) -> None:
        subprocess.run(decode_command(path, 0.0, segment_s, params, "", null_outputs=True), capture_output=True)

    start, cpu_start = time.perf_counter(), _children_cpu_s()
    with ThreadPoolExecutor(workers) as pool:  # each thread only waits on its ffmpeg process
        list(pool.map(decode, paths))
    return Cost(time.perf_counter() - start, _children_cpu_s() - cpu_start)


def run_jobs_forked(specs: list[JobSpec]) -> Cost:
    """Run each of `specs` in a process of its own forked from this one, all at once, until the last has merged
    the manifest: wall time, and the CPU time of the jobs, their workers and their ffmpeg runs (`os.wait4`).

    A forked job starts from this process's imports, so it pays its own start-up (torch, imported by a job that has
    clips to decode) only where this process has not imported torch: RuntimeError if it has.
    """
    if "torch" in sys.modules:
        raise RuntimeError("torch is imported in the benchmark's process: a forked job would not pay its own import")
    sys.stdout.flush()
    sys.stderr.flush()
    start = time.perf_counter()
    pids = []
    for spec in specs:
        pid = os.fork()
        if pid == 0:  # the job's process; never returns
            code = 1
            try:
                run_job(spec)
                code = 0
            except BaseException:
                traceback.print_exc()
            finally:
                os._exit(code)
        pids.append(pid)
    cpu_s, failed = 0.0, 0
    for pid in pids:
        _, status, usage = os.wait4(pid, 0)
        cpu_s += usage.ru_utime + usage.ru_stime
        failed += os.waitstatus_to_exitcode(status) != 0
    wall_s = time.perf_counter() - start
    if failed:
        raise RuntimeError(f"{failed} of {len(specs)} shard jobs failed (their tracebacks are above)")
    return Cost(wall_s, cpu_s)


def job_cost(spec_kwargs: dict[str, Any], workers: int, scratch: Path, num_jobs: int = 1) -> Cost:
    """The whole shard job into a fresh folder: `num_jobs` partitioned jobs at once (as a job array would run
    them), each with `workers` workers, each a process of its own (`run_jobs_forked`)."""
    out = Path(tempfile.mkdtemp(dir=scratch))
    specs = [JobSpec(out_dir=out, workers=workers, progress=False, num_jobs=num_jobs, job_index=i, **spec_kwargs)
             for i in range(num_jobs)]  # fmt: skip
    cost = run_jobs_forked(specs)
    if not (out / "manifest.json").is_file():
        raise RuntimeError(f"the shard job left no manifest in {out}")
    shutil.rmtree(out)
    return cost


def frame_rate_costs(data: Path, rates: list[float], workers: int, clips: int) -> list[dict[str, float]]:
    """For each frame rate: bytes per clip (all of it, and its frames) and the job's clips/s, sharding `clips` 10 s
    clips of natural content (`bench.photo_clips`) into a fresh folder; one run each."""
    rows = make_photo_clips(data / "photo-videos", clips)
    results = []
    for fps in rates:
        params = FeatureParams(num_frames=max(round(fps * 10.0), 1))
        out = Path(tempfile.mkdtemp(dir=data))
        spec = JobSpec(
            dataset="bench", split="train", rows=rows, multi_label=True, videos_dir=data / "photo-videos",
            out_dir=out, classes=[{"index": i, "id": n, "name": n} for i, n in enumerate(PHOTOS)],
            name_templates=AUDIOSET_NAME_TEMPLATES, params=params, shard_size=clips, workers=workers, progress=False,
        )  # fmt: skip
        seconds = run_jobs_forked([spec]).wall_s
        manifest = load_manifest(out)
        total = sum(shard.bytes for shard in manifest.shards) / manifest.num_samples
        frames = sum(len(m) for shard in manifest.shards for _, sample in iter_tar_samples(out / shard.name)
                     for e, m in sample.items() if e.endswith(".jpg")) / manifest.num_samples  # fmt: skip
        results.append({"fps": fps, "frames": params.num_frames, "bytes_per_clip": total, "frame_bytes": frames,
                        "clips_per_s": clips / seconds})  # fmt: skip
        shutil.rmtree(out)
    return results


def job_inputs(
    labels: Path, videos: Path, segment_files: list[Path], params: FeatureParams
) -> tuple[list[Path], dict[str, Any]]:
    """(each row's video, the shard job's JobSpec fields but the output's) for the AudioSet-layout clips of
    `segment_files` (classes from `labels`, videos in `videos`), decoded with `params`, in shards of 4 clips."""
    classes = read_audioset_classes(labels)
    rows = [row for path in segment_files for row in read_audioset_segments(path, [mid for mid, _ in classes])]
    index = VideoIndex(videos)
    spec = {
        "dataset": "bench", "split": "train", "rows": rows, "multi_label": True, "videos_dir": videos,
        "classes": [{"index": i, "id": mid, "name": name} for i, (mid, name) in enumerate(classes)],
        "name_templates": AUDIOSET_NAME_TEMPLATES, "params": params,
        "shard_size": 4,  # 6 shards of the 24 clips: partitioned jobs split the work by shard
    }  # fmt: skip
    return [index.find(row, AUDIOSET_NAME_TEMPLATES) for row in rows], spec


def job_against_ffmpeg(paths: list[Path], spec: dict[str, Any], workers: int, repeats: int) -> dict[str, Cost]:
    """The fastest of `repeats` runs (wall and CPU time each at its least) of bare ffmpeg decoding of `paths` with
    `workers` processes (bare), the shard job of `spec` with `workers` workers (job) and one (job_1w), two
    partitioned jobs of one worker each (jobs_2), and the job's start-up (start: the job of `spec` with `workers`
    workers over a folder without its videos, so that each clip is a missing file: the workers started, torch
    imported, the shards' records and the manifest written, nothing decoded); the runs interleaved, so that drift in
    the machine's speed hits all alike."""
    params = spec["params"]
    scratch = Path(tempfile.mkdtemp(prefix="mbt-bench-"))
    no_videos = {**spec, "videos_dir": scratch / "no-videos"}
    no_videos["videos_dir"].mkdir()
    try:
        bare_decode_cost(paths[:2], params.segment_s, params, workers)  # warm the page cache
        runs: dict[str, list[Cost]] = {"bare": [], "job": [], "job_1w": [], "jobs_2": [], "start": []}
        for _ in range(repeats):
            runs["bare"].append(bare_decode_cost(paths, params.segment_s, params, workers))
            runs["job"].append(job_cost(spec, workers, scratch))
            runs["job_1w"].append(job_cost(spec, 1, scratch))
            runs["jobs_2"].append(job_cost(spec, 1, scratch, num_jobs=2))
            runs["start"].append(job_cost(no_videos, workers, scratch))
    finally:
        shutil.rmtree(scratch)
    return {name: Cost(min(c.wall_s for c in costs), min(c.cpu_s for c in costs)) for name, costs in runs.items()}


def projected_core_hours(clips_per_s_per_core: float) -> dict[str, float]:
    """Core-hours to shard AudioSet-2M (audioset) and VGGSound (vggsound) at `clips_per_s_per_core`."""
    return {
        "audioset": AUDIOSET_2M_SEGMENTS / clips_per_s_per_core / 3600,
        "vggsound": VGGSOUND_SEGMENTS / clips_per_s_per_core / 3600,
    }
