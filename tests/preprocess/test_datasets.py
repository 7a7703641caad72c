"""Dataset CSV readers and video-file lookup, on small files written in the exact formats of the real ones."""

from pathlib import Path

import pytest

from preprocess.datasets import (
    ClipRow,
    DatasetError,
    read_audioset_classes,
    read_audioset_segments,
    read_class_list,
    split_name_from_segments,
)
from preprocess.vggsound import read_vggsound
from preprocess.videos import AUDIOSET_NAME_TEMPLATES, VGGSOUND_NAME_TEMPLATES, VideoIndex

CLASSES_CSV = """index,mid,display_name
0,/m/09x0r,"Speech"
1,/m/05zppz,"Male speech, man speaking"
2,/m/02zsn,"Female speech, woman speaking"
3,/m/0ytgt,"Child speech, kid speaking"
4,/m/068hy,"Domestic animals, pets"
"""

SEGMENTS_HEADER = """# Segments csv created Sun Mar  5 10:54:31 2017
# num_ytids=3, num_segs=3, num_unique_labels=5, num_positive_labels=6
# YTID, start_seconds, end_seconds, positive_labels
"""

SEGMENTS_CSV = (
    SEGMENTS_HEADER
    + """--4gqARaEJE, 0.000, 10.000, "/m/068hy,/m/02zsn,/m/09x0r"
-0RWZT-miFs, 420.000, 430.000, "/m/0ytgt"

a_b-c_1234X, 30.500, 40.500, "/m/05zppz,/m/09x0r"
"""
)

VGGSOUND_CSV = """---g-f_I2yQ,1,people marching,test
--0PQM4-hqg,30,waterfall burbling,train
-0e5ZQ_VaGA,30,"cattle, bovinae cowbell",train
--56QUhyDQM,185,playing tennis,train
-1pRmoJIGQc,11,"cattle, bovinae cowbell",test
"""


def write(path: Path, text: str) -> Path:
    path.write_text(text, encoding="utf-8")
    return path


@pytest.fixture
def class_mids(tmp_path: Path) -> list[str]:
    return [mid for mid, _ in read_audioset_classes(write(tmp_path / "class_labels_indices.csv", CLASSES_CSV))]


def test_audioset_classes_keep_quoted_names_with_commas(tmp_path: Path) -> None:
    classes = read_audioset_classes(write(tmp_path / "class_labels_indices.csv", CLASSES_CSV))
    assert classes[0] == ("/m/09x0r", "Speech")
    assert classes[1] == ("/m/05zppz", "Male speech, man speaking")
    assert len(classes) == 5
    # A spreadsheet's byte-order mark must not break the header check.
    assert read_audioset_classes(write(tmp_path / "bom.csv", "\ufeff" + CLASSES_CSV)) == classes


@pytest.mark.parametrize(
    ("text", "line", "message"),
    [
        ("idx,mid,name\n0,/m/a,A\n", 1, "header"),
        ("index,mid,display_name\n0,/m/a,A\n2,/m/b,B\n", 3, "out of order"),
        ("index,mid,display_name\n0,/m/a,A\n1,/m/a,B\n", 3, "already defined at"),
        ("index,mid,display_name\n0,/m/a\n", 2, "3 columns"),
    ],
)
def test_audioset_classes_errors_name_the_line(tmp_path: Path, text: str, line: int, message: str) -> None:
    path = write(tmp_path / "classes.csv", text)
    with pytest.raises(DatasetError, match=message) as error:
        read_audioset_classes(path)
    assert f"{path}:{line}" in str(error.value)


def test_audioset_classes_missing_or_empty_file(tmp_path: Path) -> None:
    with pytest.raises(DatasetError, match=r"missing\.csv"):
        read_audioset_classes(tmp_path / "missing.csv")
    with pytest.raises(DatasetError, match="header"):
        read_audioset_classes(write(tmp_path / "empty.csv", ""))
    with pytest.raises(DatasetError, match="no classes"):
        read_audioset_classes(write(tmp_path / "header_only.csv", "index,mid,display_name\n"))


def test_audioset_segments_parse_real_format(tmp_path: Path, class_mids: list[str]) -> None:
    path = write(tmp_path / "balanced_train_segments.csv", SEGMENTS_CSV)
    rows = read_audioset_segments(path, class_mids)
    assert rows == [
        ClipRow("--4gqARaEJE_0", "--4gqARaEJE", 0.0, 10.0, (0, 2, 4), f"{path}:4"),
        ClipRow("-0RWZT-miFs_420000", "-0RWZT-miFs", 420.0, 430.0, (3,), f"{path}:5"),
        ClipRow("a_b-c_1234X_30500", "a_b-c_1234X", 30.5, 40.5, (0, 1), f"{path}:7"),
    ]
    assert all("." not in row.key for row in rows)


def test_audioset_unknown_mid_names_line_and_flag(tmp_path: Path, class_mids: list[str]) -> None:
    path = write(
        tmp_path / "eval_segments.csv",
        SEGMENTS_HEADER + '--4gqARaEJE, 0.000, 10.000, "/m/09x0r"\n-abc, 5.000, 15.000, "/m/zzz,/m/02zsn"\n',
    )
    with pytest.raises(DatasetError, match="--drop-unknown-labels") as error:
        read_audioset_segments(path, class_mids)
    assert f"{path}:5" in str(error.value)
    assert "/m/zzz" in str(error.value)

    rows = read_audioset_segments(path, class_mids, drop_unknown_labels=True)
    assert [row.labels for row in rows] == [(0,), (2,)]


def test_audioset_row_left_without_labels_is_kept(tmp_path: Path, class_mids: list[str]) -> None:
    path = write(tmp_path / "eval_segments.csv", SEGMENTS_HEADER + '-abc, 5.000, 15.000, "/m/zzz"\n')
    (row,) = read_audioset_segments(path, class_mids, drop_unknown_labels=True)
    assert row.labels == ()


@pytest.mark.parametrize(
    ("row", "message"),
    [
        ("-abc, 0.000, 10.000\n", "4 columns"),
        ('-abc, zero, 10.000, "/m/09x0r"\n', "not a number"),
        ('-abc, 10.000, 10.000, "/m/09x0r"\n', "not after start"),
        ('-abc, nan, 10.000, "/m/09x0r"\n', "finite"),
        ('-a.b, 0.000, 10.000, "/m/09x0r"\n', "not a YouTube id"),
        ('-abc, 0.000, 10.000, "/m/09x0r\n', "malformed CSV"),
    ],
)
def test_audioset_malformed_row_names_line(tmp_path: Path, class_mids: list[str], row: str, message: str) -> None:
    path = write(tmp_path / "eval_segments.csv", SEGMENTS_HEADER + row)
    with pytest.raises(DatasetError, match=message) as error:
        read_audioset_segments(path, class_mids)
    assert f"{path}:4" in str(error.value)


def test_audioset_duplicate_key_names_both_lines(tmp_path: Path, class_mids: list[str]) -> None:
    path = write(
        tmp_path / "eval_segments.csv",
        SEGMENTS_HEADER + '-abc, 30.000, 40.000, "/m/09x0r"\n-abc, 30.000, 40.000, "/m/02zsn"\n',
    )
    with pytest.raises(DatasetError, match="already listed") as error:
        read_audioset_segments(path, class_mids)
    assert f"{path}:5" in str(error.value)
    assert f"{path}:4" in str(error.value)


def test_audioset_missing_segments_file(tmp_path: Path, class_mids: list[str]) -> None:
    with pytest.raises(DatasetError, match=r"eval_segments\.csv"):
        read_audioset_segments(tmp_path / "eval_segments.csv", class_mids)


def test_vggsound_classes_from_both_splits(tmp_path: Path) -> None:
    path = write(tmp_path / "vggsound.csv", VGGSOUND_CSV)
    classes, train = read_vggsound(path, "train")
    test_classes, test = read_vggsound(path, "test")
    assert (
        classes
        == test_classes
        == [
            "cattle, bovinae cowbell",
            "people marching",
            "playing tennis",
            "waterfall burbling",
        ]
    )
    assert train == [
        ClipRow("--0PQM4-hqg_000030", "--0PQM4-hqg", 30.0, 40.0, (3,), f"{path}:2"),
        ClipRow("-0e5ZQ_VaGA_000030", "-0e5ZQ_VaGA", 30.0, 40.0, (0,), f"{path}:3"),
        ClipRow("--56QUhyDQM_000185", "--56QUhyDQM", 185.0, 195.0, (2,), f"{path}:4"),
    ]
    assert [(row.key, row.labels) for row in test] == [
        ("---g-f_I2yQ_000001", (1,)),
        ("-1pRmoJIGQc_000011", (0,)),
    ]


def test_vggsound_with_class_file(tmp_path: Path) -> None:
    csv_path = write(tmp_path / "vggsound.csv", VGGSOUND_CSV)
    class_path = write(
        tmp_path / "classes.txt",
        "waterfall burbling\n  playing tennis \n\ncattle, bovinae cowbell\npeople marching\n",
    )
    classes = read_class_list(class_path)
    assert classes == ["waterfall burbling", "playing tennis", "cattle, bovinae cowbell", "people marching"]
    names, train = read_vggsound(csv_path, "train", classes)
    assert names == classes
    assert [row.labels for row in train] == [(0,), (2,), (1,)]


def test_vggsound_label_outside_class_file_names_line(tmp_path: Path) -> None:
    path = write(tmp_path / "vggsound.csv", VGGSOUND_CSV)
    with pytest.raises(DatasetError, match="playing tennis") as error:
        read_vggsound(path, "train", ["waterfall burbling", "cattle, bovinae cowbell"])
    assert f"{path}:4" in str(error.value)


def test_class_list_duplicates_and_empty(tmp_path: Path) -> None:
    path = write(tmp_path / "classes.txt", "dog barking\ncat meowing\ndog barking\n")
    with pytest.raises(DatasetError, match="line 1") as error:
        read_class_list(path)
    assert f"{path}:3" in str(error.value)
    with pytest.raises(DatasetError, match="no class names"):
        read_class_list(write(tmp_path / "blank.txt", "\n  \n"))


def test_vggsound_bad_split(tmp_path: Path) -> None:
    path = write(tmp_path / "vggsound.csv", VGGSOUND_CSV)
    with pytest.raises(DatasetError, match="'val'"):
        read_vggsound(path, "val")


@pytest.mark.parametrize(
    ("row", "message"),
    [
        ("-abc,1.5,dog barking,train\n", "whole number"),
        ("-abc,1,dog barking\n", "4 columns"),
        ("-abc,1,dog barking,validation\n", "'validation'"),
        ("-abc,1,,train\n", "empty label"),
        ("-abc,1,dog barking,train\n-abc,1,dog barking,train\n", "already listed at .*:1"),
    ],
)
def test_vggsound_malformed_row_names_line(tmp_path: Path, row: str, message: str) -> None:
    path = write(tmp_path / "vggsound.csv", row)
    with pytest.raises(DatasetError, match=message) as error:
        read_vggsound(path, "train")
    assert f"{path}:" in str(error.value)


@pytest.mark.parametrize(
    ("name", "split"),
    [
        ("balanced_train_segments.csv", "balanced_train"),
        ("eval_segments.csv", "eval"),
        ("/data/audioset/unbalanced_train_segments.csv", "unbalanced_train"),
        ("foo.csv", "foo"),
    ],
)
def test_split_name_from_segments(name: str, split: str) -> None:
    assert split_name_from_segments(name) == split


def audioset_row(ytid: str = "abc", start_s: float = 30.0) -> ClipRow:
    return ClipRow(f"{ytid}_{round(start_s * 1000)}", ytid, start_s, start_s + 10.0, (0,), "x.csv:4")


def make_folder(tmp_path: Path, names: list[str]) -> Path:
    folder = tmp_path / "videos"
    folder.mkdir()
    for name in names:
        (folder / name).write_bytes(b"")
    return folder


@pytest.mark.parametrize(
    "name",
    [
        "abc.mp4",
        "abc_30.mp4",
        "abc_30_40.mp4",
        "abc_30000_40000.mkv",
        "abc_30000.mp4",
        "abc_30.000_40.000.webm",
    ],
)
def test_audioset_default_templates_match(tmp_path: Path, name: str) -> None:
    folder = make_folder(tmp_path, [name, "abd.mp4", "ab.mp4", "abc_31.mp4"])
    assert VideoIndex(folder).find(audioset_row(), AUDIOSET_NAME_TEMPLATES) == folder / name


@pytest.mark.parametrize("name", ["abc_300.mp4", "abcd.mp4", "abc_3.mp4", "xabc.mp4"])
def test_audioset_default_templates_reject_other_clips(tmp_path: Path, name: str) -> None:
    index = VideoIndex(make_folder(tmp_path, [name]))
    with pytest.raises(FileNotFoundError):
        index.find(audioset_row(), AUDIOSET_NAME_TEMPLATES)


def test_audioset_lookup_keeps_leading_dashes(tmp_path: Path) -> None:
    folder = make_folder(tmp_path, ["--4gqARaEJE.mp4", "-4gqARaEJE.mp4", "---4gqARaEJE.mp4"])
    row = audioset_row("--4gqARaEJE", 0.0)
    assert VideoIndex(folder).find(row, AUDIOSET_NAME_TEMPLATES) == folder / "--4gqARaEJE.mp4"


def test_vggsound_default_template(tmp_path: Path) -> None:
    folder = make_folder(tmp_path, ["---g-f_I2yQ_000001.mp4", "---g-f_I2yQ_000011.mp4", "---g-f_I2yQ.mp4"])
    row = ClipRow("---g-f_I2yQ_000001", "---g-f_I2yQ", 1.0, 11.0, (0,), "vggsound.csv:1")
    assert VideoIndex(folder).find(row, VGGSOUND_NAME_TEMPLATES) == folder / "---g-f_I2yQ_000001.mp4"


def test_custom_template_with_glob(tmp_path: Path) -> None:
    folder = make_folder(tmp_path, ["clip-abc-from-30.0s.mp4", "clip-abc-from-30.0s.mp4.part"])
    found = VideoIndex(folder).find(audioset_row(), ["clip-{ytid}-from-{start}s.[mw][pe][4b]"])
    assert found == folder / "clip-abc-from-30.0s.mp4"


def test_glob_characters_in_id_match_literally(tmp_path: Path) -> None:
    folder = make_folder(tmp_path, ["a[b]c.mp4", "abc.mp4", "a*c.mp4"])
    index = VideoIndex(folder)
    assert index.find(audioset_row("a[b]c"), ["{ytid}.mp4"]) == folder / "a[b]c.mp4"
    assert index.find(audioset_row("a*c"), ["{ytid}.mp4"]) == folder / "a*c.mp4"


def test_first_matching_template_decides(tmp_path: Path) -> None:
    folder = make_folder(tmp_path, ["abc.mkv", "abc_30.mp4"])
    assert VideoIndex(folder).find(audioset_row(), ["{ytid}_{start_s}.*", "{ytid}.*"]) == folder / "abc_30.mp4"


def test_ambiguous_match_names_files_and_flag(tmp_path: Path) -> None:
    index = VideoIndex(make_folder(tmp_path, ["abc.mp4", "abc.webm"]))
    with pytest.raises(DatasetError, match="--name-template") as error:
        index.find(audioset_row(), AUDIOSET_NAME_TEMPLATES)
    assert "abc.mp4" in str(error.value)
    assert "abc.webm" in str(error.value)


def test_missing_file_names_key_and_patterns(tmp_path: Path) -> None:
    index = VideoIndex(make_folder(tmp_path, ["other.mp4"]))
    with pytest.raises(FileNotFoundError) as error:
        index.find(audioset_row(), AUDIOSET_NAME_TEMPLATES)
    message = str(error.value)
    assert "abc_30000" in message
    assert "abc.*" in message
    assert "abc_30.000_40.000.*" in message


def test_subfolders_are_not_files(tmp_path: Path) -> None:
    folder = make_folder(tmp_path, [])
    (folder / "abc.d").mkdir()
    with pytest.raises(FileNotFoundError):
        VideoIndex(folder).find(audioset_row(), AUDIOSET_NAME_TEMPLATES)


def test_missing_folder(tmp_path: Path) -> None:
    with pytest.raises(DatasetError, match="nowhere"):
        VideoIndex(tmp_path / "nowhere")


@pytest.mark.parametrize("template", ["{id}.mp4", "{}.mp4", "{ytid:d}.mp4", "{ytid"])
def test_bad_template_lists_fields(tmp_path: Path, template: str) -> None:
    index = VideoIndex(make_folder(tmp_path, ["abc.mp4"]))
    with pytest.raises(DatasetError, match=r"\{start_ms\}"):
        index.find(audioset_row(), [template])


def test_no_templates(tmp_path: Path) -> None:
    with pytest.raises(DatasetError, match="--name-template"):
        VideoIndex(make_folder(tmp_path, ["abc.mp4"])).find(audioset_row(), [])
