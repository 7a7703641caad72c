"""Benchmark the shard job against bare ffmpeg decoding of the same clips, in one run.

Measures, on the same clips and the same number of processes:
  bare    ffmpeg decoding alone: the job's own decode command (same frames, scale and audio resampling) with
          its outputs sent to ffmpeg's null muxer: the floor for any job that decodes with ffmpeg;
  job     the whole shard job (decode, JPEG, log-mel, tar + index, manifest) with --workers W;
  job_1w  the shard job with one worker, for the parallel speed-up;
  jobs_2  two partitioned jobs at once with one worker each (--num-jobs 2), for the N-job scaling.
It also projects the core-hours to shard AudioSet-2M and VGGSound at the measured clips/s per core.
Each is run --repeats times and the fastest run counts. Goals: job_vs_ffmpeg <= 1.2, speedup_2w >= 1.8.
The last line is name=value pairs.
"""

from __future__ import annotations

import argparse
import multiprocessing
import os
import shutil
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from bench.photo_clips import PHOTOS, make_photo_clips
from experiments.demo_data import make_demo_dataset
from preprocess.datasets import read_audioset_classes, read_audioset_segments
from preprocess.decode import decode_command
from preprocess.ffmpeg_run import require_ffmpeg
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


AUDIOSET_2M_SEGMENTS = 2_041_789  # unbalanced_train_segments.csv
VGGSOUND_SEGMENTS = 200_000  # about: vggsound.csv lists ~200k clips


def job_seconds(spec_kwargs: dict, workers: int, scratch: Path, num_jobs: int = 1) -> float:
    """Wall time of the whole shard job into a fresh folder: `num_jobs` partitioned jobs at once (as a job
    array would run them), each with `workers` workers, until the last one has merged the manifest."""
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
    shutil.rmtree(out)
    return seconds


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
        start = time.perf_counter()
        run_job(spec)
        seconds = time.perf_counter() - start
        manifest = load_manifest(out)
        total = sum(shard.bytes for shard in manifest.shards) / manifest.num_samples
        frames = sum(len(m) for shard in manifest.shards for _, sample in iter_tar_samples(out / shard.name)
                     for e, m in sample.items() if e.endswith(".jpg")) / manifest.num_samples  # fmt: skip
        results.append({"fps": fps, "frames": params.num_frames, "bytes_per_clip": total, "frame_bytes": frames,
                        "clips_per_s": clips / seconds})  # fmt: skip
        shutil.rmtree(out)
    return results


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument(
        "--data",
        type=Path,
        default=Path(tempfile.gettempdir(), "mbt-bench-clips"),
        help="where the generated clips are kept between runs (default %(default)s)",
    )
    parser.add_argument("--segments", type=Path, help="bench your own clips: an AudioSet segment CSV ...")
    parser.add_argument("--labels", type=Path, help="... its class_labels_indices.csv ...")
    parser.add_argument("--videos", type=Path, help="... and the folder of videos")
    parser.add_argument("--clips", type=int, default=24, help="generated clips (default %(default)s)")
    parser.add_argument("--seconds", type=float, default=10.0, help="length of generated clips (default %(default)s)")
    parser.add_argument("--size", default="480x360", help="size of generated clips (default %(default)s)")
    parser.add_argument("--grain", type=int, default=10, help="film grain of generated clips (default %(default)s)")
    parser.add_argument("--workers", type=int, default=len(os.sched_getaffinity(0)), help="default: all cores")
    parser.add_argument("--repeats", type=int, default=2, help="runs of each measurement; the fastest counts")
    parser.add_argument(
        "--frame-rates",
        help="instead: bytes per clip and job speed at these frames per second (e.g. 0.8,1,2,4), on natural clips",
    )
    args = parser.parse_args(argv)
    require_ffmpeg()
    if args.frame_rates:
        rates = [float(r) for r in args.frame_rates.split(",")]
        for r in frame_rate_costs(args.data, rates, args.workers, args.clips):
            print(
                f"fps={r['fps']:g} frames={r['frames']} bytes_per_clip={r['bytes_per_clip']:.0f} "
                f"frame_bytes_per_clip={r['frame_bytes']:.0f} clips_per_s={r['clips_per_s']:.2f} "
                f"audioset_2m_tb={r['bytes_per_clip'] * AUDIOSET_2M_SEGMENTS / 1e12:.2f}"
            )
        return 0

    if args.videos:
        labels, videos, segment_files = args.labels, args.videos, [args.segments]
    else:
        width, height = (int(x) for x in args.size.split("x"))
        demo = make_demo_dataset(args.data, clips=args.clips, seconds=args.seconds, size=(width, height),
                                 grain=args.grain)  # fmt: skip
        labels, videos, segment_files = demo.class_labels_csv, demo.videos_dir, [demo.train_csv, demo.eval_csv]
    classes = read_audioset_classes(labels)
    rows = [row for path in segment_files for row in read_audioset_segments(path, [mid for mid, _ in classes])]
    params = FeatureParams(segment_s=min(args.seconds, 10.0) if not args.videos else 10.0)
    index = VideoIndex(videos)
    paths = [index.find(row, AUDIOSET_NAME_TEMPLATES) for row in rows]
    spec = {
        "dataset": "bench", "split": "train", "rows": rows, "multi_label": True, "videos_dir": videos,
        "classes": [{"index": i, "id": mid, "name": name} for i, (mid, name) in enumerate(classes)],
        "name_templates": AUDIOSET_NAME_TEMPLATES, "params": params,
        "shard_size": 4,  # 6 shards of the 24 clips: partitioned jobs split the work by shard
    }  # fmt: skip
    scratch = Path(tempfile.mkdtemp(prefix="mbt-bench-"))
    try:
        bare_decode_seconds(paths[:2], params.segment_s, params, args.workers)  # warm the page cache
        bare, job, job_1w, jobs_2 = [], [], [], []
        for _ in range(args.repeats):  # interleaved, so that drift in the machine's speed hits all alike
            bare.append(bare_decode_seconds(paths, params.segment_s, params, args.workers))
            job.append(job_seconds(spec, args.workers, scratch))
            job_1w.append(job_seconds(spec, 1, scratch))
            jobs_2.append(job_seconds(spec, 1, scratch, num_jobs=2))
    finally:
        shutil.rmtree(scratch)
    n, cores = len(rows), len(os.sched_getaffinity(0))
    bare_s, job_s, job_1w_s, jobs_2_s = min(bare), min(job), min(job_1w), min(jobs_2)
    per_core = n / job_s / min(args.workers, cores)
    audioset_core_h = AUDIOSET_2M_SEGMENTS / per_core / 3600
    vggsound_core_h = VGGSOUND_SEGMENTS / per_core / 3600
    print(f"clips={n} segment_s={params.segment_s} workers={args.workers} cores={cores} repeats={args.repeats}")
    print(f"bare ffmpeg decode, {args.workers} processes: {bare_s:7.2f} s  {n / bare_s:6.2f} clips/s")
    print(f"shard job, {args.workers} workers:           {job_s:7.2f} s  {n / job_s:6.2f} clips/s")
    print(f"shard job, 1 worker:             {job_1w_s:7.2f} s  {n / job_1w_s:6.2f} clips/s")
    print(f"2 partitioned jobs, 1 worker each: {jobs_2_s:7.2f} s  {n / jobs_2_s:6.2f} clips/s")
    print(
        f"projected: AudioSet-2M ({AUDIOSET_2M_SEGMENTS:,} segments) {audioset_core_h:,.0f} core-hours, "
        f"VGGSound (~{VGGSOUND_SEGMENTS:,}) {vggsound_core_h:,.0f} core-hours, at {per_core:.2f} clips/s per core"
    )
    print(
        f"job_vs_ffmpeg={job_s / bare_s:.3f} speedup_2w={job_1w_s / job_s:.3f} speedup_2jobs={job_1w_s / jobs_2_s:.3f} "
        f"clips_per_s={n / job_s:.2f} clips_per_s_per_core={per_core:.2f} bare_clips_per_s={n / bare_s:.2f} "
        f"audioset_core_hours={audioset_core_h:.0f} vggsound_core_hours={vggsound_core_h:.0f}"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
