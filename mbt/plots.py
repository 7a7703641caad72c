"""Figures a person reads after an evaluation: per-class AP (best and worst classes) and the confusion matrix of a
single-label split (with the table of its most-confused pairs). matplotlib, off-screen (Agg).
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
NAMED_CLASSES = 30  # a confusion matrix of at most this many classes has their names as ticks, else indices
COUNTED_CLASSES = 15  # and of at most this many, each cell's count written in it


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


def confusion_matrix(logits: np.ndarray, labels: np.ndarray) -> np.ndarray:
    """Counts (C, C) of samples by true class (rows) and predicted class (columns, the highest logit), from logits
    (N, C) and class indices (N,)."""
    num_classes = logits.shape[1]
    matrix = np.zeros((num_classes, num_classes), dtype=np.int64)
    np.add.at(matrix, (labels.astype(np.int64), np.argmax(logits, axis=1)), 1)
    return matrix


def confused_pairs(logits: np.ndarray, labels: np.ndarray, limit: int = SHOWN_PAIRS) -> list[tuple[int, int, int, int]]:
    """The most frequent (true class, predicted class, count, samples of the true class) with true != predicted,
    from logits (N, C) and class indices (N,): most count first, then by class index."""
    matrix = confusion_matrix(logits, labels)
    support = matrix.sum(axis=1)
    np.fill_diagonal(matrix, 0)
    pairs = [(int(t), int(p), int(matrix[t, p]), int(support[t])) for t, p in zip(*np.nonzero(matrix), strict=True)]
    return sorted(pairs, key=lambda x: (-x[2], x[0], x[1]))[:limit]


def plot_confusion(path: Path, matrix: np.ndarray, names: Sequence[str] | None = None) -> Path:
    """The confusion matrix (C, C) as an image: true class down, predicted across, a colour bar of whole counts;
    ticks are class names up to NAMED_CLASSES classes (integer indices beyond), counts written in the cells up to
    COUNTED_CLASSES."""
    from matplotlib.ticker import MaxNLocator

    plt = pyplot()
    num_classes = matrix.shape[0]
    side = min(4 + 0.35 * num_classes, 16)
    fig, ax = plt.subplots(figsize=(side + 1.5, side))
    image = ax.imshow(matrix, cmap="Blues", interpolation="nearest", vmin=0)
    fig.colorbar(image, ax=ax, ticks=MaxNLocator(integer=True), label="samples")
    if num_classes <= NAMED_CLASSES:
        labels = [class_label(names, c) for c in range(num_classes)]
        ax.set_xticks(range(num_classes), labels, rotation=90, fontsize=8)
        ax.set_yticks(range(num_classes), labels, fontsize=8)
    else:
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.yaxis.set_major_locator(MaxNLocator(integer=True))
    if num_classes <= COUNTED_CLASSES:
        high = matrix.max() / 2
        for (t, p), count in np.ndenumerate(matrix):
            ax.text(p, t, str(count), ha="center", va="center", fontsize=8, color="white" if count > high else "black")
    correct = int(np.trace(matrix))
    title = f"confusion matrix: {correct} of {int(matrix.sum())} samples on the diagonal"
    ax.set(xlabel="predicted class", ylabel="true class", title=title)
    fig.tight_layout()
    return save_figure(fig, path)


def write_confusion(
    csv_path: Path, png_path: Path, logits: np.ndarray, labels: np.ndarray, names: Sequence[str] | None = None
) -> list[tuple[int, int, int, int]]:
    """The most-confused pairs as a CSV (true, predicted, count, fraction of the true class) and the whole confusion
    matrix as a PNG (`plot_confusion`)."""
    pairs = confused_pairs(logits, labels)
    with atomic_write(csv_path, "w", newline="") as f:
        writer = CsvWriter(f)
        writer.writerow(["true_index", "true_name", "predicted_index", "predicted_name", "count", "fraction"])
        for t, p, count, support in pairs:
            writer.writerow([t, class_label(names, t), p, class_label(names, p), count, f"{count / support:.6f}"])
    plot_confusion(png_path, confusion_matrix(logits, labels), names)
    return pairs
