"""What `tools/predict.py` makes of a prediction: class probabilities and the top classes, the record `--json`
writes, a timeline CSV and PNG per video (`--window-s`) and the lines printed.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from mbt.plots import class_label, pyplot, save_figure
from serve.predict import Prediction, top_classes
from shards.atomic import atomic_write
from shards.text import MAX_NAME_CHARS, CsvWriter, printable

TIMELINE_SUFFIX = ".timeline.csv"
TIMELINE_CLASSES = 6  # classes drawn in a timeline PNG


def record(prediction: Prediction, k: int) -> dict[str, Any]:
    """A prediction as plain JSON values: its top-k classes, whether it has audio and, per window, its logits and
    top-k."""
    probs, names = prediction.probabilities, prediction.class_names
    return {
        "name": prediction.name,
        "has_audio": prediction.has_audio,
        "top": [{"class": n, "probability": p} for n, p in prediction.top(k)],
        "windows": [
            {
                "start_s": start,
                "end_s": end,
                "top": [{"class": n, "probability": p} for n, p in top_classes(probs[w], names, k)],
                "logits": prediction.logits[w].tolist(),
            }
            for w, (start, end) in enumerate(prediction.windows)
        ],
    }


def timeline_path(out_dir: Path, name: str, taken: set[Path]) -> Path:
    """A free `out_dir/<stem>.timeline.csv` for the video `name` (a number added when two videos share a stem)."""
    stem = Path(name.split("@")[0]).stem or "video"
    path, n = out_dir / f"{stem}{TIMELINE_SUFFIX}", 1
    while path in taken:
        n += 1
        path = out_dir / f"{stem}-{n}{TIMELINE_SUFFIX}"
    taken.add(path)
    return path


def write_timeline_csv(path: Path, prediction: Prediction) -> Path:
    """Per window: start_s, end_s, the top class and its probability, then every class's probability."""
    probs, names = prediction.probabilities, prediction.class_names
    path.parent.mkdir(parents=True, exist_ok=True)
    with atomic_write(path, "w", newline="") as f:
        writer = CsvWriter(f)
        writer.writerow(["start_s", "end_s", "top_class", "top_probability", *names])
        for (start, end), row in zip(prediction.windows, probs, strict=True):
            best = int(np.argmax(row))
            writer.writerow([f"{start:.3f}", f"{end:.3f}", names[best], f"{row[best]:.6f}", *(f"{p:.6f}" for p in row)])
    return path


def top_lines(prediction: Prediction, k: int) -> list[str]:
    """The lines printed for a prediction: its name (and a note when it has no audio stream), then its top-k classes
    with probabilities (text from data with its control characters escaped: a file name may hold any)."""
    windows = f" ({len(prediction.windows)} windows)" if len(prediction.windows) > 1 else ""
    silent = "" if prediction.has_audio else " (no audio stream: heard as silence)"
    name = printable(prediction.name, MAX_NAME_CHARS)
    return [f"{name}{windows}{silent}:"] + [f"  {p:.3f}  {printable(n, MAX_NAME_CHARS)}" for n, p in prediction.top(k)]


def plot_timeline(
    path: Path, windows: Sequence[tuple[float, float]], probs: np.ndarray, names: Sequence[str], title: str
) -> Path:
    """The probabilities (W, C) over time (each window at its centre) of the TIMELINE_CLASSES classes that reach
    the highest probability anywhere."""
    plt = pyplot()
    centres = [(start + end) / 2 for start, end in windows]
    shown = np.argsort(-probs.max(axis=0), kind="stable")[:TIMELINE_CLASSES]
    fig, ax = plt.subplots(figsize=(10, 4))
    for c in shown:
        ax.plot(centres, probs[:, c], marker="o", label=class_label(names, int(c)))
    ax.set(xlabel="time (s, window centre)", ylabel="probability", ylim=(0, 1.02), title=title)
    ax.legend(fontsize=8, loc="upper left", bbox_to_anchor=(1.01, 1.0), borderaxespad=0)  # beside, not over, the lines
    fig.tight_layout()
    return save_figure(fig, path)
