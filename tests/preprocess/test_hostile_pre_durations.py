"""Durations that a video's container header claims (made here by rewriting the header of a clip ffmpeg wrote): the
probe reads the claim and bounds it (a day at most, and what the file's bytes can hold); the shard job plans and
allocates from its CSV's segment only, whatever the file claims."""

from __future__ import annotations

import contextlib
import dataclasses
import io
import json
import tracemalloc
from pathlib import Path

import numpy as np
import pytest
from conftest import load_tool
from media import clips_claiming, make_not_a_video

from preprocess.clip import ClipTask, process_clip
from preprocess.datasets import ClipRow
from preprocess.decode import stream_bit_rates_bps
from preprocess.ffmpeg_run import DecodeError
from preprocess.probe import BIT_RATE_MARGIN, MAX_MEDIA_S, MIN_BYTES_PER_S, probe_media
from shards.manifest import load_manifest
from shards.schema import FeatureParams
from shards.tar import iter_tar_samples

YEARS_S = 3e8  # about 9.5 years


@pytest.fixture(scope="module")
def clips(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """A 4 s clip with an honest header (mkv, mp4) and copies claiming years (mkv) or 49 days (mp4's most)."""
    return clips_claiming(tmp_path_factory.mktemp("videos"), 4.0, {"years": YEARS_S})


def test_an_honest_claim_is_planned_as_it_is(clips: dict[str, Path]) -> None:
    for suffix in ("mkv", "mp4"):
        duration, warning = probe_media(clips[f"honest.{suffix}"]).planned_duration_s()
        assert duration == pytest.approx(4.0, abs=0.1) and warning is None


def test_a_claim_of_years_is_planned_as_what_the_bytes_hold_at_least_or_a_day(clips: dict[str, Path]) -> None:
    video = clips["years.mkv"]
    probe = probe_media(video)
    assert probe.streams.duration_s == YEARS_S and probe.bit_rates_bps == ()  # mkv: no stream states a rate
    assert probe.file_bytes / MIN_BYTES_PER_S < MAX_MEDIA_S  # a small file: its bytes bound it
    assert probe.planned_duration_s() == (
        probe.file_bytes / MIN_BYTES_PER_S,
        f"{video}: its header claims 300000000 s, more than the {probe.file_bytes} s its {probe.file_bytes} bytes "
        f"hold (1 bytes/s: the least a second of video takes): planned as {probe.file_bytes} s",
    )
    large = dataclasses.replace(probe, file_bytes=10**6)  # a larger one: the stated limit
    assert large.planned_duration_s() == (
        MAX_MEDIA_S,
        f"{video}: its header claims 300000000 s, more than the 24 h a video is planned as at most: planned as 86400 s",
    )


def test_a_claim_beyond_what_the_bytes_hold_at_the_streams_rates_is_capped(clips: dict[str, Path]) -> None:
    probe = probe_media(clips["years.mp4"])
    assert probe.streams.duration_s > 40 * 86400 and len(probe.bit_rates_bps) == 2  # mp4: rates from the samples
    duration, warning = probe.planned_duration_s()
    assert duration == pytest.approx(probe.file_bytes * 8 * BIT_RATE_MARGIN / min(probe.bit_rates_bps))
    assert 4 * 2 <= duration <= 4 * 4 * BIT_RATE_MARGIN  # the clip's 4 s, within the margin (audio is the slowest)
    assert warning is not None and f"{probe.file_bytes} bytes hold" in warning and "slowest stream's" in warning


def test_a_file_that_is_not_media_is_named(tmp_path: Path) -> None:
    bad = make_not_a_video(tmp_path / "x.mp4")
    with pytest.raises(DecodeError, match=rf"{bad}: no media found"):
        probe_media(bad)


def test_stream_bit_rates_leave_out_cover_art_and_rates_of_zero() -> None:
    report = (
        "[info] Input #0, mov,mp4,m4a,3gp,3g2,mj2, from 'x':\n"
        "[info]   Duration: 00:00:12.00, start: 0.000000, bitrate: 289 kb/s\n"
        "[info]   Stream #0:0[0x1](und): Video: h264 (High), yuv420p, 320x180, 234 kb/s, 25 fps (default)\n"
        "[info]   Stream #0:1[0x2](und): Audio: aac (LC), 16000 Hz, mono, fltp, 49 kb/s (default)\n"
        "[info]   Stream #0:2: Video: mjpeg, yuvj420p, 300x300, 90k tbr, 90k tbn (attached pic)\n"
        "[info]   Stream #0:3: Audio: opus, 48000 Hz, stereo, fltp, 0 kb/s\n"
        "[info] Stream mapping:\n[info]   Stream #0:0 -> #0:0 (h264 -> mjpeg), 999 kb/s\n"
    )
    assert stream_bit_rates_bps(report) == (234000, 49000)


def decoded(path: Path) -> tuple[list, dict, int]:
    """(tar members, failure or stats, tracemalloc's peak bytes) of the shard job's clip function on the first 2 s
    of `path`."""
    row = ClipRow(key="clip_0", ytid="clip", start_s=0.0, end_s=2.0, labels=(0,), source="t.csv:2")
    task = ClipTask(row=row, path=str(path), missing=None, start_s=0.0, duration_s=2.0)
    tracemalloc.start()
    try:
        members, result = process_clip(task, FeatureParams(num_frames=8, segment_s=2.0), require_audio=True)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert members is not None, result
    return members, result, peak


def test_the_clip_function_takes_what_its_segment_takes_whatever_the_file_claims(clips: dict[str, Path]) -> None:
    honest, _, honest_peak = decoded(clips["honest.mkv"])
    hostile, _, hostile_peak = decoded(clips["years.mkv"])
    assert [m for m in hostile if not m[0].endswith("meta.json")] == [m for m in honest if not m[0].endswith("json")]
    assert hostile_peak < 2 * honest_peak, (hostile_peak, honest_peak)


def test_the_shard_job_decodes_only_its_segment_of_a_video_claiming_years(
    clips: dict[str, Path], tmp_path: Path
) -> None:
    """A row without times is the file's first --segment-seconds: the job never asks the file how long it is."""
    table = tmp_path / "clips.csv"
    table.write_text("video,label\nhonest.mkv,dog\nyears.mkv,dog\n")
    out = tmp_path / "train"
    args = ["--csv", str(table), "--videos", str(clips["years.mkv"].parent), "--out", str(out),
            "--segment-seconds", "2", "--fps", "4", "--short-side", "64", "--workers", "1", "--quiet"]  # fmt: skip
    with contextlib.redirect_stdout(io.StringIO()):
        assert load_tool("shard_csv").main(args) == 0
    manifest = load_manifest(out)
    assert manifest.num_samples == 2 and not manifest.failures
    samples = {k: m for shard in manifest.shards for k, m in iter_tar_samples(out / shard.name)}
    meta = {k: json.loads(m["meta.json"]) for k, m in samples.items()}
    years = next(k for k, m in meta.items() if m["file"] == "years.mkv")
    honest = next(k for k in meta if k != years)
    assert meta[years]["streams"]["duration_s"] == YEARS_S  # the claim is recorded as ffmpeg reported it ...
    assert meta[years]["decode_duration_s"] == 2.0 and meta[years]["audio_decoded_s"] <= 2.0  # ... and not used
    assert samples[years]["logmel.f16"] == samples[honest]["logmel.f16"]
    assert np.array_equal(np.frombuffer(samples[years]["labels.i32"], "<i4"), [0])
