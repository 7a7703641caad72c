"""What every row of a collection's CSV decides (tools/shard_csv.py), from one streaming pass in O(classes) memory
plus the split's line numbers (8 bytes a row): the classes (a class file's, or the labels of every row, every split),
how labels are written (names or indices), single- or multi-label (stated, or detected from every row), the split's
rows (its split column), and the rows dropped for unknown labels. The rows themselves are parsed and checked (times,
video, key) only when a job selects them (`preprocess.custom_csv.CustomCsvRows`).

The pass parses each block of lines with one C-level `csv.reader` (no Python step per line for a block without
quotes or blank lines) and falls back to `parse_csv_line` line by line (the rows `csv_rows` yields, with its
messages) from any line that reader would join to the next or refuses; it remembers the labels of up to CELLS_CACHED
distinct label cells and whether each split cell is the one wanted, which a CSV repeats row after row. Its cost at
2M rows: about 1.6 s of CPU (docs/PERFORMANCE.md). Bad input raises `DatasetError` naming file:line and saying what
to do, as `preprocess.custom_csv.read_custom_csv` documents.
"""

from __future__ import annotations

import contextlib
import csv
import hashlib
import itertools
import os
from array import array
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from typing import Any

import numpy as np

from preprocess.class_files import (
    choose_label_type,
    collect_classes,
    index_labels,
    label_lookup,
    read_class_file,
)
from preprocess.custom_fields import CsvColumns, CsvLayout, folder_name, header_columns, split_labels
from preprocess.datasets import MAX_FIELDS, DatasetError, line_blocks, parse_csv_line
from shards.text import excerpt

BLOCK_BYTES = 1 << 20  # read and parsed at a time
# Distinct label and split cells remembered: a CSV repeats its classes (or their combinations) and its splits.
CELLS_CACHED = 1 << 16


@dataclass
class CustomCsvPlan:
    """A CSV's reading decided from all its rows: `lines` are the 1-based line numbers of the split's rows (all rows
    without a split column) in CSV order, the dropped ones left out; `csv_sha256` is the file's."""

    path: str
    layout: CsvLayout
    columns: CsvColumns
    classes: list[dict[str, Any]]
    classes_from: str
    label_type: str  # names | indices
    multi_label: bool
    label_mode: str  # e.g. "multi-label (detected: line 3 has 2 labels)"
    num_csv_rows: int
    lines: np.ndarray
    dropped: list[str]  # sources of rows left without a label (--drop-unknown-labels)
    csv_sha256: str

    @property
    def has_times(self) -> bool:
        return self.columns.start is not None

    def describe(self, num_rows: int) -> str:
        """One line for people: `num_rows` rows of the split, the classes, the label mode, the segments."""
        split = f" of split {self.layout.split}" if self.layout.split is not None else ""
        times = (
            "segments from the start/end columns (files are whole videos, decoded from each start)"
            if self.has_times
            else "one sample per file, from its beginning"
        )
        dropped = f"; {len(self.dropped)} rows dropped (no known label left)" if self.dropped else ""
        return (
            f"{num_rows} rows{split} ({self.num_csv_rows} in the CSV); {len(self.classes)} classes "
            f"{self.classes_from} (labels as {self.label_type}); {self.label_mode}; {times}{dropped}"
        )


def csv_records(path: str | os.PathLike, digest: Any = None) -> Iterator[tuple[int, list[str]]]:
    """(line number, fields) of each non-blank line, the header included, as `csv_rows` parses them (its errors
    too) except that the fields are not stripped: strip the ones you read. `digest` (if given) is updated with every
    byte."""
    return itertools.chain.from_iterable(
        _block_records(os.fspath(path), first, lines) for first, lines in line_blocks(path, BLOCK_BYTES, digest)
    )


def _block_records(where: str, first: int, lines: list[str]) -> Iterator[tuple[int, list[str]]]:
    """The records of a block of lines starting at line `first`. A block without quotes, blank lines or lines of
    MAX_FIELDS characters (a line can hold no more fields) is one record a line, parsed by one C-level reader with
    no Python step per line; any other block is parsed as `_careful_records` parses it."""
    plain = all(map(str.strip, lines)) and max(map(len, lines), default=0) < MAX_FIELDS
    if not plain or '"' in "\n".join(lines):
        return _careful_records(where, first, lines)
    return enumerate(csv.reader(lines, skipinitialspace=True, strict=True), first)


def _careful_records(where: str, first: int, lines: list[str]) -> Iterator[tuple[int, list[str]]]:
    """The block's records parsed by one C-level reader, and line by line from any line that reader joins to the
    next (a quote left open) or refuses."""
    reader = csv.reader(lines, skipinitialspace=True, strict=True)
    done = 0  # lines read, each one record
    # A line the reader refuses is parsed again below, by parse_csv_line, whose error names its file:line.
    with contextlib.suppress(csv.Error):
        for fields in reader:
            if reader.line_num != done + 1 or len(fields) > MAX_FIELDS:
                break
            done += 1
            if len(fields) > 1 or lines[done - 1].strip():
                yield first + done - 1, fields
    for j in range(done, len(lines)):
        if lines[j].strip():
            yield first + j, parse_csv_line(f"{where}:{first + j}", lines[j])


@dataclass
class _Seen:
    """What the pass gathers: every label's first row, the first row of several labels, split values, the split's
    line numbers and its first row without a label."""

    num_rows: int
    first_source: dict[str, str]
    several: tuple[str, tuple[str, ...]] | None
    split_values: set[str]
    lines: np.ndarray
    unlabelled: str | None


def _survey(records: Iterable[tuple[int, list[str]]], where: str, columns: CsvColumns, layout: CsvLayout) -> _Seen:
    count, label, split, wanted = columns.count, columns.label, columns.split, layout.split
    separator = layout.label_separator
    label_cache: dict[str, tuple[str, ...]] = {}
    split_cache: dict[str, bool] = {}  # a split cell: whether its row is of the wanted split
    first_source: dict[str, str] = {}
    split_values: set[str] = set()
    lines = array("q")
    num_rows, several, unlabelled = 0, None, None
    for line_no, fields in records:
        num_rows += 1
        if len(fields) != count:
            raise DatasetError(f"{where}:{line_no}: {len(fields)} columns, the header has {count}")
        labels = label_cache.get(fields[label])
        if labels is None:
            labels = split_labels(fields[label], separator)
            if len(label_cache) < CELLS_CACHED:
                label_cache[fields[label]] = labels
            for name in labels:
                first_source.setdefault(name, f"{where}:{line_no}")
        if several is None and len(labels) > 1:
            several = (f"{where}:{line_no}", labels)
        if split is not None:
            keep = split_cache.get(fields[split])
            if keep is None:
                value = fields[split].strip()
                keep = value == wanted
                if len(split_cache) < CELLS_CACHED:
                    split_cache[fields[split]] = keep
                    split_values.add(value)
            if not keep:
                continue
        lines.append(line_no)
        if unlabelled is None and not labels:
            unlabelled = f"{where}:{line_no}"
    return _Seen(num_rows, first_source, several, split_values, np.frombuffer(lines, dtype=np.int64), unlabelled)


def plan_custom_csv(path: str | os.PathLike, layout: CsvLayout) -> CustomCsvPlan:
    """The plan of `path` read by `layout`, from one pass over its rows (two when some label is no class of a
    class file). DatasetError naming file:line for a bad header, a row with another column count, a label that is
    no class index (--label-type indices) or no printable class name, several labels where --single-label says one,
    a split column without --split or a split without rows, a label outside the class file (unless
    drop_unknown_labels), a row of the split without a label in a single-label CSV, no row left."""
    where = os.fspath(path)
    digest = hashlib.sha256()
    records = csv_records(path, digest)
    line_no, header = next(records, (0, []))
    columns = header_columns([name.strip() for name in header], layout, f"{where}:{line_no}" if line_no else where)
    seen = _survey(records, where, columns, layout)
    if not seen.num_rows:
        raise DatasetError(f"{where}: no rows after the header")
    given = read_class_file(layout.classes_file) if layout.classes_file is not None else None
    label_type = choose_label_type(layout.label_type, seen.first_source, given)
    first_source = seen.first_source
    if label_type == "indices":  # '007' is class 7; a label that is no index is named at its first row
        first_source = {}
        for name, source in seen.first_source.items():
            first_source.setdefault(index_labels((name,), source)[0], source)
    if given is None:
        classes = collect_classes(((source, (name,)) for name, source in first_source.items()), label_type, where)
        classes_from = "collected from the CSV"
    else:
        classes, classes_from = given, f"from {os.fspath(layout.classes_file)}"
    multi_label, label_mode = _label_mode(seen.several, layout.multi_label, label_type)
    _check_split(seen, columns, layout.split, where)
    lines, dropped = seen.lines, []
    index_of = label_lookup(classes, label_type)
    if any(name not in index_of for name in first_source):  # some row has a label outside the class file
        lines, dropped = _without_unknown_labels(
            path, lines, layout, columns, index_of, label_type, classes_from, multi_label
        )
    elif seen.unlabelled is not None and not multi_label:
        raise _no_label(seen.unlabelled)
    if not lines.size:
        raise DatasetError(f"{where}: no rows left to shard (all dropped)")
    return CustomCsvPlan(
        where, layout, columns, classes, classes_from, label_type, multi_label, label_mode, seen.num_rows, lines,
        dropped, digest.hexdigest(),
    )  # fmt: skip


def _no_label(source: str) -> DatasetError:
    return DatasetError(
        f"{source}: no label; a single-label collection needs one per row (pass --multi-label if rows may have none)"
    )


def _label_mode(several: tuple[str, tuple[str, ...]] | None, stated: bool | None, label_type: str) -> tuple[bool, str]:
    if stated is not None:
        kind = "multi-label" if stated else "single-label"
        flag = "--multi-label" if stated else "--single-label"
        if not stated and several is not None:
            source, labels = several
            labels = index_labels(labels, source) if label_type == "indices" else labels
            raise DatasetError(
                f"{source}: {len(labels)} labels {excerpt(list(labels), 200)}, but {flag} says one per row (a class "
                "name holding the separator? set --label-separator)"
            )
        return stated, f"{kind} (stated by {flag})"
    if several is not None:
        line = several[0].rsplit(":", 1)[1]
        return True, f"multi-label (detected: line {line} has {len(several[1])} labels)"
    return False, "single-label (detected: no row has several labels)"


def _check_split(seen: _Seen, columns: CsvColumns, split: str | None, where: str) -> None:
    values = sorted(seen.split_values)
    if columns.split is not None and split is None:
        raise DatasetError(
            f"{where}: the CSV has a split column ({excerpt(', '.join(values), 200)}); pass --split NAME to shard one "
            "split (the splits are sharded one at a time, into their own folders)"
        )
    if split is not None:
        folder_name(split, "--split")
        if not seen.lines.size:
            raise DatasetError(
                f"{where}: no row of split {excerpt(split)}; its split column holds {excerpt(values, 200)}"
            )


def _without_unknown_labels(
    path: str | os.PathLike,
    lines: np.ndarray,
    layout: CsvLayout,
    columns: CsvColumns,
    index_of: dict[str, int],
    label_type: str,
    classes_from: str,
    multi_label: bool,
) -> tuple[np.ndarray, list[str]]:
    """The split's `lines` without the rows left with no known label, and those rows' sources (a second pass,
    over the split's rows in order): DatasetError at the first label outside the classes unless
    layout.drop_unknown_labels, or at a row without a label in a single-label CSV."""
    keep = np.ones(lines.size, dtype=bool)
    dropped: list[str] = []
    i = 0
    for line_no, fields in csv_records(path):
        if i == lines.size:
            break
        if line_no != lines[i]:
            continue
        source = f"{os.fspath(path)}:{line_no}"
        labels = split_labels(fields[columns.label], layout.label_separator)
        labels = index_labels(labels, source) if label_type == "indices" else labels
        unknown = [name for name in labels if name not in index_of]
        if unknown and not layout.drop_unknown_labels:
            raise DatasetError(
                f"{source}: label {excerpt(unknown[0])} is not a class {classes_from} (as {label_type}); pass "
                "--drop-unknown-labels to drop it"
            )
        if not multi_label and len(unknown) == len(labels):  # no known label left
            if not unknown:
                raise _no_label(source)
            keep[i] = False
            dropped.append(source)
        i += 1
    return lines[keep], dropped
