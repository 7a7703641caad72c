"""The shard job against bare ffmpeg decoding of the same clips (`tools/bench_preprocess.py`): the decode floor,
the whole job with W workers, with one, and as two partitioned jobs, each run interleaved and the fastest kept, in
wall time and in CPU time (which a loaded machine inflates far less); the job's start-up on its own and a job's
steady-state CPU per clip (the two apart); and what the stored frame rate costs in bytes and job speed
(`bench.offline_cost` projects both onto the datasets). Every job runs through `job_cost`."""

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
from preprocess.datasets import ClipRow, read_audioset_classes, read_audioset_segments
from preprocess.decode import decode_command
from preprocess.job import JobSpec, run_job
from preprocess.videos import AUDIOSET_NAME_TEMPLATES, VideoIndex
from shards.manifest import load_manifest
from shards.schema import FeatureParams
from shards.tar import iter_tar_samples


@dataclass(frozen=True)
class Cost:
    """What a run took: wall seconds, and CPU seconds (user + system) of every process it ran."""

    wall_s: float
    cpu_s: float


def fastest(costs: list[Cost]) -> Cost:
    """The least wall time and the least CPU time of `costs` (of runs of the same thing)."""
    return Cost(min(c.wall_s for c in costs), min(c.cpu_s for c in costs))


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


def job_cost(
    spec_kwargs: dict[str, Any], workers: int, scratch: Path, num_jobs: int = 1, keep: Path | None = None
) -> Cost:
    """The whole shard job into a fresh folder under `scratch`: `num_jobs` partitioned jobs at once (as a job array
    would run them), each with `workers` workers, each a process of its own (`run_jobs_forked`). The folder is
    removed after, or moved to `keep` (replacing what was there)."""
    out = Path(tempfile.mkdtemp(dir=scratch))
    specs = [JobSpec(out_dir=out, workers=workers, progress=False, num_jobs=num_jobs, job_index=i, **spec_kwargs)
             for i in range(num_jobs)]  # fmt: skip
    cost = run_jobs_forked(specs)
    if not (out / "manifest.json").is_file():
        raise RuntimeError(f"the shard job left no manifest in {out}")
    if keep is None:
        shutil.rmtree(out)
    else:
        shutil.rmtree(keep, ignore_errors=True)
        out.rename(keep)
    return cost


def start_spec(spec_kwargs: dict[str, Any], scratch: Path) -> dict[str, Any]:
    """The job of `spec_kwargs` over an empty folder of videos under `scratch`: every clip a missing file, so that
    it runs a job's start-up alone (plan, torch imported, workers started, records and manifest written) and
    decodes nothing."""
    videos = scratch / "no-videos"
    videos.mkdir(parents=True, exist_ok=True)
    return {**spec_kwargs, "videos_dir": videos}


def steady_cpu_s_per_clip(job: Cost, start: Cost, clips: int) -> float:
    """The CPU seconds a clip costs a job once started: the CPU of a job over `clips` clips less its start-up's
    (`start`: the same job over no videos, `start_spec`), per clip. What a job of many clips tends to: a job of the
    AudioSet-2M array (20,000 clips) pays its start-up, about a second of CPU, once. Noise can make it negative for a
    job of a few small clips."""
    return (job.cpu_s - start.cpu_s) / clips


def frame_rate_costs(
    data: Path, rates: list[float], workers: int, clips: int, repeats: int = 1
) -> list[dict[str, float]]:
    """For each frame rate: bytes per clip (its tar members, of which frames, and its `.idx` lines), the job's
    clips/s in wall time, its steady-state CPU per clip (`steady_cpu_s_per_clip`) and its start-up's CPU, sharding
    `clips` 10 s clips of natural content (`bench.photo_clips`) into a fresh folder each run; each the fastest of
    `repeats` runs, the rates and the start-up interleaved so that drift in the machine's speed hits all alike."""
    videos = data / "photo-videos"
    rows = make_photo_clips(videos, clips)
    specs = {
        fps: _photo_spec(rows, videos, clips, FeatureParams(num_frames=max(round(fps * 10.0), 1))) for fps in rates
    }
    no_videos = start_spec(specs[rates[0]], data)  # the start-up does not depend on the frame rate
    outs = {fps: data / f"frame-rate-costs-{i}" for i, fps in enumerate(rates)}
    runs: dict[float, list[Cost]] = {fps: [] for fps in rates}
    starts: list[Cost] = []
    for _ in range(repeats):
        for fps in rates:
            runs[fps].append(job_cost(specs[fps], workers, data, keep=outs[fps]))
        starts.append(job_cost(no_videos, workers, data))
    start = fastest(starts)
    results = []
    for fps, out in outs.items():
        manifest = load_manifest(out)
        total = sum(shard.bytes for shard in manifest.shards) / manifest.num_samples
        frames = sum(len(m) for shard in manifest.shards for _, sample in iter_tar_samples(out / shard.name)
                     for e, m in sample.items() if e.endswith(".jpg")) / manifest.num_samples  # fmt: skip
        index = sum((out / shard.name).with_suffix(".idx").stat().st_size for shard in manifest.shards)
        job = fastest(runs[fps])
        results.append({"fps": fps, "frames": specs[fps]["params"].num_frames, "bytes_per_clip": total,
                        "frame_bytes": frames, "idx_bytes_per_clip": index / manifest.num_samples,
                        "clips_per_s": clips / job.wall_s, "cpu_s_per_clip": steady_cpu_s_per_clip(job, start, clips),
                        "start_cpu_s": start.cpu_s})  # fmt: skip
        shutil.rmtree(out)
    return results


def _spec_fields(
    rows: list[ClipRow], videos: Path, classes: list[tuple[str, str]], params: FeatureParams, shard_size: int
) -> dict[str, Any]:
    """The shard job's JobSpec fields but the output's: AudioSet-layout `rows` (multi-label) of the videos in
    `videos`, `classes` as (id, name), decoded with `params` into shards of `shard_size`."""
    return {
        "dataset": "bench", "split": "train", "rows": rows, "multi_label": True, "videos_dir": videos,
        "classes": [{"index": i, "id": cid, "name": name} for i, (cid, name) in enumerate(classes)],
        "name_templates": AUDIOSET_NAME_TEMPLATES, "params": params, "shard_size": shard_size,
    }  # fmt: skip


def _photo_spec(rows: list[ClipRow], videos: Path, clips: int, params: FeatureParams) -> dict[str, Any]:
    """The shard job's JobSpec fields but the output's for the photo clips `rows` in `videos`, in one shard."""
    return _spec_fields(rows, videos, [(name, name) for name in PHOTOS], params, clips)


def job_inputs(
    labels: Path, videos: Path, segment_files: list[Path], params: FeatureParams
) -> tuple[list[Path], dict[str, Any]]:
    """(each row's video, the shard job's JobSpec fields but the output's) for the AudioSet-layout clips of
    `segment_files` (classes from `labels`, videos in `videos`), decoded with `params`, in shards of 4 clips."""
    classes = read_audioset_classes(labels)
    rows = [row for path in segment_files for row in read_audioset_segments(path, [mid for mid, _ in classes])]
    index = VideoIndex(videos)
    spec = _spec_fields(rows, videos, classes, params, 4)  # 6 shards of 24 clips: partitioned jobs split by shard
    return [index.find(row, AUDIOSET_NAME_TEMPLATES) for row in rows], spec


def job_against_ffmpeg(paths: list[Path], spec: dict[str, Any], workers: int, repeats: int) -> dict[str, Cost]:
    """The fastest of `repeats` runs (wall and CPU time each at its least) of bare ffmpeg decoding of `paths` with
    `workers` processes (bare), the shard job of `spec` with `workers` workers (job) and one (job_1w), two
    partitioned jobs of one worker each (jobs_2), and the job's start-up (start: the job of `spec` with `workers`
    workers over no videos, `start_spec`); the runs interleaved, so that drift in the machine's speed hits all
    alike."""
    params = spec["params"]
    scratch = Path(tempfile.mkdtemp(prefix="mbt-bench-"))
    no_videos = start_spec(spec, scratch)
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
    return {name: fastest(costs) for name, costs in runs.items()}
