"""The output folder of a shard job: its plan, identity, partition, shard records, part locks and the merge.

The plan numbers the shards: the rows are shuffled once with `seed` and cut into shards of about `shard_size` rows;
shard k always holds the same rows. A shard is done exactly when its record `_state/shard-k.json` exists (written
after its tar and index), so a job killed at any moment redoes only the shards without a record. When all records
exist the split's `manifest.json` and `failures.csv` are written from them.

`_state/job.json` holds what the shards depend on (a rerun must match it) and `_state/partition.json` how many jobs
the split's parts are cut into; both are checked and written under a flock on `_state/job.lock` (of two parts
started at once with different arguments, one is refused), and each part is written by one job at a time (a flock on
`_state/part-I.lock`). State files are data too: a damaged `job.json`/`partition.json` stops the job saying what to
do (its counts are bounded), a damaged shard record (or one that does not hold its planned rows) makes its shard be
redone. Any OSError writing the folder (a full disk) is a JobError naming the file. `preprocess.job_merge` writes
the manifest from the records.
"""

from __future__ import annotations

import json
import math
import os
import re
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import asdict
from pathlib import Path
from typing import Any

import numpy as np

from shards.atomic import (
    DISK_FULL_ERRNOS,
    DiskFullError,
    LockedError,
    disk_full,
    exclusive_lock,
    read_small_file,
    write_bytes_atomic,
)
from shards.limits import is_count
from shards.manifest import CLIP_COUNTS, MAX_SPLIT_SAMPLES, LogmelStats, ShardInfo
from shards.schema import MANIFEST_NAME, SHARD_PATTERN, SchemaError, split_member_name
from shards.text import excerpt
from shards.writer import ShardWriter

STATE_DIR = "_state"
JOB_FILE = "job.json"
PARTITION_FILE = "partition.json"
JOB_LOCK = "job.lock"
FAILURE_FIELDS = ("key", "source", "file", "reason", "message")
STATE_MAX_BYTES = 64 << 20  # a record lists at most a shard's failures; job.json the classes
STATE_LOCK_WAIT_S = 30.0  # another part's check-and-write of job.json and partition.json takes milliseconds
KEPT = "(finished shards are kept)"
_TMP_SUFFIX_RE = re.compile(r"(\.[0-9]+)?\.tmp$")  # errors name the file being written, not its temporary name


class JobError(RuntimeError):
    """The job cannot run as asked (conflicting output folder, nothing to do, no ffmpeg); says what to do."""


# A split's rows: AudioSet-2M has 2,041,789; a job.json claiming far more is damaged (its plan would not fit memory).
MAX_ROWS = MAX_SPLIT_SAMPLES
MAX_SHARD_SIZE = 10_000  # a shard's samples are held in memory until it is written
# Jobs a split is cut into: a SLURM array holds ~1,000 (its default MaxArraySize is 1001); parts are listed by number.
MAX_JOBS = 100_000


def count_shards(num_rows: int, shard_size: int) -> int:
    """How many shards the plan of `num_rows` rows in shards of about `shard_size` has, without planning them."""
    return math.ceil(num_rows / shard_size)


def shard_rows(num_rows: int, num_shards: int, index: int) -> int:
    """How many rows shard `index` of the plan holds (np.array_split's sizes: the first n % k parts one more)."""
    return num_rows // num_shards + (index < num_rows % num_shards)


def plan_shards(num_rows: int, shard_size: int, seed: int) -> list[np.ndarray]:
    """Row indices of each shard: a seeded permutation cut into ceil(n / shard_size) near-equal parts."""
    if shard_size < 1:
        raise JobError(f"--shard-size must be at least 1, got {shard_size}")
    order = np.random.default_rng(seed).permutation(num_rows)
    return [part for part in np.array_split(order, count_shards(num_rows, shard_size)) if part.size]


def _shard_name(index: int) -> str:
    return SHARD_PATTERN.format(index)


def record_path(out_dir: Path, index: int) -> Path:
    """`_state/shard-NNNNNN.json`: written last, its presence is what marks shard `index` done."""
    return out_dir / STATE_DIR / (_shard_name(index).removesuffix(".tar") + ".json")


def load_record(out_dir: Path, index: int, rows: int) -> dict[str, Any] | None:
    """The record of finished shard `index` of `rows` planned rows, or None when the shard must be (re)done: no
    record, an unreadable or malformed one (not the shape write_shard writes, NaN statistics, samples and failures
    that do not add up to `rows`), or a shard/index file gone or of another size than recorded (a full re-hash is
    verify_shards' job)."""
    path = record_path(out_dir, index)
    try:
        record = json.loads(read_small_file(path, STATE_MAX_BYTES))
    except (OSError, ValueError, RecursionError):
        return None
    if not _is_record(record, index, rows, str(path)):
        return None
    if shard := record["shard"]:
        tar = out_dir / shard["name"]
        if not tar.is_file() or tar.stat().st_size != shard["bytes"] or not tar.with_suffix(".idx").is_file():
            return None
    return record


def _is_record(record: Any, index: int, rows: int, where: str) -> bool:
    """Whether `record` has the shape that write_shard gives shard `index` of `rows` rows."""
    if not isinstance(record, dict) or not {"index", "shard", "logmel", "failures"} <= set(record):
        return False
    shard, failures = record["shard"], record["failures"]
    try:
        info = None if shard is None else ShardInfo.from_dict(shard, where)
        if info is not None and info.name != _shard_name(index):
            return False
        LogmelStats.from_dict(record["logmel"])
    except (SchemaError, KeyError, TypeError):
        return False
    samples = 0 if info is None else info.num_samples
    return (
        record["index"] == index
        and clip_counts_ok(record.get("clips"), samples)
        and isinstance(failures, list)
        and samples + len(failures) == rows
        and all(isinstance(f, dict) and set(f) == set(FAILURE_FIELDS) for f in failures)
        and all(isinstance(v, str) for f in failures for v in f.values())
    )


def clip_counts_ok(counts: Any, samples: int) -> bool:
    """Whether a record's `clips` are CLIP_COUNTS of at most its `samples`, or absent (a record of an older job)."""
    if counts is None:
        return True
    return (
        isinstance(counts, dict)
        and set(counts) == set(CLIP_COUNTS)
        and all(is_count(n, 0, samples) for n in counts.values())
    )


def clip_totals(records: list[dict[str, Any]]) -> dict[str, int] | None:
    """The CLIP_COUNTS summed over shard `records`; None when one of them has none (an older job's record)."""
    if any(record.get("clips") is None for record in records):
        return None
    return {name: sum(record["clips"][name] for record in records) for name in CLIP_COUNTS}


def read_state(path: Path, fix: str) -> dict[str, Any] | None:
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


def _write_state(path: Path, data: dict[str, Any], **dumps_options: Any) -> None:
    """Write the state file `path` atomically: `data` as one JSON document and a newline."""
    write_bytes_atomic(path, (json.dumps(data, **dumps_options) + "\n").encode())


def identity_fix(out_dir: Path) -> str:
    return f"restore it, or delete {out_dir} and shard again (or use another --out)"


def claim_folder(out_dir: Path, identity: dict[str, Any], num_jobs: int) -> None:
    """Record `identity` and the partition into `num_jobs` parts in a new folder, or check them against what the
    folder records, as one step under `_state/job.lock`: JobError when the folder holds shards of other inputs or
    arguments, of an unknown job, or is cut into another number of parts (two parts started at the same instant
    with different arguments included: the second sees what the first wrote)."""
    state = out_dir / STATE_DIR
    # Checked before _state is made: a job writes job.json before any shard, so this cannot race with one.
    if not (state / JOB_FILE).exists() and ((out_dir / MANIFEST_NAME).exists() or any(out_dir.glob("shard-*.tar"))):
        raise JobError(f"{out_dir} holds shards of an unknown job; use another --out or delete the folder")
    state.mkdir(parents=True, exist_ok=True)
    lock = state / JOB_LOCK
    try:
        with exclusive_lock(lock, wait_s=STATE_LOCK_WAIT_S):
            _check_identity(out_dir, identity)
            _check_partition(out_dir, num_jobs)
    except LockedError as err:
        raise JobError(
            f"another job ({err.holder or 'pid unknown'}) has held {lock} for {STATE_LOCK_WAIT_S:g} s while checking "
            f"{out_dir}; stop it if it hangs, then run this again"
        ) from None


def _check_identity(out_dir: Path, identity: dict[str, Any]) -> None:
    """Write `identity` to job.json when there is none; JobError naming what differs from the one there."""
    path = out_dir / STATE_DIR / JOB_FILE
    previous = read_state(path, identity_fix(out_dir))
    if previous is None:
        _write_state(path, identity, indent=1, sort_keys=True)
        return
    changed = sorted(k for k in set(previous) | set(identity) if previous.get(k) != identity.get(k))
    if changed:
        names = [k if k in identity else excerpt(k) for k in changed[:10]]  # keys only job.json has are data
        more = f" and {len(changed) - 10} more" if len(changed) > 10 else ""
        raise JobError(
            f"{out_dir} holds shards made with other inputs or arguments (differs in: {', '.join(names)}{more}); "
            "rerun with the original arguments to resume, or use another --out (or delete the folder)"
        )


def write_shard(out_dir: Path, index: int, results: list[tuple[list | None, Any]]) -> dict[str, Any]:
    """Write shard `index` from its clips' results (`preprocess.clip.process_clip`'s; no tar when all failed), then
    its record, which is returned: the shard, the log-mel sums, the failures and the kept clips' CLIP_COUNTS."""
    failures = [info for members, info in results if members is None]
    kept = [info for members, info in results if members is not None]
    stats = sum((clip.logmel for clip in kept), LogmelStats())
    clips = {"no_audio": sum(not clip.has_audio for clip in kept), "padded": sum(clip.padded for clip in kept)}
    shard = None
    if len(failures) < len(results):
        with ShardWriter(out_dir / _shard_name(index)) as writer:
            for members, _ in results:
                if members is not None:
                    writer.add(split_member_name(members[0][0])[0], members)
            shard = asdict(writer.close())
    record = {"index": index, "shard": shard, "logmel": stats.to_dict(), "failures": failures, "clips": clips}
    _write_state(record_path(out_dir, index), record, sort_keys=True)
    return record


def read_partition(out_dir: Path) -> int | None:
    """The number of jobs the split's parts are cut into, as `_state/partition.json` records it (None: no file yet);
    JobError naming the file when it is damaged or claims more than MAX_JOBS."""
    path = out_dir / STATE_DIR / PARTITION_FILE
    fix = "delete it and run every part with the same --num-jobs (it is written again)"
    data = read_state(path, fix)
    if data is None:
        return None
    num_jobs = data.get("num_jobs")
    if not is_count(num_jobs, 1, MAX_JOBS):
        raise JobError(f"{path} is damaged (num_jobs {excerpt(num_jobs)} is not a count in 1..{MAX_JOBS}); {fix}")
    return num_jobs


def _check_partition(out_dir: Path, num_jobs: int) -> None:
    """All parts of a split must cut it the same way: the first part records N, the others must agree."""
    recorded = read_partition(out_dir)
    if recorded is None:
        _write_state(out_dir / STATE_DIR / PARTITION_FILE, {"num_jobs": num_jobs})
    elif recorded != num_jobs:
        raise JobError(
            f"{out_dir} is being sharded as {recorded} jobs, this job says {num_jobs} (--num-jobs or "
            f"SLURM_ARRAY_TASK_COUNT); run every part with the same number, or use another --out"
        )


def remove_stale_shard_tmp(out_dir: Path, shards: list[int]) -> None:
    """Temporary files a killed run of this job left for its own shards (other parts may be writing theirs)."""
    for k in shards:
        stem = _shard_name(k).removesuffix(".tar")
        for stale in [*out_dir.glob(f"{stem}.*.tmp"), *(out_dir / STATE_DIR).glob(f"{stem}.*.tmp")]:
            stale.unlink(missing_ok=True)


@contextmanager
def output_errors() -> Iterator[None]:
    """An OSError while writing the output folder (a full disk, a read-only folder) stops the job with a JobError
    naming the file and saying what to do; the writers have removed their temporary files."""
    try:
        yield
    except DiskFullError as err:
        raise JobError(f"{err} {KEPT}") from err
    except OSError as err:
        where = _TMP_SUFFIX_RE.sub("", os.fsdecode(err.filename)) if err.filename else "the output folder"
        if err.errno in DISK_FULL_ERRNOS:  # raised outside the writers (a mkdir, a lock file)
            raise JobError(f"{disk_full(where, err.errno)} {KEPT}") from err
        raise JobError(
            f"cannot write {where} ({err.strerror or err}); fix that and run the same command again {KEPT}"
        ) from err


@contextmanager
def part_lock(out_dir: Path, job_index: int, num_jobs: int) -> Iterator[None]:
    """Hold the lock of part `job_index` for the run: a second job writing the same part of the folder is refused."""
    path = out_dir / STATE_DIR / f"part-{job_index}.lock"
    try:
        with exclusive_lock(path):
            yield
    except LockedError as err:
        part = f"part {job_index} of " if num_jobs > 1 else ""
        raise JobError(
            f"another job ({err.holder or 'pid unknown'}) is writing {part}{out_dir} (lock {path}); wait for it "
            "to finish, or stop it and run this again (it resumes)"
        ) from None


def done_records(out_dir: Path, plan: list[np.ndarray]) -> list[dict[str, Any]]:
    """The records of the finished shards of `plan`."""
    return [r for k, rows in enumerate(plan) if (r := load_record(out_dir, k, rows.size)) is not None]
