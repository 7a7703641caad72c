"""The scale benchmark (`tools/bench_scale.py`): every stage whose cost grows with the split, timed and measured at
several split sizes on synthetic metadata and tiny synthetic samples (nothing is decoded), with its growth exponent.

Each stage runs in a fresh interpreter (`python -m bench.scale_stages STAGE FOLDER N`) so that its peak memory is its
own: the parent reads the child's peak RSS from os.wait4, and the stage's memory is that peak minus the RSS it had
after its imports (printed by the child). Stages, at a split of N clips in shards of 512:
- `csv_plan`: job 5 of 1,000 plans its part of an N-row AudioSet segment CSV (rows counted, its rows parsed);
- `csv_custom_plan`: the same over an N-row CSV of a collection's own (`tools/shard_csv.py`; its train split, four
  rows in five: the plan's pass over every row, then the job's rows parsed);
- `merge`: the manifest merged from the records of N / 512 shards written by 1,000 parts;
- `index`: the loaders' split index (`pipelines.sources.SplitIndex`: the manifest and every `.idx` file);
- `worker`: a loader worker forked from that index reads every 1000th sample's offsets, then collects garbage as a
  worker's allocations eventually make it: the index pages it copies (its private dirty memory, not its peak RSS);
- `order`: one loader worker's sample order for 64 ranks x 8 workers in a resumed epoch (indexed and streamed);
- `eval`: evaluation's gather (gloo, 2 processes) and metrics over N / 100 clips x 527 classes (20k at 2M).
`verify_rate` measures `verify_shards`' bytes per second on photo-like shards, extrapolated to hours per TB.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

if TYPE_CHECKING:
    from shards.schema import FeatureParams

SIZES = (10_000, 100_000, 1_000_000, 2_000_000)
STAGES = ("csv_plan", "csv_custom_plan", "merge", "index", "worker", "order", "eval")
NUM_JOBS, JOB_INDEX, SHARD_SIZE = 1000, 5, 512
RANKS, WORKERS, BATCH_PER_RANK = 64, 8, 8
WORKER_STRIDE = 1000  # the worker stage reads every 1000th sample
EVAL_FRACTION, NUM_CLASSES = 100, 527  # AudioSet: 20k eval clips for 2M train clips
REPO = Path(__file__).resolve().parents[1]


@dataclass(frozen=True)
class StageRun:
    """One stage at one size: wall seconds of the stage alone, and its memory above its imports."""

    stage: str
    size: int
    seconds: float
    peak_mb: float
    stage_mb: float


def prepare(folder: Path, size: int, stages: tuple[str, ...] = STAGES, num_frames: int = 1) -> None:
    """The inputs of `stages` at `size` under `folder`: a segment CSV, a collection's CSV, a finished job's output
    folder (samples of `num_frames` frames)."""
    from bench.scale_data import write_class_csv, write_custom_csv, write_job_folder, write_segments_csv

    folder.mkdir(parents=True, exist_ok=True)
    if "csv_plan" in stages:
        write_class_csv(folder / "class_labels_indices.csv")
        write_segments_csv(folder / "unbalanced_train_segments.csv", size)
    if "csv_custom_plan" in stages:
        write_custom_csv(folder / "custom.csv", size)
    if {"merge", "index", "worker", "order"} & set(stages):
        write_job_folder(folder / "train", size, SHARD_SIZE, NUM_JOBS, num_frames)
        if "merge" not in stages:  # the others read the manifest
            from preprocess.job_merge import merge

            merge(folder / "train")


def measure(stage: str, folder: Path, size: int) -> StageRun:
    """Run `stage` on `folder` in a fresh interpreter; its time and memory (see the module doc)."""
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    command = [sys.executable, "-m", "bench.scale_stages", stage, str(folder), str(size)]
    proc = subprocess.Popen(command, env=env, stdout=subprocess.PIPE, text=True)
    out = proc.stdout.read() if proc.stdout else ""
    _, status, usage = os.wait4(proc.pid, 0)
    proc.returncode = os.waitstatus_to_exitcode(status)
    if proc.returncode:
        raise RuntimeError(f"stage {stage} at {size} failed (exit {proc.returncode}): {out[-2000:]}")
    result = json.loads(out.strip().splitlines()[-1])
    peak_mb = usage.ru_maxrss / 1024
    stage_kb = result.get("stage_kb", usage.ru_maxrss - result["base_kb"])
    return StageRun(stage, size, result["seconds"], peak_mb, max(stage_kb / 1024, 0.0))


def growth_exponent(sizes: list[int], values: list[float]) -> float:
    """The least-squares slope of log(value) against log(size): 1 is linear growth. Values are floored at 1e-3 so
    that a stage that costs nothing at small sizes does not read as steep."""
    return float(np.polyfit(np.log(sizes), np.log(np.maximum(values, 1e-3)), 1)[0])


def verify_rate(folder: Path, clips: int = 48, features: FeatureParams | None = None) -> dict[str, float]:
    """`verify_split` (with JPEG decoding, one worker) over `clips` photo-like clips of `features` (default: the
    shard job's): bytes per second and the hours one core takes per TB."""
    from bench.photo_split import write_photo_split
    from preprocess.verify import verify_split

    split = write_photo_split(folder / "verify", clips, features, shard_size=16)
    start = time.perf_counter()
    report = verify_split(split, decode_jpeg=True, workers=1)
    seconds = time.perf_counter() - start
    if report.errors:
        raise RuntimeError(f"verify_shards found errors in the synthetic split: {report.errors[:3]}")
    rate = report.num_bytes / seconds
    return {"bytes_per_s": rate, "core_hours_per_tb": 1e12 / rate / 3600, "mb_per_clip": report.num_bytes / clips / 1e6}


def exponents(runs: list[StageRun]) -> dict[str, tuple[float, float]]:
    """(time exponent, memory exponent) per stage over the sizes measured."""
    found = {}
    for stage in dict.fromkeys(r.stage for r in runs):
        mine = [r for r in runs if r.stage == stage]
        sizes = [r.size for r in mine]
        if len(sizes) > 1:
            found[stage] = (
                growth_exponent(sizes, [r.seconds for r in mine]),
                growth_exponent(sizes, [max(r.stage_mb, 1.0) for r in mine]),
            )
    return found


def plot(runs: list[StageRun], path: Path) -> Path:
    """Time and stage memory against split size, log-log, one line per stage."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(11, 4.2))
    for stage in dict.fromkeys(r.stage for r in runs):
        mine = [r for r in runs if r.stage == stage]
        axes[0].plot([r.size for r in mine], [r.seconds for r in mine], "o-", label=stage)
        axes[1].plot([r.size for r in mine], [max(r.stage_mb, 1.0) for r in mine], "o-", label=stage)
    for ax, ylabel in zip(axes, ("seconds", "MB above the stage's imports"), strict=True):
        ax.set_xscale("log")
        ax.set_yscale("log")
        ax.set_xlabel("clips in the split")
        ax.set_ylabel(ylabel)
        ax.grid(True, which="both", alpha=0.3)
    axes[0].legend()
    fig.suptitle("Stages that grow with the split (tools/bench_scale.py)")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def fmt_size(size: int) -> str:
    """10000 -> 10k, 2000000 -> 2M."""
    if size >= 1_000_000 and size % 1_000_000 == 0:
        return f"{size // 1_000_000}M"
    return f"{size // 1000}k" if size >= 1000 and size % 1000 == 0 else str(size)
