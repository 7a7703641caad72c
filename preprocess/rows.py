"""A split's rows as the shard job reads them: a list in memory, or a CSV streamed so that a job of a large array
costs what its share costs.

`CsvRows` reads its CSV twice, in blocks, never holding more than a block and the rows asked for: a first pass
counts the rows (numpy over the block's bytes, no Python loop per line) and hashes the file; `select` then walks the
file again and parses and checks only the rows at the given positions. A job of N plans the split from the count
alone (`preprocess.job_state.plan_shards`, so shard k holds the same rows as when the whole file was read) and
parses about rows / N of them: memory O(rows / N) plus the plan's 8 bytes per row.

A line is a row unless it is blank (only ASCII whitespace) or, with `skip_comments`, starts with '#'; lines end at
'\\n' ('\\r\\n' too); a UTF-8 byte-order mark at the start is skipped. Bounds as `preprocess.datasets.read_lines`:
lines of at most MAX_LINE_CHARS bytes, at most MAX_ROWS rows.
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any, Protocol

import numpy as np

from preprocess.datasets import MAX_LINE_CHARS, MAX_ROWS, ClipRow, DatasetError, claim_key, parse_csv_line
from shards.text import excerpt

BLOCK_BYTES = 4 << 20  # read at a time: the memory a pass needs beyond the rows it keeps
_BOM = b"\xef\xbb\xbf"
_SPACE_BYTES = np.frombuffer(b" \t\n\r\v\f", np.uint8)


class RowSource(Protocol):
    """What the shard job needs of a split's rows."""

    @property
    def num_rows(self) -> int: ...

    def identity(self) -> dict[str, Any]:
        """What the rows' content contributes to the job's identity (`JobSpec.identity`)."""

    def select(self, indices: np.ndarray) -> dict[int, ClipRow]:
        """The rows at `indices` (positions in the split, any order), checked; DatasetError naming file:line."""


def sorted_positions(indices: np.ndarray, num_rows: int) -> np.ndarray:
    """`indices` (positions in a split of `num_rows` rows, any order) sorted without repeats, for one pass over a
    file in row order; IndexError when one is out of range."""
    wanted = np.unique(np.asarray(indices, dtype=np.int64))
    if wanted.size and not 0 <= wanted[0] <= wanted[-1] < num_rows:
        raise IndexError(f"row positions out of range 0..{num_rows - 1}")
    return wanted


class ListRows:
    """Rows already in memory (tests, and callers of the whole-file readers)."""

    def __init__(self, rows: Sequence[ClipRow]) -> None:
        self.rows = list(rows)

    @property
    def num_rows(self) -> int:
        return len(self.rows)

    def identity(self) -> dict[str, Any]:
        rows_hash = hashlib.sha256()
        for row in self.rows:
            rows_hash.update(f"{row.key},{row.start_s!r},{row.end_s!r},{list(row.labels)}\n".encode())
        return {"num_rows": len(self.rows), "rows_sha256": rows_hash.hexdigest()}

    def select(self, indices: np.ndarray) -> dict[int, ClipRow]:
        return {int(i): self.rows[int(i)] for i in indices}


class CsvRows:
    """The rows of a CSV file, each parsed by `parse_row(source, fields)` (a ClipRow, or DatasetError naming
    `source`) only when selected; `limit` keeps the first rows. Counting and hashing happen once, on first use.
    With `keep(source, fields)` only the lines it keeps are rows (a split column): every line is then parsed as it
    is counted, which costs a Python loop per line (VGGSound's 200k lines: about a second)."""

    def __init__(
        self,
        path: str | os.PathLike,
        parse_row: Callable[[str, list[str]], ClipRow],
        skip_comments: bool = False,
        limit: int | None = None,
        keep: Callable[[str, list[str]], bool] | None = None,
    ) -> None:
        self.path = Path(path)
        self.parse_row = parse_row
        self.keep = keep
        self.skip_comments = skip_comments
        self.limit = limit
        self._scan: tuple[int, str] | None = None

    def _scanned(self) -> tuple[int, str]:
        if self._scan is None:
            digest = hashlib.sha256()
            count = sum(len(starts) for _, starts, _, _ in self._blocks(digest))
            self._scan = (count if self.limit is None else min(count, self.limit), digest.hexdigest())
        return self._scan

    @property
    def num_rows(self) -> int:
        return self._scanned()[0]

    def identity(self) -> dict[str, Any]:
        num_rows, sha256 = self._scanned()
        return {"num_rows": num_rows, "csv_sha256": sha256}

    def select(self, indices: np.ndarray) -> dict[int, ClipRow]:
        """The rows at `indices`, parsed in file order; two selected rows with one key -> DatasetError naming both
        lines (a job checks the rows it shards: with one job, the whole split)."""
        wanted = sorted_positions(indices, self.num_rows)
        rows: dict[int, ClipRow] = {}
        source_of_key: dict[str, str] = {}
        first = 0  # the split position of the block's first row
        for data, starts, ends, line_nos in self._blocks(None):
            lo, hi = np.searchsorted(wanted, [first, first + len(starts)])
            for position in wanted[lo:hi]:
                j = int(position) - first
                source, fields = self._fields(data, starts[j], ends[j], line_nos[j])
                row = self.parse_row(source, fields)
                claim_key(row.key, source, source_of_key)
                rows[int(position)] = row
            first += len(starts)
            if hi == wanted.size:
                break
        return rows

    def _blocks(self, digest: Any) -> Iterator[tuple[bytes, np.ndarray, np.ndarray, np.ndarray]]:
        """(bytes of whole lines, start and end offsets of the rows among them, their 1-based line numbers) per block
        of the file; `digest` (if given) is updated with every byte. DatasetError for an unreadable file, a line
        over MAX_LINE_CHARS bytes or more than MAX_ROWS rows."""
        path = os.fspath(self.path)
        lines_before, rows_before, rest, at_start = 0, 0, b"", True
        try:
            with open(self.path, "rb") as f:
                while True:
                    block = f.read(BLOCK_BYTES)
                    if digest is not None:
                        digest.update(block)
                    data = rest + block
                    if at_start:
                        data, at_start = data.removeprefix(_BOM), False
                    cut = len(data) if not block else data.rfind(b"\n") + 1
                    if len(data) - cut > MAX_LINE_CHARS:
                        raise DatasetError(
                            f"{path}:{lines_before + 1}: a line of more than {MAX_LINE_CHARS} characters, starting "
                            f"{excerpt(data[cut : cut + 80].decode(errors='replace'))}: not a CSV row; is this the "
                            "right file?"
                        )
                    data, rest = data[:cut], data[cut:]
                    starts, ends, line_nos = self._rows_of(data, lines_before)
                    lines_before += data.count(b"\n") + (not block and bool(data) and not data.endswith(b"\n"))
                    rows_before += len(starts)
                    if rows_before > MAX_ROWS:
                        raise DatasetError(f"{path}: more than {MAX_ROWS} rows; split it into smaller files")
                    yield data, starts, ends, line_nos
                    if not block:
                        return
        except OSError as e:
            raise DatasetError(f"{path}: cannot read it ({e})") from e

    def _fields(self, data: bytes, start: int, end: int, line_no: int) -> tuple[str, list[str]]:
        """(`path:LINE`, the fields) of the line at data[start:end]; DatasetError naming it when it is no CSV."""
        source = f"{os.fspath(self.path)}:{int(line_no)}"
        try:
            line = data[start:end].decode()
        except UnicodeDecodeError as e:
            raise DatasetError(f"{source}: cannot read it as UTF-8 text ({e})") from e
        return source, parse_csv_line(source, line)

    def _rows_of(self, data: bytes, lines_before: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Start and end offsets (end before the line break) and line numbers of the rows among whole lines."""
        raw = np.frombuffer(data, np.uint8)
        breaks = np.flatnonzero(raw == ord("\n"))
        if data and not data.endswith(b"\n"):
            breaks = np.append(breaks, len(data))  # the file's last line, without a line break
        starts = np.concatenate([[0], breaks[:-1] + 1]) if breaks.size else breaks
        too_long = np.flatnonzero(breaks - starts > MAX_LINE_CHARS)
        if too_long.size:
            raise DatasetError(
                f"{os.fspath(self.path)}:{lines_before + int(too_long[0]) + 1}: a line of more than {MAX_LINE_CHARS} "
                "characters: not a CSV row; is this the right file?"
            )
        # A line whose first byte is no whitespace holds text; only the others (rare) are looked at one by one.
        keep = ~np.isin(raw[starts], _SPACE_BYTES) if starts.size else np.zeros(0, bool)
        for j in np.flatnonzero(~keep):
            keep[j] = bool(data[starts[j] : breaks[j]].strip())
        if self.skip_comments and starts.size:
            keep &= raw[starts] != ord("#")  # every start is inside `data`: each line ends at a break or its end
        if self.keep is not None:
            for j in np.flatnonzero(keep):
                keep[j] = self.keep(*self._fields(data, starts[j], breaks[j], lines_before + j + 1))
        return starts[keep], breaks[keep], np.flatnonzero(keep) + lines_before + 1
