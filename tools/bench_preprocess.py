"""Benchmark the shard job against bare ffmpeg decoding of the same clips, in one run.

Measures, on the same clips and the same number of processes:
  bare    ffmpeg decoding alone: the job's own decode command (same frames, scale and audio resampling) with
          its outputs sent to ffmpeg's null muxer: the floor for any job that decodes with ffmpeg;
  job     the whole shard job (decode, JPEG, log-mel, tar + index, manifest) with --workers W;
  job_1w  the shard job with one worker, for the parallel speed-up;
  jobs_2  two partitioned jobs at once with one worker each (--num-jobs 2), for the N-job scaling.
It also projects the core-hours to shard AudioSet-2M and VGGSound at the measured clips/s per core
(tools/offline_cost.py: the whole offline stage's cost, from a committed record).
Each is run --repeats times and the fastest run counts. Goals: job_vs_ffmpeg <= 1.2, speedup_2w >= 1.8.
The last line is name=value pairs. The measurements are `bench.preprocess`'s.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
from pathlib import Path

from bench.offline_cost import AUDIOSET_2M_SEGMENTS, VGGSOUND_SEGMENTS, core_hours
from bench.preprocess import frame_rate_costs, job_against_ffmpeg, job_inputs
from experiments.demo_data import make_demo_dataset
from preprocess.ffmpeg_run import require_ffmpeg
from shards.schema import FeatureParams


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
    params = FeatureParams(segment_s=min(args.seconds, 10.0) if not args.videos else 10.0)
    paths, spec = job_inputs(labels, videos, segment_files, params)
    best = job_against_ffmpeg(paths, spec, args.workers, args.repeats)
    n, cores = len(paths), len(os.sched_getaffinity(0))
    bare_s, job_s, job_1w_s, jobs_2_s = best["bare"], best["job"], best["job_1w"], best["jobs_2"]
    per_core = n / job_s / min(args.workers, cores)
    audioset_core_h, vggsound_core_h = (
        core_hours(AUDIOSET_2M_SEGMENTS, per_core),
        core_hours(VGGSOUND_SEGMENTS, per_core),
    )
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
