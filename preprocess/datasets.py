"""Readers for the AudioSet CSV files and the CSV parsing every reader shares (VGGSound's: `preprocess.vggsound`;
the lookup of a clip's video file: `preprocess.videos`).

Every reader returns `ClipRow`s whose `key` is the shard key (no dots: DALI takes everything after the first
dot as the extension). Bad input raises `DatasetError` naming the file and line and saying what to do, quoting what
it read as a bounded excerpt; lines, fields per line and rows are bounded, and class names must be printable.
"""

import codecs
import csv
import io
import itertools
import os
import re
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from shards.manifest import MAX_CLASSES, MAX_SPLIT_SAMPLES
from shards.text import excerpt, name_problem

# YouTube ids are [A-Za-z0-9_-] (often starting with '-'); anything else could put a dot or a slash in a key.
_YTID_RE = re.compile(r"[A-Za-z0-9_-]+")
# Bounds that keep a key and its member names within a ustar header's 100-byte name (YouTube ids have 11 chars).
MAX_YTID_CHARS = 64
MAX_SECONDS = 1_000_000.0
_SPLIT_NAME_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]*")
_SECONDS_RE = re.compile(r"[0-9]+(?:\.[0-9]*)?")  # float() would also take '1_0', 'nan', '1e3' and non-ASCII digits
# A CSV line: AudioSet's are ~100 characters, a row of many labels a few KB; read no further than this into one.
MAX_LINE_CHARS = 1 << 20
MAX_FIELDS = 1024  # columns of a row (the readers look each header name up among the others)
MAX_ROWS = MAX_SPLIT_SAMPLES  # a split's rows, as the shard job plans them


class DatasetError(ValueError):
    """Bad dataset input; the message names the file (and line) and says what to do."""


@dataclass(frozen=True)
class ClipRow:
    """One clip of a dataset CSV.

    key: shard key, no dots (AudioSet `{ytid}_{start_ms}`, VGGSound `{ytid}_{start_s:06d}`).
    labels: sorted, distinct class indices. source: `path:LINE` of the CSV row, for error messages.
    video_path: the video's path relative to the video folder when the CSV names its file (tools/shard_csv.py);
    None: the file is found by name templates over the row's fields.
    """

    key: str
    ytid: str
    start_s: float
    end_s: float
    labels: tuple[int, ...]
    source: str
    video_path: str | None = None


def read_lines(path: str | os.PathLike) -> Iterator[tuple[int, str]]:
    """Yields (1-based line number, line) of a UTF-8 text file; an unreadable file, a line longer than
    MAX_LINE_CHARS (refused before more of it is read) or more than MAX_ROWS lines -> DatasetError."""
    try:
        # utf-8-sig: a BOM written by a spreadsheet would otherwise end up in the first field.
        with open(path, encoding="utf-8-sig") as f:
            for line_no in itertools.count(1):
                line = f.readline(MAX_LINE_CHARS + 1)
                if not line:
                    return
                if len(line) > MAX_LINE_CHARS and not line.endswith("\n"):
                    raise _long_line(path, line_no, line)
                if line_no > MAX_ROWS + 1:  # + 1: a header
                    raise _too_many_lines(path)
                yield line_no, line
    except (OSError, UnicodeDecodeError) as e:
        raise _unreadable(path, e) from e


def _long_line(path: str | os.PathLike, line_no: int, start: str) -> DatasetError:
    return DatasetError(
        f"{os.fspath(path)}:{line_no}: a line of more than {MAX_LINE_CHARS} characters, starting "
        f"{excerpt(start)}: not a CSV row or class name; is this the right file?"
    )


def _too_many_lines(path: str | os.PathLike) -> DatasetError:
    return DatasetError(f"{os.fspath(path)}: more than {MAX_ROWS} lines; split it into smaller files")


def _unreadable(path: str | os.PathLike, err: Exception) -> DatasetError:
    return DatasetError(f"{os.fspath(path)}: cannot read it as UTF-8 text ({err})")


def line_blocks(
    path: str | os.PathLike, block_bytes: int = 4 << 20, digest: Any = None
) -> Iterator[tuple[int, list[str]]]:
    """Yields (1-based number of its first line, lines without their line break) for consecutive blocks of about
    `block_bytes` of a UTF-8 text file, the lines as `read_lines` reads them (a byte-order mark skipped, '\\r\\n' and
    '\\r' ending lines too) and bounded as it bounds them; `digest` (if given) is updated with every byte."""
    decoder = io.IncrementalNewlineDecoder(codecs.getincrementaldecoder("utf-8-sig")(), translate=True)
    first, rest = 1, ""
    try:
        with open(path, "rb") as f:
            while True:
                block = f.read(block_bytes)
                if digest is not None:
                    digest.update(block)
                lines = (rest + decoder.decode(block, final=not block)).split("\n")
                rest = lines.pop() if block else ""  # a line not ended yet
                if not block and not lines[-1]:
                    lines.pop()  # the file ends with a line break
                if len(rest) > MAX_LINE_CHARS or (lines and max(map(len, lines)) > MAX_LINE_CHARS):
                    j = next((j for j, line in enumerate(lines) if len(line) > MAX_LINE_CHARS), len(lines))
                    line = lines[j] if j < len(lines) else rest
                    raise _long_line(path, first + j, line[: MAX_LINE_CHARS + 1])
                if first + len(lines) - 1 > MAX_ROWS + 1:  # + 1: a header
                    raise _too_many_lines(path)
                yield first, lines
                first += len(lines)
                if not block:
                    return
    except (OSError, UnicodeDecodeError) as e:
        raise _unreadable(path, e) from e


def csv_rows(path: str | os.PathLike, skip_comments: bool = False) -> Iterator[tuple[str, list[str]]]:
    """Yields (`path:LINE`, fields) for each non-blank line, parsed as one CSV record (no multi-line fields).

    With skip_comments, lines starting with '#' are skipped. A broken quote or more than MAX_FIELDS fields ->
    DatasetError naming the line.
    """
    for line_no, line in read_lines(path):
        if not line.strip() or (skip_comments and line.startswith("#")):
            continue
        source = f"{os.fspath(path)}:{line_no}"
        yield source, parse_csv_line(source, line)


def parse_csv_line(source: str, line: str) -> list[str]:
    """The fields of one CSV line, each stripped; a broken quote or more than MAX_FIELDS fields -> DatasetError
    naming `source`."""
    try:
        fields = next(csv.reader([line], skipinitialspace=True, strict=True))
    except csv.Error as e:
        raise DatasetError(f"{source}: malformed CSV line ({e}): {excerpt(line.rstrip())}") from e
    if len(fields) > MAX_FIELDS:
        raise DatasetError(f"{source}: {len(fields)} fields, more than a row of a dataset CSV has ({MAX_FIELDS})")
    return [field.strip() for field in fields]


def check_ytid(ytid: str, source: str) -> None:
    if not _YTID_RE.fullmatch(ytid) or len(ytid) > MAX_YTID_CHARS:
        raise DatasetError(
            f"{source}: {excerpt(ytid)} is not a YouTube id (letters, digits, '_' and '-' only, "
            f"at most {MAX_YTID_CHARS} of them)"
        )


def claim_key(key: str, source: str, source_of_key: dict[str, str]) -> None:
    """Note that clip `key` is listed at `source`; DatasetError naming both lines when it was listed before."""
    if key in source_of_key:
        raise DatasetError(f"{source}: clip {key} already listed at {source_of_key[key]}")
    source_of_key[key] = source


def read_audioset_classes(path: str | os.PathLike) -> list[tuple[str, str]]:
    """Reads class_labels_indices.csv (header `index,mid,display_name`) -> [(mid, display_name)] by index.

    The index column must count 0, 1, 2, ... in order and mids must be distinct; a missing file, a bad header,
    a malformed row, a mid or name that is no printable name (`check_class_name`) or an empty class list, or one of
    more than MAX_CLASSES -> DatasetError naming file:line.
    """
    rows = csv_rows(path)
    header_source, header = next(rows, (os.fspath(path), None))
    if header != ["index", "mid", "display_name"]:
        raise DatasetError(f"{header_source}: expected the header 'index,mid,display_name' of class_labels_indices.csv")
    classes: list[tuple[str, str]] = []
    first_line_of_mid: dict[str, str] = {}
    for source, fields in rows:
        if len(fields) != 3:
            raise DatasetError(f"{source}: expected 3 columns index,mid,display_name, got {len(fields)}")
        index, mid, display_name = fields
        if index != str(len(classes)):
            raise DatasetError(f"{source}: index {excerpt(index)} out of order, expected {len(classes)}")
        if len(classes) >= MAX_CLASSES:
            raise DatasetError(f"{source}: more than {MAX_CLASSES} classes")
        if not mid:
            raise DatasetError(f"{source}: empty mid")
        if mid in first_line_of_mid:
            raise DatasetError(f"{source}: mid {excerpt(mid)} already defined at {first_line_of_mid[mid]}")
        check_class_name(mid, "mid", source)
        check_class_name(display_name, "display_name", source)
        first_line_of_mid[mid] = source
        classes.append((mid, display_name))
    if not classes:
        raise DatasetError(f"{os.fspath(path)}: no classes after the header")
    return classes


def check_class_name(name: str, what: str, source: str) -> str:
    """`name` if a class name (or id) read at `source` can be shown to people: DatasetError naming `source` when it
    holds a control character (terminal escapes; printed, plotted and written to CSVs) or is pages long."""
    if problem := name_problem(name):
        raise DatasetError(f"{source}: {what} {excerpt(name)} {problem}; remove it from the file")
    return name


def _parse_seconds(text: str, what: str, source: str) -> float:
    if not _SECONDS_RE.fullmatch(text) or float(text) > MAX_SECONDS:
        raise DatasetError(
            f"{source}: {what} {excerpt(text, 40)} is not a number of seconds: write a finite value in "
            f"[0, {MAX_SECONDS:.0f}] as digits with an optional decimal point"
        )
    return float(text)


def read_audioset_segments(
    path: str | os.PathLike, class_mids: list[str], drop_unknown_labels: bool = False
) -> list[ClipRow]:
    """Reads an AudioSet segment CSV (balanced_train/eval/unbalanced_train_segments.csv) in file order: every row
    as `audioset_row` parses it; a duplicate key -> DatasetError naming both lines. (The shard tool streams the
    file instead: `preprocess.rows.CsvRows`.)"""
    parse = audioset_row_parser(class_mids, drop_unknown_labels)
    rows: list[ClipRow] = []
    source_of_key: dict[str, str] = {}
    for source, fields in csv_rows(path, skip_comments=True):
        row = parse(source, fields)
        claim_key(row.key, source, source_of_key)
        rows.append(row)
    return rows


def audioset_row_parser(
    class_mids: list[str], drop_unknown_labels: bool = False
) -> Callable[[str, list[str]], ClipRow]:
    """The parser of one row of an AudioSet segment CSV, `parse(source, fields) -> ClipRow`.

    Format: '#' comment lines, then `YTID, start_seconds, end_seconds, "mid,mid,..."`. class_mids[i] is the
    mid of class i; labels become sorted distinct indices. An unknown mid -> DatasetError (file:line, the mid,
    the --drop-unknown-labels flag) unless drop_unknown_labels, which drops it (a row left without labels
    is kept). A malformed row (column count, YouTube id, times, end <= start) -> DatasetError naming file:line.
    """
    class_of_mid = {mid: index for index, mid in enumerate(class_mids)}

    def parse(source: str, fields: list[str]) -> ClipRow:
        if len(fields) != 4:
            raise DatasetError(
                f"{source}: expected 4 columns YTID, start_seconds, end_seconds, positive_labels, got {len(fields)}"
            )
        ytid, start_text, end_text, mids_text = fields
        check_ytid(ytid, source)
        start_s = _parse_seconds(start_text, "start", source)
        end_s = _parse_seconds(end_text, "end", source)
        if end_s <= start_s:
            raise DatasetError(f"{source}: end {end_text} is not after start {start_text}")
        labels: set[int] = set()
        for mid in filter(None, (m.strip() for m in mids_text.split(","))):
            if mid in class_of_mid:
                labels.add(class_of_mid[mid])
            elif not drop_unknown_labels:
                raise DatasetError(
                    f"{source}: label {excerpt(mid)} is not in the class list; pass --drop-unknown-labels to drop it"
                )
        return ClipRow(f"{ytid}_{round(start_s * 1000)}", ytid, start_s, end_s, tuple(sorted(labels)), source)

    return parse


def read_class_list(path: str | os.PathLike) -> list[str]:
    """Reads one class name per line (surrounding whitespace stripped, blank lines ignored) in file order.

    A duplicate name, a name that is no printable name (`check_class_name`), an empty list or one of more than
    MAX_CLASSES names -> DatasetError naming the file (and both lines).
    """
    names: list[str] = []
    line_of_name: dict[str, int] = {}
    for line_no, line in read_lines(path):
        name = line.strip()
        if not name:
            continue
        source = f"{os.fspath(path)}:{line_no}"
        if name in line_of_name:
            raise DatasetError(f"{source}: class {excerpt(name)} already listed at line {line_of_name[name]}")
        if len(names) >= MAX_CLASSES:
            raise DatasetError(f"{source}: more than {MAX_CLASSES} classes")
        line_of_name[name] = line_no
        check_class_name(name, "class", source)
        names.append(name)
    if not names:
        raise DatasetError(f"{os.fspath(path)}: no class names")
    return names


def split_name_from_segments(path: str | os.PathLike) -> str:
    """The split an AudioSet segment CSV holds: 'eval_segments.csv' -> 'eval', any 'foo.csv' -> 'foo'.

    The name becomes a folder of the default output path: anything but letters, digits, '_', '-', '.' (not first)
    -> DatasetError, so that '..csv' cannot send the shards to a parent folder.
    """
    split = Path(path).name.removesuffix(".csv").removesuffix("_segments")
    if not _SPLIT_NAME_RE.fullmatch(split):
        raise DatasetError(
            f"{os.fspath(path)}: {excerpt(split)} is not a usable split name (letters, digits, '_', '-', '.', not "
            "first); rename the file, e.g. eval_segments.csv"
        )
    return split
