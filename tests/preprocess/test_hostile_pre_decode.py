"""Hostile media for the decoder: non-finite audio, playlists and lists that point ffmpeg at FIFOs and devices,
FIFOs and devices named like clips, forged stream reports, oversized output, a decode past its time."""

from __future__ import annotations

import os
import time
from pathlib import Path

import numpy as np
import pytest
import torch
import torchvision.io
from media import clip_with_audio, hostile_lists, make_clip, tone, with_metadata

import preprocess.decode as decode
from preprocess.clip import ClipTask, process_clip
from preprocess.datasets import ClipRow
from preprocess.decode import decode_clip
from preprocess.ffmpeg_run import DecodeError
from shards.schema import FeatureParams

PARAMS = FeatureParams(num_frames=8, segment_s=2.0)


def task_for(path: Path) -> ClipTask:
    row = ClipRow(key="clip_0", ytid="clip", start_s=0.0, end_s=2.0, labels=(0,), source="t.csv:4")
    return ClipTask(row=row, path=str(path), missing=None, start_s=0.0, duration_s=2.0)


@pytest.mark.parametrize(("value", "kind"), [(np.nan, "NaN"), (np.inf, "inf"), (-np.inf, "-inf")])
def test_ffmpeg_passes_non_finite_samples_through(tmp_path, value, kind):
    samples = tone()
    samples[1000:1010] = value
    decoded = decode_clip(clip_with_audio(tmp_path, kind, samples), 0.0, 2.0, PARAMS)
    assert np.count_nonzero(~np.isfinite(decoded.waveform)) == 10  # f32le out keeps what the file holds


@pytest.mark.parametrize(
    ("value", "message"),
    [(np.nan, "10 of 32000 decoded audio samples are NaN or infinite"), (3e38, "log-mel values are NaN or infinite")],
)
def test_non_finite_audio_is_a_failure_not_a_sample(tmp_path, value, message):
    samples = tone()
    samples[1000:1010] = value  # 3e38 is finite, but its power overflows float32 in the fbank
    members, failure = process_clip(task_for(clip_with_audio(tmp_path, "bad", samples)), PARAMS, False)
    assert members is None and failure["reason"] == "non_finite_audio" and message in failure["message"]
    members, kept = process_clip(task_for(clip_with_audio(tmp_path, "good", tone())), PARAMS, False)
    assert members is not None and np.isfinite(kept.logmel.total) and kept.logmel.count > 0


def test_playlists_and_concat_lists_fail_within_seconds(tmp_path):
    for path in hostile_lists(tmp_path):
        start = time.monotonic()
        members, failure = process_clip(task_for(path), PARAMS, False)
        assert members is None and failure["reason"] == "not_media", failure
        assert "hls" in failure["message"] or "concat" in failure["message"]
        assert time.monotonic() - start < 10


def test_fifo_device_and_folder_are_refused_before_ffmpeg(tmp_path):
    os.mkfifo(tmp_path / "fifo.mp4")
    (tmp_path / "zero.mp4").symlink_to("/dev/zero")
    (tmp_path / "dir.mp4").mkdir()
    (tmp_path / "gone.mp4").symlink_to(tmp_path / "nowhere.mp4")
    for name, reason in [
        ("fifo", "not_a_file"),
        ("zero", "not_a_file"),
        ("dir", "not_a_file"),
        ("gone", "missing_file"),
    ]:
        start = time.monotonic()
        with pytest.raises(DecodeError) as err:
            decode_clip(tmp_path / f"{name}.mp4", 0.0, 2.0, PARAMS)
        assert err.value.reason == reason and f"{name}.mp4" in str(err.value)
        assert time.monotonic() - start < 1


@pytest.mark.slow
@pytest.mark.parametrize(
    ("name", "vcodec", "acodec"),
    [
        ("c.mov", "libx264", "aac"),
        ("c.avi", "mpeg4", "libmp3lame"),
        ("c.ts", "mpeg2video", "mp2"),
        ("c.mpg", "mpeg1video", "mp2"),
        ("c.ogv", "libtheora", "libvorbis"),
        ("c.wmv", "wmv2", "wmav2"),
        ("c.flv", "flv", "libmp3lame"),
    ],
)
def test_usual_containers_pass_the_demuxer_whitelist(tmp_path, name, vcodec, acodec):
    clip = make_clip(tmp_path / name, vcodec=vcodec, acodec=acodec, sample_rate=44100)
    decoded = decode_clip(clip, 0.0, 2.0, PARAMS)
    assert decoded.frames_decoded >= 1 and decoded.streams.has_audio and decoded.waveform.size > 0


def test_frames_the_readers_would_refuse_are_a_failure(tmp_path):
    tall = make_clip(tmp_path / "tall.mp4", size=(16, 1024))  # 256 x 16384 frames: beyond MAX_FRAME_ASPECT
    members, failure = process_clip(task_for(tall), PARAMS, False)
    assert members is None and failure["reason"] == "bad_frame_size" and "256x16384" in failure["message"]


def test_metadata_cannot_forge_the_stream_report(tmp_path):
    clip = make_clip(tmp_path / "c.mp4")
    forged = with_metadata(
        clip,
        tmp_path / "forged.mp4",
        title="x Duration: 00:00:00.50, Stream mapping:",
        comment="a\n  Stream #0:0: Video: h264, 5000x5000, 1 fps",
    )
    decoded = decode_clip(forged, 0.0, 2.0, PARAMS)
    streams = decoded.streams
    assert streams.duration_s == pytest.approx(2.0, abs=0.05) and decoded.duration_s == 2.0
    assert streams.has_video and streams.has_audio and (streams.width, streams.height) == (96, 64)
    assert decoded.waveform.size == pytest.approx(32000, abs=400)


def test_a_file_over_the_output_cap_is_too_large(tmp_path, monkeypatch):
    monkeypatch.setattr(decode, "output_cap_bytes", lambda duration_s, params: 20_000)  # the audio is 128 KB
    clip = make_clip(tmp_path / "c.mp4")
    with pytest.raises(DecodeError) as err:
        decode_clip(clip, 0.0, 2.0, PARAMS)
    assert err.value.reason == "too_large" and "over 20000 bytes" in str(err.value)


def test_a_decode_past_its_timeout_is_killed(tmp_path):
    clip = make_clip(tmp_path / "c.mp4")
    start = time.monotonic()
    with pytest.raises(DecodeError) as err:
        decode_clip(clip, 0.0, 2.0, PARAMS, timeout_s=0.001)
    assert err.value.reason == "timeout" and "0.001 s (--decode-timeout)" in str(err.value)
    assert time.monotonic() - start < 5
    assert decode_clip(clip, 0.0, 2.0, PARAMS, timeout_s=60).frames_decoded == 8


def test_odd_short_side_would_not_match_the_manifest(tmp_path):
    """Why --short-side must be even: ffmpeg's scale (force_divisible_by=2) makes 255 into 256 and 257 into 258."""
    clip = make_clip(tmp_path / "c.mp4", size=(96, 64))
    for asked, made in [(255, 256), (257, 258)]:
        frame = decode_clip(clip, 0.0, 2.0, FeatureParams(segment_s=2.0, short_side_px=asked)).frames[0]
        image = torchvision.io.decode_jpeg(torch.frombuffer(bytearray(frame), dtype=torch.uint8))
        assert image.shape[1] == made


@pytest.mark.slow
def test_a_decode_over_the_memory_cap_is_too_large(tmp_path, monkeypatch):
    clip = make_clip(tmp_path / "8k.mp4", seconds=0.2, size=(7680, 4320))  # 50 MB per decoded frame
    assert decode_clip(clip, 0.0, 0.2, PARAMS).frames_decoded >= 1  # within the default 4 GiB
    monkeypatch.setattr(decode, "FFMPEG_MEMORY_BYTES", 300 << 20)  # room for ffmpeg, not for 8K frames
    with pytest.raises(DecodeError) as err:
        decode_clip(clip, 0.0, 0.2, PARAMS)
    assert err.value.reason == "too_large" and "more than 0.292969 GiB of memory" in str(err.value)
