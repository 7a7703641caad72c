"""The shard job against bare ffmpeg decoding of the same clips (`tools/bench_preprocess.py`): the decode floor,
the whole job with W workers, with one, and as two partitioned jobs, each run interleaved and the fastest kept; and
what the stored frame rate costs in bytes and job speed (`bench.offline_cost` projects both onto the datasets)."""

from __future__ import annotations

import multiprocessing
import shutil
import subprocess
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
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


def bare_decode_seconds(paths: list[Path], segment_s: float, params: FeatureParams, workers: int) -> float:
    """Wall time of decoding every clip with ffmpeg (outputs discarded), `workers` ffmpeg processes at once."""

    def decode(path: Path) -> None:
        subprocess.run(decode_command(path, 0.0, segment_s, params, "", null_outputs=True), capture_output=True)

    start = time.perf_counter()
    with ThreadPoolExecutor(workers) as pool:  # each thread only waits on its ffmpeg process
        list(pool.map(decode, paths))
    return time.perf_counter() - start


def job_seconds(
    spec_kwargs: dict[str, Any], workers: int, scratch: Path, num_jobs: int = 1, keep: Path | None = None
) -> float:
    """Wall time of the whole shard job into a fresh folder under `scratch`: `num_jobs` partitioned jobs at once (as
    a job array would run them), each with `workers` workers, until the last one has merged the manifest. The folder
    is removed after, or moved to `keep` (replacing what was there)."""
    out = Path(tempfile.mkdtemp(dir=scratch))
    specs = [JobSpec(out_dir=out, workers=workers, progress=False, num_jobs=num_jobs, job_index=i, **spec_kwargs)
             for i in range(num_jobs)]  # fmt: skip
    start = time.perf_counter()
    if num_jobs == 1:
        run_job(specs[0])
    else:
        jobs = [multiprocessing.get_context("fork").Process(target=run_job, args=(spec,)) for spec in specs]
        for job in jobs:
            job.start()
        for job in jobs:
            job.join()
        if any(job.exitcode for job in jobs) or not (out / "manifest.json").is_file():
            raise RuntimeError("a partitioned job failed")
    seconds = time.perf_counter() - start
    if keep is None:
        shutil.rmtree(out)
    else:
        shutil.rmtree(keep, ignore_errors=True)
        out.rename(keep)
    return seconds


def frame_rate_costs(
    data: Path, rates: list[float], workers: int, clips: int, repeats: int = 1
) -> list[dict[str, float]]:
    """For each frame rate: bytes per clip (its tar members, of which frames, and its `.idx` lines) and the job's
    clips/s (the fastest of `repeats` runs, the rates interleaved so that drift in the machine's speed hits all
    alike), sharding `clips` 10 s clips of natural content (`bench.photo_clips`) into a fresh folder each run."""
    videos = data / "photo-videos"
    rows = make_photo_clips(videos, clips)
    specs = {
        fps: _photo_spec(rows, videos, clips, FeatureParams(num_frames=max(round(fps * 10.0), 1))) for fps in rates
    }
    outs = {fps: data / f"frame-rate-costs-{i}" for i, fps in enumerate(rates)}
    seconds: dict[float, list[float]] = {fps: [] for fps in rates}
    for _ in range(repeats):
        for fps in rates:
            seconds[fps].append(job_seconds(specs[fps], workers, data, keep=outs[fps]))
    results = []
    for fps, out in outs.items():
        manifest = load_manifest(out)
        total = sum(shard.bytes for shard in manifest.shards) / manifest.num_samples
        frames = sum(len(m) for shard in manifest.shards for _, sample in iter_tar_samples(out / shard.name)
                     for e, m in sample.items() if e.endswith(".jpg")) / manifest.num_samples  # fmt: skip
        index = sum((out / shard.name).with_suffix(".idx").stat().st_size for shard in manifest.shards)
        results.append({"fps": fps, "frames": specs[fps]["params"].num_frames, "bytes_per_clip": total,
                        "frame_bytes": frames, "idx_bytes_per_clip": index / manifest.num_samples,
                        "clips_per_s": clips / min(seconds[fps])})  # fmt: skip
        shutil.rmtree(out)
    return results


def _photo_spec(rows: list[ClipRow], videos: Path, clips: int, params: FeatureParams) -> dict[str, Any]:
    """The shard job's JobSpec fields but the output's for the photo clips `rows` in `videos`, in one shard."""
    return {
        "dataset": "bench", "split": "train", "rows": rows, "multi_label": True, "videos_dir": videos,
        "classes": [{"index": i, "id": n, "name": n} for i, n in enumerate(PHOTOS)],
        "name_templates": AUDIOSET_NAME_TEMPLATES, "params": params, "shard_size": clips,
    }  # fmt: skip


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


def job_against_ffmpeg(paths: list[Path], spec: dict[str, Any], workers: int, repeats: int) -> dict[str, float]:
    """The fastest of `repeats` runs, in seconds, of bare ffmpeg decoding of `paths` with `workers` processes
    (bare), the shard job of `spec` with `workers` workers (job) and one (job_1w), and two partitioned jobs of one
    worker each (jobs_2); the runs interleaved, so that drift in the machine's speed hits all alike."""
    params = spec["params"]
    scratch = Path(tempfile.mkdtemp(prefix="mbt-bench-"))
    try:
        bare_decode_seconds(paths[:2], params.segment_s, params, workers)  # warm the page cache
        runs: dict[str, list[float]] = {"bare": [], "job": [], "job_1w": [], "jobs_2": []}
        for _ in range(repeats):
            runs["bare"].append(bare_decode_seconds(paths, params.segment_s, params, workers))
            runs["job"].append(job_seconds(spec, workers, scratch))
            runs["job_1w"].append(job_seconds(spec, 1, scratch))
            runs["jobs_2"].append(job_seconds(spec, 1, scratch, num_jobs=2))
    finally:
        shutil.rmtree(scratch)
    return {name: min(seconds) for name, seconds in runs.items()}
