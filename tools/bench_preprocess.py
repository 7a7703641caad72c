"""Benchmark the shard job against bare ffmpeg decoding of the same clips, in one run.

Measures, on the same clips and the same number of processes:
  bare    ffmpeg decoding alone: the job's own decode command (same frames, scale and audio resampling) with
          its outputs sent to ffmpeg's null muxer: the floor for any job that decodes with ffmpeg;
  job     the whole shard job (decode, JPEG, log-mel, tar + index, manifest) with --workers W;
  job_1w  the shard job with one worker, for the parallel speed-up;
  jobs_2  two partitioned jobs at once with one worker each (--num-jobs 2), for the N-job scaling;
  start   the job's start-up alone: the job with --workers W over a folder without its videos (workers started,
          torch imported, records and manifest written, nothing decoded), a cost each job pays once.
Each in wall time and in CPU time (user + system, of every process the run started), which a machine loaded by
other work inflates far less: job_vs_ffmpeg_cpu is the job's CPU over bare ffmpeg's, and
job_less_start_vs_ffmpeg_cpu the same with the start-up's CPU taken off, what a job of many clips tends to.
Each job runs in a process of its own, as a shard job does, so it pays its own start-up.
It also projects the core-hours to shard AudioSet-2M and VGGSound at the job's steady-state rate: clips per
CPU-second of the job less its start-up (`bench.preprocess.steady_cpu_s_per_clip`; tools/offline_cost.py: the whole
offline stage's cost, from a committed record of the same rate).
Each is run --repeats times and the fastest run counts. Goals: job_vs_ffmpeg <= 1.1, speedup_2w >= 1.8.
The last line is name=value pairs. The measurements are `bench.preprocess`'s.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
from pathlib import Path

from bench.offline_cost import AUDIOSET_2M_SEGMENTS, VGGSOUND_SEGMENTS, core_hours
from bench.preprocess import frame_rate_costs, job_against_ffmpeg, job_inputs, steady_cpu_s_per_clip
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
                f"steady_cpu_ms_per_clip={1000 * r['cpu_s_per_clip']:.0f} start_cpu_s={r['start_cpu_s']:.2f} "
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
    bare, job, job_1w, jobs_2, start = (best[k] for k in ("bare", "job", "job_1w", "jobs_2", "start"))
    steady_cpu_s = steady_cpu_s_per_clip(job, start, n)
    per_core = 1 / steady_cpu_s if steady_cpu_s > 0 else float("nan")  # nan: too few clips to tell them apart
    audioset_core_h, vggsound_core_h = (core_hours(s, per_core) for s in (AUDIOSET_2M_SEGMENTS, VGGSOUND_SEGMENTS))
    print(f"clips={n} segment_s={params.segment_s} workers={args.workers} cores={cores} repeats={args.repeats}")
    for name, cost in (
        (f"bare ffmpeg decode, {args.workers} processes", bare),
        (f"shard job, {args.workers} workers", job),
        ("shard job, 1 worker", job_1w),
        ("2 partitioned jobs, 1 worker each", jobs_2),
    ):
        print(f"{name + ':':36s} {cost.wall_s:7.2f} s  {n / cost.wall_s:6.2f} clips/s  "
              f"{1000 * cost.cpu_s / n:5.0f} ms CPU a clip")  # fmt: skip
    print(f"{'job start-up, ' + str(args.workers) + ' workers, no clip decoded:':36s} {start.wall_s:7.2f} s  "
          f"{start.cpu_s:.2f} s CPU")  # fmt: skip
    print(
        f"projected: AudioSet-2M ({AUDIOSET_2M_SEGMENTS:,} segments) {audioset_core_h:,.0f} core-hours, "
        f"VGGSound (~{VGGSOUND_SEGMENTS:,}) {vggsound_core_h:,.0f} core-hours, at {per_core:.2f} clips per CPU-second "
        "(the job's steady state)"
    )
    print(
        f"job_vs_ffmpeg={job.wall_s / bare.wall_s:.3f} job_vs_ffmpeg_cpu={job.cpu_s / bare.cpu_s:.3f} "
        f"job_less_start_vs_ffmpeg_cpu={steady_cpu_s * n / bare.cpu_s:.3f} start_cpu_s={start.cpu_s:.2f} "
        f"speedup_2w={job_1w.wall_s / job.wall_s:.3f} speedup_2jobs={job_1w.wall_s / jobs_2.wall_s:.3f} "
        f"clips_per_s={n / job.wall_s:.2f} clips_per_cpu_s={per_core:.2f} bare_clips_per_s={n / bare.wall_s:.2f} "
        f"audioset_core_hours={audioset_core_h:.0f} vggsound_core_hours={vggsound_core_h:.0f}"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
