"""The stages of the scale benchmark (`bench.scale`), each run alone in a fresh interpreter by
`python -m bench.scale_stages STAGE FOLDER N`: it imports the stage's modules, reads its RSS, runs the stage on the
synthetic inputs `bench.scale.prepare` wrote, and prints its seconds and memory as the last line (see `main`)."""

from __future__ import annotations

import importlib
import json
import os
import resource
import socket
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np

from bench.scale import (
    BATCH_PER_RANK,
    EVAL_FRACTION,
    JOB_INDEX,
    NUM_CLASSES,
    NUM_JOBS,
    RANKS,
    REPO,
    SHARD_SIZE,
    WORKER_STRIDE,
    WORKERS,
)


def _job_rows(num_rows: int) -> np.ndarray:
    """The split positions of the rows of job JOB_INDEX of NUM_JOBS: those of its shards."""
    from preprocess.job_state import plan_shards

    mine = plan_shards(num_rows, SHARD_SIZE, 0)[JOB_INDEX % NUM_JOBS :: NUM_JOBS]
    return np.concatenate(mine) if mine else np.zeros(0, np.int64)


def _csv_plan(folder: Path, size: int) -> None:
    from preprocess.datasets import audioset_row_parser, read_audioset_classes
    from preprocess.rows import CsvRows

    mids = [mid for mid, _ in read_audioset_classes(folder / "class_labels_indices.csv")]
    rows = CsvRows(folder / "unbalanced_train_segments.csv", audioset_row_parser(mids), skip_comments=True)
    rows.select(_job_rows(rows.num_rows))


def _csv_custom_plan(folder: Path, size: int) -> None:
    from preprocess.custom_csv import CustomCsvRows
    from preprocess.custom_fields import CsvLayout

    rows = CustomCsvRows(folder / "custom.csv", CsvLayout(split="train"))
    rows.select(_job_rows(rows.num_rows))


def _merge(folder: Path, size: int) -> None:
    from preprocess.job_merge import merge

    (folder / "train" / "manifest.json").unlink(missing_ok=True)
    manifest, _ = merge(folder / "train")
    assert manifest is not None and manifest.num_samples == size


def _index(folder: Path, size: int) -> None:
    from pipelines.sources import SplitIndex

    assert len(SplitIndex(folder / "train")) == size


def _worker(folder: Path, size: int) -> dict[str, float]:
    """The private dirty memory (copied pages) of a child forked from the split index, after it reads every
    `WORKER_STRIDE`th sample and collects garbage, above its own right after the fork; its seconds."""
    import gc

    from pipelines.sources import SplitIndex

    index = SplitIndex(folder / "train")
    read_end, write_end = os.pipe()
    if (pid := os.fork()) == 0:
        base_kb = _private_dirty_kb()
        start = time.perf_counter()
        refs = [index.samples[i] for i in range(0, len(index.samples), WORKER_STRIDE)]
        gc.collect()
        result = {"seconds": time.perf_counter() - start, "stage_kb": _private_dirty_kb() - base_kb, "read": len(refs)}
        os.write(write_end, json.dumps(result).encode())
        os._exit(0)
    os.close(write_end)
    with os.fdopen(read_end) as f:
        result = json.loads(f.read())
    os.waitpid(pid, 0)
    return result


def _private_dirty_kb() -> int:
    """This process's private dirty memory in kB (Linux): the pages it wrote, its own or copied from its parent."""
    with open("/proc/self/smaps_rollup") as f:
        return next(int(line.split()[1]) for line in f if line.startswith("Private_Dirty:"))


def _order(folder: Path, size: int) -> None:
    from pipelines.order import eval_range, train_batches, train_order, train_units
    from shards.manifest import load_manifest

    epoch = 3  # a resumed run starts by recomputing its epoch's order
    train_order(size, BATCH_PER_RANK, RANKS - 1, RANKS, 0, epoch)
    np.asarray(eval_range(size, RANKS - 1, RANKS), dtype=np.int64)
    sizes = [s.num_samples for s in load_manifest(folder / "train").shards]
    batches, readers = train_batches(size, BATCH_PER_RANK, RANKS), RANKS * WORKERS
    quotas = [len(range(r % WORKERS, batches, WORKERS)) * BATCH_PER_RANK for r in range(readers)]
    train_units(sizes, quotas, 0, epoch)


def _eval_rank(folder: Path, size: int, rank: int, port: int) -> dict[str, float]:
    """Rank `rank` of 2: its half of N / 100 clips' predictions gathered; rank 0 computes the metrics."""
    import torch.distributed as torch_dist

    from mbt.dist import all_gather_objects
    from mbt.metrics import compute_metrics
    from mbt.sharded_eval import merge_predictions

    clips = max(size // EVAL_FRACTION, 2)
    torch_dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=2)
    torch_dist.barrier()  # timed from here: the rendezvous waits for the other interpreter's start
    start = time.perf_counter()
    rng = np.random.default_rng(rank)
    mine = range(rank * clips // 2, (rank + 1) * clips // 2)
    logits = rng.standard_normal((len(mine), NUM_CLASSES), dtype=np.float32)
    labels = (rng.random((len(mine), NUM_CLASSES)) < 0.01).astype(np.float32)
    labels[:, rank] = 1  # every class has a positive and a negative somewhere
    local = {f"clip{i:08d}": (logits[j], labels[j]) for j, i in enumerate(mine)}
    predictions = merge_predictions(all_gather_objects(local))
    if rank == 0:
        keys = sorted(predictions)
        compute_metrics(np.stack([predictions[k][0] for k in keys]), np.stack([predictions[k][1] for k in keys]), True)
    seconds = time.perf_counter() - start
    torch_dist.destroy_process_group()
    return {"seconds": seconds}


def _eval(folder: Path, size: int) -> dict[str, float]:
    """Two ranks, each a fresh interpreter (as torchrun starts them); the stage's time and memory are the larger
    rank's."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    ranks = [
        subprocess.Popen(
            [sys.executable, "-m", "bench.scale_stages", "eval_rank", str(folder), str(size), str(rank), str(port)],
            env=env,
            stdout=subprocess.PIPE,
            text=True,
        )
        for rank in range(2)
    ]
    results = [json.loads(proc.communicate()[0].strip().splitlines()[-1]) for proc in ranks]
    if any(proc.returncode for proc in ranks):
        raise RuntimeError("an evaluation rank failed")
    # The ranks' own time and memory: their interpreters' start and imports are no part of the stage.
    seconds, stage_kb = max(r["seconds"] for r in results), max(r["peak_kb"] - r["base_kb"] for r in results)
    return {"seconds": seconds, "stage_kb": stage_kb}


STAGE_FUNCTIONS: dict[str, Callable[[Path, int], dict[str, float] | None]] = {
    "csv_plan": _csv_plan,
    "csv_custom_plan": _csv_custom_plan,
    "merge": _merge,
    "index": _index,
    "worker": _worker,
    "order": _order,
    "eval": _eval,
}
# What each stage imports before its memory base is read: the modules' size is no stage's.
STAGE_IMPORTS = {
    "csv_plan": ("preprocess.rows", "preprocess.job_state"),
    "csv_custom_plan": ("preprocess.custom_csv", "preprocess.job_state"),
    "merge": ("preprocess.job_merge",),
    "index": ("pipelines.sources",),
    "worker": ("pipelines.sources",),
    "order": ("pipelines.order", "shards.manifest"),
    "eval": (),
    "eval_rank": ("torch.distributed", "mbt.dist", "mbt.sharded_eval", "mbt.metrics"),
}


def main(argv: list[str]) -> None:
    """Child entry: run one stage, print {"seconds", "base_kb", "peak_kb", ...} as the last line and exit at once
    (the interpreter's teardown would add its own peak to what os.wait4 reports)."""
    stage, folder, size, *rest = argv
    for module in STAGE_IMPORTS[stage]:
        importlib.import_module(module)
    base_kb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    start = time.perf_counter()
    if stage == "eval_rank":
        extra = _eval_rank(Path(folder), int(size), *map(int, rest))
    else:
        extra = STAGE_FUNCTIONS[stage](Path(folder), int(size)) or {}
    seconds = time.perf_counter() - start
    peak_kb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    print(json.dumps({"seconds": seconds, "base_kb": base_kb, "peak_kb": peak_kb, **extra}), flush=True)
    os._exit(0)


if __name__ == "__main__":
    main(sys.argv[1:])
