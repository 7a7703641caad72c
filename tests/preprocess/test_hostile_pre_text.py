"""Dataset CSVs and class files whose text is hostile: a field of 100 KB holding terminal escapes is quoted in the
error as a bounded excerpt, a line of megabytes is refused before more of it is read, a header of 20,000 columns at
once, and a class name holding a control character is refused naming file:line (class names are printed and
written to CSVs)."""

from __future__ import annotations

import tracemalloc
from collections.abc import Callable
from pathlib import Path

import pytest

from preprocess.class_files import read_class_file
from preprocess.custom_csv import read_custom_csv
from preprocess.custom_fields import CsvLayout
from preprocess.datasets import (
    DatasetError,
    csv_rows,
    read_audioset_classes,
    read_audioset_segments,
    read_class_list,
)
from preprocess.vggsound import read_vggsound
from serve.segments import read_segments_csv

BIG = "\x1b[2J" + "x" * 100_000  # a field under csv's field limit (131,072), with a terminal escape
CLASSES = "index,mid,display_name\n"
SEGMENTS = "# a\n# b\n# YTID, start_seconds, end_seconds, positive_labels\n"


def write(tmp_path: Path, name: str, text: str) -> Path:
    path = tmp_path / name
    path.write_text(text, encoding="utf-8")
    return path


READERS: dict[str, tuple[str, str, Callable[[Path], object]]] = {
    "audioset_index": ("c.csv", CLASSES + f"{BIG},/m/0,Dog\n", read_audioset_classes),
    "audioset_mid": ("c.csv", CLASSES + f'0,/m/0,Dog\n1,"/m/1,{BIG}",Cat\n', read_audioset_classes),
    "audioset_label": ("s.csv", SEGMENTS + f'abc, 0, 10, "{BIG}"\n', lambda p: read_audioset_segments(p, ["/m/0"])),
    "audioset_ytid": ("s.csv", SEGMENTS + f'{BIG}, 0, 10, ""\n', lambda p: read_audioset_segments(p, [])),
    "vggsound_split": ("v.csv", f"abc,1,dog,{BIG}\n", lambda p: read_vggsound(p, "train")),
    "vggsound_label": ("v.csv", f"abc,1,{BIG[4:]},train\n", lambda p: read_vggsound(p, "train", ["dog"])),
    "custom_header": ("x.csv", f"video,label,{BIG},{BIG}\n", lambda p: read_custom_csv(p, CsvLayout())),
    "custom_column": ("x.csv", f"video,{BIG}\n", lambda p: read_custom_csv(p, CsvLayout())),
    "custom_split": ("x.csv", f"video,label,split\na.mp4,dog,{BIG}\n", lambda p: read_custom_csv(p, CsvLayout())),
    "class_file": ("k.csv", f"index,id,name\n0,a,{BIG[4:]}\n1,b,{BIG[4:]}\n", read_class_file),
    "segments_header": ("p.csv", f"{BIG},start\n", read_segments_csv),
    "malformed": ("s.csv", SEGMENTS + f'abc, 0, 10, "{BIG}"x\n', lambda p: read_audioset_segments(p, [])),
}


@pytest.mark.parametrize("case", sorted(READERS))
def test_a_long_field_is_quoted_as_a_bounded_excerpt(tmp_path: Path, case: str) -> None:
    name, text, read = READERS[case]
    with pytest.raises(DatasetError) as raised:
        read(write(tmp_path, name, text))
    message = str(raised.value)
    assert message.startswith(str(tmp_path / name)), message[:300]
    assert len(message) < 600 and "more characters" in message and "\x1b" not in message, message[:600]


def test_a_32_mb_line_is_refused_after_its_first_mib(tmp_path: Path) -> None:
    """Memory stays within a few times MAX_LINE_CHARS whatever the file holds (before: the whole line, then its repr
    in the message, 64 MB and more)."""
    path = write(tmp_path, "s.csv", SEGMENTS + "abc, 0, 10, " + "\x1b" + "y" * (32 << 20) + "\nabd, 0, 10, \n")
    tracemalloc.start()
    try:
        with pytest.raises(DatasetError) as raised:
            read_audioset_segments(path, [])
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    message = str(raised.value)
    assert message.startswith(f"{path}:4: a line of more than 1048576 characters") and len(message) < 400
    assert "\x1b" not in message
    assert peak < 8 << 20, peak  # 1 MiB of text read (4 bytes a character at most) and its parse


def test_a_header_of_20000_columns_is_refused_at_once(tmp_path: Path) -> None:
    path = write(tmp_path, "x.csv", ",".join(f"c{i}" for i in range(20_000)) + "\n")
    with pytest.raises(DatasetError, match=r"x\.csv:1: 20000 fields, more than a row of a dataset CSV has \(1024\)"):
        read_custom_csv(path, CsvLayout())
    (_, fields), *_ = csv_rows(write(tmp_path, "ok.csv", ",".join("c" * 1024) + "\n"))
    assert len(fields) == 1024


ESCAPE = "Dog\x1b]0;pwned\x07"  # a terminal's window-title escape
CLASS_FILES: dict[str, tuple[str, str, Callable[[Path], object], str]] = {
    "audioset_name": ("c.csv", CLASSES + f'0,/m/0,"{ESCAPE}"\n', read_audioset_classes, "c.csv:2: display_name"),
    "audioset_mid": ("c.csv", CLASSES + "0,/m/0\u202e,Dog\n", read_audioset_classes, "c.csv:2: mid"),
    "name_list": ("n.txt", f"Cat\n{ESCAPE}\n", read_class_list, "n.txt:2: class"),
    "indexed": ("k.csv", f"index,id,name\n0,a,Cat\n1,b,{ESCAPE}\n", read_class_file, "k.csv:3: class name"),
    "epic": ("k.csv", f"id,key,category\n0,{ESCAPE},x\n", read_class_file, "k.csv:2: class name"),
    "vggsound": ("v.csv", f"abc,1,{ESCAPE},train\n", lambda p: read_vggsound(p, "train"), "v.csv:1: label"),
    "custom_labels": (
        "x.csv",
        f"video,label\na.mp4,Cat\nb.mp4,{ESCAPE}\n",
        lambda p: read_custom_csv(p, CsvLayout()),
        "x.csv:3: label",
    ),
}


@pytest.mark.parametrize("case", sorted(CLASS_FILES))
def test_class_names_with_control_characters_are_refused_naming_the_line(tmp_path: Path, case: str) -> None:
    name, text, read, where = CLASS_FILES[case]
    with pytest.raises(DatasetError) as raised:
        read(write(tmp_path, name, text))
    message = str(raised.value)
    assert message.startswith(str(tmp_path / where)), message
    assert "holds the control character" in message and "remove it from the file" in message
    assert "\x1b" not in message and "\u202e" not in message


def test_plain_class_names_are_read_as_before(tmp_path: Path) -> None:
    path = write(tmp_path, "c.csv", CLASSES + '0,/m/09x0r,"Speech"\n1,/m/05zppz,"Male speech, man speaking"\n')
    assert read_audioset_classes(path) == [("/m/09x0r", "Speech"), ("/m/05zppz", "Male speech, man speaking")]
