"""Figures a person reads after an evaluation: per-class AP (best and worst classes) and the most-confused class pairs
of a single-label split (with their table). matplotlib, off-screen (Agg).
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from shards.atomic import atomic_write
from shards.text import CsvWriter

SHOWN_CLASSES = 15  # best and worst, each
SHOWN_PAIRS = 20


def pyplot() -> Any:
    """matplotlib.pyplot on the off-screen Agg backend (no display needed)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def save_figure(fig: Any, path: Path) -> Path:
    """Write `fig` to `path` as a PNG (100 dpi) atomically and close it; a full disk is DiskFullError naming `path`."""
    try:
        with atomic_write(path) as f:
            fig.savefig(f, format="png", dpi=100)
    finally:
        pyplot().close(fig)
    return path


def class_label(names: Sequence[str] | None, c: int) -> str:
    """The name of class `c`, or "class c" where the names give none."""
    return names[c] if names and names[c] else f"class {c}"


def plot_per_class_ap(path: Path, ap: np.ndarray, names: Sequence[str] | None = None) -> Path:
    """A bar chart of the SHOWN_CLASSES best and worst classes by AP (C,) (classes without positives left out)."""
    plt = pyplot()
    order = [int(c) for c in np.argsort(-np.nan_to_num(ap, nan=-1.0), kind="stable") if not np.isnan(ap[c])]
    shown = order if len(order) <= 2 * SHOWN_CLASSES else order[:SHOWN_CLASSES] + order[-SHOWN_CLASSES:]
    fig, ax = plt.subplots(figsize=(8, 1.5 + 0.28 * max(len(shown), 1)))
    ax.barh(range(len(shown)), [ap[c] for c in shown], color=["tab:green" if c in order[:SHOWN_CLASSES] else
                                                              "tab:red" for c in shown])  # fmt: skip
    ax.set_yticks(range(len(shown)), [class_label(names, c) for c in shown], fontsize=8)
    ax.invert_yaxis()
    ax.set(xlim=(0, 1), xlabel="average precision", title=f"per-class AP: best and worst of {len(order)} classes")
    fig.tight_layout()
    return save_figure(fig, path)


def confused_pairs(logits: np.ndarray, labels: np.ndarray, limit: int = SHOWN_PAIRS) -> list[tuple[int, int, int, int]]:
    """The most frequent (true class, predicted class, count, samples of the true class) with true != predicted,
    from logits (N, C) and class indices (N,): most count first, then by class index."""
    predicted = np.argmax(logits, axis=1)
    num_classes = logits.shape[1]
    matrix = np.zeros((num_classes, num_classes), dtype=np.int64)
    np.add.at(matrix, (labels.astype(np.int64), predicted), 1)
    support = matrix.sum(axis=1)
    np.fill_diagonal(matrix, 0)
    pairs = [(int(t), int(p), int(matrix[t, p]), int(support[t])) for t, p in zip(*np.nonzero(matrix), strict=True)]
    return sorted(pairs, key=lambda x: (-x[2], x[0], x[1]))[:limit]


def write_confusion(
    csv_path: Path, png_path: Path, logits: np.ndarray, labels: np.ndarray, names: Sequence[str] | None = None
) -> list[tuple[int, int, int, int]]:
    """The most-confused pairs as a CSV (true, predicted, count, fraction of the true class) and a bar chart."""
    pairs = confused_pairs(logits, labels)
    with atomic_write(csv_path, "w", newline="") as f:
        writer = CsvWriter(f)
        writer.writerow(["true_index", "true_name", "predicted_index", "predicted_name", "count", "fraction"])
        for t, p, count, support in pairs:
            writer.writerow([t, class_label(names, t), p, class_label(names, p), count, f"{count / support:.6f}"])
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(9, 1.5 + 0.3 * max(len(pairs), 1)))
    ax.barh(range(len(pairs)), [count for _, _, count, _ in pairs], color="tab:orange")
    ticks = [f"{class_label(names, t)} → {class_label(names, p)}" for t, p, _, _ in pairs]
    ax.set_yticks(range(len(pairs)), ticks, fontsize=8)
    ax.invert_yaxis()
    ax.set(xlabel="samples", title="most-confused pairs (true → predicted)" if pairs else "no sample misclassified")
    fig.tight_layout()
    save_figure(fig, png_path)
    return pairs
