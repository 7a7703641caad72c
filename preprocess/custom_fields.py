"""The fields of a labelled video collection's own CSV (tools/shard_csv.py): how to read it (`CsvLayout`), its header's
columns, and one row checked into the shard job's `ClipRow`.

A row is one sample: a video (a path inside the video folder, or an id found by name templates), an optional
segment [start, end) in seconds or HH:MM:SS.ff, one or several labels (`;`-separated) and an optional split. Keys
are the video's stem (letters, digits, '_' and '-') and the start in milliseconds, or a key column's text. Bad input
raises `DatasetError` naming file:line and saying what to do.
"""

from __future__ import annotations

import math
import os
import re
from dataclasses import dataclass
from pathlib import PurePosixPath

from preprocess.class_files import index_labels
from preprocess.datasets import _SECONDS_RE, _SPLIT_NAME_RE, MAX_SECONDS, MAX_YTID_CHARS, ClipRow, DatasetError
from shards.text import excerpt

_HMS_RE = re.compile(r"([0-9]{1,7}):([0-5][0-9]):([0-5][0-9](?:\.[0-9]*)?)")
_NOT_KEY_CHARS_RE = re.compile(r"[^A-Za-z0-9_-]")
MAX_VIDEO_CHARS = 4096  # PATH_MAX: a longer cell is no file name
MAX_ID_CHARS = 255  # NAME_MAX
# Rows that name their file are opened by path (ClipRow.video_path), not found by a name template: this one only
# stands for "the path in the CSV" in the job's identity.
PATH_COLUMN_TEMPLATES: tuple[str, ...] = ("{ytid}",)


@dataclass(frozen=True)
class CsvLayout:
    """How to read a collection's CSV. A column given as None is read when the header has its default name
    (start, end, split); one named explicitly must be there."""

    video_column: str = "video"
    label_column: str = "label"
    start_column: str | None = None
    end_column: str | None = None
    split_column: str | None = None
    key_column: str | None = None  # keys from this column (sanitised) instead of the video's stem and start
    split: str | None = None  # keep the rows of this split
    label_separator: str = ";"
    multi_label: bool | None = None  # None: detected (several labels on any row)
    label_type: str = "auto"  # names | indices | auto
    by_id: bool = False  # the video column holds ids looked up by name templates, not paths
    classes_file: str | os.PathLike | None = None
    drop_unknown_labels: bool = False
    segment_s: float = 10.0  # the segment of a row without times: the file's first segment_s seconds

    def reading(self) -> dict[str, object]:
        """What decides the rows read from a CSV, for the job's identity (the class file is there by its classes)."""
        return {name: value for name, value in vars(self).items() if name != "classes_file"}


@dataclass(frozen=True)
class CsvColumns:
    """Positions of the layout's columns in the header (None: absent), and how many the header has."""

    count: int
    video: int
    label: int
    start: int | None
    end: int | None
    split: int | None
    key: int | None


def parse_time(text: str, what: str, source: str) -> float:
    """Seconds from '12.5' or 'HH:MM:SS.ff' (EPIC-KITCHENS' '00:01:02.50'); anything else, or more than
    MAX_SECONDS -> DatasetError naming `source`."""
    seconds = math.inf
    if m := _HMS_RE.fullmatch(text):
        seconds = int(m[1]) * 3600 + int(m[2]) * 60 + float(m[3])
    elif _SECONDS_RE.fullmatch(text):
        seconds = float(text)
    if seconds <= MAX_SECONDS:
        return seconds
    raise DatasetError(
        f"{source}: {what} {excerpt(text, 40)} is not a time: write seconds (12.5) or HH:MM:SS.ff (00:01:02.50), "
        f"at most {MAX_SECONDS:.0f} s"
    )


def folder_name(name: str, option: str) -> str:
    """`name` if it can name an output folder (letters, digits, '_', '-', '.' not first); else DatasetError."""
    if not _SPLIT_NAME_RE.fullmatch(name):
        raise DatasetError(f"{option} {excerpt(name)}: it names a folder: letters, digits, '_', '-', '.' (not first)")
    return name


def key_stem(text: str) -> str:
    """`text` as the first part of a key: characters other than letters, digits, '_' and '-' become '_' (a dot
    would end the key for DALI), cut to MAX_YTID_CHARS."""
    return _NOT_KEY_CHARS_RE.sub("_", text)[:MAX_YTID_CHARS]


def split_labels(cell: str, separator: str) -> tuple[str, ...]:
    """The distinct labels of a label cell, in order, each stripped (empty ones left out)."""
    return tuple(dict.fromkeys(t.strip() for t in cell.strip().split(separator) if t.strip()))


def _check_video(text: str, by_id: bool, source: str) -> str:
    """The video cell as a path inside the video folder (normalised), or an id (a file name, no '/')."""
    if not text or "\x00" in text or len(text) > (MAX_ID_CHARS if by_id else MAX_VIDEO_CHARS):
        raise DatasetError(f"{source}: video {excerpt(text)} is empty or too long to be a file name")
    if by_id:
        if "/" in text:
            raise DatasetError(
                f"{source}: video id {excerpt(text)} holds '/': name templates find files by id in the video folder; "
                "leave out --name-template to read the column as paths"
            )
        return text
    path = PurePosixPath(text)
    if path.is_absolute() or ".." in path.parts or not path.parts:
        raise DatasetError(
            f"{source}: video {excerpt(text)} is not a path inside --videos: write it relative to that folder, "
            "without '..'"
        )
    return str(path)


def _column(header: list[str], name: str | None, default: str, option: str, where: str) -> int | None:
    """The index of column `name` (required when given), else of `default` if the header has it, else None."""
    wanted = name if name is not None else default
    if wanted in header:
        return header.index(wanted)
    if name is None:
        return None
    raise DatasetError(
        f"{where}: no column {excerpt(wanted)} in the header ({excerpt(', '.join(header), 200)}); name the column "
        f"with {option}"
    )


def header_columns(header: list[str], layout: CsvLayout, where: str) -> CsvColumns:
    """The layout's columns in `header` (read at `where`); DatasetError for an empty or repeated column name, a
    column named by the layout and missing, a start without an end (or the reverse), --split without a split column."""
    if not layout.label_separator:
        raise DatasetError("--label-separator must not be empty")
    for i, name in enumerate(header):
        if not name or name in header[:i]:
            raise DatasetError(f"{where}: column {i + 1} of the header is empty or repeated ({excerpt(name)})")
    video = _column(header, layout.video_column, "video", "--video-column", where)
    label = _column(header, layout.label_column, "label", "--label-column", where)
    start = _column(header, layout.start_column, "start", "--start-column", where)
    end = _column(header, layout.end_column, "end", "--end-column", where)
    split = _column(header, layout.split_column, "split", "--split-column", where)
    key = _column(header, layout.key_column, "key", "--key-column", where) if layout.key_column else None
    if (start is None) != (end is None):
        have, missing = ("start", "end") if end is None else ("end", "start")
        raise DatasetError(f"{where}: a {have} column without an {missing} column; name it with --{missing}-column")
    if layout.split is not None and split is None:
        raise DatasetError(f"{where}: --split needs a split column, and the header has no 'split'; use --split-column")
    assert video is not None and label is not None  # named by the layout: present or refused
    return CsvColumns(len(header), video, label, start, end, split, key)


def clip_row(
    source: str, fields: list[str], columns: CsvColumns, layout: CsvLayout, index_of: dict[str, int], label_type: str
) -> ClipRow:
    """The ClipRow of one data row's stripped `fields`: its times, video and key checked (DatasetError naming
    `source`), its labels the classes `index_of` knows (written as `label_type`)."""
    if len(fields) != columns.count:
        raise DatasetError(f"{source}: {len(fields)} columns, the header has {columns.count}")
    start_s, end_s = 0.0, layout.segment_s
    if columns.start is not None and columns.end is not None:
        start_s = parse_time(fields[columns.start], "start", source)
        end_s = parse_time(fields[columns.end], "end", source)
        if end_s <= start_s:
            raise DatasetError(
                f"{source}: end {excerpt(fields[columns.end])} is not after start {excerpt(fields[columns.start])}"
            )
    video = _check_video(fields[columns.video], layout.by_id, source)
    labels = split_labels(fields[columns.label], layout.label_separator)
    if label_type == "indices":
        labels = index_labels(labels, source)
    if columns.key is not None:
        key = key_stem(fields[columns.key])
        if not key:
            raise DatasetError(f"{source}: empty key in the --key-column column")
    else:
        stem = video if layout.by_id else PurePosixPath(video).stem
        key = f"{key_stem(stem)}_{round(start_s * 1000)}"
    classes = tuple(sorted({index_of[label] for label in labels if label in index_of}))
    return ClipRow(key, video, start_s, end_s, classes, source, None if layout.by_id else video)
