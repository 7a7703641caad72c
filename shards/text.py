"""Text read from data (CSV fields and lines, manifest and state values, class names, keys, file names) on its way
to a person or a spreadsheet. Such text may be megabytes long or hold terminal escape sequences, and a CSV cell that
starts with `=` is a formula to a spreadsheet; so:
- an error message quotes it as `excerpt(value)`: bounded, its control characters escaped;
- a class name holding a control character (or a page of text) is refused where a class list is read (`name_problem`);
- other text from data shown unquoted (a sample key, a file name) goes through `printable`, bounded as well;
- every CSV the project writes is written by `CsvWriter`, whose cells cannot be formulas.
"""

from __future__ import annotations

import csv
import re
import reprlib
from collections.abc import Iterable
from typing import Any, TextIO

# What an error message shows of a value read from data: enough to find it in the file.
MAX_EXCERPT_CHARS = 80
# A class name or id is printed, plotted and written to CSVs (AudioSet's and VGGSound's are a few words each).
MAX_NAME_CHARS = 1024
# C0 and C1 controls, DEL, line and paragraph separators and the bidirectional controls: what moves a terminal's
# cursor, changes its colours or title, or shows text in another order than it is stored.
_CONTROL_RE = re.compile("[\x00-\x1f\x7f-\x9f\u061c\u200e\u200f\u2028\u2029\u202a-\u202e\u2066-\u2069]")
# OWASP's CSV injection rule: a cell starting with one of these is a formula (or becomes one) to a spreadsheet.
FORMULA_PREFIXES = ("=", "+", "-", "@", "\t", "\r")
_NUMBER_RE = re.compile(r"[+-]?(?:[0-9]+\.?[0-9]*|\.[0-9]+)(?:[eE][+-]?[0-9]+)?|[+-]?(?:nan|inf)")
# A key's or a plain file name's characters (YouTube ids, and files named after them, may begin with '-'; the shard
# job writes undecodable bytes of a name as \xNN): such a cell holds no parenthesis, quote, operator, '!' or '|',
# so it can call no function and start no program.
_PLAIN_NAME_RE = re.compile(r"[A-Za-z0-9_.\\-]+")


def _bounded_repr(limit: int) -> reprlib.Repr:
    bounded = reprlib.Repr()  # keyword arguments only from Python 3.12
    bounded.maxlevel, bounded.maxstring, bounded.maxother, bounded.maxlong = 3, limit, limit, limit
    bounded.maxdict = bounded.maxlist = bounded.maxtuple = bounded.maxset = 4
    return bounded


def excerpt(value: object, limit: int = MAX_EXCERPT_CHARS) -> str:
    """`value` quoted for a one-line message, at most about `limit` characters plus a count of what was left out:
    a string as the repr of its first `limit` characters (quotes, control and unprintable characters escaped)
    followed by '… (N more characters)'; any other value (a number, a JSON list or mapping) as a bounded repr."""
    if isinstance(value, str):
        more = len(value) - limit
        return repr(value[:limit]) + (f"… ({more} more characters)" if more > 0 else "")
    text = _bounded_repr(limit).repr(value)
    return text if len(text) <= limit else text[:limit] + "…"


def control_character(text: str) -> str | None:
    """The first control character in `text` (see `_CONTROL_RE`), escaped as Python writes it ('\\x1b'); None when
    it holds none."""
    found = _CONTROL_RE.search(text)
    return None if found is None else repr(found.group())[1:-1]


def name_problem(text: str) -> str | None:
    """Why `text` cannot be a class name or id shown to people: a control character or more than MAX_NAME_CHARS
    characters; None when it can be one."""
    if (char := control_character(text)) is not None:
        return f"holds the control character '{char}' (a terminal runs such characters as commands)"
    if len(text) > MAX_NAME_CHARS:
        return f"has {len(text)} characters, more than {MAX_NAME_CHARS}"
    return None


def printable(text: str, limit: int = MAX_EXCERPT_CHARS) -> str:
    """`text` for a terminal, unquoted (a sample key, a file name): its first `limit` characters with control
    characters escaped ('\\x1b') and '… (N more characters)' after them; a short plain text as it is."""
    more = len(text) - limit
    shown = _CONTROL_RE.sub(lambda found: repr(found.group())[1:-1], text[:limit])
    return shown + (f"… ({more} more characters)" if more > 0 else "")


def csv_cell(value: object) -> object:
    """`value` as a CSV cell that a spreadsheet shows as text, never runs: a string starting with = + - @, a tab or a
    carriage return gets a leading `'` (OWASP), unless it is a number, a key or a plain file name (letters, digits,
    '_', '-', '.', '\\' only); numbers and other values are unchanged."""
    if not isinstance(value, str) or not value.startswith(FORMULA_PREFIXES):
        return value
    if _NUMBER_RE.fullmatch(value) or _PLAIN_NAME_RE.fullmatch(value):
        return value
    return "'" + value


class CsvWriter:
    """`csv.writer` whose every cell (header included) goes through `csv_cell`: the one writer of the project's
    CSV files (failures.csv, per_class_ap.csv, confusion.csv, timelines, the ablation table)."""

    def __init__(self, f: TextIO, **fmtparams: Any) -> None:
        self._writer = csv.writer(f, **fmtparams)

    def writerow(self, cells: Iterable[object]) -> None:
        self._writer.writerow([csv_cell(cell) for cell in cells])

    def writerows(self, rows: Iterable[Iterable[object]]) -> None:
        for row in rows:
            self.writerow(row)
