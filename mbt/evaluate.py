"""`python -m mbt.evaluate`: a trained model evaluated on a split, on one rank or under torchrun, the same numbers
on any world size (`mbt.sharded_eval`).

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
import sys
from collections.abc import Sequence
from pathlib import Path

from mbt.checkpoint import CheckpointFileError, TrainedModel, build_model
from mbt.classes import ClassListError, class_record, record_difference
from mbt.config import INT_LIMITS, PRESETS
from mbt.config_io import ConfigError
from mbt.dist import cleanup, env_main_rank, init_distributed
from mbt.exported import ExportError
from mbt.fits import fits
from mbt.interrupt import SignalStop, raising_signals, stop_line
from mbt.model_source import load_source, resolve_model, run_setting
from mbt.preset_feed import preset_feed
from mbt.results import (
    CONFUSION_FILE,
    CONFUSION_PLOT,
    METRICS_FILE,
    PER_CLASS_AP_FILE,
    PER_CLASS_AP_PLOT,
    PREDICTIONS_FILE,
)
from mbt.scenic import conversion_note
from mbt.sharded_eval import EvaluationError, evaluate_split
from pipelines import LOADERS, LoaderError, open_split
from pipelines.config import records_logmel_norm
from shards.manifest import Manifest

log = logging.getLogger(__name__)


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
    main_rank = env_main_rank()  # one line, not one per rank: every rank fails alike
    try:
        with raising_signals():
            return run(args)
    except (EvaluationError, CheckpointFileError, ExportError, LoaderError, OSError) as err:
        if main_rank:
            print(f"mbt.evaluate: error: {err}", file=sys.stderr)
        return 1
    except SignalStop as stopped:  # the files of --out are each written whole, at the end
        if main_rank:
            print(
                f"mbt.evaluate: {stop_line(stopped.signum, 'before the end', 'rerun the same command')}",
                file=sys.stderr,
            )
        return stopped.exit_status
    finally:
        cleanup()


if __name__ == "__main__":
    sys.exit(main())
