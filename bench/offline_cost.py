"""The offline stage's cost for a dataset, projected from measured rates (`tools/offline_cost.py`).

A record (docs/offline_cost.json) holds what one run measured on one machine, per stored frame rate: the shard job's
steady-state clips per CPU-second and its start-up's CPU seconds, the bytes a clip writes (its tar members and its
`.idx` lines) and `verify_shards`' bytes/s on one core; with the machine, the date, its load and the command.
`project` turns a record into each dataset's cost under the shard tools' own defaults (shard size from their
options, jobs from the launch files or a plain run): shard-job core-hours (each job's clips at the steady rate, and
its start-up once), verify core-hours, bytes and files written, shards. `measure` makes a record with
`bench.preprocess.frame_rate_costs` (the job on photo-like 10 s clips) and `bench.scale.verify_rate`.
Every shard is assumed full (no clip fails): the cost of the whole split, an upper bound.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import yaml

from preprocess.cli import add_job_arguments, partition
from preprocess.job_state import JOB_FILE, JOB_LOCK, PARTITION_FILE, STATE_DIR, count_shards
from shards.atomic import read_small_file, write_bytes_atomic
from shards.schema import FAILURES_NAME, MANIFEST_NAME, MAX_FRAMES, FeatureParams

RECORD_VERSION = 2  # 1: clips/s per core in wall time, the workers started with torch imported
RECORD_MAX_BYTES = 1 << 20
AUDIOSET_2M_SEGMENTS = 2_041_789  # unbalanced_train_segments.csv
AUDIOSET_EVAL_SEGMENTS = 20_383  # eval_segments.csv
VGGSOUND_SEGMENTS = 200_000  # about: vggsound.csv lists ~200k clips
REPO = Path(__file__).resolve().parents[1]
LAUNCH_FILE = REPO / "tools" / "kubernetes" / "shard_audioset.yaml"  # its completions = the array's --num-jobs
# The files of a finished split besides its shards: written once, whatever its size.
SPLIT_FILES = (MANIFEST_NAME, FAILURES_NAME, f"{STATE_DIR}/{JOB_FILE}", f"{STATE_DIR}/{PARTITION_FILE}",
               f"{STATE_DIR}/{JOB_LOCK}")  # fmt: skip


class RecordError(ValueError):
    """An input of the projection (a record of measured rates, a launch file) that cannot be used; the message
    names the file and what to do."""


@dataclass(frozen=True)
class Rate:
    """What the offline stage costs per clip at one stored frame rate, as measured."""

    fps: float
    clips_per_s_per_core: float  # the shard job once started: clips per CPU-second (`steady_cpu_s_per_clip`)
    job_start_cpu_s: float  # the shard job's start-up, CPU seconds, paid once a job
    tar_bytes_per_clip: float
    idx_bytes_per_clip: float
    verify_bytes_per_s_per_core: float  # verify_shards with JPEG decoding, of tar bytes


@dataclass(frozen=True)
class Record:
    """One measuring run: its rates, and where, when and how it ran."""

    machine: str
    date: str
    command: str
    load_average: tuple[float, float]  # 1-minute load average before and after
    note: str
    rates: tuple[Rate, ...]

    def to_json(self) -> str:
        return json.dumps({"version": RECORD_VERSION, **asdict(self)}, indent=1) + "\n"

    @classmethod
    def from_dict(cls, data: Any, where: str) -> Record:
        """The record `data` holds; RecordError naming `where` when a field is missing or out of range."""
        fix = f"{where}: measure again with tools/offline_cost.py --measure"
        if not isinstance(data, dict) or data.get("version") != RECORD_VERSION:
            raise RecordError(f"{fix} (not a version {RECORD_VERSION} record)")
        texts = {name: data.get(name) for name in ("machine", "date", "command", "note")}
        if not all(isinstance(text, str) for text in texts.values()):
            raise RecordError(f"{fix} (machine, date, command and note must be text)")
        load, rates = data.get("load_average"), data.get("rates")
        if not (isinstance(load, list) and len(load) == 2 and all(_is_number(x, 0.0) for x in load)):
            raise RecordError(f"{fix} (load_average must be two numbers)")
        if not isinstance(rates, list) or not 1 <= len(rates) <= MAX_FRAMES:
            raise RecordError(f"{fix} (rates must list 1..{MAX_FRAMES} frame rates)")
        fields = list(Rate.__dataclass_fields__)
        for rate in rates:
            if not (isinstance(rate, dict) and set(rate) == set(fields) and all(_is_number(rate[f]) for f in fields)):
                raise RecordError(f"{fix} (a rate must hold {', '.join(fields)}, each a positive number)")
        return cls(**texts, load_average=(load[0], load[1]), rates=tuple(Rate(**rate) for rate in rates))


def _is_number(value: Any, floor: float = 1e-12) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool) and floor <= value < 1e15


def load_record(path: Path) -> Record:
    """The record in `path`; RecordError naming the file when it is missing or malformed."""
    try:
        data = json.loads(read_small_file(path, RECORD_MAX_BYTES))
    except (OSError, ValueError) as err:
        raise RecordError(f"cannot read {path} ({err}); measure with tools/offline_cost.py --measure") from None
    return Record.from_dict(data, str(path))


@dataclass(frozen=True)
class Dataset:
    """A split to cost: its rows, and how many jobs shard it."""

    name: str
    segments: int
    num_jobs: int
    approximate: bool = False  # segments is a round figure


def job_defaults() -> tuple[int, int]:
    """(samples per shard, jobs) of a shard tool run with no options: its --shard-size default and a plain run's
    partition."""
    parser = argparse.ArgumentParser()
    add_job_arguments(parser)
    return parser.get_default("shard_size"), partition(None, None, {})[0]


def launch_num_jobs(path: Path = LAUNCH_FILE) -> int:
    """The number of jobs the AudioSet-2M launch files run (the Kubernetes Job's completions)."""
    completions = yaml.safe_load(path.read_text())["spec"]["completions"]
    if not isinstance(completions, int) or completions < 1:
        raise RecordError(f"{path}: spec.completions must be a count of jobs, got {completions!r}")
    return completions


def datasets() -> tuple[Dataset, ...]:
    """AudioSet-2M sharded by the launch files' array; its eval split and VGGSound by one plain run each."""
    plain = job_defaults()[1]
    return (
        Dataset("AudioSet-2M unbalanced", AUDIOSET_2M_SEGMENTS, launch_num_jobs()),
        Dataset("AudioSet eval", AUDIOSET_EVAL_SEGMENTS, plain),
        Dataset("VGGSound", VGGSOUND_SEGMENTS, plain, approximate=True),
    )


def output_files(num_rows: int, shard_size: int, num_jobs: int) -> dict[str, int]:
    """The files a finished split of `num_rows` rows in shards of `shard_size`, made by `num_jobs` jobs, holds, by
    kind: each shard's tar, `.idx` and `_state/` record; the split's own files; one lock per job's part."""
    shards = count_shards(num_rows, shard_size)
    return {"tar": shards, "idx": shards, "record": shards, "split": len(SPLIT_FILES), "part_lock": num_jobs}


def core_hours(clips: float, clips_per_s_per_core: float) -> float:
    """Core-hours to process `clips` at `clips_per_s_per_core`."""
    return clips / clips_per_s_per_core / 3600


@dataclass(frozen=True)
class Cost:
    """The offline stage for one dataset at one frame rate."""

    dataset: Dataset
    fps: float
    shards: int
    files: int
    bytes_written: float  # tars and indexes
    job_core_hours: float
    verify_core_hours: float


def cost(dataset: Dataset, rate: Rate, shard_size: int) -> Cost:
    """What sharding and verifying `dataset` costs at `rate`, in shards of `shard_size`."""
    files = output_files(dataset.segments, shard_size, dataset.num_jobs)
    return Cost(
        dataset=dataset,
        fps=rate.fps,
        shards=files["tar"],
        files=sum(files.values()),
        bytes_written=dataset.segments * (rate.tar_bytes_per_clip + rate.idx_bytes_per_clip),
        job_core_hours=core_hours(dataset.segments, rate.clips_per_s_per_core)
        + dataset.num_jobs * rate.job_start_cpu_s / 3600,
        verify_core_hours=dataset.segments * rate.tar_bytes_per_clip / rate.verify_bytes_per_s_per_core / 3600,
    )


def project(record: Record, splits: tuple[Dataset, ...], shard_size: int) -> list[Cost]:
    """Each split's cost at each of the record's frame rates, split by split."""
    return [cost(split, rate, shard_size) for split in splits for rate in record.rates]


def default_frame_rates() -> tuple[float, ...]:
    """The shard job's default frames per second, and the most its schema stores (25: scenic's checkpoints)."""
    params = FeatureParams()
    return params.frames_per_s, MAX_FRAMES / params.segment_s


def machine() -> str:
    """The CPU, the cores this process may use, the system and Python."""
    cpuinfo = Path("/proc/cpuinfo")
    lines = cpuinfo.read_text().splitlines() if cpuinfo.is_file() else []
    cpu = next((line.split(":", 1)[1].strip() for line in lines if line.startswith("model name")), platform.machine())
    return (
        f"{cpu}, {len(os.sched_getaffinity(0))} cores, {platform.system()} {platform.release()}, "
        f"Python {platform.python_version()}"
    )


def measure(
    data: Path, rates: tuple[float, ...], clips: int, workers: int, repeats: int, verify_clips: int, command: str
) -> Record:
    """A record measured here: at each frame rate, the shard job over `clips` photo-like clips with `workers`
    workers and verify_shards over `verify_clips` clips on one core. The job's rate is its steady state: clips per
    CPU-second of the whole job (its process, its workers, their ffmpeg runs) less its start-up's, which is measured
    apart (the same job over no videos) and recorded, since a job pays it once whatever its size
    (`bench.preprocess.frame_rate_costs`, each job a process of its own, the fastest of `repeats` runs). CPU time,
    not wall time: the cores a job keeps busy, which a machine shared with other jobs inflates far less; a job
    whose cores wait (on storage, or on one last clip) is billed more. RecordError where a rate is not positive
    (too few clips to tell the job from its start-up)."""
    from bench.preprocess import frame_rate_costs

    load_before = os.getloadavg()[0]
    started = time.strftime("%Y-%m-%dT%H:%MZ", time.gmtime())
    jobs = frame_rate_costs(data, list(rates), workers, clips, repeats)
    bad = [job["fps"] for job in jobs if job["cpu_s_per_clip"] <= 0]
    if bad:
        raise RecordError(f"the job's CPU less its start-up is not positive at {bad} frames/s: measure more --clips")
    from bench.scale import verify_rate  # after the jobs, which must fork from a process without torch

    measured = []
    for job in jobs:
        features = FeatureParams(num_frames=job["frames"])
        verify = verify_rate(data / f"verify-{job['frames']}", verify_clips, features)
        measured.append(
            Rate(
                fps=job["fps"],
                clips_per_s_per_core=1 / job["cpu_s_per_clip"],
                job_start_cpu_s=job["start_cpu_s"],
                tar_bytes_per_clip=job["bytes_per_clip"],
                idx_bytes_per_clip=job["idx_bytes_per_clip"],
                verify_bytes_per_s_per_core=verify["bytes_per_s"],
            )
        )
    load = (load_before, os.getloadavg()[0])
    note = (
        f"{clips} clips of 10 s, 480x360 25 fps H.264 + AAC panning over a photograph with film grain "
        f"(bench.photo_clips), {workers} workers, each job a process of its own: its clips per CPU-second less its "
        f"start-up (the same job over no videos), fastest of {repeats}; verify over {verify_clips} photo-like clips "
        f"on one core. The machine is shared with other jobs (1-minute load average {load[0]:.1f} before, "
        f"{load[1]:.1f} after): verify's wall-time rate is lower than an idle core's"
    )
    return Record(machine(), started, command, (round(load[0], 2), round(load[1], 2)), note, tuple(measured))


def write_record(record: Record, path: Path) -> None:
    """`record` as JSON in `path` (its folder made if missing), written atomically."""
    path.parent.mkdir(parents=True, exist_ok=True)
    write_bytes_atomic(path, record.to_json().encode())
