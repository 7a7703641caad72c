"""Reader of a labelled video collection's own CSV (tools/shard_csv.py) into the shard job's rows.

The CSV has a header naming its columns; each row is one sample: a video (a path inside the video folder, or an id
found by name templates), an optional segment [start, end) in seconds or HH:MM:SS.ff, one or several labels (class
names or indices, `;`-separated) and an optional split. Keys are the video's stem (letters, digits, '_' and '-')
and the start in milliseconds. Classes come from a class file (`preprocess.class_files`) or from the labels of all
rows (every split: train and test share one list); single- or multi-label is stated or detected, and said in
`CustomTable.describe()`. Bad input raises `DatasetError` naming file:line and saying what to do.
"""

from __future__ import annotations

import dataclasses
import hashlib
import math
import os
import re
from dataclasses import dataclass, field
from pathlib import PurePosixPath
from typing import Any

from preprocess.class_files import choose_label_type, collect_classes, index_labels, label_lookup, read_class_file
from preprocess.datasets import (
    _SECONDS_RE,
    _SPLIT_NAME_RE,
    MAX_SECONDS,
    MAX_YTID_CHARS,
    ClipRow,
    DatasetError,
    csv_rows,
)
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


@dataclass
class CustomTable:
    """The rows of one split, the collection's classes, and how they were decided (for the summary)."""

    rows: list[ClipRow]
    classes: list[dict[str, Any]]
    multi_label: bool
    label_mode: str  # e.g. "multi-label (detected: line 3 has 2 labels)"
    label_type: str  # names | indices
    classes_from: str
    has_times: bool
    split: str | None
    num_csv_rows: int
    dropped: list[str] = field(default_factory=list)  # sources of rows left without a label (--drop-unknown-labels)

    def describe(self) -> str:
        split = f" of split {self.split}" if self.split is not None else ""
        times = (
            "segments from the start/end columns (files are whole videos, decoded from each start)"
            if self.has_times
            else "one sample per file, from its beginning"
        )
        dropped = f"; {len(self.dropped)} rows dropped (no known label left)" if self.dropped else ""
        return (
            f"{len(self.rows)} rows{split} ({self.num_csv_rows} in the CSV); {len(self.classes)} classes "
            f"{self.classes_from} (labels as {self.label_type}); {self.label_mode}; {times}{dropped}"
        )

    def videos_sha256(self) -> str:
        """A hash of which video each key reads: the shard job's identity holds keys and times, not files."""
        digest = hashlib.sha256()
        for row in self.rows:
            digest.update(f"{row.key},{row.ytid},{row.video_path}\n".encode())
        return digest.hexdigest()


@dataclass(frozen=True)
class _Parsed:
    source: str
    video: str
    start_s: float
    end_s: float
    labels: tuple[str, ...]
    split: str | None
    key_text: str | None


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


def _parse_rows(path: str | os.PathLike, layout: CsvLayout) -> tuple[list[_Parsed], bool, bool]:
    """Every data row, checked: (rows, has_times, has_split)."""
    if not layout.label_separator:
        raise DatasetError("--label-separator must not be empty")
    rows = csv_rows(path)
    where, header = next(rows, (os.fspath(path), []))
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
    parsed = []
    for source, fields in rows:
        if len(fields) != len(header):
            raise DatasetError(f"{source}: {len(fields)} columns, the header has {len(header)}")
        start_s, end_s = 0.0, layout.segment_s
        if start is not None and end is not None:
            start_s = parse_time(fields[start], "start", source)
            end_s = parse_time(fields[end], "end", source)
            if end_s <= start_s:
                raise DatasetError(f"{source}: end {excerpt(fields[end])} is not after start {excerpt(fields[start])}")
        labels = dict.fromkeys(t.strip() for t in fields[label].split(layout.label_separator) if t.strip())
        parsed.append(
            _Parsed(
                source=source,
                video=_check_video(fields[video], layout.by_id, source),
                start_s=start_s,
                end_s=end_s,
                labels=tuple(labels),
                split=fields[split] if split is not None else None,
                key_text=fields[key] if key is not None else None,
            )
        )
    if not parsed:
        raise DatasetError(f"{os.fspath(path)}: no rows after the header")
    return parsed, start is not None, split is not None


def _label_mode(parsed: list[_Parsed], stated: bool | None) -> tuple[bool, str]:
    several = next((row for row in parsed if len(row.labels) > 1), None)
    if stated is not None:
        kind = "multi-label" if stated else "single-label"
        flag = "--multi-label" if stated else "--single-label"
        if not stated and several is not None:
            raise DatasetError(
                f"{several.source}: {len(several.labels)} labels {excerpt(list(several.labels), 200)}, but {flag} "
                "says one per row (a class name holding the separator? set --label-separator)"
            )
        return stated, f"{kind} (stated by {flag})"
    if several is not None:
        line = several.source.rsplit(":", 1)[1]
        return True, f"multi-label (detected: line {line} has {len(several.labels)} labels)"
    return False, "single-label (detected: no row has several labels)"


def read_custom_csv(path: str | os.PathLike, layout: CsvLayout) -> CustomTable:
    """The rows of `layout.split` (all rows without a split column), in CSV order, with the collection's classes.

    Errors name file:line: a missing column (and the option naming it), a row with another column count, a
    malformed time or end <= start, a video path outside the folder, a label outside the class file (unless
    drop_unknown_labels: then dropped, and a single-label row left without one is dropped and listed), a row without
    a label in a single-label CSV, two rows giving one key (naming both lines), a split holding no rows.
    """
    parsed, has_times, has_split = _parse_rows(path, layout)
    given = read_class_file(layout.classes_file) if layout.classes_file is not None else None
    label_type = choose_label_type(layout.label_type, (t for row in parsed for t in row.labels), given)
    if label_type == "indices":
        parsed = [dataclasses.replace(row, labels=index_labels(row.labels, row.source)) for row in parsed]
    if given is None:
        classes = collect_classes(((row.source, row.labels) for row in parsed), label_type, os.fspath(path))
        classes_from = "collected from the CSV"
    else:
        classes, classes_from = given, f"from {os.fspath(layout.classes_file)}"
    multi_label, label_mode = _label_mode(parsed, layout.multi_label)
    index_of = label_lookup(classes, label_type)
    rows: list[ClipRow] = []
    dropped: list[str] = []
    source_of_key: dict[str, str] = {}
    for row in _select_split(parsed, layout.split, has_split, path):
        unknown = [label for label in row.labels if label not in index_of]
        if unknown and not layout.drop_unknown_labels:  # only a class file leaves labels out
            raise DatasetError(
                f"{row.source}: label {excerpt(unknown[0])} is not a class {classes_from} (as {label_type}); "
                "pass --drop-unknown-labels to drop it"
            )
        labels = tuple(sorted({index_of[label] for label in row.labels if label in index_of}))
        if not multi_label and not labels:
            if unknown:
                dropped.append(row.source)
                continue
            raise DatasetError(
                f"{row.source}: no label; a single-label collection needs one per row (pass --multi-label if rows "
                "may have none)"
            )
        rows.append(_clip_row(row, labels, layout, source_of_key))
    if not rows:
        raise DatasetError(f"{os.fspath(path)}: no rows left to shard (all dropped)")
    return CustomTable(
        rows, classes, multi_label, label_mode, label_type, classes_from, has_times, layout.split, len(parsed), dropped
    )


def _select_split(parsed: list[_Parsed], split: str | None, has_split: bool, path: str | os.PathLike) -> list[_Parsed]:
    values = sorted({row.split or "" for row in parsed})
    if has_split and split is None:
        raise DatasetError(
            f"{os.fspath(path)}: the CSV has a split column ({excerpt(', '.join(values), 200)}); pass --split NAME "
            "to shard one split (the splits are sharded one at a time, into their own folders)"
        )
    if split is None:
        return parsed
    folder_name(split, "--split")
    kept = [row for row in parsed if row.split == split]
    if not kept:
        raise DatasetError(
            f"{os.fspath(path)}: no row of split {excerpt(split)}; its split column holds {excerpt(values, 200)}"
        )
    return kept


def _clip_row(row: _Parsed, labels: tuple[int, ...], layout: CsvLayout, source_of_key: dict[str, str]) -> ClipRow:
    """The ClipRow of `row`; DatasetError naming both lines when an earlier row gave the same key."""
    if row.key_text is not None:
        key = key_stem(row.key_text)
        if not key:
            raise DatasetError(f"{row.source}: empty key in the --key-column column")
    else:
        stem = row.video if layout.by_id else PurePosixPath(row.video).stem
        key = f"{key_stem(stem)}_{round(row.start_s * 1000)}"
    if key in source_of_key:
        raise DatasetError(
            f"{row.source}: key {key} is already the key of {source_of_key[key]}: the same segment twice (video and "
            "start), or videos whose names differ only in characters a key cannot hold"
        )
    source_of_key[key] = row.source
    video_path = None if layout.by_id else row.video
    return ClipRow(key, row.video, row.start_s, row.end_s, labels, row.source, video_path)
