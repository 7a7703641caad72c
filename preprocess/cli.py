"""Command-line plumbing shared by tools/shard_audioset.py and tools/shard_vggsound.py."""

from __future__ import annotations

import argparse
import math
import os
import sys
from collections.abc import Callable, Mapping
from pathlib import Path

from preprocess.datasets import DatasetError
from preprocess.ffmpeg_run import FFMPEG_ENV, ToolMissingError, use_ffmpeg
from preprocess.job import JobSpec, JobSummary, run_job
from preprocess.job_state import MAX_JOBS, MAX_SHARD_SIZE, JobError
from shards.schema import MAX_FRAMES, FeatureParams, SchemaError
from shards.text import excerpt

EXIT_INPUT_ERROR = 1
MAX_SHORT_SIDE_PX = 4096
MAX_SEGMENT_S = 3600.0
MAX_WORKERS = 1024


def add_job_arguments(parser: argparse.ArgumentParser) -> None:
    """The options every shard tool takes (beyond its dataset's CSV options)."""
    defaults = FeatureParams()
    parser.add_argument("--videos", type=Path, required=True, help="folder with one downloaded video per row")
    parser.add_argument("--out", type=Path, help="output folder (default: data/shards/<dataset>/<split>)")
    parser.add_argument("--workers", type=int, default=None, help="decoding processes (default: all cores)")
    parser.add_argument("--limit", type=int, default=None, help="shard only the first N rows (a quick subset)")
    parser.add_argument(
        "--fps",
        type=float,
        default=defaults.frames_per_s,
        help="frames stored per second of segment, at the centres of equal slices (default %(default)s: 20 for 10 s)",
    )
    parser.add_argument("--frames", type=int, default=None, help="frames per clip, instead of --fps")
    parser.add_argument(
        "--short-side", type=int, default=defaults.short_side_px, help="frame short side in px (default %(default)s)"
    )
    parser.add_argument(
        "--segment-seconds",
        type=float,
        default=defaults.segment_s,
        help="segment length; the log-mel is cut/padded to it in 10 ms hops (default %(default)s → 1000 frames)",
    )
    parser.add_argument("--shard-size", type=int, default=512, help="samples per shard (default %(default)s)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the shuffle across shards (default %(default)s)")
    parser.add_argument(
        "--full-videos",
        action="store_true",
        help="files are whole videos: seek to the CSV's start/end (default: files are the trimmed segments)",
    )
    parser.add_argument("--require-audio", action="store_true", help="skip clips without an audio stream")
    parser.add_argument(
        "--name-template",
        action="append",
        default=None,
        help="file name pattern of a row's video, str.format fields {ytid} {start} {end} {start_s} {end_s} "
        "{start_ms} {end_ms} plus glob wildcards, e.g. '{ytid}_{start_s:06d}.*'; repeat to try several",
    )
    parser.add_argument(
        "--num-jobs",
        type=int,
        default=None,
        help="split the work into N jobs run anywhere, in any order, into the same --out "
        "(default: SLURM_ARRAY_TASK_COUNT in a SLURM job array, else 1; give it in a Kubernetes Indexed Job or an "
        "AWS Batch array job)",
    )
    parser.add_argument(
        "--job-index",
        type=int,
        default=None,
        help="which of the N jobs this is, 0..N-1 (default: SLURM_ARRAY_TASK_ID - SLURM_ARRAY_TASK_MIN, "
        "JOB_COMPLETION_INDEX (Kubernetes) or AWS_BATCH_JOB_ARRAY_INDEX (AWS Batch), else 0)",
    )
    parser.add_argument(
        "--decode-timeout",
        type=float,
        default=None,
        metavar="SECONDS",
        help="time one clip's ffmpeg decode may take before it is killed and recorded as 'timeout' "
        "(default: 12 s per second of segment, at least 60 s)",
    )
    parser.add_argument("--quiet", action="store_true", help="no progress bar")
    parser.add_argument(
        "--ffmpeg", type=Path, help=f"the ffmpeg to run (default: ${FFMPEG_ENV[0]} or ${FFMPEG_ENV[1]}, else PATH's)"
    )


def num_frames(args: argparse.Namespace) -> int:
    """Frames per clip: --frames, else --fps × --segment-seconds (at least 1; a non-finite --fps gives 0, refused)."""
    if args.frames is not None:
        return args.frames
    product = args.fps * args.segment_seconds
    return max(round(product), 1) if math.isfinite(product) and product <= 10_000 else 0


def check_options(args: argparse.Namespace) -> None:
    """JobError naming the first option whose value ffmpeg cannot produce or that would allocate without bound."""
    timeout = args.decode_timeout
    checks = [
        (
            "--short-side",
            args.short_side,
            16 <= args.short_side <= MAX_SHORT_SIDE_PX and args.short_side % 2 == 0,
            f"an even number of pixels in 16..{MAX_SHORT_SIDE_PX} (ffmpeg scales to even sizes)",
        ),
        (
            "--segment-seconds",
            args.segment_seconds,
            math.isfinite(args.segment_seconds) and 0.01 <= args.segment_seconds <= MAX_SEGMENT_S,
            f"in [0.01, {MAX_SEGMENT_S:g}] seconds (at least one 10 ms log-mel hop)",
        ),
        (
            "--frames",
            num_frames(args),
            1 <= num_frames(args) <= MAX_FRAMES,
            f"in 1..{MAX_FRAMES} (--fps × --segment-seconds)",
        ),
        ("--shard-size", args.shard_size, 1 <= args.shard_size <= MAX_SHARD_SIZE, f"in 1..{MAX_SHARD_SIZE}"),
        ("--workers", args.workers, args.workers is None or 1 <= args.workers <= MAX_WORKERS, f"in 1..{MAX_WORKERS}"),
        ("--limit", args.limit, args.limit is None or args.limit >= 1, "at least 1"),
        ("--seed", args.seed, args.seed >= 0, "at least 0"),
        ("--num-jobs", args.num_jobs, args.num_jobs is None or args.num_jobs >= 1, "at least 1"),
        (
            "--decode-timeout",
            timeout,
            timeout is None or (math.isfinite(timeout) and timeout > 0),
            "a positive number of seconds",
        ),
    ]
    for option, value, ok, rule in checks:
        if not ok:
            raise JobError(f"{option} must be {rule}, got {value}")


def _env_int(env: Mapping[str, str], name: str) -> int:
    text = env.get(name, "0")
    try:
        return int(text)
    except ValueError:
        raise JobError(f"environment variable {name}={excerpt(text)} is not an integer; fix the job array") from None


# Array engines that give each task its index but not the array's size: --num-jobs must be given.
INDEX_VARIABLES: dict[str, str] = {
    "JOB_COMPLETION_INDEX": "a Kubernetes Indexed Job (the Job's completions)",
    "AWS_BATCH_JOB_ARRAY_INDEX": "an AWS Batch array job (the array size)",
}


def partition(num_jobs: int | None, job_index: int | None, env: Mapping[str, str] = os.environ) -> tuple[int, int]:
    """(N, i) from --num-jobs/--job-index, else from the array engine's environment: a SLURM job array (its count,
    and task ids that may start above 0), a Kubernetes Indexed Job's JOB_COMPLETION_INDEX or an AWS Batch array's
    AWS_BATCH_JOB_ARRAY_INDEX (these two with --num-jobs given); else (1, 0)."""
    if num_jobs is None and "SLURM_ARRAY_TASK_COUNT" in env:
        num_jobs = _env_int(env, "SLURM_ARRAY_TASK_COUNT")
    if job_index is None and "SLURM_ARRAY_TASK_ID" in env:
        job_index = _env_int(env, "SLURM_ARRAY_TASK_ID") - _env_int(env, "SLURM_ARRAY_TASK_MIN")
    for name, engine in INDEX_VARIABLES.items():
        if job_index is None and name in env:
            job_index = _env_int(env, name)
            if num_jobs is None:
                raise JobError(f"{name} is set ({engine}) but not the number of jobs: pass --num-jobs N")
    num_jobs, job_index = num_jobs or 1, job_index or 0
    if num_jobs > MAX_JOBS:
        raise JobError(
            f"--num-jobs (or SLURM_ARRAY_TASK_COUNT) is {num_jobs}: at most {MAX_JOBS} parts; use fewer, larger ones"
        )
    if num_jobs < 1 or not 0 <= job_index < num_jobs:
        raise JobError(f"job index {job_index} is not in 0..{num_jobs - 1}: check --num-jobs/--job-index or the array")
    return num_jobs, job_index


def spec_options(args: argparse.Namespace) -> dict:
    """JobSpec keyword arguments that come from the common options; JobError naming an option out of range."""
    check_options(args)
    params = FeatureParams(num_frames=num_frames(args), short_side_px=args.short_side, segment_s=args.segment_seconds)
    num_jobs, job_index = partition(args.num_jobs, args.job_index)
    return {
        "num_jobs": num_jobs,
        "job_index": job_index,
        "params": params.validate(),
        "shard_size": args.shard_size,
        "seed": args.seed,
        "full_videos": args.full_videos,
        "require_audio": args.require_audio,
        "workers": args.workers,
        "progress": not args.quiet,
        "decode_timeout_s": args.decode_timeout,
    }


def check_limit(limit: int | None) -> int | None:
    """--limit, if at least 1 (or not given); else JobError."""
    if limit is not None and limit < 1:
        raise JobError(f"--limit must be at least 1, got {limit}")
    return limit


def run_tool(build_spec: Callable[[argparse.Namespace], JobSpec], args: argparse.Namespace) -> int:
    """Build the spec, run the job, print the summary; input and environment errors exit 1 with the message."""
    use_ffmpeg(args.ffmpeg)  # before the workers start: they inherit it
    try:
        spec = build_spec(args)
        summary: JobSummary = run_job(spec)
    except (DatasetError, JobError, SchemaError, ToolMissingError, FileNotFoundError) as err:
        print(f"error: {err}", file=sys.stderr)
        return EXIT_INPUT_ERROR
    print(summary.describe())
    return 0
