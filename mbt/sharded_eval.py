"""Sharded evaluation whose numbers do not depend on world size, batch size or loader workers.

Each rank runs the evaluation batches the loader gives it (every (sample, clip) pair exactly once across ranks),
keeps each row's logits in float32 on the CPU and averages the `num_test_clips` rows of a sample in clip order, so
a sample's prediction is the same however its rows were batched. Rank 0 gathers the per-sample predictions, sorts
them by clip id, computes the metrics and writes them (`mbt.results`). Training's evaluations and the command line
`python -m mbt.evaluate` (`mbt.evaluate`) both run it.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable, Iterator, Sequence, Sized
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn
from torch.nn.parallel import DistributedDataParallel

from mbt.classes import class_record
from mbt.dist import DistInfo, all_gather_objects, on_main_rank
from mbt.embeddings import Embedding, forward_with_embeddings, mean_embedding, rows_as_numpy, write_embeddings
from mbt.metrics import average_precision_per_class, compute_metrics
from mbt.results import (
    write_results,
)
from pipelines import Split, build_loader
from pipelines.config import AugmentConfig
from shards.progress import Progress

Predictions = dict[str, tuple[np.ndarray, np.ndarray]]  # key → (clip-averaged logits (C,), label (C,) or ())
MAX_KEYS_SHOWN = 5
PROGRESS_LINES = 10  # plain progress lines of an evaluation whose output is not a terminal

log = logging.getLogger(__name__)


class EvaluationError(RuntimeError):
    """The checkpoint or the shards cannot be evaluated as asked; the message says what to change."""


def _counted(batches: Iterable[dict[str, Any]], progress: Progress) -> Iterator[dict[str, Any]]:
    """`batches`, each counted by `progress` once it is done."""
    for batch in batches:
        yield batch
        progress.update()


def _rank_predictions(
    model: nn.Module,
    batches: Iterable[dict[str, Any]],
    device: torch.device,
    num_classes: int,
    amp_bf16: bool,
    embed: bool = False,
) -> tuple[Predictions, dict[str, Embedding]]:
    """This rank's clip-averaged predictions (and with `embed`, embeddings). Rows are kept per (key, clip_index) and
    averaged in clip order."""
    clip_logits: dict[str, dict[int, np.ndarray]] = {}
    clip_embeddings: dict[str, dict[int, Embedding]] = {}
    labels: dict[str, np.ndarray] = {}
    autocast = torch.autocast("cuda", dtype=torch.bfloat16, enabled=amp_bf16 and device.type == "cuda")
    with torch.no_grad():
        for batch in batches:
            video = batch["video"].to(device, non_blocking=True)
            audio = batch["audio"].to(device, non_blocking=True)
            with autocast:
                logits, features = forward_with_embeddings(model, video, audio) if embed else (model(video, audio), {})
            embedded = rows_as_numpy(features)
            if logits.shape[1] != num_classes:
                raise EvaluationError(f"the model gives {logits.shape[1]} logits, the data has {num_classes} classes")
            rows = logits.float().cpu().numpy()
            batch_labels = batch["labels"].cpu().numpy()
            for i, (key, clip) in enumerate(zip(batch["key"], batch["clip_index"].tolist(), strict=True)):
                clips = clip_logits.setdefault(key, {})
                if clip in clips:
                    raise EvaluationError(f"{key}: clip {clip} was given twice on one rank (loader contract broken)")
                clips[clip] = rows[i]
                labels.setdefault(key, batch_labels[i])
                if embed:
                    clip_embeddings.setdefault(key, {})[clip] = embedded[i]
    predictions = {
        key: (np.stack([clips[c] for c in sorted(clips)]).mean(axis=0), labels[key])
        for key, clips in clip_logits.items()
    }
    return predictions, {key: mean_embedding([e[c] for c in sorted(e)]) for key, e in clip_embeddings.items()}


def merge_predictions(parts: Sequence[Predictions]) -> Predictions:
    """One dict of the ranks' predictions; raises if a key was evaluated by more than one rank."""
    merged: Predictions = {}
    owner: dict[str, int] = {}
    for rank, part in enumerate(parts):
        for key, prediction in part.items():
            if key in owner:
                raise EvaluationError(f"{key} was evaluated by ranks {owner[key]} and {rank} (loader contract broken)")
            merged[key], owner[key] = prediction, rank
    return merged


def evaluate(
    model: nn.Module,
    loader: Iterable[dict[str, Any]],
    dist: DistInfo,
    multi_label: bool,
    num_classes: int,
    out_dir: Path | None = None,
    amp_bf16: bool = False,
    class_names: Sequence[str] | None = None,
    progress: bool = False,
    embeddings_path: Path | None = None,
) -> dict[str, Any] | None:
    """Evaluate `model` on this rank's part of `loader` (batches with rows = samples x num_test_clips) and gather.

    Every rank must call this (it gathers). The model runs in eval mode under no_grad (bf16 autocast on CUDA when
    `amp_bf16`) and its training mode is restored after; a DDP wrapper is unwrapped, since ranks run different
    numbers of batches. On rank 0: the metrics (`mbt.metrics.compute_metrics`), written with the predictions under
    `out_dir` if given (`class_names` label the per-class AP rows) and the embeddings to `embeddings_path` if given;
    None on the other ranks. What fails there (logits, a full disk) is raised on every rank.
    With `progress`, rank 0 shows the batches done (`shards.progress`: a bar on a terminal, else a plain line every
    tenth of them or 30 s).
    """
    module = model.module if isinstance(model, DistributedDataParallel) else model
    was_training = module.training
    total = len(loader) if isinstance(loader, Sized) else None
    every_n = -(-total // PROGRESS_LINES) if total else 0  # about PROGRESS_LINES lines, and one at least every 30 s
    shown = Progress(total, "evaluate", "batch", enabled=progress and dist.is_main, every_n=every_n, every_s=30)
    module.eval()
    try:
        local, local_embeddings = _rank_predictions(
            module, _counted(loader, shown), dist.device, num_classes, amp_bf16, embeddings_path is not None
        )
    finally:
        shown.close()
        module.train(was_training)
    predictions = merge_predictions(all_gather_objects(local))
    embeddings = {}
    if embeddings_path is not None:
        for part in all_gather_objects(local_embeddings):
            embeddings.update(part)

    def report() -> dict[str, Any]:  # rank 0
        if not predictions:
            raise EvaluationError("the loader gave no samples on any rank")
        keys = sorted(predictions)
        logits = np.stack([predictions[k][0] for k in keys])
        labels = np.stack([predictions[k][1] for k in keys])
        check_predictions(keys, logits, labels, multi_label)
        metrics = compute_metrics(logits, labels, multi_label)
        if out_dir is not None:
            per_class_ap = average_precision_per_class(logits, labels) if multi_label else None
            write_results(Path(out_dir), metrics, keys, logits, labels, per_class_ap, class_names)
        if embeddings_path is not None:
            write_embeddings(Path(embeddings_path), keys, [embeddings[k] for k in keys])
        return metrics

    return on_main_rank(report)


def evaluate_split(
    model: nn.Module,
    split: Split,
    dist: DistInfo,
    augment: AugmentConfig,
    where: str,
    out_dir: Path | None = None,
    amp_bf16: bool = False,
    progress: bool = False,
    embeddings_path: Path | None = None,
    **loader_options: Any,
) -> dict[str, Any] | None:
    """`evaluate` on every sample of `split` (named `where` in errors), read by its evaluation loader for this rank
    (`loader_options`: batch_size, loader, num_workers, device), the rows of the per-class AP named by its classes."""
    manifest = split.manifest
    batches = build_loader(
        split, train=False, rank=dist.rank, world_size=dist.world_size, augment=augment, **loader_options
    )
    names = [c["name"] for c in class_record(manifest, where)["classes"]]
    return evaluate(
        model, batches, dist, manifest.multi_label, manifest.num_classes, out_dir, amp_bf16, names, progress,
        embeddings_path,
    )  # fmt: skip


def check_predictions(keys: Sequence[str], logits: np.ndarray, labels: np.ndarray, multi_label: bool) -> None:
    """Raise EvaluationError naming the first keys whose logits (N, C) are NaN or infinite, or whose labels are
    not class indices in [0, C) (single-label) or 0/1 rows of C (multi-label)."""
    num_classes = logits.shape[1]
    bad = ~np.isfinite(logits).all(axis=1)
    if bad.any():
        raise EvaluationError(
            f"the model gave NaN or infinite logits for {int(bad.sum())} of {len(keys)} samples "
            f"({_first_keys(keys, bad)}): the weights or these samples' inputs are not finite; check the checkpoint "
            "and run tools/verify_shards.py on the split"
        )
    if multi_label:
        bad = ~np.isin(labels, (0, 1)).all(axis=1) if labels.ndim == 2 and labels.shape[1] == num_classes else None
    else:
        bad = ((labels < 0) | (labels >= num_classes)) if labels.ndim == 1 else None
    if bad is None:
        raise EvaluationError(f"the labels have shape {labels.shape}, not that of {num_classes} classes")
    if bad.any():
        raise EvaluationError(
            f"{int(bad.sum())} samples have labels outside the split's {num_classes} classes "
            f"({_first_keys(keys, bad)}); run tools/verify_shards.py on the split"
        )


def _first_keys(keys: Sequence[str], bad: np.ndarray) -> str:
    shown = [keys[i] for i in np.flatnonzero(bad)[:MAX_KEYS_SHOWN]]
    return ", ".join(shown) + (", ..." if bad.sum() > MAX_KEYS_SHOWN else "")
