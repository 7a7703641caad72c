"""Reader of vggsound.csv (no header; `YTID,start_seconds,label,split`): rows are 10 s from a whole-second start, keys
`{YTID}_{start:06d}`, classes the sorted distinct labels of every row (both splits) or a class list given.

The shard tool streams the file (`preprocess.rows.CsvRows` with `vggsound_row_parser` and `vggsound_split_filter`);
`read_vggsound` reads it whole. Bad input raises `DatasetError` naming file:line.
"""

import os
import re
from collections.abc import Callable

from preprocess.datasets import (
    MAX_SECONDS,
    ClipRow,
    DatasetError,
    check_class_name,
    check_ytid,
    claim_key,
    csv_rows,
)
from shards.manifest import MAX_CLASSES
from shards.text import excerpt

VGGSOUND_SPLITS: tuple[str, ...] = ("train", "test")
VGGSOUND_SEGMENT_S = 10.0
_WHOLE_SECONDS_RE = re.compile(r"[0-9]+")


def vggsound_fields(source: str, fields: list[str]) -> tuple[str, int, str, str]:
    """(ytid, start seconds, label, split) of one row, checked: 4 columns, a YouTube id, a whole number of seconds,
    a printable label (`check_class_name`), a split of VGGSOUND_SPLITS; DatasetError naming `source` otherwise."""
    if len(fields) != 4:
        raise DatasetError(f"{source}: expected 4 columns YTID,start_seconds,label,split, got {len(fields)}")
    ytid, start_text, label, row_split = fields
    check_ytid(ytid, source)
    if not _WHOLE_SECONDS_RE.fullmatch(start_text) or int(start_text) > MAX_SECONDS:
        raise DatasetError(
            f"{source}: start {excerpt(start_text, 40)} is not a whole number of seconds in [0, {MAX_SECONDS:.0f}]"
        )
    if not label:
        raise DatasetError(f"{source}: empty label")
    check_class_name(label, "label", source)
    if row_split not in VGGSOUND_SPLITS:
        raise DatasetError(f"{source}: split {excerpt(row_split)} is not one of {', '.join(VGGSOUND_SPLITS)}")
    return ytid, int(start_text), label, row_split


def check_split(split: str) -> str:
    if split not in VGGSOUND_SPLITS:
        raise DatasetError(f"split {excerpt(split)} is not one of {', '.join(VGGSOUND_SPLITS)}")
    return split


def vggsound_classes(path: str | os.PathLike) -> list[str]:
    """The sorted distinct labels of every row (both splits, so train and test share one list), read by streaming:
    every row is checked (`vggsound_fields`); more than MAX_CLASSES labels -> DatasetError."""
    labels = {vggsound_fields(source, fields)[2] for source, fields in csv_rows(path)}
    if len(labels) > MAX_CLASSES:
        raise DatasetError(f"{os.fspath(path)}: {len(labels)} distinct labels, more than {MAX_CLASSES} classes")
    return sorted(labels)


def vggsound_split_filter(split: str) -> Callable[[str, list[str]], bool]:
    """`keep(source, fields)`: whether a row is of `split`, each row checked (`vggsound_fields`) as it is counted."""
    check_split(split)
    return lambda source, fields: vggsound_fields(source, fields)[3] == split


def vggsound_row_parser(class_names: list[str]) -> Callable[[str, list[str]], ClipRow]:
    """`parse(source, fields) -> ClipRow`: the row checked (`vggsound_fields`) and its label looked up in
    `class_names` (DatasetError naming `source` when it is not there)."""
    class_of_name = {name: index for index, name in enumerate(class_names)}

    def parse(source: str, fields: list[str]) -> ClipRow:
        ytid, start_s, label, _ = vggsound_fields(source, fields)
        if label not in class_of_name:
            raise DatasetError(f"{source}: label {excerpt(label)} is not in the class list")
        key = f"{ytid}_{start_s:06d}"
        return ClipRow(key, ytid, float(start_s), start_s + VGGSOUND_SEGMENT_S, (class_of_name[label],), source)

    return parse


def read_vggsound(
    path: str | os.PathLike, split: str, classes: list[str] | None = None
) -> tuple[list[str], list[ClipRow]]:
    """Reads vggsound.csv whole -> (class_names, rows of `split`): class_names `classes` if given, else
    `vggsound_classes(path)`; every row checked (`vggsound_fields`), a `split` row's label must be a class, and a key
    listed twice in `split` -> DatasetError naming both lines."""
    check_split(split)
    class_names = list(classes) if classes is not None else vggsound_classes(path)
    if len(class_names) > MAX_CLASSES:
        raise DatasetError(f"{os.fspath(path)}: {len(class_names)} distinct labels, more than {MAX_CLASSES} classes")
    parse, keep = vggsound_row_parser(class_names), vggsound_split_filter(split)
    rows: list[ClipRow] = []
    source_of_key: dict[str, str] = {}
    for source, fields in csv_rows(path):
        if keep(source, fields):
            row = parse(source, fields)
            claim_key(row.key, source, source_of_key)
            rows.append(row)
    return class_names, rows
