"""Sharded evaluation whose numbers do not depend on world size, batch size or loader workers.

Each rank runs the evaluation batches the loader gives it (every (sample, clip) pair exactly once across ranks),
keeps each row's logits in float32 on the CPU and averages the `num_test_clips` rows of a sample in clip order, so
a sample's prediction is the same however its rows were batched. Rank 0 gathers the per-sample predictions, sorts
them by clip id, computes the metrics and writes them.

    python -m mbt.evaluate --model runs/demo/bottleneck --out runs/demo/eval-again
    torchrun --nproc_per_node=8 -m mbt.evaluate --model last.pt --shards data/shards/audioset/eval --out runs/eval

`--model` takes a training checkpoint, a run folder (its latest checkpoint) or an export (`mbt.model_source`), and a
line says which it found; without `--shards` the split is the evaluation split the run's config.yaml names.

writes `metrics.json` (`num_samples` and `mAP`, `mAUC`, `d_prime`, or `top1`, `top5` above 5 classes),
`predictions.npz` (`keys`, `logits`, `labels`, sorted by key) and, for multi-label splits, `per_class_ap.csv` (index,
name, AP per class) with `per_class_ap.png` (the best and worst classes), for single-label splits `confusion.csv`
(the most-confused class pairs) and `confusion.png` (the confusion matrix). `--embeddings FILE.npz` also writes each
sample's clip-averaged embeddings (`mbt.embeddings`: each tower's pooled features, the bottleneck tokens), computed
on every rank, gathered by key.
The log-mels are normalized with the model's statistics, those of its training split that the checkpoint's config
records (older checkpoints without them: the evaluated split's own, and a warning). The clips are those the
checkpoint's config records, or with `--preset NAME` that preset's (its clip sampling, audio padding, test clips and,
where it fixes them, log-mel statistics: `--preset scenic_as` for a converted scenic checkpoint). The checkpoint
must record the classes of the split (older checkpoints without a record: a warning), and no sample's logits may
be NaN or infinite; what cannot be evaluated is printed as one `error: ...` line.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
from collections.abc import Iterable, Iterator, Sequence, Sized
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn
from torch.nn.parallel import DistributedDataParallel

from mbt.checkpoint import CheckpointFileError, TrainedModel, build_model
from mbt.classes import ClassListError, class_record, record_difference
from mbt.config import INT_LIMITS, PRESETS
from mbt.config_io import ConfigError
from mbt.dist import DistInfo, all_gather_objects, cleanup, init_distributed, on_main_rank
from mbt.embeddings import Embedding, forward_with_embeddings, mean_embedding, rows_as_numpy, write_embeddings
from mbt.exported import ExportError
from mbt.fits import fits
from mbt.metrics import average_precision_per_class, compute_metrics
from mbt.model_source import load_source, resolve_model, run_setting
from mbt.preset_feed import preset_feed
from mbt.results import (
    CONFUSION_FILE,
    CONFUSION_PLOT,
    METRICS_FILE,
    PER_CLASS_AP_FILE,
    PER_CLASS_AP_PLOT,
    PREDICTIONS_FILE,
    write_results,
)
from mbt.scenic import conversion_note
from pipelines import LOADERS, LoaderError, Split, build_loader, open_split
from pipelines.config import AugmentConfig, records_logmel_norm
from shards.manifest import Manifest
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


# The command line: a model alone, as a user would evaluate it after training.


def check_inputs(trained: TrainedModel, manifest: Manifest, shards: str | Path, checkpoint: str | Path) -> None:
    """Raise if the split's classes or inputs do not fit the model of the checkpoint `trained` (`mbt.fits.fits`, the
    check training makes); warn when the checkpoint records no classes to compare, or no log-mel normalization (then
    the split's own statistics normalize it)."""
    try:
        record = class_record(manifest, str(shards))
    except ClassListError as err:
        raise EvaluationError(str(err)) from None
    problems = []
    if "audio" in trained.model.modalities and not records_logmel_norm(trained.augment):
        log.warning(
            "warning: %s records no log-mel normalization (an older checkpoint): %s is normalized with its own "
            "manifest's statistics, not the training split's",
            checkpoint, shards,
        )  # fmt: skip
    if trained.classes is None:
        log.warning(
            "warning: %s records no class list (an older checkpoint): only the number of classes of %s is checked",
            checkpoint, shards,
        )  # fmt: skip
    elif difference := record_difference(trained.classes, record, f"the checkpoint {checkpoint}", str(shards)):
        problems.append(f"the split's classes are not the model's: {difference}")
    problems += fits(trained.model, trained.augment, manifest, f"the shards in {shards}")
    if problems:
        raise EvaluationError(
            f"{shards} does not fit the checkpoint (trained with the settings named): " + "; ".join(problems)
        )


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m mbt.evaluate", description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--model", "--checkpoint", dest="model", type=Path, required=True,
        help="a training checkpoint (.pt), a run folder (its latest checkpoint) or an export folder",
    )  # fmt: skip
    parser.add_argument(
        "--shards",
        help="the split: its folder, shard files or a brace pattern of them, file: or pipe: URLs (streamed); "
        "default: the eval_shards of the run's config.yaml",
    )
    parser.add_argument("--out", type=Path, required=True, help="folder for metrics.json and predictions.npz")
    parser.add_argument("--loader", choices=LOADERS, default="auto", help="auto (default): DALI on CUDA when installed")
    parser.add_argument(
        "--batch-size",
        type=int,
        default=8,
        help="samples per batch and rank (x num_test_clips rows; default %(default)s)",
    )
    parser.add_argument(
        "--num-workers", type=int, default=2, help="loader workers (DALI: threads) per rank (default %(default)s)"
    )
    parser.add_argument("--bf16", action="store_true", help="bf16 autocast on CUDA")
    parser.add_argument("--embeddings", type=Path, help="also write each sample's embeddings to this .npz")
    parser.add_argument(
        "--preset", choices=PRESETS,
        help="feed the model as this preset does (clip sampling, audio, test clips; scenic_as: a converted scenic "
        "checkpoint) instead of with the settings the checkpoint records",
    )  # fmt: skip
    args = parser.parse_args(argv)
    for flag, key in (("batch-size", "eval_batch_size"), ("num-workers", "num_workers")):
        least, most, what = INT_LIMITS[key]
        if not least <= getattr(args, flag.replace("-", "_")) <= most:
            parser.error(f"--{flag} must be in {least}..{most} ({what})")
    return args


def run(args: argparse.Namespace) -> int:
    """Check the model against the shards, then evaluate on this rank and (rank 0) report."""
    source = resolve_model(args.model)
    trained = load_source(source)
    if note := conversion_note(trained.converted_from, trained.model):
        log.warning("note: %s: %s", source.path, note)
    if args.preset:
        try:
            augment = preset_feed(args.preset, trained.model, trained.augment, str(source.path))
        except ConfigError as err:
            raise EvaluationError(str(err)) from None
        trained = trained._replace(augment=augment)
    augment = trained.augment
    if args.shards is None:
        args.shards = run_setting(source, "eval_shards", "--shards")
    split = open_split(args.shards)
    manifest = split.manifest
    check_inputs(trained, manifest, args.shards, source.path)
    model = build_model(trained, source.path)
    info = init_distributed()
    if info.is_main:
        print(source.describe(trained.step), flush=True)
    model.to(info.device)
    metrics = evaluate_split(
        model, split, info, augment, str(args.shards), args.out, args.bf16, True, args.embeddings,
        batch_size=args.batch_size, loader=args.loader, num_workers=args.num_workers,
    )  # fmt: skip
    if metrics is not None:
        summary = " ".join(f"{name}={value:.4f}" for name, value in metrics.items() if name != "num_samples")
        print(
            f"evaluated {metrics['num_samples']} samples x {augment.num_test_clips} clips of {args.shards} "
            f"on {info.world_size} process(es): {summary}"
        )
        extra = [PER_CLASS_AP_FILE, PER_CLASS_AP_PLOT] if manifest.multi_label else [CONFUSION_FILE, CONFUSION_PLOT]
        written = [str(args.out / name) for name in [METRICS_FILE, PREDICTIONS_FILE, *extra]]
        print("wrote " + ", ".join(written + ([str(args.embeddings)] if args.embeddings else [])))
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        return run(args)
    except (EvaluationError, CheckpointFileError, ExportError, LoaderError, OSError) as err:
        if int(os.environ.get("RANK", "0")) == 0:  # one line, not one per rank: every rank fails alike
            print(f"mbt.evaluate: error: {err}", file=sys.stderr)
        return 1
    finally:
        cleanup()


if __name__ == "__main__":
    sys.exit(main())
