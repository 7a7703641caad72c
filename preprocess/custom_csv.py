"""Reader of a labelled video collection's own CSV (tools/shard_csv.py) into the shard job's rows.

The CSV has a header naming its columns; each row is one sample: a video (a path inside the video folder, or an id
found by name templates), an optional segment [start, end) in seconds or HH:MM:SS.ff, one or several labels (class
names or indices, `;`-separated) and an optional split (`preprocess.custom_fields`). Classes come from a class file
(`preprocess.class_files`) or from the labels of all rows (every split: train and test share one list); single- or
multi-label is stated or detected, and said in the plan's `describe()`.

A job of an array streams the file (`CustomCsvRows`): one pass decides what needs every row
(`preprocess.custom_plan`), and the job parses and checks only the rows of its own shards, so its memory is O(rows /
jobs) plus the split's line numbers and its time one read of the file. `read_custom_csv` reads the split whole. Bad
input raises `DatasetError` naming file:line and saying what to do.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any

import numpy as np

from preprocess.class_files import label_lookup
from preprocess.custom_fields import CsvLayout, clip_row
from preprocess.custom_plan import CustomCsvPlan, plan_custom_csv
from preprocess.datasets import ClipRow, DatasetError, line_blocks, parse_csv_line
from preprocess.rows import sorted_positions


class CustomCsvRows:
    """The rows of one split of a collection's CSV as the shard job reads them (`preprocess.rows.RowSource`): planned
    by one streaming pass (`plan_custom_csv`, on construction), each row parsed and checked when selected; `limit`
    keeps the split's first rows."""

    def __init__(self, path: str | os.PathLike, layout: CsvLayout, limit: int | None = None) -> None:
        self.plan: CustomCsvPlan = plan_custom_csv(path, layout)
        self.lines = self.plan.lines if limit is None else self.plan.lines[:limit]
        self._index_of = label_lookup(self.plan.classes, self.plan.label_type)

    @property
    def num_rows(self) -> int:
        return int(self.lines.size)

    def identity(self) -> dict[str, Any]:
        """The rows' count and the CSV's sha256 (which rows it gives is the layout's, in the job's inputs)."""
        return {"num_rows": self.num_rows, "csv_sha256": self.plan.csv_sha256}

    def select(self, indices: np.ndarray) -> dict[int, ClipRow]:
        """The rows at `indices` (positions in the split), parsed in CSV order from one more read of the file; two
        selected rows with one key -> DatasetError naming both lines (a job checks the rows it shards: with one job,
        the whole split)."""
        wanted = sorted_positions(indices, self.num_rows)
        lines = self.lines[wanted]
        plan, rows, source_of_key = self.plan, {}, {}
        for first, block in line_blocks(plan.path) if wanted.size else ():
            lo, hi = np.searchsorted(lines, [first, first + len(block)])
            for position, line_no in zip(wanted[lo:hi].tolist(), lines[lo:hi].tolist(), strict=True):
                source = f"{plan.path}:{line_no}"
                fields = parse_csv_line(source, block[line_no - first])
                row = clip_row(source, fields, plan.columns, plan.layout, self._index_of, plan.label_type)
                _claim_key(row, source_of_key)
                rows[position] = row
            if hi == lines.size:
                break
        return rows


def _claim_key(row: ClipRow, source_of_key: dict[str, str]) -> None:
    """Note `row`'s key; DatasetError naming both lines when an earlier row gave the same key."""
    if row.key in source_of_key:
        raise DatasetError(
            f"{row.source}: key {row.key} is already the key of {source_of_key[row.key]}: the same segment twice "
            "(video and start), or videos whose names differ only in characters a key cannot hold"
        )
    source_of_key[row.key] = row.source


@dataclass
class CustomTable:
    """The rows of one split, whole and in CSV order, and the plan that chose them."""

    rows: list[ClipRow]
    plan: CustomCsvPlan

    @property
    def classes(self) -> list[dict[str, Any]]:
        return self.plan.classes

    @property
    def multi_label(self) -> bool:
        return self.plan.multi_label

    @property
    def label_type(self) -> str:
        return self.plan.label_type

    @property
    def dropped(self) -> list[str]:
        return self.plan.dropped

    def describe(self) -> str:
        return self.plan.describe(len(self.rows))


def read_custom_csv(path: str | os.PathLike, layout: CsvLayout) -> CustomTable:
    """The rows of `layout.split` (all rows without a split column), in CSV order, with the collection's classes.

    Errors name file:line: a missing column (and the option naming it), a row with another column count, a
    malformed time or end <= start, a video path outside the folder, a label outside the class file (unless
    drop_unknown_labels: then dropped, and a single-label row left without one is dropped and listed), a row without
    a label in a single-label CSV, two rows giving one key (naming both lines), a split holding no rows. Times,
    videos and keys are checked for the split's rows (`CustomCsvRows.select`), the rest for every row.
    """
    source = CustomCsvRows(path, layout)
    rows = source.select(np.arange(source.num_rows))
    return CustomTable([rows[i] for i in range(source.num_rows)], source.plan)
