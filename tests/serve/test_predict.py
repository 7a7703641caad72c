"""Prediction on raw videos (tools/predict.py, serve.predict): the logits and embeddings of a demo video are those
evaluation gives its shard sample (the same decode, features and test clips); timelines, segments CSVs and JSON;
each bad input gets one error line naming it while the others are predicted, a full disk one error line naming the
file; the demo run names its videos' classes and its timeline of two videos changes class at the cut."""

from __future__ import annotations

import csv
import json
import math
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import load_tool
from full_disk import PAGE, FullDisk
from media import make_clip, make_not_a_video
from tiny_run import eval_videos, make_run

from experiments.demo_data import DemoDataset
from mbt.dist import DistInfo
from mbt.sharded_eval import evaluate_split
from mbt.train import main as train_main
from pipelines import open_split
from preprocess.clip import ClipTask, process_clip
from preprocess.datasets import ClipRow
from preprocess.features import compute_logmel
from serve.load import from_checkpoint
from serve.predict import Predictor, window_features
from serve.segments import Segment
from shards.atomic import RERUN
from shards.schema import LOGMEL_EXT, MAX_FRAMES, FeatureParams

SINGLE = DistInfo(rank=0, local_rank=0, world_size=1, device=torch.device("cpu"))


@pytest.fixture(scope="module")
def run(train_shards: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_run(train_shards, tmp_path_factory.mktemp("predict") / "run")


def concatenate(first: Path, second: Path, out: Path) -> Path:
    """The two videos one after the other (re-encoded), with ffmpeg."""
    graph = "[0:v][0:a][1:v][1:a]concat=n=2:v=1:a=1[v][a]"
    cmd = ["ffmpeg", "-nostdin", "-loglevel", "error", "-y", "-i", f"file:{first}", "-i", f"file:{second}",
           "-filter_complex", graph, "-map", "[v]", "-map", "[a]", "-c:v", "libx264", "-preset", "veryfast",
           "-pix_fmt", "yuv420p", "-c:a", "aac", str(out)]  # fmt: skip
    subprocess.run(cmd, check=True, capture_output=True)
    return out


@pytest.mark.slow
def test_predict_gives_the_logits_and_embeddings_evaluation_gives(
    run: Path, demo: DemoDataset, eval_shards: Path, tmp_path: Path
) -> None:
    model, prep = from_checkpoint(run)
    out = tmp_path / "eval"
    evaluate_split(
        model, open_split(eval_shards), SINGLE, prep.augment, str(eval_shards), out, embeddings_path=out / "emb.npz",
        batch_size=2, loader="torch", num_workers=0,
    )  # fmt: skip
    with np.load(out / "predictions.npz") as npz, np.load(out / "emb.npz") as emb:
        keys = list(npz["keys"])
        assert list(emb["keys"]) == keys and set(emb.files) == {"keys", "video", "audio", "bottleneck"}
        evaluated = {k: (npz["logits"][i], {n: emb[n][i] for n in ("video", "audio", "bottleneck")}) for i, k in
                     enumerate(keys)}  # fmt: skip
    assert (out / "per_class_ap.png").stat().st_size > 0
    names = [row["class_name"] for row in csv.DictReader((out / "per_class_ap.csv").open())]
    assert names == prep.class_names and all(names)
    predictor = Predictor(model, prep)
    videos = eval_videos(demo)
    assert set(videos) == set(evaluated)
    for key, video in videos.items():
        prediction = predictor.predict(Segment(video, key), embeddings=True)
        assert prediction.windows == [(0.0, 2.0)]
        logits, embedding = evaluated[key]
        np.testing.assert_allclose(prediction.logits[0], logits, atol=1e-5)
        tokens = model.cfg.bottleneck_tokens  # 4 and, with the CLS pool, scenic's one more
        assert embedding["bottleneck"].shape == (tokens, 32) and embedding["video"].shape == (32,)
        for name, value in embedding.items():
            np.testing.assert_allclose(prediction.embeddings[0][name], value, atol=1e-5)


@pytest.mark.slow
def test_predict_tool_writes_json_embeddings_and_a_timeline(
    run: Path, demo: DemoDataset, tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    first, second = list(eval_videos(demo).values())[:2]
    joined = concatenate(first, second, tmp_path / "joined.mp4")
    out = ["--out-dir", str(tmp_path / "tl"), "--json", str(tmp_path / "out.json")]
    args = [str(joined), "--model", str(run), "--window-s", "2", "--hop-s", "1", "--top-k", "3", *out,
            "--embeddings", str(tmp_path / "emb.npz")]  # fmt: skip
    assert load_tool("predict").main(args) == 0
    printed = capsys.readouterr().out
    assert "(3 windows)" in printed and "timeline:" in printed
    rows = list(csv.DictReader((tmp_path / "tl" / "joined.timeline.csv").open()))
    assert [(r["start_s"], r["end_s"]) for r in rows] == [("0.000", "2.000"), ("1.000", "3.000"), ("2.000", "4.000")]
    assert (tmp_path / "tl" / "joined.timeline.png").stat().st_size > 0
    result = json.loads((tmp_path / "out.json").read_text())
    video = result["videos"][0]
    assert len(video["windows"]) == 3 and len(video["top"]) == 3 and result["classes"][0] == "Red background"
    with np.load(tmp_path / "emb.npz") as emb:
        # 3 windows; 4 bottleneck tokens and, with the CLS pool, scenic's one more
        assert emb["video"].shape == (3, 32) and emb["bottleneck"].shape == (3, 5, 32)
        assert list(emb["keys"]) == [f"{joined}@{s}" for s in (0, 1, 2)]


def test_a_segments_csv_is_read_inside_its_video_folder(
    run: Path, demo: DemoDataset, tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    ytid = next(c.ytid for c in demo.clips)
    table = tmp_path / "segments.csv"
    table.write_text(f"video,start,end\n{ytid}.mp4,0,2\n")
    args = [str(table), "--model", str(run), "--videos", str(demo.videos_dir)]
    assert load_tool("predict").main(args) == 0
    assert f"{ytid}.mp4:" in capsys.readouterr().out
    table.write_text("video\n../../etc/passwd\n")
    assert load_tool("predict").main(args) == 1
    assert "is not a path inside" in capsys.readouterr().err


@pytest.mark.parametrize("kind", ["missing", "not_a_video", "too_short"])
def test_each_bad_input_gets_one_error_line_and_the_others_are_predicted(
    kind: str, run: Path, demo: DemoDataset, tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    bad = tmp_path / f"bad-{kind}.mp4"
    if kind == "not_a_video":
        make_not_a_video(bad)
    elif kind == "too_short":
        make_clip(bad, seconds=1.0)
    good = next(iter(eval_videos(demo).values()))
    assert load_tool("predict").main([str(bad), str(good), "--model", str(run)]) == 1
    captured = capsys.readouterr()
    errors = [line for line in captured.err.splitlines() if line.startswith("error: ")]
    assert len(errors) == 1 and str(bad) in errors[0], captured.err
    expected = {"missing": "does not exist", "not_a_video": "", "too_short": "shorter"}
    assert expected[kind] in errors[0]
    assert f"{good}:" in captured.out and "1 of 2 video(s) could not be predicted" in captured.err


def test_a_video_without_audio_is_predicted_with_silence_as_the_shard_job_stores_it(
    run: Path, tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    silent = make_clip(tmp_path / "silent.mp4", seconds=2.0, audio=False)
    assert load_tool("predict").main([str(silent), "--model", str(run), "--json", str(tmp_path / "out.json")]) == 0
    captured = capsys.readouterr()
    assert f"{silent} (no audio stream: heard as silence):" in captured.out
    assert captured.err.splitlines() == [f"warning: {silent}: no audio stream: predicted with silent audio, as "
                                         "training sees such clips"]  # fmt: skip
    assert json.loads((tmp_path / "out.json").read_text())["videos"][0]["has_audio"] is False
    model, prep = from_checkpoint(run)
    task = ClipTask(ClipRow("k", "", 0.0, 2.0, (0,), str(silent)), str(silent), None, 0.0, 2.0)
    members, _ = process_clip(task, prep.features, require_audio=False)  # what the shard job stores
    logmel = next(data for name, data in members if name.endswith(LOGMEL_EXT))
    zeros = compute_logmel(np.zeros(32000, np.float32), prep.features).values.astype(np.float16).tobytes()
    assert logmel == zeros
    prediction = Predictor(model, prep).predict(Segment(silent, "silent"))
    assert not prediction.has_audio and prediction.probabilities.shape == (1, len(prep.class_names))
    np.testing.assert_allclose(prediction.probabilities, 1 / (1 + np.exp(-prediction.logits)))
    top = prediction.top(len(prep.class_names))
    assert (
        len(top) == len(prep.class_names)
        and len(prediction.top(100)) == len(top)
        and top[0][1] == max(prediction.probabilities[0])
    )


def test_predict_runs_the_ffmpeg_given_when_none_is_on_path(
    run: Path, demo: DemoDataset, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture
) -> None:
    ffmpeg = tmp_path / "bin" / "ffmpeg"
    ffmpeg.parent.mkdir()
    ffmpeg.symlink_to(shutil.which("ffmpeg"))
    monkeypatch.setenv("PATH", str(tmp_path / "nothing"))
    monkeypatch.setenv("MBT_FFMPEG", "")  # restored after the test, as --ffmpeg sets it
    video = next(iter(eval_videos(demo).values()))
    assert load_tool("predict").main([str(video), "--model", str(run)]) == 1
    assert "ffmpeg not found on PATH" in capsys.readouterr().err
    assert load_tool("predict").main([str(video), "--model", str(run), "--ffmpeg", str(ffmpeg)]) == 0
    assert f"{video}:" in capsys.readouterr().out


def test_a_window_shorter_than_the_models_input_is_refused(run: Path, capsys: pytest.CaptureFixture) -> None:
    assert load_tool("predict").main(["x.mp4", "--model", str(run), "--window-s", "1"]) == 1
    assert "shorter than the model's audio input of 1.6 s" in capsys.readouterr().err


def test_a_window_holds_1_to_max_frames() -> None:
    features = FeatureParams(num_frames=20, segment_s=10.0)  # 2 frames a second
    assert window_features(features, MAX_FRAMES / 2).num_frames == MAX_FRAMES
    with pytest.raises(ValueError, match=f"--window-s {(MAX_FRAMES + 1) / 2:g} holds {MAX_FRAMES + 1} frames"):
        window_features(features, (MAX_FRAMES + 1) / 2)


def test_a_model_that_cannot_be_read_is_one_error_line(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    assert load_tool("predict").main(["x.mp4", "--model", str(tmp_path)]) == 1
    assert capsys.readouterr().err.startswith(f"error: {tmp_path}: a folder with neither checkpoints")


# The demo preset made tiny for the session's 2 s demo clips, trained long enough to learn the background colours.
COLOUR_RUN = [
    "--model.embed_dim", "32", "--model.depth", "2", "--model.num_heads", "2", "--model.fusion_layer", "1",
    "--model.img_size", "32", "--augment.crop_px", "32", "--augment.eval_short_side_px", "36",
    "--loader", "torch", "--num_workers", "0", "--batch_size", "3", "--epochs", "100", "--eval_every_epochs", "100",
    "--checkpoint_every_steps", "1000", "--log_every_steps", "1000",
]  # fmt: skip
COLOURS = ("/m/demo_red", "/m/demo_green", "/m/demo_blue", "/m/demo_yellow")


@pytest.fixture(scope="module")
def trained_run(train_shards: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny MBT trained by mbt.train on the demo's 9 training clips (300 steps, about 20 s)."""
    out = tmp_path_factory.mktemp("predict") / "trained"
    args = ["--train_shards", str(train_shards), "--eval_shards", "", "--out_dir", str(out), *COLOUR_RUN]
    assert train_main(args) == 0
    return out


def csv_labels(path: Path) -> dict[str, set[str]]:
    """{YTID: label ids} of an AudioSet segments CSV."""
    rows = [line.split(", ", 3) for line in path.read_text().splitlines() if not line.startswith("#")]
    return {r[0]: set(r[3].strip().strip('"').split(",")) for r in rows if len(r) == 4}


@pytest.mark.slow
def test_a_trained_run_names_the_background_colour_its_csv_gives_each_video(
    trained_run: Path, demo: DemoDataset
) -> None:
    model, prep = from_checkpoint(trained_run)
    ids = [c["id"] for c in prep.classes]
    colours = [ids.index(c) for c in COLOURS]
    predictor = Predictor(model, prep)
    for ytid, labels in csv_labels(demo.train_csv).items():
        prediction = predictor.predict(Segment(demo.videos_dir / f"{ytid}.mp4", ytid))
        best = colours[int(np.argmax(prediction.logits[0][colours]))]
        expected = [prep.class_names[i] for i in colours if ids[i] in labels]
        assert [prep.class_names[best]] == expected, (ytid, labels)  # e.g. "Red background"


@pytest.mark.slow
def test_the_timeline_of_two_videos_changes_colour_at_the_cut(
    trained_run: Path, demo: DemoDataset, tmp_path: Path
) -> None:
    labels = csv_labels(demo.train_csv)
    model, prep = from_checkpoint(trained_run)
    ids = [c["id"] for c in prep.classes]
    colours = [ids.index(c) for c in COLOURS]
    by_colour: dict[int, str] = {}
    for ytid, mids in labels.items():
        by_colour.setdefault(next(i for i in colours if ids[i] in mids), ytid)
    (a, first), (b, second) = list(by_colour.items())[:2]
    joined = concatenate(demo.videos_dir / f"{first}.mp4", demo.videos_dir / f"{second}.mp4", tmp_path / "j.mp4")
    segment_s = prep.features.segment_s
    predictor = Predictor(model, prep, window_s=segment_s, hop_s=segment_s / 2)
    prediction = predictor.predict(Segment(joined, "joined"))
    assert len(prediction.windows) == 3  # the first video, across the cut, the second video
    top_colour = [colours[int(np.argmax(row[colours]))] for row in prediction.logits]
    assert top_colour[0] == a and top_colour[-1] == b


WRITTEN = ["tl/v.timeline.csv", "tl/v.timeline.png", "out.json", "emb.npz"]  # in this order


@pytest.mark.slow
@pytest.mark.parametrize("named", WRITTEN)
def test_a_full_disk_is_one_error_line_naming_the_file_and_nothing_partial_is_left(
    run: Path, demo: DemoDataset, full_disk: FullDisk, capsys: pytest.CaptureFixture, named: str
) -> None:
    video = full_disk.folder.parent / "v.mp4"
    video.write_bytes(next(iter(eval_videos(demo).values())).read_bytes())
    disk = full_disk.folder
    args = [str(video), "--model", str(run), "--window-s", "2", "--out-dir", str(disk / "tl"),
            "--json", str(disk / "out.json"), "--embeddings", str(disk / "emb.npz")]  # fmt: skip
    assert load_tool("predict").main(args) == 0
    before = WRITTEN[: WRITTEN.index(named)]  # the files written before `named`, in whole pages on a tmpfs
    room = sum(math.ceil((disk / name).stat().st_size / PAGE) * PAGE for name in before)
    for name in WRITTEN:
        (disk / name).unlink()
    full_disk.fill(leave_bytes=room)
    capsys.readouterr()
    assert load_tool("predict").main(args) == 1
    assert capsys.readouterr().err == f"error: cannot write {disk / named}: No space left on device; {RERUN}\n"
    assert sorted(str(p) for p in full_disk.files()) == sorted(before)
