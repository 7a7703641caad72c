"""The shard job: dataset rows → decoded clips → WebDataset shards + manifest, parallel and resumable.

Clips are decoded by a process pool in the order of the plan (`preprocess.job_state`: shard k always holds the
same rows); the parent writes each shard when its last clip is in (tar + index under temporary names, renamed when
complete), then its record. A shard is done exactly when its record exists, so a job killed at any moment (SIGKILL
included) and run again redoes only the shards without a record: every clip ends up in the output once. The job
that completes the split's last part writes the split's `manifest.json` and `failures.csv`.

A full disk (any OSError writing the folder) stops the job with a JobError naming the file; nothing half-written is
left and a rerun resumes. A bad clip never stops the job: it is recorded in `failures.csv` with a reason.
"""

from __future__ import annotations

import collections
import contextlib
import multiprocessing
import os
import signal
import time
from collections import Counter
from collections.abc import Iterator, Sequence
from concurrent.futures import Future, ProcessPoolExecutor
from concurrent.futures.process import BrokenProcessPool
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from preprocess.clip import ClipTask, process_clip
from preprocess.datasets import ClipRow, DatasetError
from preprocess.decode import default_decode_timeout_s, remove_stale_scratch
from preprocess.ffmpeg_run import die_with_parent, require_ffmpeg
from preprocess.job_merge import merge
from preprocess.job_state import (
    JobError,
    claim_folder,
    clip_totals,
    done_records,
    load_record,
    output_errors,
    part_lock,
    plan_shards,
    remove_stale_shard_tmp,
    write_shard,
)
from preprocess.rows import ListRows, RowSource
from preprocess.videos import VideoIndex, check_name_templates
from shards.progress import Progress
from shards.schema import FAILURES_NAME, MANIFEST_NAME, SCHEMA_VERSION, FeatureParams

PROGRESS_EVERY_S = 30.0  # a plain progress line in a log file (a SLURM .out) this often, and at the end


@dataclass
class JobSpec:
    """Everything that decides a split's shards, plus how to run the job (`workers`, `progress`)."""

    dataset: str
    split: str
    rows: RowSource | Sequence[ClipRow]  # a sequence is held as ListRows
    classes: list[dict[str, Any]]
    multi_label: bool
    videos_dir: Path
    out_dir: Path
    name_templates: Sequence[str]
    params: FeatureParams = field(default_factory=FeatureParams)
    shard_size: int = 512
    seed: int = 0
    full_videos: bool = False
    require_audio: bool = False
    workers: int | None = None
    progress: bool = True
    num_jobs: int = 1  # partitioned runs: this job makes shards k with k % num_jobs == job_index
    job_index: int = 0
    inputs: dict[str, Any] = field(default_factory=dict)
    decode_timeout_s: float | None = None  # per clip; None: default_decode_timeout_s(segment). Not in identity().

    def __post_init__(self) -> None:
        if isinstance(self.rows, Sequence):
            self.rows = ListRows(self.rows)

    @property
    def row_source(self) -> RowSource:
        assert not isinstance(self.rows, Sequence)  # __post_init__ wrapped it
        return self.rows

    def identity(self) -> dict[str, Any]:
        """What the output depends on; a rerun into the same folder must match it."""
        return {
            "schema_version": SCHEMA_VERSION,
            "dataset": self.dataset,
            "split": self.split,
            **self.row_source.identity(),
            "classes": self.classes,
            "multi_label": self.multi_label,
            "features": self.params.to_dict(),
            "shard_size": self.shard_size,
            "seed": self.seed,
            "full_videos": self.full_videos,
            "require_audio": self.require_audio,
            "name_templates": list(self.name_templates),
            "videos_dir": str(Path(self.videos_dir).resolve()),
            "inputs": self.inputs,
        }


@dataclass
class JobSummary:
    """What a run did: clips written and skipped (by reason) over the whole split, and this run's work."""

    out_dir: Path
    num_samples: int
    num_shards: int
    skipped: Counter[str]
    clips_processed: int
    shards_written: int
    seconds: float
    already_done: bool
    missing_parts: list[int] = field(default_factory=list)  # partitioned runs: parts whose shards are not done
    num_jobs: int = 1
    clips: dict[str, int] | None = None  # CLIP_COUNTS of the samples written; None: a shard of an older job has none

    def kept(self) -> str:
        """The samples kept, with how many have no audio and how many were padded (where every record counts them)."""
        kept = f"{self.num_samples} samples in {self.num_shards} shards"
        if self.clips is None:
            return kept
        return (
            f"{kept} ({self.clips['no_audio']} without audio, {self.clips['padded']} shorter than the segment, padded)"
        )

    def describe(self) -> str:
        if self.already_done:
            return (
                f"nothing to do: {self.out_dir} is complete ({self.kept()}, {sum(self.skipped.values())} skipped); "
                "delete it to shard again"
            )
        if waiting := len(self.missing_parts):
            return (
                f"{self.out_dir}: this part is done ({self.clips_processed} clips, {self.shards_written} shards in "
                f"{self.seconds:.1f} s); waiting for {waiting} part{'s' * (waiting > 1)}; "
                f"{self.num_jobs - waiting} done: the last part to finish writes the manifest "
                "(tools/merge_manifests.py on the folder names the parts missing)"
            )
        skipped = ", ".join(f"{n} {reason}" for reason, n in sorted(self.skipped.items())) or "none"
        rate = self.clips_processed / self.seconds if self.seconds > 0 else 0.0
        return (
            f"{self.out_dir}: {self.kept()}; skipped: {skipped} "
            f"(see {FAILURES_NAME}); this run: {self.clips_processed} clips, {self.shards_written} shards "
            f"in {self.seconds:.1f} s ({rate:.1f} clips/s)"
        )


_WORKER_ARGS: tuple[FeatureParams, bool, float] | None = None


def _import_worker_modules() -> None:
    """Import torch and torchaudio (the workers' log-mel) here, so that the workers forked after it share them:
    each worker importing them on its own cost a job's start-up 2.4 s of CPU with 2 workers (1.2 s a worker),
    against 1.2 s once (docs/PERFORMANCE.md, "Offline stage"). Called once the plan is made, so that planning stays
    without torch's memory and seconds, and only by a job with clips to decode."""
    import torch  # noqa: F401
    import torchaudio  # noqa: F401


def _init_worker(params: FeatureParams, require_audio: bool, decode_timeout_s: float, parent_pid: int) -> None:
    import torch

    global _WORKER_ARGS
    _WORKER_ARGS = (params, require_audio, decode_timeout_s)
    die_with_parent(parent_pid)  # a SIGKILLed job takes its workers (and their ffmpeg) with it
    torch.set_num_threads(1)
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # the parent handles Ctrl-C and stops the pool


def ordered_results(pool: ProcessPoolExecutor, fn: Any, items: Iterator[Any], window: int) -> Iterator[Any]:
    """fn(item) for each item, computed by `pool` with at most `window` in flight, yielded in order; the pool is shut
    down when this ends or is closed (its queued work cancelled). A worker that dies (the system's OOM killer, a
    crash) is a JobError, not a job that waits for ever: finished shards are kept and a rerun resumes."""
    pending: collections.deque[Future] = collections.deque()
    try:
        for item in items:
            pending.append(pool.submit(fn, item))
            if len(pending) >= window:
                yield pending.popleft().result()
        while pending:
            yield pending.popleft().result()
    except BrokenProcessPool:
        raise JobError(
            "a decoding worker died (killed by the system, out of memory?); the finished shards are kept: run the "
            "same command again, with fewer --workers if memory is short"
        ) from None
    finally:
        if pending:  # stopped early (Ctrl-C, an error): the workers hold the part's lock, inherited; stop them now
            for worker in list(getattr(pool, "_processes", {}).values()):  # no public API to kill an executor's workers
                worker.kill()
        pool.shutdown(wait=True, cancel_futures=True)


def _run_task(task: ClipTask) -> tuple[list | None, Any]:
    assert _WORKER_ARGS is not None
    return process_clip(task, *_WORKER_ARGS)


def _tasks(spec: JobSpec, rows: np.ndarray, parsed: dict[int, ClipRow], index: VideoIndex) -> Iterator[ClipTask]:
    for i in rows:
        row = parsed[int(i)]
        try:
            path, missing = str(index.find(row, spec.name_templates)), None
        except (FileNotFoundError, DatasetError) as err:
            path, missing = None, str(err)
        segment_s = min(row.end_s - row.start_s, spec.params.segment_s)
        start_s = row.start_s if spec.full_videos else 0.0
        yield ClipTask(row=row, path=path, missing=missing, start_s=start_s, duration_s=segment_s)


def _summary(
    spec: JobSpec, records: list[dict[str, Any]], processed: int, written: int, t0: float, done: bool
) -> JobSummary:
    return JobSummary(
        out_dir=spec.out_dir,
        num_samples=sum(r["shard"]["num_samples"] for r in records if r["shard"]),
        num_shards=sum(1 for r in records if r["shard"]),
        skipped=Counter(f["reason"] for r in records for f in r["failures"]),
        clips_processed=processed,
        shards_written=written,
        seconds=time.monotonic() - t0,
        already_done=done,
        clips=clip_totals(records),
    )


def run_job(spec: JobSpec) -> JobSummary:
    """Shard this job's part of `spec.rows` into `spec.out_dir`, resuming whatever an earlier run left; the job
    that completes the split's last part writes the manifest. The part's rows are parsed and checked first: a bad
    row (DatasetError) stops the job before it creates or changes anything in the folder."""
    t0 = time.monotonic()
    if not spec.row_source.num_rows:
        raise JobError(f"no rows to shard for {spec.dataset}/{spec.split}; check the CSV and --split/--limit")
    if not 0 <= spec.job_index < spec.num_jobs:
        raise JobError(f"--job-index must be in 0..{spec.num_jobs - 1} for --num-jobs {spec.num_jobs}")
    spec.params.validate()
    check_name_templates(spec.name_templates)
    plan = plan_shards(spec.row_source.num_rows, spec.shard_size, spec.seed)
    mine = [k for k in range(len(plan)) if k % spec.num_jobs == spec.job_index]
    # This part's rows (only these: its share), parsed and checked before the output folder is touched.
    parsed = spec.row_source.select(np.concatenate([plan[k] for k in mine]) if mine else np.zeros(0, np.int64))
    with output_errors():
        spec.out_dir.mkdir(parents=True, exist_ok=True)
        claim_folder(spec.out_dir, spec.identity(), spec.num_jobs)
        with part_lock(spec.out_dir, spec.job_index, spec.num_jobs):
            return _run_part(spec, plan, mine, parsed, t0)


def _run_part(
    spec: JobSpec, plan: list[np.ndarray], mine: list[int], parsed: dict[int, ClipRow], t0: float
) -> JobSummary:
    pending = [k for k in mine if load_record(spec.out_dir, k, plan[k].size) is None]
    if not pending and (spec.out_dir / MANIFEST_NAME).is_file():
        return _summary(spec, done_records(spec.out_dir, plan), 0, 0, t0, done=True)
    remove_stale_shard_tmp(spec.out_dir, pending)
    processed = 0
    if pending:
        require_ffmpeg()
        remove_stale_scratch()
        index = VideoIndex(spec.videos_dir)
        tasks = (task for k in pending for task in _tasks(spec, plan[k], parsed, index))
        workers = spec.workers or len(os.sched_getaffinity(0))
        total = sum(plan[k].size for k in pending)
        part = f" part {spec.job_index + 1}/{spec.num_jobs}" if spec.num_jobs > 1 else ""
        timeout_s = spec.decode_timeout_s or default_decode_timeout_s(spec.params.segment_s)
        initargs = (spec.params, spec.require_audio, timeout_s, os.getpid())
        _import_worker_modules()
        context = multiprocessing.get_context("fork")
        pool = ProcessPoolExecutor(workers, mp_context=context, initializer=_init_worker, initargs=initargs)
        with (
            contextlib.closing(ordered_results(pool, _run_task, tasks, window=4 * workers)) as results_iter,
            Progress(
                total, f"{spec.dataset}/{spec.split}{part}", "clips", enabled=spec.progress, every_s=PROGRESS_EVERY_S
            ) as bar,
        ):
            for k in pending:
                results = []
                for _ in range(plan[k].size):
                    results.append(next(results_iter))
                    bar.update(1)
                write_shard(spec.out_dir, k, results)
                processed += len(results)
    _, waiting = merge(spec.out_dir)
    summary = _summary(spec, done_records(spec.out_dir, plan), processed, len(pending), t0, done=False)
    summary.missing_parts, summary.num_jobs = waiting.parts(spec.num_jobs), spec.num_jobs
    return summary
