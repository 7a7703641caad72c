"""The demo's last step (`make demo`): train the demo MBT with bottleneck fusion, audio only and video only on the
same budget, evaluate each on the held-out split, and print what was measured as a table.

The demo labels are split by what reveals them: background colour and the moving box can only be seen, pitch,
beeping and noise only heard. The table gives the mean AP over each group next to the overall mAP, so that it shows
where a single modality is held back.
"""

from __future__ import annotations

import argparse
import csv
import sys
from pathlib import Path

import numpy as np

from mbt.config import ConfigError, TrainConfig, preset, validate
from mbt.dist import cleanup, init_distributed
from mbt.evaluate import EvaluationError
from mbt.train import EXPECTED_ERRORS, train
from preprocess.demo_data import DEMO_CLASSES

VARIANTS = (("bottleneck", "MBT, bottleneck fusion"), ("audio", "audio only"), ("video", "video only"))


def group_ap(per_class_csv: Path) -> dict[str, float]:
    """Mean AP of the visual and of the audible demo classes, from an evaluation's per_class_ap.csv; EvaluationError
    naming the file when it does not hold an AP for each demo class."""
    try:
        with open(per_class_csv, newline="") as f:
            ap = {int(row["class_index"]): float(row["ap"]) for row in csv.DictReader(f)}
    except (KeyError, TypeError, ValueError) as err:
        raise EvaluationError(
            f"{per_class_csv}: not a per-class AP table ({err!r:.100}); evaluate the run again"
        ) from None
    if missing := [c.index for c in DEMO_CLASSES if c.index not in ap]:
        raise EvaluationError(f"{per_class_csv}: no AP of classes {missing}; evaluate the run again")
    return {
        modality: float(np.nanmean([ap[c.index] for c in DEMO_CLASSES if c.modality == modality]))
        for modality in ("visual", "audible")
    }


def run_demo(shards: Path, out: Path, epochs: int | None = None) -> list[dict[str, object]]:
    """Train and evaluate each variant (resuming or reusing finished runs in `out`); one result row each."""
    dist = init_distributed()
    rows = []
    try:
        for fusion, label in VARIANTS:
            base = preset("demo")
            cfg: TrainConfig = base.replace(
                model=base.model.replace(fusion=fusion),
                train_shards=str(shards / "train"),
                eval_shards=str(shards / "eval"),
                out_dir=str(out / fusion),
                epochs=epochs or base.epochs,
            )
            validate(cfg, dist.world_size)
            print(f"== {label}: {cfg.epochs} epochs, batch {cfg.batch_size}, run dir {cfg.out_dir}", flush=True)
            metrics = train(cfg, dist)
            rows.append({"variant": label, **metrics, **group_ap(out / fusion / "eval" / "per_class_ap.csv")})
    finally:
        cleanup()
    return rows


def format_table(rows: list[dict[str, object]]) -> str:
    header = f"{'variant':<24} {'mAP':>6} {'mAUC':>6} {'d-prime':>8} {'AP seen':>8} {'AP heard':>9}"
    lines = [header, "-" * len(header)]
    for r in rows:
        lines.append(
            f"{r['variant']:<24} {r['mAP']:>6.3f} {r['mAUC']:>6.3f} {r['d_prime']:>8.3f} "
            f"{r['visual']:>8.3f} {r['audible']:>9.3f}"
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--shards", type=Path, default=Path("shards/demo"), help="folder with train/ and eval/")
    parser.add_argument("--out", type=Path, default=Path("runs/demo"), help="run folders, one per variant")
    parser.add_argument("--epochs", type=int, default=None, help="epochs per variant (default: the demo preset's)")
    args = parser.parse_args(argv)
    try:
        rows = run_demo(args.shards, args.out, args.epochs)
    except ConfigError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    except EXPECTED_ERRORS as err:
        print(f"error: {err}", file=sys.stderr)
        return 1
    num_samples = rows[0]["num_samples"]
    print(f"\nMBT demo: held-out split of {num_samples} clips, 8 classes (4 seen, 4 heard), same budget per variant")
    print(format_table(rows))
    return 0


if __name__ == "__main__":
    sys.exit(main())
