"""tools/shard_csv.py: your own labelled videos from a CSV, on clips made by ffmpeg, through the shard job and
read back by the schema and the PyTorch loader; and every bad input named by its CSV line."""

from __future__ import annotations

import contextlib
import io
import json
from pathlib import Path

import pytest
import torch
import yaml
from conftest import load_tool
from media import make_clip

from mbt.checkpoint import latest_checkpoint
from mbt.evaluate import main as evaluate_main
from mbt.train import main as train_main
from pipelines import build_loader, open_split
from pipelines.config import AugmentConfig
from preprocess.custom_csv import read_custom_csv
from preprocess.custom_fields import CsvLayout, parse_time
from preprocess.datasets import ClipRow, DatasetError
from preprocess.videos import VideoIndex
from shards.manifest import load_manifest
from shards.schema import decode_sample
from shards.tar import iter_tar_samples

shard_csv = load_tool("shard_csv")

# 1 s segments, 4 frames of 64 px: 100 log-mel frames per sample.
SMALL = ["--segment-seconds", "1", "--fps", "4", "--short-side", "64", "--shard-size", "2", "--workers", "2", "--quiet"]
LOADER_AUG = AugmentConfig(
    crop_px=48, frames_used=4, eval_short_side_px=64, audio_frames=80, time_mask_px=20, freq_mask_px=24
)


@pytest.fixture(scope="module")
def videos(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """long.mp4 (4 s), c.mp4 (2 s), sub/b.mp4 (2 s), and escape.mp4: a link to a clip outside the folder."""
    root = tmp_path_factory.mktemp("collection")
    folder = root / "videos"
    (folder / "sub").mkdir(parents=True)
    make_clip(folder / "long.mp4", seconds=4.0)
    make_clip(folder / "c.mp4", seconds=2.0)
    make_clip(folder / "sub" / "b.mp4", seconds=2.0)
    (folder / "escape.mp4").symlink_to(make_clip(root / "outside.mp4", seconds=1.0))
    return folder


def write_csv(folder: Path, name: str, text: str) -> Path:
    path = folder / name
    path.write_text(text, encoding="utf-8")
    return path


def shard(csv: Path, videos: Path, out: Path, *extra: str) -> str:
    """Run the tool in-process (exit status 0 asserted); its standard output."""
    stdout = io.StringIO()
    with contextlib.redirect_stdout(stdout):
        assert shard_csv.main(["--csv", str(csv), "--videos", str(videos), "--out", str(out), *SMALL, *extra]) == 0
    return stdout.getvalue()


def read_back(out: Path) -> dict[str, object]:
    """Every sample of the split, read through the schema, by key."""
    manifest = load_manifest(out)
    return {
        key: decode_sample(key, members, manifest.features, manifest.num_classes, manifest.multi_label)
        for shard_info in manifest.shards
        for key, members in iter_tar_samples(out / shard_info.name)
    }


def first_batch(out: Path) -> dict[str, object]:
    loader = build_loader(open_split(out), train=True, batch_size=2, loader="torch", num_workers=0, augment=LOADER_AUG)
    return next(iter(loader))


SEGMENTS_CSV = """video,start,end,label,split
long.mp4,0,1,dog,train
long.mp4,1.5,2.5,cat,train
sub/b.mp4,0.5,1.5,dog,train
long.mp4,2,3,bird,test
"""


@pytest.fixture(scope="module")
def segment_shards(videos: Path, tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, str]:
    """SEGMENTS_CSV's train split sharded: (output folder, the tool's standard output)."""
    folder = tmp_path_factory.mktemp("segments")
    out = folder / "train"
    return out, shard(write_csv(folder, "clips.csv", SEGMENTS_CSV), videos, out, "--split", "train")


def test_paths_with_segments_in_seconds_single_label_and_a_split(segment_shards):
    out, stdout = segment_shards
    assert "3 rows of split train (4 in the CSV)" in stdout and "single-label (detected" in stdout
    manifest = load_manifest(out)
    assert manifest.dataset == "custom" and manifest.split == "train" and not manifest.multi_label
    # Classes are the sorted labels of every split (bird is only in test): train and test share one list.
    assert [(c["index"], c["name"]) for c in manifest.classes] == [(0, "bird"), (1, "cat"), (2, "dog")]
    samples = read_back(out)
    assert sorted(samples) == ["b_500", "long_0", "long_1500"]
    assert {key: s.labels.tolist() for key, s in samples.items()} == {"long_0": [2], "long_1500": [1], "b_500": [2]}
    meta = samples["long_1500"].meta
    assert meta["segment_s"] == [1.5, 2.5] and meta["decode_start_s"] == 1.5 and meta["source"].endswith("clips.csv:3")
    assert meta["ytid"] == "long.mp4" and samples["b_500"].meta["ytid"] == "sub/b.mp4"
    assert all(s.logmel.shape == (100, 128) and len(s.frames) == 4 for s in samples.values())
    assert manifest.failures == [] and manifest.job["full_videos"] is True


def test_a_second_run_has_nothing_to_do_and_other_videos_are_refused(segment_shards, videos, tmp_path, capsys):
    out, _ = segment_shards
    args = ["--videos", str(videos), "--out", str(out), "--split", "train", *SMALL]
    assert shard_csv.main(["--csv", str(out.parent / "clips.csv"), *args]) == 0
    assert "nothing to do" in capsys.readouterr().out
    moved = write_csv(tmp_path, "clips.csv", SEGMENTS_CSV.replace("sub/b.mp4", "b.mp4"))  # same keys, another file
    assert shard_csv.main(["--csv", str(moved), *args]) == 1
    assert "differs in: csv_sha256" in capsys.readouterr().err  # the rows are the CSV's, by its sha256


def test_the_torch_loader_reads_the_shards(segment_shards):
    batch = first_batch(segment_shards[0])
    assert batch["video"].shape == (2, 4, 3, 48, 48) and batch["audio"].shape == (2, 1, 80, 128)
    assert batch["labels"].dtype == torch.int64 and batch["labels"].shape == (2,)  # single-label: class indices
    assert set(batch["key"]) <= {"b_500", "long_0", "long_1500"}


def test_hhmmss_times_renamed_columns_multi_label_detected_and_a_class_file(videos, tmp_path):
    csv = write_csv(
        tmp_path,
        "epic_like.csv",
        "file,t_start,t_stop,tags\n"
        "long.mp4,00:00:00.00,00:00:01.00,dog\n"
        "sub/b.mp4,00:00:00.50,00:00:01.50,dog;cat\n"
        "long.mp4,00:00:02.25,00:00:03.25,bird\n",
    )
    classes = write_csv(tmp_path, "classes.txt", "dog\ncat\nbird\nfish\n")
    columns = ["--video-column", "file", "--start-column", "t_start", "--end-column", "t_stop"]
    columns += ["--label-column", "tags"]
    stdout = shard(csv, videos, tmp_path / "out", *columns, "--classes", str(classes))
    assert "multi-label (detected: line 3 has 2 labels)" in stdout and f"4 classes from {classes}" in stdout
    manifest = load_manifest(tmp_path / "out")
    assert manifest.multi_label and [c["name"] for c in manifest.classes] == ["dog", "cat", "bird", "fish"]
    assert manifest.split == "epic_like"  # no --split: the CSV's stem
    samples = read_back(tmp_path / "out")
    assert {key: s.labels.tolist() for key, s in samples.items()} == {"long_0": [0], "b_500": [0, 1], "long_2250": [2]}
    assert samples["long_2250"].meta["segment_s"] == [2.25, 3.25]
    labels = first_batch(tmp_path / "out")["labels"]
    assert labels.dtype == torch.float32 and labels.shape == (2, 4)  # multi-label: multi-hot


def test_ids_with_a_name_template_index_labels_stated_multi_label_and_whole_files(videos, tmp_path):
    csv = write_csv(tmp_path, "ids.csv", "id,classes\nlong,0;2\nc,1\n")
    extra = ["--video-column", "id", "--label-column", "classes", "--name-template", "{ytid}.mp4", "--multi-label"]
    stdout = shard(csv, videos, tmp_path / "out", *extra)
    assert "multi-label (stated by --multi-label)" in stdout and "labels as indices" in stdout
    assert "one sample per file, from its beginning" in stdout
    manifest = load_manifest(tmp_path / "out")
    assert manifest.multi_label and [c["name"] for c in manifest.classes] == ["0", "1", "2"]
    samples = read_back(tmp_path / "out")
    assert {key: s.labels.tolist() for key, s in samples.items()} == {"long_0": [0, 2], "c_0": [1]}
    assert samples["long_0"].meta["decode_start_s"] == 0.0 and samples["long_0"].meta["segment_s"] == [0.0, 1.0]
    assert samples["c_0"].meta["file"] == "c.mp4" and manifest.job["full_videos"] is False


def test_bad_clips_are_recorded_with_their_line_and_the_other_rows_sharded(videos, tmp_path):
    csv = write_csv(
        tmp_path,
        "bad.csv",
        "video,start,end,label\n"
        "long.mp4,0,1,dog\n"
        "long.mp4,10,11,dog\n"  # starts after the video's end (4 s): no frame to store
        "long.mp4,3.5,5,dog\n"  # ends after it: kept, padded as a clip shorter than its segment
        "escape.mp4,0,1,dog\n"  # a link out of --videos
        "gone.mp4,0,1,dog\n",
    )
    stdout = shard(csv, videos, tmp_path / "out")
    assert "2 samples" in stdout and "2 missing_file, 1 no_frames" in stdout
    failures = {f["key"]: f for f in load_manifest(tmp_path / "out").failures}
    assert {key: (f["reason"], f["source"]) for key, f in failures.items()} == {
        "long_10000": ("no_frames", f"{csv}:3"),
        "escape_0": ("missing_file", f"{csv}:5"),
        "gone_0": ("missing_file", f"{csv}:6"),
    }
    assert "outside the video folder" in failures["escape_0"]["message"]
    samples = read_back(tmp_path / "out")
    assert sorted(samples) == ["long_0", "long_3500"]
    assert samples["long_3500"].meta["fbank_pad_frames"] > 0 and samples["long_3500"].meta["frames_repeated"] >= 1


def test_a_named_path_must_stay_inside_the_video_folder(tmp_path):
    folder, elsewhere = tmp_path / "videos", tmp_path / "elsewhere"
    (folder / "sub").mkdir(parents=True)
    elsewhere.mkdir()
    for path in (folder / "sub" / "a.mp4", elsewhere / "b.mp4"):
        path.write_bytes(b"not decoded here")
    (folder / "out").symlink_to(elsewhere)  # a linked folder that leads out
    (folder / "in.mp4").symlink_to(folder / "sub" / "a.mp4")  # a link that stays inside is fine
    index = VideoIndex(folder)

    def find(path: str) -> Path:
        return index.find(ClipRow("k_0", path, 0.0, 1.0, (0,), "x.csv:2", path), ())

    assert find("sub/a.mp4") == find("./sub//a.mp4") == find("in.mp4") == (folder / "sub" / "a.mp4").resolve()
    for bad in ("out/b.mp4", "../elsewhere/b.mp4", str(elsewhere / "b.mp4")):
        with pytest.raises(DatasetError, match=r"outside the video folder|not a path inside"):
            find(bad)
    with pytest.raises(FileNotFoundError, match=r"no file sub/gone\.mp4"):
        find("sub/gone.mp4")


CLASSES = "dog\ncat\n"


@pytest.mark.parametrize(
    ("text", "layout", "lines", "message"),
    [
        ("video,label\na.mp4,dog\nb.mp4,cow\n", {"classes_file": True}, [3], "'cow' is not a class from"),
        ("video,start,end,label\na.mp4,1,2,dog\na.mp4,1.0,3,cat\n", {}, [3, 2], "already the key of"),
        ("video,label\na.b.mp4,dog\na_b.mp4,cat\n", {}, [3, 2], "already the key of"),
        ("video,start,end,label\na.mp4,2,2,dog\n", {}, [2], "is not after start"),
        ("video,start,end,label\na.mp4,3,00:00:01.00,dog\n", {}, [2], "is not after start"),
        ("video,start,end,label\na.mp4,1:2:3,4,dog\n", {}, [2], "is not a time"),
        ("video,start,end,label\na.mp4,1e3,2e3,dog\n", {}, [2], "is not a time"),
        ("video,start,end,label\na.mp4,nan,2,dog\n", {}, [2], "is not a time"),
        ("video,tag\na.mp4,dog\n", {}, [1], "no column 'label'"),
        ("video,label\na.mp4,dog\n", {"start_column": "t0"}, [1], "no column 't0'"),
        ("video,start,label\na.mp4,1,dog\n", {}, [1], "without an end column"),
        ("video,label\n../a.mp4,dog\n", {}, [2], "not a path inside --videos"),
        ("video,label\n/etc/passwd,dog\n", {}, [2], "not a path inside --videos"),
        ("video,label\nx/a,dog\n", {"by_id": True}, [2], "holds '/'"),
        ("video,label\na.mp4,dog\nb.mp4,\n", {}, [3], "no label"),
        ("video,label\na.mp4,dog;cat\n", {"multi_label": False}, [2], "--single-label says one"),
        ("video,label\na.mp4,dog,extra\n", {}, [2], "3 columns, the header has 2"),
        ("video,label\na.mp4,dog\n", {"label_type": "indices"}, [2], "'dog' is not a class index"),
        ("video,label\na.mp4,\nb.mp4,\n", {"multi_label": True}, [], "no row has a label"),
        ("video,label,split\na.mp4,dog,train\n", {}, [], "pass --split NAME"),
        ("video,label,split\na.mp4,dog,train\n", {"split": "val"}, [], "no row of split 'val'"),
    ],
)
def test_input_errors_name_the_line(tmp_path, text, layout, lines, message):
    csv = write_csv(tmp_path, "bad.csv", text)
    if layout.get("classes_file"):
        layout = {**layout, "classes_file": write_csv(tmp_path, "classes.txt", CLASSES)}
    with pytest.raises(DatasetError, match=message) as error:
        read_custom_csv(csv, CsvLayout(**layout))
    assert str(csv) in str(error.value)
    for line in lines:  # a duplicate names both lines
        assert f"{csv}:{line}" in str(error.value)


def test_the_tool_stops_before_any_work_on_an_input_error(videos, tmp_path, capsys):
    csv = write_csv(tmp_path, "bad.csv", "video,label\nlong.mp4,dog\n../../etc/passwd,dog\n")
    args = ["--csv", str(csv), "--videos", str(videos), "--out", str(tmp_path / "out"), *SMALL]
    assert shard_csv.main(args) == 1
    assert f"{csv}:3" in capsys.readouterr().err and not (tmp_path / "out").exists()


def test_unknown_labels_can_be_dropped_and_the_dropped_rows_are_reported(tmp_path):
    classes = write_csv(tmp_path, "classes.txt", CLASSES)
    single = write_csv(tmp_path, "single.csv", "video,label\na.mp4,dog\nb.mp4,cow\n")
    table = read_custom_csv(single, CsvLayout(classes_file=classes, drop_unknown_labels=True))
    assert [r.key for r in table.rows] == ["a_0"] and table.dropped == [f"{single}:3"]
    assert "1 rows dropped" in table.describe()
    multi = write_csv(tmp_path, "multi.csv", "video,label\na.mp4,dog;cow\nb.mp4,cow\n")
    table = read_custom_csv(multi, CsvLayout(classes_file=classes, drop_unknown_labels=True))
    assert [(r.key, r.labels) for r in table.rows] == [("a_0", (0,)), ("b_0", ())]  # as AudioSet: kept, no label


def test_index_labels_against_a_class_csv(tmp_path):
    classes = write_csv(tmp_path, "classes.csv", "index,id,name\n0,d,dog\n1,c,cat\n2,b,bird\n")
    csv = write_csv(tmp_path, "c.csv", "video,label\na.mp4,2\nb.mp4,02\n")
    table = read_custom_csv(csv, CsvLayout(classes_file=classes))
    assert table.label_type == "indices" and [r.labels for r in table.rows] == [(2,), (2,)]
    assert table.classes[1] == {"index": 1, "id": "c", "name": "cat"}
    by_name = write_csv(tmp_path, "n.csv", "video,label\na.mp4,cat\nb.mp4,b\n")  # a class's name or its id
    assert [r.labels for r in read_custom_csv(by_name, CsvLayout(classes_file=classes)).rows] == [(1,), (2,)]
    out_of_range = write_csv(tmp_path, "c.csv", "video,label\na.mp4,2\nb.mp4,3\n")
    with pytest.raises(DatasetError, match=r"c\.csv:3: label '3' is not a class"):
        read_custom_csv(out_of_range, CsvLayout(classes_file=classes))


@pytest.mark.parametrize(
    ("text", "seconds"),
    [("12.5", 12.5), ("0", 0.0), ("00:00:01.089", 1.089), ("01:02:03.50", 3723.5), ("00:00:07", 7.0)],
)
def test_times_in_seconds_or_hh_mm_ss(text, seconds):
    assert parse_time(text, "start", "x.csv:2") == pytest.approx(seconds)


# EPIC-KITCHENS-100's annotation layout (EPIC_100_train.csv) and its class file (EPIC_100_verb_classes.csv).
EPIC_CSV = """narration_id,participant_id,video_id,narration_timestamp,start_timestamp,stop_timestamp,start_frame,\
stop_frame,narration,verb,verb_class,noun,noun_class,all_nouns,all_noun_classes
P01_01_0,P01,P01_01,00:00:01.089,00:00:00.14,00:00:03.37,8,202,open door,open,3,door,3,['door'],[3]
P01_01_1,P01,P01_01,00:00:02.629,00:00:04.37,00:00:06.17,262,370,turn on light,turn-on,6,light,114,['light'],[114]
P01_01_2,P01,P01_01,00:00:05.349,00:00:06.98,00:00:09.49,418,569,"put plate, cup",put,1,plate,2,"['plate', 'cup']",\
"[2, 13]"
"""
EPIC_VERBS = """id,key,instances,category
0,take,"['take', 'grab', 'pick-up']",retrieve
1,put,"['put', 'place']",leave
2,wash,['wash'],clean
3,open,['open'],access
4,close,['close'],access
5,insert,['insert'],leave
6,turn-on,['turn-on'],manipulate
"""


def test_epic_kitchens_annotations_shard_by_verb_class(tmp_path):
    csv = write_csv(tmp_path, "EPIC_100_train.csv", EPIC_CSV)
    verbs = write_csv(tmp_path, "EPIC_100_verb_classes.csv", EPIC_VERBS)
    layout = CsvLayout(
        video_column="video_id",
        start_column="start_timestamp",
        end_column="stop_timestamp",
        label_column="verb_class",
        by_id=True,
        classes_file=verbs,
    )
    table = read_custom_csv(csv, layout)
    assert [c["name"] for c in table.classes][:4] == ["take", "put", "wash", "open"] and not table.multi_label
    assert [(r.key, r.ytid, r.start_s, r.end_s, r.labels) for r in table.rows] == [
        ("P01_01_140", "P01_01", 0.14, 3.37, (3,)),
        ("P01_01_4370", "P01_01", 4.37, 6.17, (6,)),
        ("P01_01_6980", "P01_01", 6.98, 9.49, (1,)),
    ]
    keyed = read_custom_csv(csv, CsvLayout(**{**vars(layout), "key_column": "narration_id"}))
    assert [r.key for r in keyed.rows] == ["P01_01_0", "P01_01_1", "P01_01_2"]


# The custom preset (MBT-B) made tiny for 1 s segments of 4 frames: 80 of the 100 log-mel frames, 32 px crops.
CUSTOM_TINY = [
    "--preset", "custom", "--model.embed_dim", "32", "--model.depth", "2", "--model.num_heads", "2",
    "--model.fusion_layer", "1", "--model.num_frames", "4", "--augment.frames_used", "4", "--model.img_size", "32",
    "--augment.crop_px", "32", "--augment.eval_short_side_px", "36", "--model.audio_frames", "80",
    "--augment.audio_frames", "80", "--augment.time_mask_px", "20", "--augment.freq_mask_px", "24",
    "--loader", "torch", "--num_workers", "0", "--batch_size", "2", "--eval_batch_size", "2", "--epochs", "2",
    "--warmup_epochs", "1",
]  # fmt: skip


@pytest.mark.slow
@pytest.mark.parametrize("multi_label", [False, True], ids=["single-label", "multi-label"])
def test_the_custom_preset_trains_and_evaluates_with_the_splits_own_head(videos, tmp_path, multi_label):
    """`--preset custom` reads the number of classes from the training split (the head's size in config.yaml and the
    checkpoint) and the loss and metrics from single/multi-label: top-1/top-5, or mAP/mAUC/d'."""
    text = SEGMENTS_CSV.replace(",dog,train\n", ",dog;cat,train\n", 1) if multi_label else SEGMENTS_CSV
    csv = write_csv(tmp_path, "clips.csv", text)
    for split in ("train", "test"):
        shard(csv, videos, tmp_path / split, "--split", split)
    assert load_manifest(tmp_path / "train").multi_label is multi_label
    run = tmp_path / "run"
    args = ["--train_shards", str(tmp_path / "train"), "--eval_shards", str(tmp_path / "test"), "--out_dir", str(run)]
    assert train_main([*CUSTOM_TINY, *args]) == 0
    saved = yaml.safe_load((run / "config.yaml").read_text())
    assert saved["model"]["num_classes"] == 3 and saved["model"]["embed_dim"] == 32  # dog, cat, bird: the CSV's
    assert saved["label_smoothing"] == 0.3 and saved["optimizer"] == "sgd"  # the MBT recipe
    metrics = json.loads((run / "eval" / "metrics.json").read_text())
    assert set(metrics) == (
        {"num_samples", "mAP", "mAUC", "d_prime"} if multi_label else {"num_samples", "top1"}  # 3 classes: no top-5
    )
    out = tmp_path / "evaluated"
    checkpoint = latest_checkpoint(run)
    assert evaluate_main(["--checkpoint", str(checkpoint), "--shards", str(tmp_path / "test"), "--out", str(out)]) == 0
    evaluated = json.loads((out / "metrics.json").read_text())
    assert evaluated.keys() == metrics.keys()  # one test sample: mAUC and d' are null (no negative of each class)
    assert all(evaluated[k] == pytest.approx(v, rel=0, abs=1e-6) for k, v in metrics.items() if v is not None)


def test_the_custom_preset_without_a_readable_training_split_asks_for_the_classes(tmp_path, capsys):
    assert train_main([*CUSTOM_TINY, "--train_shards", str(tmp_path / "none"), "--out_dir", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert "--train_shards" in err and str(tmp_path / "none") in err


def test_help_names_every_column_option(capsys):
    with pytest.raises(SystemExit) as done:
        shard_csv.main(["--help"])
    assert done.value.code == 0
    text = capsys.readouterr().out
    for option in (
        "--video-column",
        "--start-column",
        "--end-column",
        "--label-column",
        "--split-column",
        "--split",
        "--label-separator",
        "--classes",
        "--label-type",
        "--multi-label",
        "--single-label",
        "--dataset",
    ):
        assert option in text
