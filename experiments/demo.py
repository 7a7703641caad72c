"""The demo's last step (`make demo`): train the demo MBT as bottleneck fusion, vanilla cross-attention, late fusion,
audio only and video only on the same budget, evaluate each on the held-out split, and print what was measured.

The demo labels are split by what reveals them (`experiments.demo_data`): background colour and the moving box can
only be seen; pitch, beeping and noise only heard; the cross-modal labels say whether a seen and a heard attribute
agree, which neither modality alone nor a sum of the towers' logits (late fusion) can predict. The table gives the
mean AP over the single-modality and over the cross-modal classes next to the overall mAP, with each variant's
forward GFLOPs per clip (`mbt.flops`) and training time. `runs/demo/summary.json` holds the rows (and, with
`--seeds N`, the mean and spread over the seeds); each run folder holds its own row as `summary.json`.

    python -m experiments.demo                                          # the five variants, seed 0
    python -m experiments.demo --seeds 3 --variants bottleneck,late     # mean ± spread over seeds 0, 1, 2
"""

from __future__ import annotations

import argparse
import csv
import json
import shutil
import statistics
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from experiments.demo_data import DEMO_CLASSES
from experiments.parallel import Run, RunFailedError, run_all
from mbt.config import ConfigError, TrainConfig, preset
from mbt.dist import DistInfo
from mbt.flops import count_flops
from mbt.interrupt import Interrupted, SignalStop, raising_signals, stop_line
from mbt.sharded_eval import EvaluationError
from mbt.train import EXPECTED_ERRORS, prepare_run, train
from shards.atomic import write_bytes_atomic
from shards.layout import RAW_ROOT, SHARDS_ROOT

VARIANTS = {
    "bottleneck": "MBT, bottleneck fusion",
    "cross": "vanilla cross-attention",
    "late": "late fusion",
    "audio": "audio only",
    "video": "video only",
}
# The numbers of a row that are averaged over seeds.
METRICS = ("mAP", "ap_single", "ap_cross", "ap_visual", "ap_audible", "forward_gflops", "train_s")
SUMMARY = "summary.json"


def group_ap(per_class_csv: Path) -> dict[str, float]:
    """Mean AP of the visual, audible, single-modality (both) and cross-modal demo classes, from an evaluation's
    per_class_ap.csv; EvaluationError naming the file when it does not hold an AP for each demo class."""
    try:
        with open(per_class_csv, newline="") as f:
            ap = {int(row["class_index"]): float(row["ap"]) for row in csv.DictReader(f)}
    except (KeyError, TypeError, ValueError) as err:
        raise EvaluationError(
            f"{per_class_csv}: not a per-class AP table ({err!r:.100}); evaluate the run again"
        ) from None
    if missing := [c.index for c in DEMO_CLASSES if c.index not in ap]:
        raise EvaluationError(f"{per_class_csv}: no AP of classes {missing}; evaluate the run again")

    def mean(modalities: tuple[str, ...]) -> float:
        return float(np.nanmean([ap[c.index] for c in DEMO_CLASSES if c.modality in modalities]))

    return {
        "ap_visual": mean(("visual",)),
        "ap_audible": mean(("audible",)),
        "ap_single": mean(("visual", "audible")),
        "ap_cross": mean(("cross",)),
    }


def variant_config(base: TrainConfig, shards: Path, run_dir: Path, seed: int, **model: Any) -> TrainConfig:
    """`base` (the demo preset) on `shards`/{train,eval}, writing to `run_dir`, with `seed` and the model changes
    `model` (`fusion`, `fusion_layer`, `num_bottlenecks`, ...)."""
    return base.replace(
        model=base.model.replace(**model),
        train_shards=str(shards / "train"),
        eval_shards=str(shards / "eval"),
        out_dir=str(run_dir),
        seed=seed,
    )


def _fresh_run_dir(run_dir: Path) -> None:
    """Remove an earlier run of the demo in `run_dir` (a folder with config.yaml), so that every row is timed on a
    whole training; refuse a folder that is not a run's."""
    if run_dir.exists() and any(run_dir.iterdir()):
        if not (run_dir / "config.yaml").is_file():
            raise ConfigError(f"{run_dir} exists and is not a run folder (no config.yaml): give another --out")
        shutil.rmtree(run_dir)


def run_variant(cfg: TrainConfig, dist: DistInfo, name: str) -> dict[str, Any]:
    """Train and evaluate `cfg` from scratch in its run folder; its result row (also written there as
    summary.json): metrics, group APs, forward GFLOPs and parameters per clip, wall time of training + evaluation."""
    run_dir = Path(cfg.out_dir)
    cfg, splits = prepare_run(cfg, dist.world_size)
    _fresh_run_dir(run_dir)
    start = time.perf_counter()
    metrics = train(cfg, dist, splits)
    train_s = time.perf_counter() - start
    flops = count_flops(cfg.model)
    model = cfg.model
    row = {
        "variant": name,
        "fusion": model.fusion,
        "fusion_layer": model.fusion_layer,
        "num_bottlenecks": model.num_bottlenecks if model.fusion == "bottleneck" else 0,
        "seed": cfg.seed,
        "mAP": metrics["mAP"],
        **group_ap(run_dir / "eval" / "per_class_ap.csv"),
        "forward_gflops": flops["forward_gflops"],
        "params_m": flops["params_m"],
        "train_s": train_s,
        "num_eval_clips": metrics["num_samples"],
        "run_dir": str(run_dir),
    }
    write_bytes_atomic(run_dir / SUMMARY, (json.dumps(row, indent=1) + "\n").encode())
    return row


def run_demo(
    shards: Path,
    out: Path,
    variants: Sequence[str],
    seeds: int = 1,
    base: TrainConfig | None = None,
    jobs: int = 1,
) -> list[dict[str, Any]]:
    """Train and evaluate each of `variants` (keys of VARIANTS) for seeds 0..seeds-1 under `out` (`out/<variant>`,
    or `out/<variant>-seed<k>` with several seeds) on the budget of `base` (default: the demo preset), `jobs` at a
    time (`experiments.parallel`); one row each (`run_variant`), in that order."""
    base = base or preset("demo")
    runs = []
    for seed in range(seeds):
        for fusion in variants:
            run_dir = out / (fusion if seeds == 1 else f"{fusion}-seed{seed}")
            cfg = variant_config(base, shards, run_dir, seed, fusion=fusion)
            title = f"{VARIANTS[fusion]}, seed {seed}: {cfg.epochs} epochs of batch {cfg.batch_size}"
            runs.append(Run(fusion, title, cfg))
    rows: dict[int, dict[str, Any]] = dict(run_all(runs, jobs, run_variant))
    return [rows[index] for index in range(len(runs))]


def show_results(run_dir: Path, videos: Path) -> list[str]:
    """Lines saying where the evaluation files of `run_dir` are, and what it predicts (tools/predict.py's code) for
    the first held-out video found in `videos` next to the labels its CSV gives; the command that does the same."""
    from mbt.results import METRICS_FILE, PER_CLASS_AP_FILE, PER_CLASS_AP_PLOT, PREDICTIONS_FILE
    from serve.load import from_checkpoint  # the data packages only when asked
    from serve.outputs import top_lines
    from serve.predict import Predictor
    from serve.segments import Segment

    files = ", ".join(f for f in (METRICS_FILE, PER_CLASS_AP_FILE, PER_CLASS_AP_PLOT, PREDICTIONS_FILE))
    lines = [f"evaluation files of {run_dir.name}: {run_dir / 'eval'}/{{{files}}}"]
    with np.load(run_dir / "eval" / PREDICTIONS_FILE) as npz:
        keys, labels = [str(k) for k in npz["keys"]], npz["labels"]
    found = [(i, videos / f"{key.rsplit('_', 1)[0]}.mp4") for i, key in enumerate(keys)]
    found = [(i, video) for i, video in found if video.is_file()]
    if not found:
        return lines
    index, video = found[0]
    model, prep = from_checkpoint(run_dir)
    prediction = Predictor(model, prep).predict(Segment(video, str(video)))
    given = [prep.class_names[c] for c in np.flatnonzero(labels[index])]
    lines += [
        f"$ .venv/bin/python tools/predict.py --model {run_dir} {video}",
        *top_lines(prediction, 5),
    ]
    return [*lines, f"  (its CSV labels: {', '.join(given)})"]


def aggregate(rows: Sequence[dict[str, Any]]) -> list[dict[str, Any]]:
    """Per variant (in order of first appearance): the mean, sample standard deviation ("_std", 0 for one seed),
    min and max of each of METRICS over its rows, and how many seeds."""
    names = list(dict.fromkeys(r["variant"] for r in rows))
    summary = []
    for name in names:
        own = [r for r in rows if r["variant"] == name]
        entry: dict[str, Any] = {"variant": name, "seeds": [r["seed"] for r in own]}
        for key in METRICS:
            values = [float(r[key]) for r in own]
            entry[key] = statistics.fmean(values)
            entry[f"{key}_std"] = statistics.stdev(values) if len(values) > 1 else 0.0
            entry[f"{key}_min"], entry[f"{key}_max"] = min(values), max(values)
        summary.append(entry)
    return summary


def format_table(summary: Sequence[dict[str, Any]]) -> str:
    """The table of `aggregate`'s entries; with several seeds each AP as mean ± standard deviation."""
    spread = any(len(s["seeds"]) > 1 for s in summary)
    width = 15 if spread else 9
    header = (
        f"{'variant':<24} {'mAP':>{width}} {'AP single':>{width}} {'AP cross':>{width}} {'GFLOPs':>7} {'train s':>8}"
    )
    lines = [header, "-" * len(header)]
    for s in summary:
        cells = [
            f"{s[k]:.3f} ± {s[k + '_std']:.3f}" if spread else f"{s[k]:.3f}" for k in ("mAP", "ap_single", "ap_cross")
        ]
        lines.append(
            f"{VARIANTS.get(s['variant'], s['variant']):<24} "
            + " ".join(f"{c:>{width}}" for c in cells)
            + f" {s['forward_gflops']:>7.3f} {s['train_s']:>8.1f}"
        )
    return "\n".join(lines)


def write_summary(out: Path, rows: Sequence[dict[str, Any]]) -> Path:
    """`out/summary.json`: {"variants": aggregate(rows), "runs": rows}."""
    out.mkdir(parents=True, exist_ok=True)
    text = json.dumps({"variants": aggregate(rows), "runs": list(rows)}, indent=1) + "\n"
    return write_bytes_atomic(out / SUMMARY, text.encode())


def parse_variants(text: str) -> list[str]:
    """Comma-separated VARIANTS keys; ValueError naming the unknown ones."""
    names = [name.strip() for name in text.split(",") if name.strip()]
    if unknown := [name for name in names if name not in VARIANTS]:
        raise ValueError(f"unknown variants {unknown}: choose from {', '.join(VARIANTS)}")
    if not names:
        raise ValueError("no variants given")
    return names


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--shards", type=Path, default=SHARDS_ROOT / "demo", help="folder with train/ and eval/")
    parser.add_argument("--out", type=Path, default=Path("runs/demo"), help="run folders and summary.json")
    parser.add_argument(
        "--videos", type=Path, default=RAW_ROOT / "demo" / "videos", help="the demo's videos (predicted)"
    )
    parser.add_argument("--variants", default=",".join(VARIANTS), help="comma list (default: all five)")
    parser.add_argument("--seeds", type=int, default=1, help="train each variant with seeds 0..N-1 (default 1)")
    parser.add_argument("--epochs", type=int, default=None, help="epochs per variant (default: the demo preset's)")
    parser.add_argument("--jobs", type=int, default=2, help="trainings at once, one thread each (default 2)")
    args = parser.parse_args(argv)
    try:
        variants = parse_variants(args.variants)
    except ValueError as err:
        parser.error(str(err))
    if args.seeds < 1:
        parser.error(f"--seeds must be at least 1, got {args.seeds}")
    if args.jobs < 1:
        parser.error(f"--jobs must be at least 1, got {args.jobs}")
    # One thread: the tiny model's small ops gain nothing from a second one, and on a busy 2-core machine two
    # threads made a training step 4x slower (measured, docs/PERFORMANCE.md).
    torch.set_num_threads(1)
    base = preset("demo")
    if args.epochs:
        base = base.replace(epochs=args.epochs, eval_every_epochs=args.epochs)
    try:
        with raising_signals():
            rows = run_demo(args.shards, args.out, variants, args.seeds, base, args.jobs)
            path = write_summary(args.out, rows)
    except ConfigError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    except (RunFailedError, *EXPECTED_ERRORS) as err:
        print(f"error: {err}", file=sys.stderr)
        return 1
    except (SignalStop, Interrupted) as stopped:
        then = "run it again: it trains every variant from scratch"
        print(stop_line(stopped.signum, "during the demo", then), file=sys.stderr)
        return stopped.exit_status
    single = sum(c.modality != "cross" for c in DEMO_CLASSES)
    print(
        f"\nMBT demo: held-out split of {rows[0]['num_eval_clips']} clips, {len(DEMO_CLASSES)} classes ({single} "
        f"single-modality, {len(DEMO_CLASSES) - single} cross-modal), same budget per variant, "
        f"{args.seeds} seed(s); {path}"
    )
    print(format_table(aggregate(rows)))
    if "bottleneck" in variants and args.seeds == 1:
        print("\n".join(["", *show_results(args.out / "bottleneck", args.videos)]))
    return 0


if __name__ == "__main__":
    sys.exit(main())
