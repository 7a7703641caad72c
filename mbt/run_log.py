"""Rank 0's record of a training: one JSON row per line in `metrics.jsonl`, TensorBoard scalars (tags grouped as
`train/...` and `val/...`, `tensorboard_tag`), and the PNG of the loss and validation curves drawn from the rows at
the end.

A run killed while writing a row leaves a partial last line; the next run starts on a new line, and the curves
leave out any line that is not a metrics row rather than fail at the end of a training.
"""

from __future__ import annotations

import io
import itertools
import json
import math
import os
import socket
import time
from pathlib import Path
from typing import Any

from mbt.metrics import json_values
from mbt.plots import pyplot, save_figure
from shards.atomic import append_bytes

EVENTS_VERSION = "brain.Event:2"  # the first event of a TensorBoard events file
_EVENT_FILES = itertools.count()  # two logs opened by one process in one second get two files


class RunLog:
    """Rank 0's logs: metrics.jsonl and a TensorBoard events file, opened at the first row (training calls them on
    rank 0 alone, through `mbt.dist.on_main_rank`). Each row is appended to both whole or not at all, in this thread
    (TensorBoard's own writer appends from a thread of its own, whose failure would print a traceback and surface
    rows later), so a full disk is DiskFullError naming the file, raised by the row that met it."""

    def __init__(self, run_dir: Path) -> None:
        self.path = run_dir / "metrics.jsonl"
        self.tensorboard_dir = run_dir / "tensorboard"
        self.events: Path | None = None

    def write(self, row: dict[str, Any]) -> None:
        """Append `row` (a "step" and values; the numbers become TensorBoard scalars at that step)."""
        from torch.utils.tensorboard.summary import scalar

        if self.events is None:
            self.events = self._open()
        append_bytes(self.path, (json.dumps(json_values(row), allow_nan=False) + "\n").encode())
        now = time.time()
        scalars = [
            _event(wall_time=now, step=row["step"], summary=scalar(tag, value))
            for name, value in row.items()
            if (tag := tensorboard_tag(name)) and isinstance(value, int | float)
        ]
        append_bytes(self.events, _records(scalars))

    def _open(self) -> Path:
        """A new events file (TensorBoard reads every one in the folder), and metrics.jsonl continued on a new line
        where a killed run cut it."""
        self.tensorboard_dir.mkdir(parents=True, exist_ok=True)
        name = f"events.out.tfevents.{int(time.time()):010d}.{socket.gethostname()}.{os.getpid()}.{next(_EVENT_FILES)}"
        events = append_bytes(
            self.tensorboard_dir / name, _records([_event(wall_time=time.time(), file_version=EVENTS_VERSION)])
        )
        if self.path.is_file() and self.path.stat().st_size and not _ends_with_newline(self.path):
            append_bytes(self.path, b"\n")
        return events


def tensorboard_tag(key: str) -> str | None:
    """The TensorBoard tag of a metrics.jsonl key, grouped as TensorBoard shows them: the training's under `train/`
    (loss, lr, clips_per_s, epoch), the evaluation's under `val/` (`eval_mAP` → `val/mAP`, `best_eval_metric` →
    `val/best_metric`); None for what is no curve (the step, the best step, the sample count, the repeated metric)."""
    if key in ("step", "best_step", "eval_metric", "eval_num_samples"):
        return None
    if key == "best_eval_metric":
        return "val/best_metric"
    return f"val/{key.removeprefix('eval_')}" if key.startswith("eval_") else f"train/{key}"


def _event(**fields: Any) -> Any:
    from tensorboard.compat.proto.event_pb2 import Event

    return Event(**fields)


def _records(events: list[Any]) -> bytes:
    """`events` framed as TensorBoard's records (length, CRCs), as its own writer frames them."""
    from tensorboard.summary.writer.record_writer import RecordWriter

    buffer = io.BytesIO()
    writer = RecordWriter(buffer)
    for event in events:
        writer.write(event.SerializeToString())
    return buffer.getvalue()


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
    plt = pyplot()
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
    save_figure(fig, png)
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
