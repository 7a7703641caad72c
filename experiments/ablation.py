"""The paper's two ablations in small, on the demo data (`make ablation`): where fusion starts (`fusion_layer`, from
the first layer to the last, for bottleneck and for vanilla cross-attention fusion, late fusion as the end point) and
how many bottleneck tokens carry it (`num_bottlenecks` 1, 4, 16). Each run is a demo variant
(`experiments.demo.run_variant`, the demo preset's budget); the result is the mean AP of the cross-modal classes
against forward GFLOPs per clip, as the paper plots mAP against GFLOPs:

    runs/ablation/ablation.csv   one row per run: sweep, name, fusion, fusion_layer, num_bottlenecks, seed, GFLOPs, APs
    runs/ablation/ablation.png   cross-modal AP against GFLOPs, one line per sweep, points labelled Lf / B
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

from experiments.demo import run_variant, variant_config
from experiments.parallel import Run, RunFailedError, run_all
from mbt.config import ConfigError, TrainConfig, preset
from mbt.interrupt import Interrupted, SignalStop, raising_signals, stop_line
from mbt.plots import pyplot, save_figure
from mbt.train import EXPECTED_ERRORS
from shards.atomic import atomic_write
from shards.layout import SHARDS_ROOT
from shards.text import CsvWriter

CSV_NAME = "ablation.csv"
PNG_NAME = "ablation.png"
COLUMNS = (
    "sweep", "name", "fusion", "fusion_layer", "num_bottlenecks", "seed", "forward_gflops", "params_m", "ap_cross",
    "ap_single", "mAP", "train_s",
)  # fmt: skip


def ablation_runs(
    depth: int, fusion_layer: int, bottlenecks: Sequence[int], fusion_layers: Sequence[int] | None = None
) -> list[tuple[str, dict[str, Any]]]:
    """The runs as (sweep, model changes), the most telling first: bottleneck fusion at each of `fusion_layers`
    (default every layer, 0..depth-1) with the preset's bottleneck count, late fusion, bottleneck fusion at the
    preset's `fusion_layer` with each of `bottlenecks` tokens, then cross-attention fusion at each fusion layer."""
    layers = list(range(depth)) if fusion_layers is None else list(fusion_layers)
    if bad := [layer for layer in layers if not 0 <= layer < depth]:
        raise ValueError(f"fusion layers {bad} are not in 0..{depth - 1} (depth {depth}; late fusion is run anyway)")
    if bad := [b for b in bottlenecks if b < 1]:
        raise ValueError(f"bottleneck counts {bad} must be at least 1")
    runs = [("fusion_layer", {"fusion": "bottleneck", "fusion_layer": layer}) for layer in layers]
    runs.append(("fusion_layer", {"fusion": "late"}))
    runs += [
        ("bottlenecks", {"fusion": "bottleneck", "fusion_layer": fusion_layer, "num_bottlenecks": b})
        for b in bottlenecks
    ]
    return runs + [("fusion_layer", {"fusion": "cross", "fusion_layer": layer}) for layer in layers]


def run_name(fusion: str, fusion_layer: int, num_bottlenecks: int) -> str:
    """The run folder's name: what of the model the sweeps change (`bottleneck-lf2-b4`, `cross-lf1`, `late`)."""
    if fusion == "bottleneck":
        return f"bottleneck-lf{fusion_layer}-b{num_bottlenecks}"
    return f"cross-lf{fusion_layer}" if fusion == "cross" else fusion


def run_ablation(
    shards: Path,
    out: Path,
    runs: Sequence[tuple[str, dict[str, Any]]],
    seed: int = 0,
    base: TrainConfig | None = None,
    jobs: int = 1,
) -> list[dict[str, Any]]:
    """Train and evaluate each of `runs` (`ablation_runs`) on `shards` under `out/runs/<name>`, `jobs` at a time
    (`experiments.parallel`); one row each (COLUMNS), in the order of `runs`. A run already in an earlier sweep
    (the same model) is trained once. The CSV and the PNG in `out` are rewritten as each run ends, with the rows
    measured so far, so that a sweep cut short still shows what it measured."""
    base = base or preset("demo")
    names = []  # per entry of `runs`: its run's name
    trainings: dict[str, Run] = {}
    for sweep, changes in runs:
        model = base.model.replace(**changes)
        name = run_name(model.fusion, model.fusion_layer, model.num_bottlenecks)
        names.append(name)
        if name not in trainings:
            cfg = variant_config(base, shards, out / "runs" / name, seed, **changes)
            trainings[name] = Run(name, f"ablation, {sweep} sweep: {name}", cfg)
    order = list(trainings)
    done: dict[str, dict[str, Any]] = {}
    rows: list[dict[str, Any]] = []
    for index, result in run_all(list(trainings.values()), jobs, run_variant):
        done[order[index]] = result
        rows = [
            {"sweep": sweep, "name": name, **{k: done[name][k] for k in COLUMNS[2:]}}
            for (sweep, _), name in zip(runs, names, strict=True)
            if name in done
        ]
        write_csv(rows, out / CSV_NAME)
        plot_ablation(rows, out / PNG_NAME)
    return rows


def write_csv(rows: Sequence[dict[str, Any]], path: Path) -> Path:
    """`rows` as CSV with the COLUMNS header."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with atomic_write(path, "w", newline="") as f:
        writer = CsvWriter(f)
        writer.writerow(COLUMNS)
        writer.writerows([row.get(column, "") for column in COLUMNS] for row in rows)
    return path


def plot_ablation(rows: Sequence[dict[str, Any]], path: Path) -> Path:
    """The PNG: cross-modal AP (y) against forward GFLOPs per clip (x); bottleneck and cross fusion by fusion layer
    as two lines (points labelled Lf), late fusion as one point, bottleneck counts as a third line (labelled B)."""
    fig, ax = pyplot().subplots(figsize=(7, 4.5))
    series = (
        ("fusion_layer", "bottleneck", "bottleneck, by fusion layer", "o-", "Lf={fusion_layer}"),
        ("fusion_layer", "cross", "cross-attention, by fusion layer", "s-", "Lf={fusion_layer}"),
        ("fusion_layer", "late", "late fusion", "D", "late"),
        ("bottlenecks", "bottleneck", "bottleneck, by tokens (Lf fixed)", "^--", "B={num_bottlenecks}"),
    )
    for sweep, fusion, label, style, point in series:
        own = [r for r in rows if r["sweep"] == sweep and r["fusion"] == fusion]
        own.sort(key=lambda r: r["forward_gflops"])
        if not own:
            continue
        xs, ys = [r["forward_gflops"] for r in own], [r["ap_cross"] for r in own]
        ax.plot(xs, ys, style, label=label)
        for r, x, y in zip(own, xs, ys, strict=True):
            ax.annotate(point.format(**r), (x, y), textcoords="offset points", xytext=(4, 4), fontsize=8)
    ax.axhline(0.5, color="grey", linestyle=":", linewidth=1, label="chance (half the clips are positive)")
    ax.set(xlabel="forward GFLOPs per clip", ylabel="mean AP, cross-modal classes", title="MBT demo ablation")
    ax.legend(fontsize=8, loc="best")
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    return save_figure(fig, path)


def _ints(text: str) -> list[int]:
    try:
        return [int(part) for part in text.split(",") if part.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a comma list of integers, got {text!r}") from None


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--shards", type=Path, default=SHARDS_ROOT / "demo", help="folder with train/ and eval/")
    parser.add_argument("--out", type=Path, default=Path("runs/ablation"), help="run folders, the CSV and the PNG")
    parser.add_argument("--fusion-layers", type=_ints, default=None, help="comma list (default: every layer)")
    parser.add_argument("--bottlenecks", type=_ints, default=[1, 4, 16], help="comma list (default 1,4,16)")
    parser.add_argument("--seed", type=int, default=0, help="training seed (default 0)")
    parser.add_argument("--epochs", type=int, default=None, help="epochs per run (default: the demo preset's)")
    parser.add_argument("--jobs", type=int, default=2, help="trainings at once, one thread each (default 2)")
    args = parser.parse_args(argv)
    torch.set_num_threads(1)  # as experiments.demo: the tiny model is faster on one thread
    base = preset("demo")
    if args.epochs:
        base = base.replace(epochs=args.epochs, eval_every_epochs=args.epochs)
    try:
        runs = ablation_runs(base.model.depth, base.model.fusion_layer, args.bottlenecks, args.fusion_layers)
        with raising_signals():
            rows = run_ablation(args.shards, args.out, runs, args.seed, base, args.jobs)
    except (ValueError, ConfigError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    except (RunFailedError, *EXPECTED_ERRORS) as err:
        print(f"error: {err}", file=sys.stderr)
        return 1
    except (SignalStop, Interrupted) as stopped:
        then = f"{args.out / CSV_NAME} holds the runs that ended; run it again: it trains every run from scratch"
        print(stop_line(stopped.signum, "during the ablation", then), file=sys.stderr)
        return stopped.exit_status
    print(f"\n{'sweep':<13} {'run':<20} {'GFLOPs':>7} {'AP cross':>9} {'AP single':>10} {'train s':>8}")
    for r in rows:
        print(
            f"{r['sweep']:<13} {r['name']:<20} {r['forward_gflops']:>7.3f} {r['ap_cross']:>9.3f} "
            f"{r['ap_single']:>10.3f} {r['train_s']:>8.1f}"
        )
    print(f"{args.out / CSV_NAME}\n{args.out / PNG_NAME}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
