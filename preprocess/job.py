"""The shard job: dataset rows → decoded clips → WebDataset shards + manifest, parallel and resumable.

Plan: the rows are shuffled once with `seed` and cut into shards of about `shard_size` rows; shard k always
holds the same rows, whatever happens. Clips are decoded by a process pool in plan order; the parent writes
each shard when its last clip is in (tar + index under temporary names, renamed when complete), then its record
`_state/shard-k.json`. A shard is done exactly when its record exists, so a job killed at any moment (SIGKILL
included) and run again redoes only the shards without a record: every clip ends up in the output once.
When all records exist the split's `manifest.json` and `failures.csv` are written from them.

Each part of the split is written by one job at a time (a flock on `_state/part-I.lock`). A full disk (any OSError
writing the folder) stops the job with a JobError naming the file; nothing half-written is left and a rerun
resumes. State files are data too: a damaged `job.json`/`partition.json` stops the job saying what to do, a
damaged shard record makes its shard be redone.
"""

from __future__ import annotations

import collections
import contextlib
import csv
import errno
import hashlib
import io
import json
import math
import multiprocessing
import os
import re
import signal
import time
from collections import Counter
from collections.abc import Iterator, Sequence
from concurrent.futures import Future, ProcessPoolExecutor
from concurrent.futures.process import BrokenProcessPool
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from tqdm import tqdm

from preprocess.datasets import ClipRow, DatasetError, VideoIndex, check_name_templates
from preprocess.decode import (
    DecodeError,
    decode_clip,
    default_decode_timeout_s,
    die_with_parent,
    remove_stale_scratch,
    require_ffmpeg,
)
from preprocess.features import NonFiniteAudioError, compute_logmel
from shards.atomic import LockedError, exclusive_lock, read_small_file, write_bytes_atomic
from shards.manifest import LogmelStats, Manifest, ShardInfo
from shards.schema import (
    FAILURES_NAME,
    MANIFEST_NAME,
    SCHEMA_VERSION,
    SHARD_PATTERN,
    FeatureParams,
    Sample,
    SchemaError,
    encode_sample,
    frame_ext,
    frame_size_problem,
    jpeg_size,
    split_member_name,
)
from shards.writer import ShardWriter

STATE_DIR = "_state"
JOB_FILE = "job.json"
PARTITION_FILE = "partition.json"
FAILURE_FIELDS = ("key", "source", "file", "reason", "message")
STATE_MAX_BYTES = 64 << 20  # a record lists at most a shard's failures; job.json the classes
_DISK_FULL = (errno.ENOSPC, errno.EDQUOT, errno.EFBIG)
_TMP_SUFFIX_RE = re.compile(r"(\.[0-9]+)?\.tmp$")  # errors name the file being written, not its temporary name


class JobError(RuntimeError):
    """The job cannot run as asked (conflicting output folder, nothing to do, no ffmpeg); says what to do."""


@dataclass
class JobSpec:
    """Everything that decides a split's shards, plus how to run the job (`workers`, `progress`)."""

    dataset: str
    split: str
    rows: list[ClipRow]
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

    def identity(self) -> dict[str, Any]:
        """What the output depends on; a rerun into the same folder must match it."""
        rows_hash = hashlib.sha256()
        for row in self.rows:
            rows_hash.update(f"{row.key},{row.start_s!r},{row.end_s!r},{list(row.labels)}\n".encode())
        return {
            "schema_version": SCHEMA_VERSION,
            "dataset": self.dataset,
            "split": self.split,
            "num_rows": len(self.rows),
            "rows_sha256": rows_hash.hexdigest(),
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

    def describe(self) -> str:
        if self.already_done:
            return (
                f"nothing to do: {self.out_dir} is complete ({self.num_samples} samples in {self.num_shards} shards, "
                f"{sum(self.skipped.values())} skipped); delete it to shard again"
            )
        if self.missing_parts:
            return (
                f"{self.out_dir}: this part is done ({self.clips_processed} clips, {self.shards_written} shards in "
                f"{self.seconds:.1f} s); waiting for parts {self.missing_parts}: the last part to finish writes the "
                "manifest (or run tools/merge_manifests.py on the folder)"
            )
        skipped = ", ".join(f"{n} {reason}" for reason, n in sorted(self.skipped.items())) or "none"
        rate = self.clips_processed / self.seconds if self.seconds > 0 else 0.0
        return (
            f"{self.out_dir}: {self.num_samples} samples in {self.num_shards} shards; skipped: {skipped} "
            f"(see {FAILURES_NAME}); this run: {self.clips_processed} clips, {self.shards_written} shards "
            f"in {self.seconds:.1f} s ({rate:.1f} clips/s)"
        )


def plan_shards(num_rows: int, shard_size: int, seed: int) -> list[np.ndarray]:
    """Row indices of each shard: a seeded permutation cut into ceil(n / shard_size) near-equal parts."""
    if shard_size < 1:
        raise JobError(f"--shard-size must be at least 1, got {shard_size}")
    order = np.random.default_rng(seed).permutation(num_rows)
    return [part for part in np.array_split(order, math.ceil(num_rows / shard_size)) if part.size]


@dataclass(frozen=True)
class ClipTask:
    """One clip for a worker: where to read it and what to store with it."""

    row: ClipRow
    path: str | None
    missing: str | None
    start_s: float
    duration_s: float


def _file_name(path: str) -> str:
    """The file name as text that encodes to UTF-8 (a name of undecodable bytes keeps them as \\xNN escapes)."""
    return os.fsencode(Path(path).name).decode(errors="backslashreplace")


def _failure(task: ClipTask, reason: str, message: str) -> dict[str, str]:
    return {
        "key": task.row.key,
        "source": task.row.source,
        "file": _file_name(task.path) if task.path else "",
        "reason": reason,
        "message": message.encode(errors="surrogateescape").decode(errors="backslashreplace"),
    }


def _frames_problem(frames: list[bytes], params: FeatureParams) -> str | None:
    """Why the readers would refuse these frames (an extreme aspect ratio, sizes that change), or None."""
    for i, jpeg in enumerate(frames):
        if problem := frame_size_problem(jpeg, params.short_side_px, frame_ext(i)):
            return f"the video's frames cannot be stored: {problem}"
    if len(sizes := {jpeg_size(jpeg) for jpeg in frames}) > 1:
        return f"the video changes size within the segment: frames of {sorted(sizes)} (height, width)"
    return None


def process_clip(
    task: ClipTask, params: FeatureParams, require_audio: bool, decode_timeout_s: float | None = None
) -> tuple[list | None, Any]:
    """Decode and featurize one clip: (tar members, LogmelStats) or (None, failure record). Never raises for
    a bad clip: a batch job records it and goes on."""
    if task.path is None:
        return None, _failure(task, "missing_file", task.missing or "no file")
    try:
        clip = decode_clip(task.path, task.start_s, task.duration_s, params, decode_timeout_s)
    except DecodeError as err:
        return None, _failure(task, err.reason, str(err))
    if problem := _frames_problem(clip.frames, params):
        return None, _failure(task, "bad_frame_size", problem)
    streams = clip.streams
    has_audio = streams.has_audio and clip.waveform.size > 0
    if require_audio and not has_audio:
        return None, _failure(task, "no_audio", "no audio stream (--require-audio)")
    waveform = clip.waveform if has_audio else np.zeros(round(task.duration_s * params.sample_rate_hz), np.float32)
    try:
        logmel = compute_logmel(waveform, params)
    except NonFiniteAudioError as err:
        return None, _failure(task, "non_finite_audio", str(err))
    meta = {
        "key": task.row.key,
        "ytid": task.row.ytid,
        "source": task.row.source,
        "file": _file_name(task.path),
        "segment_s": [task.row.start_s, task.row.end_s],
        "decode_start_s": task.start_s,
        "decode_duration_s": clip.duration_s,
        "labels": list(task.row.labels),
        "streams": streams.to_dict(),
        "has_audio": has_audio,
        "audio_decoded_s": clip.waveform.size / params.sample_rate_hz,
        "frames_decoded": clip.frames_decoded,
        "frames_repeated": params.num_frames - clip.frames_decoded,
        "frame_times_s": [round(t, 6) for t in clip.frame_times_s],
        "fbank_frames_computed": logmel.frames_computed,
        "fbank_pad_frames": logmel.pad_frames,
        "fbank_cut_frames": logmel.cut_frames,
    }
    sample = Sample(
        key=task.row.key,
        frames=clip.frames,
        logmel=logmel.values,
        labels=np.asarray(task.row.labels, dtype=np.int32),
        meta=meta,
    )
    stats = logmel.stats() if has_audio else LogmelStats()
    return encode_sample(sample, params), stats


_WORKER_ARGS: tuple[FeatureParams, bool, float] | None = None


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


def _shard_name(index: int) -> str:
    return SHARD_PATTERN.format(index)


def record_path(out_dir: Path, index: int) -> Path:
    """`_state/shard-NNNNNN.json`: written last, its presence is what marks shard `index` done."""
    return out_dir / STATE_DIR / (_shard_name(index).removesuffix(".tar") + ".json")


def _load_record(out_dir: Path, index: int) -> dict[str, Any] | None:
    """The record of a finished shard, or None when the shard must be (re)done: no record, an unreadable or
    malformed one (not the shape _write_shard writes, NaN statistics), or a shard/index file gone or of another
    size than recorded (a full re-hash is verify_shards' job)."""
    path = record_path(out_dir, index)
    try:
        record = json.loads(read_small_file(path, STATE_MAX_BYTES))
    except (OSError, ValueError, RecursionError):
        return None
    if not _is_record(record, index, str(path)):
        return None
    if shard := record["shard"]:
        tar = out_dir / shard["name"]
        if not tar.is_file() or tar.stat().st_size != shard["bytes"] or not tar.with_suffix(".idx").is_file():
            return None
    return record


def _is_record(record: Any, index: int, where: str) -> bool:
    """Whether `record` has the shape that _write_shard gives shard `index`."""
    if not isinstance(record, dict) or not {"index", "shard", "logmel", "failures"} <= set(record):
        return False
    shard, failures = record["shard"], record["failures"]
    try:
        if shard is not None and ShardInfo.from_dict(shard, where).name != _shard_name(index):
            return False
        LogmelStats.from_dict(record["logmel"])
    except (SchemaError, KeyError, TypeError):
        return False
    return (
        record["index"] == index
        and isinstance(failures, list)
        and all(isinstance(f, dict) and set(f) == set(FAILURE_FIELDS) for f in failures)
        and all(isinstance(v, str) for f in failures for v in f.values())
    )


def _read_state(path: Path, fix: str) -> dict[str, Any] | None:
    """The JSON object in the state file `path`, or None when there is none; JobError naming it and `fix` when it
    cannot be used (not UTF-8 JSON, not an object, a FIFO, huge)."""
    try:
        data = json.loads(read_small_file(path, STATE_MAX_BYTES))
    except FileNotFoundError:
        return None
    except (OSError, ValueError, RecursionError) as err:
        raise JobError(f"{path} is damaged or unreadable ({err}); {fix}") from err
    if not isinstance(data, dict):
        raise JobError(f"{path} is damaged (a JSON {type(data).__name__}, not an object); {fix}")
    return data


def _identity_fix(out_dir: Path) -> str:
    return f"restore it, or delete {out_dir} and shard again (or use another --out)"


def _check_identity(out_dir: Path, identity: dict[str, Any]) -> None:
    path = out_dir / STATE_DIR / JOB_FILE
    previous = _read_state(path, _identity_fix(out_dir))
    if previous is not None:
        changed = sorted(k for k in set(previous) | set(identity) if previous.get(k) != identity.get(k))
        if changed:
            raise JobError(
                f"{out_dir} holds shards made with other inputs or arguments (differs in: {', '.join(changed)}); "
                "rerun with the original arguments to resume, or use another --out (or delete the folder)"
            )
    elif (out_dir / MANIFEST_NAME).exists() or any(out_dir.glob("shard-*.tar")):
        raise JobError(f"{out_dir} holds shards of an unknown job; use another --out or delete the folder")
    else:
        path.parent.mkdir(parents=True, exist_ok=True)
        write_bytes_atomic(path, (json.dumps(identity, indent=1, sort_keys=True) + "\n").encode())


def _tasks(spec: JobSpec, rows: np.ndarray, index: VideoIndex) -> Iterator[ClipTask]:
    for i in rows:
        row = spec.rows[int(i)]
        try:
            path, missing = str(index.find(row, spec.name_templates)), None
        except (FileNotFoundError, DatasetError) as err:
            path, missing = None, str(err)
        segment_s = min(row.end_s - row.start_s, spec.params.segment_s)
        start_s = row.start_s if spec.full_videos else 0.0
        yield ClipTask(row=row, path=path, missing=missing, start_s=start_s, duration_s=segment_s)


def _write_shard(out_dir: Path, index: int, results: list[tuple[list | None, Any]]) -> dict[str, Any]:
    failures = [info for members, info in results if members is None]
    stats = sum((info for members, info in results if members is not None), LogmelStats())
    shard = None
    if len(failures) < len(results):
        with ShardWriter(out_dir / _shard_name(index)) as writer:
            for members, _ in results:
                if members is not None:
                    writer.add(split_member_name(members[0][0])[0], members)
            shard = asdict(writer.close())
    record = {"index": index, "shard": shard, "logmel": stats.to_dict(), "failures": failures}
    write_bytes_atomic(record_path(out_dir, index), (json.dumps(record, sort_keys=True) + "\n").encode())
    return record


def _write_failures_csv(out_dir: Path, failures: list[dict[str, str]]) -> None:
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=FAILURE_FIELDS, lineterminator="\n")
    writer.writeheader()
    writer.writerows(failures)
    write_bytes_atomic(out_dir / FAILURES_NAME, buffer.getvalue().encode())


def _finish(out_dir: Path, identity: dict[str, Any], records: list[dict[str, Any]]) -> Manifest:
    """Write the split's manifest and failures.csv from the job's identity and every shard's record."""
    failures = sorted((f for r in records for f in r["failures"]), key=lambda f: f["key"])
    manifest = Manifest(
        dataset=identity["dataset"],
        split=identity["split"],
        features=FeatureParams.from_dict(identity["features"]),
        classes=identity["classes"],
        multi_label=identity["multi_label"],
        shards=[ShardInfo(**r["shard"]) for r in records if r["shard"]],
        logmel=sum((LogmelStats.from_dict(r["logmel"]) for r in records), LogmelStats()),
        failures=failures,
        job={k: v for k, v in identity.items() if k != "classes"},
    )
    _write_failures_csv(out_dir, failures)
    manifest.write(out_dir)
    return manifest


def merge(out_dir: Path) -> tuple[Manifest | None, list[int]]:
    """(the manifest, []) once every shard of the split's plan has its record, written now; else (None, the shard
    numbers still missing). Reads only `_state/`: the parts of a partitioned job may have run anywhere."""
    identity_path = out_dir / STATE_DIR / JOB_FILE
    identity = _read_state(identity_path, _identity_fix(out_dir))
    if identity is None:
        raise JobError(f"{out_dir}: no {STATE_DIR}/{JOB_FILE}; not the output folder of a shard job")
    num_rows, shard_size, seed = (identity.get(k) for k in ("num_rows", "shard_size", "seed"))
    if not (_is_count(num_rows) and _is_count(shard_size) and shard_size >= 1 and _is_count(seed, math.inf)):
        raise JobError(
            f"{identity_path} is damaged (num_rows, shard_size, seed are not counts); {_identity_fix(out_dir)}"
        )
    num_shards = len(plan_shards(num_rows, shard_size, seed))
    records = [_load_record(out_dir, k) for k in range(num_shards)]
    missing = [k for k, r in enumerate(records) if r is None]
    if missing:
        return None, missing
    try:
        with _output_errors():
            return _finish(out_dir, identity, records), []  # type: ignore[arg-type]
    except (KeyError, TypeError, ValueError) as err:  # fields of job.json that run_job did not compare
        raise JobError(f"{identity_path} is damaged ({type(err).__name__}: {err}); {_identity_fix(out_dir)}") from err


def _is_count(value: object, most: float = 10**9) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and 0 <= value <= most


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
    )


def read_partition(out_dir: Path) -> int | None:
    """The number of jobs the split's parts are cut into, as `_state/partition.json` records it (None: no file yet);
    JobError naming the file when it is damaged."""
    path = out_dir / STATE_DIR / PARTITION_FILE
    fix = "delete it and run every part with the same --num-jobs (it is written again)"
    data = _read_state(path, fix)
    if data is None:
        return None
    num_jobs = data.get("num_jobs")
    if not _is_count(num_jobs) or num_jobs < 1:
        raise JobError(f"{path} is damaged (num_jobs {num_jobs!r:.40} is not a count); {fix}")
    return num_jobs


def _check_partition(out_dir: Path, num_jobs: int) -> None:
    """All parts of a split must cut it the same way: the first part records N, the others must agree."""
    path = out_dir / STATE_DIR / PARTITION_FILE
    recorded = read_partition(out_dir)
    if recorded is not None:
        if recorded != num_jobs:
            raise JobError(
                f"{out_dir} is being sharded as {recorded} jobs, this job says {num_jobs} (--num-jobs or "
                f"SLURM_ARRAY_TASK_COUNT); run every part with the same number, or use another --out"
            )
    else:
        write_bytes_atomic(path, (json.dumps({"num_jobs": num_jobs}) + "\n").encode())


def _remove_stale_tmp(out_dir: Path, shards: list[int]) -> None:
    """Temporary files a killed run of this job left for its own shards (other parts may be writing theirs)."""
    for k in shards:
        stem = _shard_name(k).removesuffix(".tar")
        for stale in [*out_dir.glob(f"{stem}.*.tmp"), *(out_dir / STATE_DIR).glob(f"{stem}.*.tmp")]:
            stale.unlink(missing_ok=True)


@contextmanager
def _output_errors() -> Iterator[None]:
    """An OSError while writing the output folder (a full disk, a read-only folder) stops the job with a JobError
    naming the file and saying what to do; the writers have removed their temporary files."""
    try:
        yield
    except OSError as err:
        where = _TMP_SUFFIX_RE.sub("", os.fsdecode(err.filename)) if err.filename else "the output folder"
        fix = "free space" if err.errno in _DISK_FULL else "fix that"
        raise JobError(
            f"cannot write {where} ({err.strerror or err}); {fix} and run the same command again "
            "(finished shards are kept)"
        ) from err


@contextmanager
def _part_lock(spec: JobSpec) -> Iterator[None]:
    """Hold this part's lock for the run: a second job writing the same part of the folder is refused."""
    path = spec.out_dir / STATE_DIR / f"part-{spec.job_index}.lock"
    try:
        with exclusive_lock(path):
            yield
    except LockedError as err:
        part = f"part {spec.job_index} of " if spec.num_jobs > 1 else ""
        raise JobError(
            f"another job ({err.holder or 'pid unknown'}) is writing {part}{spec.out_dir} (lock {path}); wait for it "
            "to finish, or stop it and run this again (it resumes)"
        ) from None


def run_job(spec: JobSpec) -> JobSummary:
    """Shard this job's part of `spec.rows` into `spec.out_dir`, resuming whatever an earlier run left; the job
    that completes the split's last part writes the manifest."""
    t0 = time.monotonic()
    if not spec.rows:
        raise JobError(f"no rows to shard for {spec.dataset}/{spec.split}; check the CSV and --split/--limit")
    if not 0 <= spec.job_index < spec.num_jobs:
        raise JobError(f"--job-index must be in 0..{spec.num_jobs - 1} for --num-jobs {spec.num_jobs}")
    spec.params.validate()
    check_name_templates(spec.name_templates)
    with _output_errors():
        spec.out_dir.mkdir(parents=True, exist_ok=True)
        identity = spec.identity()
        _check_identity(spec.out_dir, identity)
        _check_partition(spec.out_dir, spec.num_jobs)
        with _part_lock(spec):
            return _run_part(spec, t0)


def _run_part(spec: JobSpec, t0: float) -> JobSummary:
    plan = plan_shards(len(spec.rows), spec.shard_size, spec.seed)
    mine = [k for k in range(len(plan)) if k % spec.num_jobs == spec.job_index]
    pending = [k for k in mine if _load_record(spec.out_dir, k) is None]
    if not pending and (spec.out_dir / MANIFEST_NAME).is_file():
        return _summary(spec, _done_records(spec.out_dir, len(plan)), 0, 0, t0, done=True)
    _remove_stale_tmp(spec.out_dir, pending)
    processed = 0
    if pending:
        require_ffmpeg()
        remove_stale_scratch()
        index = VideoIndex(spec.videos_dir)
        tasks = (task for k in pending for task in _tasks(spec, plan[k], index))
        workers = spec.workers or len(os.sched_getaffinity(0))
        total = sum(plan[k].size for k in pending)
        part = f" part {spec.job_index + 1}/{spec.num_jobs}" if spec.num_jobs > 1 else ""
        timeout_s = spec.decode_timeout_s or default_decode_timeout_s(spec.params.segment_s)
        initargs = (spec.params, spec.require_audio, timeout_s, os.getpid())
        context = multiprocessing.get_context("fork")
        pool = ProcessPoolExecutor(workers, mp_context=context, initializer=_init_worker, initargs=initargs)
        with (
            contextlib.closing(ordered_results(pool, _run_task, tasks, window=4 * workers)) as results_iter,
            tqdm(total=total, unit="clip", disable=not spec.progress, desc=f"{spec.dataset}/{spec.split}{part}") as bar,
        ):
            for k in pending:
                results = []
                for _ in range(plan[k].size):
                    results.append(next(results_iter))
                    bar.update(1)
                _write_shard(spec.out_dir, k, results)
                processed += len(results)
    _, missing = merge(spec.out_dir)
    summary = _summary(spec, _done_records(spec.out_dir, len(plan)), processed, len(pending), t0, done=False)
    summary.missing_parts = sorted({k % spec.num_jobs for k in missing})
    return summary


def _done_records(out_dir: Path, num_shards: int) -> list[dict[str, Any]]:
    return [r for r in (_load_record(out_dir, k) for k in range(num_shards)) if r is not None]
