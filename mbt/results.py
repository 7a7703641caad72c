"""The files of an evaluation, written by rank 0 into its `--out` folder: metrics, predictions and the tables and
figures a person reads (per-class AP with the split's class names, the most-confused pairs of a single-label split).
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from mbt.metrics import json_values
from mbt.plots import plot_per_class_ap, write_confusion
from shards.atomic import atomic_write, write_bytes_atomic
from shards.text import CsvWriter

METRICS_FILE = "metrics.json"
PREDICTIONS_FILE = "predictions.npz"
PER_CLASS_AP_FILE = "per_class_ap.csv"
PER_CLASS_AP_PLOT = "per_class_ap.png"
CONFUSION_FILE = "confusion.csv"
CONFUSION_PLOT = "confusion.png"


def write_results(
    out_dir: Path,
    metrics: Mapping[str, Any],
    keys: Sequence[str],
    logits: np.ndarray,
    labels: np.ndarray,
    per_class_ap: np.ndarray | None,
    class_names: Sequence[str] | None = None,
) -> None:
    """Write metrics.json, predictions.npz (keys (N,), logits (N, C), labels) and, when `per_class_ap` (C,) is
    given, per_class_ap.csv and .png into `out_dir`; for single-label labels (N,), confusion.csv and .png."""
    out_dir.mkdir(parents=True, exist_ok=True)
    text = json.dumps(json_values(dict(metrics)), indent=2, allow_nan=False) + "\n"
    write_bytes_atomic(out_dir / METRICS_FILE, text.encode())
    with atomic_write(out_dir / PREDICTIONS_FILE) as f:
        np.savez(f, keys=np.asarray(keys, dtype=str), logits=logits, labels=labels)
    if per_class_ap is not None:
        with atomic_write(out_dir / PER_CLASS_AP_FILE, "w", newline="") as f:
            writer = CsvWriter(f)
            writer.writerow(["class_index", "class_name", "ap"])
            for c, ap in enumerate(per_class_ap):
                writer.writerow([c, class_names[c] if class_names else "", f"{ap:.6f}"])
        plot_per_class_ap(out_dir / PER_CLASS_AP_PLOT, per_class_ap, class_names)
    elif labels.ndim == 1:
        write_confusion(out_dir / CONFUSION_FILE, out_dir / CONFUSION_PLOT, logits, labels, class_names)
