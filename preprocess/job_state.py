"""The output folder of a shard job: its plan, identity, partition, shard records, part locks and the merge.

The plan numbers the shards: the rows are shuffled once with `seed` and cut into shards of about `shard_size` rows;
shard k always holds the same rows. A shard is done exactly when its record `_state/shard-k.json` exists (written
after its tar and index), so a job killed at any moment redoes only the shards without a record. When all records
exist the split's `manifest.json` and `failures.csv` are written from them.

`_state/job.json` holds what the shards depend on (a rerun must match it) and `_state/partition.json` how many jobs
the split's parts are cut into; each part is written by one job at a time (a flock on `_state/part-I.lock`). State
files are data too: a damaged `job.json`/`partition.json` stops the job saying what to do, a damaged shard record
makes its shard be redone. Any OSError writing the folder (a full disk) is a JobError naming the file.
"""

from __future__ import annotations

import csv
import io
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
from shards.manifest import LogmelStats, Manifest, ShardInfo
from shards.schema import (
    FAILURES_NAME,
    MANIFEST_NAME,
    SHARD_PATTERN,
    FeatureParams,
    SchemaError,
    split_member_name,
)
from shards.writer import ShardWriter

STATE_DIR = "_state"
JOB_FILE = "job.json"
PARTITION_FILE = "partition.json"
FAILURE_FIELDS = ("key", "source", "file", "reason", "message")
STATE_MAX_BYTES = 64 << 20  # a record lists at most a shard's failures; job.json the classes
KEPT = "(finished shards are kept)"
_TMP_SUFFIX_RE = re.compile(r"(\.[0-9]+)?\.tmp$")  # errors name the file being written, not its temporary name


class JobError(RuntimeError):
    """The job cannot run as asked (conflicting output folder, nothing to do, no ffmpeg); says what to do."""


# A split's rows: AudioSet-2M has 2,041,789; a job.json claiming far more is damaged (its plan would not fit memory).
MAX_ROWS = 100_000_000


def plan_shards(num_rows: int, shard_size: int, seed: int) -> list[np.ndarray]:
    """Row indices of each shard: a seeded permutation cut into ceil(n / shard_size) near-equal parts."""
    if shard_size < 1:
        raise JobError(f"--shard-size must be at least 1, got {shard_size}")
    order = np.random.default_rng(seed).permutation(num_rows)
    return [part for part in np.array_split(order, math.ceil(num_rows / shard_size)) if part.size]


def _shard_name(index: int) -> str:
    return SHARD_PATTERN.format(index)


def record_path(out_dir: Path, index: int) -> Path:
    """`_state/shard-NNNNNN.json`: written last, its presence is what marks shard `index` done."""
    return out_dir / STATE_DIR / (_shard_name(index).removesuffix(".tar") + ".json")


def load_record(out_dir: Path, index: int) -> dict[str, Any] | None:
    """The record of a finished shard, or None when the shard must be (re)done: no record, an unreadable or
    malformed one (not the shape write_shard writes, NaN statistics), or a shard/index file gone or of another
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
    """Whether `record` has the shape that write_shard gives shard `index`."""
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


def _write_state(path: Path, data: dict[str, Any], **dumps_options: Any) -> None:
    """Write the state file `path` atomically: `data` as one JSON document and a newline."""
    write_bytes_atomic(path, (json.dumps(data, **dumps_options) + "\n").encode())


def _identity_fix(out_dir: Path) -> str:
    return f"restore it, or delete {out_dir} and shard again (or use another --out)"


def check_identity(out_dir: Path, identity: dict[str, Any]) -> None:
    """Record `identity` in a new folder; JobError when the folder holds shards of other inputs or arguments."""
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
        _write_state(path, identity, indent=1, sort_keys=True)


def write_shard(out_dir: Path, index: int, results: list[tuple[list | None, Any]]) -> dict[str, Any]:
    """Write shard `index` from its clips' results (no tar when all failed), then its record, which is returned."""
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
    _write_state(record_path(out_dir, index), record, sort_keys=True)
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
    counts = _is_count(num_rows, MAX_ROWS) and num_rows >= 1 and _is_count(shard_size) and shard_size >= 1
    if not (counts and _is_count(seed, math.inf)):
        raise JobError(
            f"{identity_path} is damaged (num_rows, shard_size, seed are not counts in range); {_identity_fix(out_dir)}"
        )
    num_shards = len(plan_shards(num_rows, shard_size, seed))
    records = [load_record(out_dir, k) for k in range(num_shards)]
    missing = [k for k, r in enumerate(records) if r is None]
    if missing:
        return None, missing
    try:
        with output_errors():
            return _finish(out_dir, identity, records), []  # type: ignore[arg-type]
    except (KeyError, TypeError, ValueError) as err:  # fields of job.json that run_job did not compare
        raise JobError(f"{identity_path} is damaged ({type(err).__name__}: {err}); {_identity_fix(out_dir)}") from err


def _is_count(value: object, most: float = 10**9) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and 0 <= value <= most


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


def check_partition(out_dir: Path, num_jobs: int) -> None:
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
        _write_state(path, {"num_jobs": num_jobs})


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


def done_records(out_dir: Path, num_shards: int) -> list[dict[str, Any]]:
    """The records of the finished shards among the first `num_shards`."""
    return [r for r in (load_record(out_dir, k) for k in range(num_shards)) if r is not None]
