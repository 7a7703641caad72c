"""What `tools/predict.py` predicts, as segments (a file, from a start to an end): the video files given, the video
files of a folder given, or the rows of a segments CSV.

A segments CSV has a header with a `video` column (a path inside the video folder: `--videos`, default the CSV's
folder) and optional `start` and `end` columns (seconds or HH:MM:SS.ff), read by the shard job's own parsers: a path
that leads out of the folder is refused, as the shard job refuses it.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from preprocess.custom_fields import parse_time
from preprocess.datasets import ClipRow, DatasetError, csv_rows
from preprocess.videos import VideoIndex
from shards.text import excerpt

VIDEO_SUFFIXES = frozenset({".mp4", ".mkv", ".webm", ".avi", ".mov", ".flv", ".mpg", ".mpeg", ".ts", ".m4v", ".ogv"})


@dataclass(frozen=True)
class Segment:
    """What to predict: the file `path` from `start_s` to `end_s` (None: its end), called `name` in results."""

    path: Path
    name: str
    start_s: float = 0.0
    end_s: float | None = None


def read_segments_csv(path: Path, videos: Path | None = None) -> list[Segment]:
    """The segments of a segments CSV (see the module doc); DatasetError naming file:line for a bad row. A row whose
    file is missing is kept: predicting it reports the file."""
    rows = list(csv_rows(path))
    if not rows:
        raise DatasetError(f"{path}: empty; expected a header with a video column")
    header = [name.lower() for name in rows[0][1]]
    if "video" not in header:
        raise DatasetError(f"{rows[0][0]}: no 'video' column in the header {excerpt(','.join(header), 200)}")
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
