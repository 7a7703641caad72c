"""Rank 0's record of a training: one JSON row per line in `metrics.jsonl`, TensorBoard scalars, and the PNG of the
loss and validation curves drawn from the rows at the end.

A run killed while writing a row leaves a partial last line; the next run starts on a new line, and the curves
leave out any line that is not a metrics row rather than fail at the end of a training.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

from mbt.metrics import json_values


class RunLog:
    """Rank 0's logs: metrics.jsonl, TensorBoard, the final PNG of the curves (no-ops on other ranks)."""

    def __init__(self, run_dir: Path, enabled: bool) -> None:
        self.enabled = enabled
        self.path = run_dir / "metrics.jsonl"
        self.writer = None
        if enabled:
            from torch.utils.tensorboard import SummaryWriter

            self.writer = SummaryWriter(str(run_dir / "tensorboard"))
            if self.path.is_file() and self.path.stat().st_size and not _ends_with_newline(self.path):
                with open(self.path, "a") as f:
                    f.write("\n")

    def write(self, row: dict[str, Any]) -> None:
        if not self.enabled:
            return
        with open(self.path, "a") as f:
            f.write(json.dumps(json_values(row), allow_nan=False) + "\n")
        for name, value in row.items():
            if name != "step" and isinstance(value, int | float):
                self.writer.add_scalar(name, value, row["step"])

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()


def read_rows(jsonl: Path) -> tuple[list[dict[str, Any]], int]:
    """The rows of metrics.jsonl that are JSON objects with a numeric step, and how many lines were not."""
    rows, skipped = [], 0
    for line in jsonl.read_text(encoding="utf-8", errors="replace").splitlines():
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except ValueError:
            row = None
        if isinstance(row, dict) and _number(row.get("step")):
            rows.append(row)
        else:
            skipped += 1
    return rows, skipped


def plot_curves(jsonl: Path, png: Path) -> int:
    """Loss and validation metric against step, from metrics.jsonl; returns how many lines were left out."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows, skipped = read_rows(jsonl)
    train = [r for r in rows if _number(r.get("loss"))]
    evals = [r for r in rows if _number(r.get("eval_metric"))]
    fig, (ax_loss, ax_eval) = plt.subplots(1, 2, figsize=(10, 4))
    ax_loss.plot([r["step"] for r in train], [r["loss"] for r in train])
    ax_loss.set(xlabel="step", ylabel="training loss", title="loss")
    if evals:
        name = str(evals[0].get("eval_metric_name", "metric"))
        ax_eval.plot([r["step"] for r in evals], [r["eval_metric"] for r in evals], marker="o")
        ax_eval.set(xlabel="step", ylabel=name, title=f"validation {name}")
    fig.tight_layout()
    fig.savefig(png, dpi=100)
    plt.close(fig)
    return skipped


def _number(value: Any) -> bool:
    return (
        isinstance(value, int | float)
        and not isinstance(value, bool)
        and not (isinstance(value, float) and math.isnan(value))
    )


def _ends_with_newline(path: Path) -> bool:
    with open(path, "rb") as f:
        f.seek(-1, 2)
        return f.read(1) == b"\n"
