"""Text from data on its way to a person or a spreadsheet: bounded excerpts in messages, control characters found
and escaped, CSV cells that cannot be formulas (and a normal CSV written byte for byte as csv.writer writes it)."""

from __future__ import annotations

import csv
import io

import pytest

from shards.text import CsvWriter, control_character, csv_cell, excerpt, name_problem, printable


def test_an_excerpt_of_a_3_mb_field_is_short_and_says_how_much_is_left_out() -> None:
    field = "\x1b[2J" + "a" * 3_000_000
    shown = excerpt(field)
    assert shown == repr(field[:80]) + f"… ({len(field) - 80} more characters)"
    assert len(shown) < 120 and "\x1b" not in shown and "\\x1b[2J" in shown


@pytest.mark.parametrize(
    ("value", "shown"),
    [("dog", "'dog'"), (7, "7"), (None, "None"), (["\x1b"], r"['\x1b']"), ("it's", '"it\'s"')],
)
def test_short_values_are_quoted_whole(value: object, shown: str) -> None:
    assert excerpt(value) == shown


def test_an_excerpt_of_a_large_json_value_is_bounded() -> None:
    value = {"a": ["x" * 10_000] * 10_000, **{str(i): i for i in range(10_000)}}
    assert len(excerpt(value)) <= 81 and len(excerpt(10**1000)) <= 81


@pytest.mark.parametrize("char", ["\x00", "\n", "\r", "\t", "\x1b", "\x7f", "\x9b", "\u2028", "\u202e", "\u2066"])
def test_control_characters_are_found_and_escaped(char: str) -> None:
    text = f"Dog{char}bark"
    assert control_character(text) == repr(char)[1:-1]
    assert char not in printable(text) and printable(text) == f"Dog{repr(char)[1:-1]}bark"
    assert "control character" in (name_problem(text) or "")


@pytest.mark.parametrize("text", ["Speech", "Bird vocalization, bird call, bird song", "Café", "狗", "/m/09x0r", " x"])
def test_printable_names_pass(text: str) -> None:
    assert control_character(text) is None and printable(text) == text and name_problem(text) is None


def test_printable_is_bounded() -> None:
    assert printable("k" * 1000) == "k" * 80 + "… (920 more characters)"
    assert "more than 1024" in (name_problem("n" * 1025) or "")


@pytest.mark.parametrize(
    ("cell", "written"),
    [
        ('=HYPERLINK("http://x","y")', '\'=HYPERLINK("http://x","y")'),
        ("+1+cmd|' /C calc'!A0", "'+1+cmd|' /C calc'!A0"),
        ("-2+3+cmd|' /C calc'!A0", "'-2+3+cmd|' /C calc'!A0"),
        ("@SUM(A1:A9)", "'@SUM(A1:A9)"),
        ("\t=1", "'\t=1"),
        ("\r=1", "'\r=1"),
        ("-1.5", "-1.5"),  # numbers
        ("-0.000001", "-0.000001"),
        ("+3e-5", "+3e-5"),
        ("-inf", "-inf"),
        ("-hGCG-X8F4Z_0", "-hGCG-X8F4Z_0"),  # a key: YouTube ids may begin with '-'
        ("-hGCG-X8F4Z.mp4", "-hGCG-X8F4Z.mp4"),  # a file named after one
        ("Dog", "Dog"),
        ("a=b", "a=b"),
        (3, 3),
        (-2.5, -2.5),
    ],
)
def test_csv_cells_that_a_spreadsheet_would_run_are_escaped(cell: object, written: object) -> None:
    assert csv_cell(cell) == written


def test_a_normal_csv_is_written_as_csv_writer_writes_it() -> None:
    rows = [
        ["key", "source", "file", "reason", "message"],
        ["-hGCG-X8F4Z_0", "/data/eval_segments.csv:4", "-hGCG-X8F4Z.mp4", "unreadable", 'ffmpeg exit 1: "moov" atom'],
        ["abc_1000", "/data/eval_segments.csv:5", "", "missing_file", "clip abc_1000: no file, in /v, matches"],
        [0, "Speech", "0.512000", -1.5, "nan"],
    ]
    ours, theirs = io.StringIO(), io.StringIO()
    CsvWriter(ours, lineterminator="\n").writerows(rows)
    csv.writer(theirs, lineterminator="\n").writerows(rows)
    assert ours.getvalue() == theirs.getvalue()


def test_formula_cells_read_back_as_text() -> None:
    out = io.StringIO()
    CsvWriter(out).writerow(["=1+1", "Dog"])
    assert next(csv.reader(io.StringIO(out.getvalue()))) == ["'=1+1", "Dog"]
