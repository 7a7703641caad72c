"""The merge of a shard job's output folder: once every shard of the split's plan has its record, the split's
`manifest.json` and `failures.csv` are written from `_state/` (the parts of a partitioned job may have run anywhere).

`_state/job.json` is data like any other file: its counts are bounded (MAX_ROWS rows, shards of at most
MAX_SHARD_SIZE, at most a manifest's MAX_SHARDS shards) and the merge costs what the folder holds: it lists the
records present once, never plans the rows nor walks every planned shard, and refuses a job.json whose plan is
smaller than the records present.
"""

from __future__ import annotations

import io
import math
import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from preprocess.job_state import (
    FAILURE_FIELDS,
    JOB_FILE,
    MAX_ROWS,
    MAX_SHARD_SIZE,
    STATE_DIR,
    JobError,
    clip_totals,
    count_shards,
    identity_fix,
    load_record,
    output_errors,
    read_state,
    record_path,
    shard_rows,
)
from shards.atomic import write_bytes_atomic
from shards.limits import is_count
from shards.manifest import MAX_SHARDS, LogmelStats, Manifest, ShardInfo, check_classes
from shards.schema import FAILURES_NAME, FeatureParams
from shards.text import CsvWriter

_RECORD_NAME_RE = re.compile(r"^shard-([0-9]{6,9})\.json$")


@dataclass(frozen=True)
class Pending:
    """The shards of a split's plan without a usable record: counted and grouped by part, never listed one by one
    (a plan may hold millions of shards where the folder holds a few records)."""

    num_shards: int
    done: np.ndarray  # (D,) int64: the shards with a usable record, each below num_shards

    @property
    def count(self) -> int:
        return self.num_shards - len(self.done)

    def parts(self, num_jobs: int) -> list[int]:
        """The job indices (shard k is part k % num_jobs) whose part holds a shard not done, in order."""
        width = min(num_jobs, self.num_shards)
        planned = self.num_shards // num_jobs + (np.arange(width) < self.num_shards % num_jobs)
        done = np.bincount(self.done % num_jobs, minlength=width)
        return np.flatnonzero(planned > done).tolist()


def merge(out_dir: Path) -> tuple[Manifest | None, Pending]:
    """(the manifest, nothing pending) once every shard of the split's plan has its record, written now; else
    (None, the shards pending). JobError naming `_state/job.json` when its counts are out of bounds or its plan does
    not hold the records present."""
    path = out_dir / STATE_DIR / JOB_FILE
    identity = read_state(path, identity_fix(out_dir))
    if identity is None:
        raise JobError(f"{out_dir}: no {STATE_DIR}/{JOB_FILE}; not the output folder of a shard job")
    num_rows, shard_size, seed = (identity.get(k) for k in ("num_rows", "shard_size", "seed"))
    if not (
        is_count(num_rows, 1, MAX_ROWS) and is_count(shard_size, 1, MAX_SHARD_SIZE) and is_count(seed, 0, math.inf)
    ):
        raise JobError(
            f"{path} is damaged (num_rows, shard_size, seed are not counts in range); {identity_fix(out_dir)}"
        )
    num_shards = count_shards(num_rows, shard_size)
    if num_shards > MAX_SHARDS:
        raise JobError(
            f"{path} is damaged ({num_rows} rows in shards of {shard_size} make {num_shards} shards, more than a "
            f"manifest lists: {MAX_SHARDS}); {identity_fix(out_dir)}"
        )
    present = _record_indices(out_dir)
    if present and present[-1] >= num_shards:
        raise JobError(
            f"{path} is damaged (its plan has {num_shards} shards, but {record_path(out_dir, present[-1]).name} "
            f"records shard {present[-1]}: another job wrote the records); {identity_fix(out_dir)}"
        )
    records = {k: r for k in present if (r := load_record(out_dir, k, shard_rows(num_rows, num_shards, k)))}
    pending = Pending(num_shards, np.fromiter(records, dtype=np.int64, count=len(records)))
    if pending.count:
        return None, pending
    try:
        with output_errors():
            return _finish(out_dir, identity, [records[k] for k in range(num_shards)]), pending
    except (KeyError, TypeError, ValueError) as err:  # fields of job.json that run_job did not compare
        raise JobError(f"{path} is damaged ({type(err).__name__}: {err}); {identity_fix(out_dir)}") from err


def _record_indices(out_dir: Path) -> list[int]:
    """The shard numbers whose record file is in `_state/` (listed once), sorted."""
    try:
        with os.scandir(out_dir / STATE_DIR) as entries:
            found = [(int(m[1]), e.name) for e in entries if (m := _RECORD_NAME_RE.match(e.name))]
    except OSError as err:
        raise JobError(
            f"{out_dir / STATE_DIR}: cannot list it ({err.strerror or err}); fix that and merge again"
        ) from err
    return sorted(k for k, name in found if name == record_path(out_dir, k).name)  # shard-0000001.json is not one


def _write_failures_csv(out_dir: Path, failures: list[dict[str, str]]) -> None:
    buffer = io.StringIO()
    writer = CsvWriter(buffer, lineterminator="\n")
    writer.writerow(FAILURE_FIELDS)
    writer.writerows([failure[name] for name in FAILURE_FIELDS] for failure in failures)
    write_bytes_atomic(out_dir / FAILURES_NAME, buffer.getvalue().encode())


def _finish(out_dir: Path, identity: dict[str, Any], records: list[dict[str, Any]]) -> Manifest:
    """Write the split's manifest and failures.csv from the job's identity and every shard's record."""
    failures = sorted((f for r in records for f in r["failures"]), key=lambda f: f["key"])
    manifest = Manifest(
        dataset=identity["dataset"],
        split=identity["split"],
        features=FeatureParams.from_dict(identity["features"]),
        classes=check_classes(identity["classes"], str(out_dir / STATE_DIR / JOB_FILE)),
        multi_label=identity["multi_label"],
        shards=[ShardInfo(**r["shard"]) for r in records if r["shard"]],
        logmel=sum((LogmelStats.from_dict(r["logmel"]) for r in records), LogmelStats()),
        failures=failures,
        job={k: v for k, v in identity.items() if k != "classes"},
        clips=clip_totals(records),
    )
    _write_failures_csv(out_dir, failures)
    manifest.write(out_dir)
    return manifest
