"""The synthetic demo dataset and the edge-case media helpers, checked with ffprobe and by decoding them."""

from __future__ import annotations

import dataclasses
import itertools
import json
import os
import re
import shutil
import subprocess
import sys
from fractions import Fraction
from pathlib import Path

import numpy as np
import pytest
from media import make_clip, make_not_a_video, make_vfr_clip, truncate_file

from experiments.demo_data import (
    BACKGROUND_RGB,
    DEMO_CLASSES,
    HIGH_TONE_HZ,
    LOW_TONE_HZ,
    MODALITIES,
    DemoClip,
    DemoDataset,
    draw_demo_clips,
    make_demo_dataset,
)
from preprocess.datasets import read_audioset_classes, read_audioset_segments
from preprocess.videos import AUDIOSET_NAME_TEMPLATES, VideoIndex
from shards.atomic import tmp_path_for

pytestmark = pytest.mark.skipif(shutil.which("ffmpeg") is None, reason="needs ffmpeg (apt-get install ffmpeg)")

REPO = Path(__file__).resolve().parents[2]
SECONDS = 2.0
SIZE = (160, 120)
DECODE_SAMPLE_RATE_HZ = 16000
YTID_RE = re.compile(r"[A-Za-z0-9_-]{11}")
SEGMENT_ROW_RE = re.compile(r'([A-Za-z0-9_-]{11}), 0\.000, 2\.000, "(/m/demo_[a-z_]+(?:,/m/demo_[a-z_]+)*)"')
VISUAL_MIDS = {c.mid for c in DEMO_CLASSES if c.modality == "visual"}
AUDIBLE_MIDS = {c.mid for c in DEMO_CLASSES if c.modality == "audible"}
CROSS_MIDS = {c.mid for c in DEMO_CLASSES if c.modality == "cross"}


def ffprobe(path: Path, *options: str) -> dict:
    """ffprobe's JSON of `path`'s streams and format; fails the test when ffprobe cannot read it."""
    result = subprocess.run(
        ["ffprobe", "-hide_banner", "-loglevel", "error", "-print_format", "json", "-show_streams",
         "-show_format", *options, "-i", os.path.abspath(path)],
        capture_output=True, text=True, check=True,
    )  # fmt: skip
    return json.loads(result.stdout)


def streams(info: dict, codec_type: str) -> list[dict]:
    """The streams of one type ("video" or "audio") in ffprobe's JSON."""
    return [s for s in info["streams"] if s["codec_type"] == codec_type]


def decode(path: Path, *output_args: str) -> bytes:
    """Raw bytes that ffmpeg decodes `path` to, in the format `output_args` ask for."""
    command = ["ffmpeg", "-nostdin", "-hide_banner", "-loglevel", "error", "-y", "-i", os.path.abspath(path)]
    return subprocess.run([*command, *output_args, "-"], capture_output=True, check=True).stdout


def file_times(folder: Path) -> dict[str, int]:
    """mtime (ns) of every file under `folder`, by relative path."""
    return {str(p.relative_to(folder)): p.stat().st_mtime_ns for p in folder.rglob("*") if p.is_file()}


@pytest.fixture(scope="module")
def demo(tmp_path_factory: pytest.TempPathFactory) -> DemoDataset:
    return make_demo_dataset(tmp_path_factory.mktemp("demo"), clips=6, seconds=SECONDS, size=SIZE, workers=1)


def test_videos_are_h264_and_aac_of_the_segment_length(demo: DemoDataset) -> None:
    assert sorted(p.name for p in demo.videos_dir.iterdir()) == sorted(f"{c.ytid}.mp4" for c in demo.clips)
    for clip in demo.clips:
        info = ffprobe(demo.videos_dir / f"{clip.ytid}.mp4")
        [video] = streams(info, "video")
        [audio] = streams(info, "audio")
        assert (video["codec_name"], video["pix_fmt"], video["r_frame_rate"]) == ("h264", "yuv420p", "25/1")
        assert (video["width"], video["height"]) == SIZE
        assert int(video["nb_frames"]) == 50
        assert audio["codec_name"] == "aac"
        assert (int(audio["sample_rate"]), audio["channels"]) == (clip.sample_rate_hz, clip.channels)
        assert float(info["format"]["duration"]) == pytest.approx(SECONDS, abs=0.05)


@pytest.mark.slow
def test_labels_match_what_is_seen_and_heard(demo: DemoDataset) -> None:
    for clip in demo.clips:
        path = demo.videos_dir / f"{clip.ytid}.mp4"
        frames = np.frombuffer(decode(path, "-f", "rawvideo", "-pix_fmt", "rgb24"), np.uint8)
        frames = frames.reshape(-1, SIZE[1], SIZE[0], 3)
        background = np.median(frames.reshape(-1, 3), axis=0)
        nearest = min(BACKGROUND_RGB, key=lambda c: np.abs(background - _rgb(BACKGROUND_RGB[c])).sum())
        assert nearest == clip.background
        white_share = (frames.min(axis=3) > 200).mean(axis=(1, 2)).max()
        assert (white_share > 0.02) == clip.moving_box

        audio = np.frombuffer(decode(path, "-f", "f32le", "-ac", "1", "-ar", str(DECODE_SAMPLE_RATE_HZ)), np.float32)
        power = np.abs(np.fft.rfft(audio)) ** 2
        freqs_hz = np.fft.rfftfreq(len(audio), 1 / DECODE_SAMPLE_RATE_HZ)
        assert freqs_hz[power.argmax()] == pytest.approx(clip.tone_hz, abs=10)
        # Pink noise reaches 5-7.5 kHz, far above both tones; the tone alone leaves < 1e-4 of its power there.
        high_band_share = power[(freqs_hz > 5000) & (freqs_hz < 7500)].sum() / power.sum()
        assert (high_band_share > 1e-4) == clip.noise
        windows = audio[: len(audio) // 160 * 160].reshape(-1, 160)  # 10 ms
        quiet_rms = np.percentile(np.sqrt((windows**2).mean(axis=1)), 10)
        assert (quiet_rms < 0.1) == clip.beeping


def _rgb(hex_colour: str) -> np.ndarray:
    """(r, g, b) of ``0xRRGGBB``."""
    value = int(hex_colour, 16)
    return np.array([value >> 16, (value >> 8) & 255, value & 255], dtype=float)


def test_class_csv_is_in_audioset_format(demo: DemoDataset) -> None:
    lines = demo.class_labels_csv.read_text().splitlines()
    assert lines[0] == "index,mid,display_name"
    assert lines[1] == '0,/m/demo_red,"Red background"'
    assert len(lines) == 1 + len(DEMO_CLASSES)
    assert read_audioset_classes(demo.class_labels_csv) == [(c.mid, c.display_name) for c in DEMO_CLASSES]


def test_segment_csvs_are_in_audioset_format(demo: DemoDataset) -> None:
    mids = [c.mid for c in DEMO_CLASSES]
    ytids_of_split = {}
    for path, split in ((demo.train_csv, "train"), (demo.eval_csv, "eval")):
        lines = path.read_text().splitlines()
        rows = [SEGMENT_ROW_RE.fullmatch(line) for line in lines[3:]]
        assert all(rows), lines
        labels = [mid for row in rows for mid in row[2].split(",")]
        assert lines[0] == "# Segments csv created Sun Mar  5 10:54:31 2017"
        assert lines[1] == (
            f"# num_ytids={len(rows)}, num_segs={len(rows)}, num_unique_labels={len(set(labels))}, "
            f"num_positive_labels={len(labels)}"
        )
        assert lines[2] == "# YTID, start_seconds, end_seconds, positive_labels"
        assert set(labels) <= set(mids)
        ytids_of_split[split] = [row[1] for row in rows]
        assert ytids_of_split[split] == [c.ytid for c in demo.clips if c.split == split]

        index = VideoIndex(demo.videos_dir)
        for clip_row in read_audioset_segments(path, mids):
            assert index.find(clip_row, AUDIOSET_NAME_TEMPLATES).name == f"{clip_row.ytid}.mp4"
    assert (len(ytids_of_split["train"]), len(ytids_of_split["eval"])) == (5, 1)
    assert any(ytid.startswith("-") for ytid in ytids_of_split["train"] + ytids_of_split["eval"])


def test_same_seed_gives_the_same_dataset(demo: DemoDataset, tmp_path: Path) -> None:
    again = make_demo_dataset(tmp_path, clips=6, seconds=SECONDS, size=SIZE, workers=2)
    for a, b in ((demo.class_labels_csv, again.class_labels_csv), (demo.train_csv, again.train_csv),
                 (demo.eval_csv, again.eval_csv)):  # fmt: skip
        assert a.read_bytes() == b.read_bytes()
    assert again.clips == demo.clips
    other = draw_demo_clips(6, seed=1)
    assert [c.ytid for c in other] != [c.ytid for c in demo.clips]


def test_rerun_regenerates_nothing_and_completes_what_is_missing(tmp_path: Path) -> None:
    first = make_demo_dataset(tmp_path, clips=4, seconds=1.0, workers=2)
    assert first.num_generated == 4
    times = file_times(tmp_path)
    assert make_demo_dataset(tmp_path, clips=4, seconds=1.0, workers=2).num_generated == 0
    assert file_times(tmp_path) == times

    # A killed run leaves a temporary file and no video: the rerun renders that one clip only.
    missing = first.videos_dir / f"{first.clips[1].ytid}.mp4"
    missing.unlink()
    stale = tmp_path_for(missing)
    stale.write_bytes(b"half a video")
    assert make_demo_dataset(tmp_path, clips=4, seconds=1.0, workers=2).num_generated == 1
    assert not stale.exists()
    del times[str(missing.relative_to(tmp_path))]
    assert {k: v for k, v in file_times(tmp_path).items() if k in times} == times
    assert ffprobe(missing)["format"]["format_name"].startswith("mov,mp4")


def test_every_clip_needs_both_modalities() -> None:
    clips = draw_demo_clips(2000, eval_fraction=0.25, seed=7)
    for clip in clips:
        mids = set(clip.mids)
        assert len(mids & {f"/m/demo_{colour}" for colour in BACKGROUND_RGB}) == 1
        assert len(mids & {"/m/demo_low_tone", "/m/demo_high_tone"}) == 1
        assert mids & VISUAL_MIDS
        assert mids & AUDIBLE_MIDS
    assert {mid for clip in clips for mid in clip.mids} == VISUAL_MIDS | AUDIBLE_MIDS | CROSS_MIDS
    assert {clip.tone_hz for clip in clips} == {LOW_TONE_HZ, HIGH_TONE_HZ}
    assert {(clip.sample_rate_hz, clip.channels) for clip in clips} == {
        (16000, 1),
        (16000, 2),
        (44100, 1),
        (44100, 2),
    }
    assert sum(clip.split == "eval" for clip in clips) == 500
    ytids = [clip.ytid for clip in clips]
    assert len(set(ytids)) == len(ytids)
    assert all(YTID_RE.fullmatch(ytid) for ytid in ytids)
    assert [ytid.startswith("-") for ytid in ytids] == [i % 3 == 0 for i in range(len(ytids))]
    assert draw_demo_clips(10, eval_fraction=0.25, seed=7) == clips[:10]


def _attributes(clip: DemoClip) -> dict[str, tuple]:
    """What each modality shows of `clip`: its seen and its heard attributes."""
    return {
        "visual": (clip.background, clip.moving_box),
        "audible": (clip.tone_hz, clip.beeping, clip.noise),
    }


def test_cross_modal_labels_need_both_modalities() -> None:
    """Over every combination of the (uniform, independent) attributes, each cross-modal label is true for exactly
    half the clips whatever one modality shows (so neither modality alone predicts it), and is a function of the
    two together; the generator draws the attributes uniformly and independently."""
    template = draw_demo_clips(4)[0]
    everything = [
        dataclasses.replace(template, background=b, moving_box=m, tone_hz=t, beeping=e, noise=n)
        for b, m, t, e, n in itertools.product(
            BACKGROUND_RGB, (False, True), (LOW_TONE_HZ, HIGH_TONE_HZ), (False, True), (False, True)
        )
    ]
    assert [c.modality for c in DEMO_CLASSES].count("cross") == 3
    assert {c.modality for c in DEMO_CLASSES} == set(MODALITIES)
    for cross in CROSS_MIDS:
        for modality in ("visual", "audible"):
            by_value: dict[tuple, list[bool]] = {}
            for clip in everything:
                by_value.setdefault(_attributes(clip)[modality], []).append(cross in clip.mids)
            assert all(np.mean(labels) == 0.5 for labels in by_value.values()), (cross, modality)
        by_both: dict[tuple, set[bool]] = {}
        for clip in everything:
            by_both.setdefault(tuple(_attributes(clip).values()), set()).add(cross in clip.mids)
        assert all(len(labels) == 1 for labels in by_both.values())
    # A sum of per-modality scores cannot rank them: the four (seen, heard) cells of an XOR.
    clip = dataclasses.replace(template, background="red", tone_hz=LOW_TONE_HZ, moving_box=True, beeping=True)
    assert "/m/demo_colour_pitch" in clip.mids and "/m/demo_box_beeping" in clip.mids
    assert "/m/demo_colour_pitch" not in dataclasses.replace(clip, background="blue").mids
    assert "/m/demo_colour_pitch" not in dataclasses.replace(clip, tone_hz=HIGH_TONE_HZ).mids
    assert "/m/demo_colour_pitch" in dataclasses.replace(clip, background="green", tone_hz=HIGH_TONE_HZ).mids

    drawn = draw_demo_clips(4000, seed=3)
    cells: dict[tuple, int] = {}
    for clip in drawn:
        key = tuple(_attributes(clip).values())
        cells[key] = cells.get(key, 0) + 1
    assert len(cells) == len(everything)  # 64 combinations, each about 4000 / 64 = 62.5 times
    assert max(cells.values()) < 100 and min(cells.values()) > 30
    for cross in CROSS_MIDS:
        for modality in ("visual", "audible"):
            by_value = {}
            for clip in drawn:
                by_value.setdefault(_attributes(clip)[modality], []).append(cross in clip.mids)
            assert all(abs(np.mean(labels) - 0.5) < 0.08 for labels in by_value.values()), (cross, modality)


@pytest.mark.parametrize(
    "kwargs",
    [{"clips": 2}, {"eval_fraction": 0.0}, {"size": (161, 120)}, {"seconds": 0.0}, {"workers": 0}],
)
def test_bad_arguments_are_refused(tmp_path: Path, kwargs: dict) -> None:
    with pytest.raises(ValueError):
        make_demo_dataset(tmp_path, **kwargs)
    assert not any(tmp_path.iterdir())


def _run_tool(*args: str, path_env: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(REPO), "PATH": path_env}
    return subprocess.run(
        [sys.executable, str(REPO / "tools" / "make_demo_data.py"), *args],
        capture_output=True,
        text=True,
        env=env,
    )


def test_tool_makes_a_dataset_and_explains_a_missing_ffmpeg(tmp_path: Path) -> None:
    assert _run_tool("--help", path_env=os.environ["PATH"]).returncode == 0
    out = tmp_path / "demo"
    done = _run_tool(
        "--out", str(out), "--clips", "4", "--seconds", "1", "--size", "64x48", path_env=os.environ["PATH"]
    )
    assert done.returncode == 0, done.stderr
    assert len(list((out / "videos").glob("*.mp4"))) == 4
    assert streams(ffprobe(next((out / "videos").glob("*.mp4"))), "video")[0]["width"] == 64

    no_ffmpeg = _run_tool("--out", str(tmp_path / "x"), path_env=str(tmp_path / "empty"))
    assert no_ffmpeg.returncode != 0
    assert "apt-get install ffmpeg" in no_ffmpeg.stderr
    bad_size = _run_tool("--out", str(tmp_path / "x"), "--size", "big", path_env=os.environ["PATH"])
    assert bad_size.returncode != 0
    assert "WIDTHxHEIGHT" in bad_size.stderr


@pytest.mark.slow
@pytest.mark.parametrize(
    ("name", "kwargs", "video", "audio"),
    [
        ("ntsc.mp4", {"fps": "30000/1001"}, ("h264", 96, 64, "30000/1001"), ("aac", 16000, 1)),
        ("pal.mp4", {"fps": "25"}, ("h264", 96, 64, "25/1"), ("aac", 16000, 1)),
        ("fast.mp4", {"fps": "60"}, ("h264", 96, 64, "60/1"), ("aac", 16000, 1)),
        ("tiny.mp4", {"size": (16, 16)}, ("h264", 16, 16, "25/1"), ("aac", 16000, 1)),
        ("portrait.mp4", {"size": (64, 112)}, ("h264", 64, 112, "25/1"), ("aac", 16000, 1)),
        ("stereo.mp4", {"sample_rate": 44100, "channels": 2}, ("h264", 96, 64, "25/1"), ("aac", 44100, 2)),
        (
            "opus.webm",
            {"vcodec": "libvpx-vp9", "acodec": "libopus", "sample_rate": 48000},
            ("vp9", 96, 64, "25/1"),
            ("opus", 48000, 1),
        ),
        ("mp3.mkv", {"acodec": "libmp3lame"}, ("h264", 96, 64, "25/1"), ("mp3", 16000, 1)),
        ("mute.mp4", {"audio": False}, ("h264", 96, 64, "25/1"), None),
        ("sound.m4a", {"video": False}, None, ("aac", 16000, 1)),
        ("-dash.mp4", {}, ("h264", 96, 64, "25/1"), ("aac", 16000, 1)),
    ],
)
def test_make_clip_has_the_intended_streams(
    tmp_path: Path,
    name: str,
    kwargs: dict,
    video: tuple[str, int, int, str] | None,
    audio: tuple[str, int, int] | None,
) -> None:
    info = ffprobe(make_clip(tmp_path / name, **kwargs))
    assert [(s["codec_name"], s["width"], s["height"], s["r_frame_rate"]) for s in streams(info, "video")] == (
        [video] if video else []
    )
    assert [(s["codec_name"], int(s["sample_rate"]), s["channels"]) for s in streams(info, "audio")] == (
        [audio] if audio else []
    )
    assert float(info["format"]["duration"]) == pytest.approx(2.0, abs=0.1)


def test_make_vfr_clip_has_uneven_frame_intervals(tmp_path: Path) -> None:
    path = make_vfr_clip(tmp_path / "vfr.mp4")
    [video] = streams(ffprobe(path), "video")
    assert Fraction(video["avg_frame_rate"]) != Fraction(video["r_frame_rate"])
    result = subprocess.run(
        ["ffprobe", "-hide_banner", "-loglevel", "error", "-select_streams", "v:0", "-show_entries",
         "packet=pts_time", "-of", "csv=p=0", "-i", str(path)],
        capture_output=True, text=True, check=True,
    )  # fmt: skip
    pts_s = sorted(float(line) for line in result.stdout.split())
    assert len(pts_s) == 100
    intervals_ms = {round(1000 * (b - a)) for a, b in itertools.pairwise(pts_s)}
    assert {17, 33, 100} <= intervals_ms


def test_truncate_file_cuts_the_bytes(tmp_path: Path) -> None:
    src = make_clip(tmp_path / "whole.mp4")
    half = truncate_file(src, tmp_path / "half.mp4")
    assert half.read_bytes() == src.read_bytes()[: src.stat().st_size // 2]
    assert subprocess.run(["ffprobe", "-loglevel", "error", "-i", str(half)], capture_output=True).returncode != 0
    # With the index in front, the cut file opens but holds fewer packets than the index promises.
    indexed = truncate_file(make_clip(tmp_path / "indexed.mp4", faststart=True), tmp_path / "indexed_half.mp4")
    [video] = streams(ffprobe(indexed, "-count_packets"), "video")
    assert int(video["nb_read_packets"]) < int(video["nb_frames"]) == 50


def test_make_not_a_video_is_refused_by_ffprobe(tmp_path: Path) -> None:
    path = make_not_a_video(tmp_path / "-not_a_video.mp4")
    result = subprocess.run(
        ["ffprobe", "-loglevel", "error", "-i", os.path.abspath(path)], capture_output=True, text=True
    )
    assert result.returncode != 0
    assert "Invalid data" in result.stderr
