"""What `tools/predict.py` reads and writes: its inputs as segments (video files, the files of a folder, or the rows
of a segments CSV) and its results as records (`--json`), a timeline CSV per video and top-k lines.

A segments CSV has a header with a `video` column (a path inside the video folder: `--videos`, default the CSV's
folder) and optional `start` and `end` columns (seconds or HH:MM:SS.ff), read by the shard job's own parsers: a path
that leads out of the folder is refused, as the shard job refuses it.
"""

from __future__ import annotations

import csv
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from preprocess.custom_csv import parse_time
from preprocess.datasets import ClipRow, DatasetError, csv_rows
from preprocess.videos import VideoIndex
from serve.predict import Prediction, Segment, probabilities, top_classes

VIDEO_SUFFIXES = frozenset({".mp4", ".mkv", ".webm", ".avi", ".mov", ".flv", ".mpg", ".mpeg", ".ts", ".m4v", ".ogv"})
TIMELINE_SUFFIX = ".timeline.csv"


def read_segments_csv(path: Path, videos: Path | None = None) -> list[Segment]:
    """The segments of a segments CSV (see the module doc); DatasetError naming file:line for a bad row. A row whose
    file is missing is kept: predicting it reports the file."""
    rows = list(csv_rows(path))
    if not rows:
        raise DatasetError(f"{path}: empty; expected a header with a video column")
    header = [name.lower() for name in rows[0][1]]
    if "video" not in header:
        raise DatasetError(f"{rows[0][0]}: no 'video' column in the header {','.join(header)[:200]}")
    column = {name: header.index(name) for name in ("video", "start", "end") if name in header}
    index = VideoIndex(videos or path.parent)
    segments = []
    for source, fields in rows[1:]:
        if len(fields) != len(header):
            raise DatasetError(f"{source}: expected {len(header)} columns, got {len(fields)}")
        video = fields[column["video"]]
        start = parse_time(fields[column["start"]], "start", source) if "start" in column else 0.0
        end = parse_time(fields[column["end"]], "end", source) if "end" in column and fields[column["end"]] else None
        if end is not None and end <= start:
            raise DatasetError(f"{source}: end {end:g} s is not after start {start:g} s")
        row = ClipRow(key="row", ytid="", start_s=start, end_s=end or start, labels=(), source=source, video_path=video)
        try:
            file = index.resolve_path(row)
        except FileNotFoundError:
            file = index.folder / video
        segments.append(Segment(file, f"{video}@{start:g}" if start else video, start, end))
    return segments


def gather_segments(inputs: Sequence[str | Path], videos: Path | None = None) -> list[Segment]:
    """One segment per video file given, per video file directly in a folder given (by suffix, sorted), per row of
    a `.csv` given; a path that does not exist is kept (predicting it reports the file)."""
    segments: list[Segment] = []
    for item in map(Path, inputs):
        if item.is_dir():
            files = sorted(p for p in item.iterdir() if p.suffix.lower() in VIDEO_SUFFIXES and p.is_file())
            segments += [Segment(p, str(p)) for p in files]
        elif item.suffix.lower() == ".csv" and item.is_file():
            segments += read_segments_csv(item, videos)
        else:
            segments.append(Segment(item, str(item)))
    return segments


def summary_probabilities(prediction: Prediction, multi_label: bool) -> np.ndarray:
    """The class probabilities (C,) of a whole prediction: the mean over its windows' probabilities."""
    return probabilities(prediction.logits, multi_label).mean(axis=0)


def record(prediction: Prediction, names: list[str], multi_label: bool, k: int) -> dict[str, Any]:
    """A prediction as plain JSON values: its top-k classes and, per window, its logits and top-k."""
    probs = probabilities(prediction.logits, multi_label)
    overall = top_classes(summary_probabilities(prediction, multi_label), names, k)
    return {
        "name": prediction.name,
        "top": [{"class": n, "probability": p} for n, p in overall],
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


def write_timeline_csv(path: Path, prediction: Prediction, names: list[str], multi_label: bool) -> Path:
    """Per window: start_s, end_s, the top class and its probability, then every class's probability."""
    probs = probabilities(prediction.logits, multi_label)
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["start_s", "end_s", "top_class", "top_probability", *names])
        for (start, end), row in zip(prediction.windows, probs, strict=True):
            best = int(np.argmax(row))
            writer.writerow([f"{start:.3f}", f"{end:.3f}", names[best], f"{row[best]:.6f}", *(f"{p:.6f}" for p in row)])
    return path


def top_lines(prediction: Prediction, names: list[str], multi_label: bool, k: int) -> list[str]:
    """The lines printed for a prediction: its name, then its top-k classes with probabilities."""
    windows = f" ({len(prediction.windows)} windows)" if len(prediction.windows) > 1 else ""
    top = top_classes(summary_probabilities(prediction, multi_label), names, k)
    return [f"{prediction.name}{windows}:"] + [f"  {p:.3f}  {n}" for n, p in top]
