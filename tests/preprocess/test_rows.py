"""A split's rows streamed from its CSV (preprocess/rows.py): the same rows as reading the whole file (AudioSet's and
VGGSound's formats), at any block size, and only the selected rows parsed and checked."""

from pathlib import Path

import numpy as np
import pytest
from test_datasets import CLASSES_CSV, SEGMENTS_CSV, SEGMENTS_HEADER, VGGSOUND_CSV, write

from preprocess import rows as rows_module
from preprocess.datasets import DatasetError, audioset_row_parser, read_audioset_classes, read_audioset_segments
from preprocess.job import JobSpec
from preprocess.rows import CsvRows, ListRows
from preprocess.vggsound import read_vggsound, vggsound_classes, vggsound_row_parser, vggsound_split_filter

# AudioSet's format with what real files and spreadsheets add: a byte-order mark, CRLF line ends, a blank and a
# whitespace-only line between rows, no line break after the last row.
AWKWARD_CSV = (
    "\ufeff"
    + SEGMENTS_HEADER.replace("\n", "\r\n")
    + '--4gqARaEJE, 0.000, 10.000, "/m/068hy,/m/02zsn"\r\n'
    + "\r\n"
    + '-0RWZT-miFs, 420.000, 430.000, "/m/0ytgt"\n'
    + " \t \n"
    + "# a comment between rows\n"
    + 'a_b-c_1234X, 30.500, 40.500, "/m/05zppz,/m/09x0r"'
)


@pytest.fixture
def mids(tmp_path: Path) -> list[str]:
    return [mid for mid, _ in read_audioset_classes(write(tmp_path / "class_labels_indices.csv", CLASSES_CSV))]


@pytest.mark.parametrize("text", [SEGMENTS_CSV, AWKWARD_CSV])
@pytest.mark.parametrize("block_bytes", [7, 64, 1 << 20])
def test_streamed_rows_equal_the_whole_file(tmp_path, mids, monkeypatch, text, block_bytes):
    monkeypatch.setattr(rows_module, "BLOCK_BYTES", block_bytes)  # rows cut across blocks
    path = write(tmp_path / "segments.csv", text)
    whole = read_audioset_segments(path, mids)
    streamed = CsvRows(path, audioset_row_parser(mids), skip_comments=True)
    assert streamed.num_rows == len(whole) == 3
    assert streamed.select(np.array([2, 0, 1])) == dict(enumerate(whole))  # sources name the same lines
    assert streamed.select(np.array([1])) == {1: whole[1]}


def test_identity_hashes_the_file_and_limit_keeps_the_first_rows(tmp_path, mids):
    path = write(tmp_path / "segments.csv", SEGMENTS_CSV)
    limited = CsvRows(path, audioset_row_parser(mids), skip_comments=True, limit=2)
    assert limited.num_rows == 2
    assert set(limited.select(np.arange(2))) == {0, 1}
    with pytest.raises(IndexError):
        limited.select(np.array([2]))
    other = CsvRows(write(tmp_path / "other.csv", SEGMENTS_CSV + "\n"), audioset_row_parser(mids), True, limit=2)
    assert limited.identity()["num_rows"] == other.identity()["num_rows"] == 2
    assert limited.identity()["csv_sha256"] != other.identity()["csv_sha256"]  # any byte of the CSV changes it


def test_only_selected_rows_are_checked(tmp_path, mids):
    text = SEGMENTS_CSV + 'bad id!, 0.000, 10.000, "/m/09x0r"\n--4gqARaEJE, 0.000, 10.000, "/m/09x0r"\n'
    path = write(tmp_path / "segments.csv", text)
    streamed = CsvRows(path, audioset_row_parser(mids), skip_comments=True)
    assert streamed.num_rows == 5
    assert len(streamed.select(np.array([0, 1, 2]))) == 3  # another job's bad rows cost this one nothing
    with pytest.raises(DatasetError, match=r"segments\.csv:8: .* is not a YouTube id"):
        streamed.select(np.array([3]))
    with pytest.raises(DatasetError, match=r"segments\.csv:9: clip --4gqARaEJE_0 already listed at .*segments\.csv:4"):
        streamed.select(np.array([0, 4]))


def test_bounds_name_the_line(tmp_path, mids, monkeypatch):
    monkeypatch.setattr(rows_module, "MAX_LINE_CHARS", 100)
    monkeypatch.setattr(rows_module, "BLOCK_BYTES", 64)
    path = write(tmp_path / "segments.csv", SEGMENTS_HEADER + "x" * 300 + "\n")
    with pytest.raises(DatasetError, match=r"segments\.csv:4: a line of more than 100 characters"):
        _ = CsvRows(path, audioset_row_parser(mids), skip_comments=True).num_rows
    monkeypatch.setattr(rows_module, "MAX_ROWS", 2)
    with pytest.raises(DatasetError, match="more than 2 rows"):
        _ = CsvRows(write(tmp_path / "s.csv", SEGMENTS_CSV), audioset_row_parser(mids), skip_comments=True).num_rows
    with pytest.raises(DatasetError, match="cannot read it"):
        _ = CsvRows(tmp_path / "missing.csv", audioset_row_parser(mids)).num_rows


def test_a_list_is_held_as_list_rows_with_the_identity_of_its_rows(tmp_path, mids):
    whole = read_audioset_segments(write(tmp_path / "segments.csv", SEGMENTS_CSV), mids)
    spec = JobSpec("audioset", "x", whole, [], True, tmp_path, tmp_path, ["{ytid}.*"])
    assert isinstance(spec.rows, ListRows)
    assert spec.identity()["num_rows"] == 3 and len(spec.identity()["rows_sha256"]) == 64


@pytest.mark.parametrize("split", ["train", "test"])
def test_vggsound_streamed_rows_equal_the_whole_file(tmp_path, monkeypatch, split):
    monkeypatch.setattr(rows_module, "BLOCK_BYTES", 16)
    path = write(tmp_path / "vggsound.csv", VGGSOUND_CSV)
    classes, whole = read_vggsound(path, split)
    assert vggsound_classes(path) == classes
    streamed = CsvRows(path, vggsound_row_parser(classes), keep=vggsound_split_filter(split))
    assert streamed.num_rows == len(whole)
    assert streamed.select(np.arange(len(whole))) == dict(enumerate(whole))


def test_vggsound_rows_of_another_split_are_checked_as_they_are_counted(tmp_path):
    path = write(tmp_path / "vggsound.csv", VGGSOUND_CSV + "abc,1,dog,val\n")
    with pytest.raises(DatasetError, match=r"vggsound\.csv:6: split 'val' is not one of train, test"):
        _ = CsvRows(path, vggsound_row_parser(["dog"]), keep=vggsound_split_filter("train")).num_rows
