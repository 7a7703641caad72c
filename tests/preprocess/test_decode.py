"""ffmpeg decoding and log-mel features on clips made by ffmpeg: every input kind real AudioSet folders hold."""

from __future__ import annotations

import io
import shutil
from fractions import Fraction
from pathlib import Path

import numpy as np
import pytest
import torch
import torchaudio
import torchvision.io
from media import make_clip, make_not_a_video, make_vfr_clip, truncate_file

from preprocess.clip import ClipTask, process_clip
from preprocess.datasets import ClipRow
from preprocess.decode import decode_clip, decode_command, parse_input_report
from preprocess.features import compute_logmel
from preprocess.ffmpeg_run import DecodeError
from shards.schema import FeatureParams, decode_sample, split_member_name

PARAMS = FeatureParams(num_frames=8, segment_s=2.0)


def jpeg_size(data: bytes) -> tuple[int, int]:
    """(height, width) of a JPEG, decoded by torchvision as the loaders will."""
    image = torchvision.io.decode_jpeg(torch.frombuffer(bytearray(data), dtype=torch.uint8))
    return tuple(image.shape[1:])


def tone_peak_hz(waveform: np.ndarray, sample_rate_hz: int) -> float:
    spectrum = np.abs(np.fft.rfft(waveform))
    return float(np.fft.rfftfreq(waveform.size, 1 / sample_rate_hz)[spectrum.argmax()])


def task_for(path: Path | None, key: str = "clip_0", start_s: float = 0.0, duration_s: float = 2.0) -> ClipTask:
    row = ClipRow(key=key, ytid=key, start_s=start_s, end_s=start_s + duration_s, labels=(1, 3), source="t.csv:4")
    return ClipTask(
        row=row, path=str(path) if path else None, missing="not found", start_s=start_s, duration_s=duration_s
    )


def run_clip(path: Path | None, params: FeatureParams = PARAMS, require_audio: bool = False, **kw):
    """process_clip, then the stored members read back through the schema."""
    members, info = process_clip(task_for(path, **kw), params, require_audio)
    if members is None:
        return None, info
    key = split_member_name(members[0][0])[0]
    sample = decode_sample(key, {split_member_name(n)[1]: d for n, d in members}, params, num_classes=8)
    return sample, info


@pytest.mark.parametrize("fps", ["30000/1001", "25", "60"])
def test_frame_rates_give_f_frames_at_short_side_256(tmp_path, fps):
    clip = make_clip(tmp_path / "c.mp4", seconds=2.0, fps=fps, size=(96, 64))
    decoded = decode_clip(clip, 0.0, 2.0, PARAMS)
    assert decoded.frames_decoded == PARAMS.num_frames
    assert {jpeg_size(f) for f in decoded.frames} == {(256, 384)}
    assert len(set(decoded.frames)) == PARAMS.num_frames  # testsrc2 changes every frame: no frame twice
    assert decoded.streams.fps == pytest.approx(float(Fraction(fps)), rel=1e-3)
    assert decoded.waveform.size == pytest.approx(2.0 * 16000, abs=400)


def test_25_frames_per_second_of_10_s_in_time_order(tmp_path):
    """250 frames (scenic's rate; ffmpeg's select filter failed on a sum of about 90 targets, and the frame files
    are read in numeric order, 99.jpg before 100.jpg): frame i is the first at or after (i + 0.5) / 25 s, so
    source frame i + 1 of a 25 fps video, and the one after the last target is missing, repeated."""
    clip = make_clip(tmp_path / "c.mp4", seconds=10.0, fps="25", size=(64, 48))
    dense = decode_clip(clip, 0.0, 10.0, FeatureParams(num_frames=250, segment_s=10.0))
    half = decode_clip(clip, 0.0, 10.0, FeatureParams(num_frames=125, segment_s=10.0))
    assert (dense.frames_decoded, len(dense.frames), len(set(dense.frames))) == (249, 250, 249)
    assert half.frames_decoded == 125 and half.frames == dense.frames[0:250:2]  # (j + 0.5) / 12.5 s: source 2j + 1


def test_variable_frame_rate(tmp_path):
    clip = make_vfr_clip(tmp_path / "vfr.mp4")
    decoded = decode_clip(clip, 0.0, PARAMS.segment_s, PARAMS)
    assert decoded.frames_decoded == PARAMS.num_frames
    assert len(set(decoded.frames)) == PARAMS.num_frames
    assert decoded.frame_times_s == pytest.approx([(i + 0.5) * PARAMS.segment_s / 8 for i in range(8)])


@pytest.mark.parametrize(("size", "expected"), [((16, 16), (256, 256)), ((64, 112), (448, 256))])
def test_tiny_and_portrait_resolutions(tmp_path, size, expected):
    clip = make_clip(tmp_path / "c.mp4", size=size)
    sample, _ = run_clip(clip)
    assert {jpeg_size(f) for f in sample.frames} == {expected}
    assert (sample.meta["streams"]["width"], sample.meta["streams"]["height"]) == size


@pytest.mark.slow
@pytest.mark.parametrize(
    ("name", "acodec", "rate", "channels"),
    [
        ("c.mp4", "aac", 44100, 2),
        ("c.mp4", "aac", 48000, 2),
        ("c.webm", "libopus", 48000, 2),
        ("c.mkv", "libmp3lame", 44100, 2),
    ],
)
def test_audio_codecs_and_rates_become_16k_mono(tmp_path, name, acodec, rate, channels):
    vcodec = "libvpx-vp9" if name.endswith(".webm") else "libx264"
    clip = make_clip(tmp_path / name, acodec=acodec, vcodec=vcodec, sample_rate=rate, channels=channels, tone_hz=1000)
    decoded = decode_clip(clip, 0.0, 2.0, PARAMS)
    assert decoded.streams.has_audio and decoded.streams.sample_rate_hz == rate
    assert decoded.waveform.size == pytest.approx(2.0 * 16000, abs=1200)  # codec priming/padding
    assert tone_peak_hz(decoded.waveform, 16000) == pytest.approx(1000, abs=5)


def test_no_audio_stream_is_kept_silent_or_skipped(tmp_path):
    clip = make_clip(tmp_path / "video_only.mp4", audio=False)
    sample, kept = run_clip(clip)
    assert sample.meta["has_audio"] is False and kept.logmel.count == 0 and kept.has_audio is False
    real = sample.logmel[: sample.meta["fbank_frames_computed"]]
    assert real.size and np.all(real == real.flat[0])  # silence: one value everywhere
    skipped, failure = run_clip(clip, require_audio=True)
    assert skipped is None and failure["reason"] == "no_audio"


def test_no_video_stream_is_skipped(tmp_path):
    clip = make_clip(tmp_path / "audio_only.m4a", video=False)
    sample, failure = run_clip(clip)
    assert sample is None and failure["reason"] == "no_video" and failure["file"] == "audio_only.m4a"


def test_short_file_is_padded_and_its_frames_keep_their_times(tmp_path):
    """Schema 2: a 3 s file in a 10 s segment has the frames at 0.25, 0.75, ... 2.75 s and repeats the last one, as
    its log-mel is zero-padded: frame i shows time (i + 0.5) / 2 s for every clip (version 1 spread 20 frames over
    the 3 s it had)."""
    clip = make_clip(tmp_path / "short.mp4", seconds=3.0)
    params = FeatureParams(segment_s=10.0)
    sample, kept = run_clip(clip, params=params, duration_s=10.0)
    meta = sample.meta
    assert meta["frames_decoded"] == 6 and meta["frames_repeated"] == 14
    assert meta["frame_times_s"] == pytest.approx([(i + 0.5) / 2 for i in range(20)])
    assert sample.frames[6:] == [sample.frames[5]] * 14
    assert meta["audio_decoded_s"] == pytest.approx(3.0, abs=0.05)
    assert meta["fbank_frames_computed"] == pytest.approx(298, abs=3)
    assert meta["fbank_pad_frames"] == 1000 - meta["fbank_frames_computed"]
    assert np.all(sample.logmel[meta["fbank_frames_computed"] :] == 0)  # AST pads with zeros
    assert kept.logmel.count == meta["fbank_frames_computed"] * 128  # padding is not in the statistics
    assert kept.padded and kept.has_audio  # counted as padded in the job's summary and manifest


@pytest.mark.parametrize("faststart", [False, True])
def test_truncated_file_is_reported_with_ffmpegs_message(tmp_path, faststart):
    clip = make_clip(tmp_path / "full.mp4", seconds=2.0, faststart=faststart)
    broken = truncate_file(clip, tmp_path / "broken.mp4", fraction=0.3 if faststart else 0.5)
    sample, failure = run_clip(broken)
    if faststart:  # the index survives: ffmpeg decodes what is there; the clip is kept with what was decoded
        assert sample is None or sample.meta["frames_decoded"] <= 8
    else:
        assert sample is None and failure["reason"] == "unreadable"
        assert "moov atom not found" in failure["message"]


def test_not_a_video_is_reported(tmp_path):
    sample, failure = run_clip(make_not_a_video(tmp_path / "notes.mp4"))
    assert sample is None and failure["reason"] == "unreadable"
    assert "Invalid data found" in failure["message"]


def test_missing_file_is_reported():
    sample, failure = run_clip(None)
    assert sample is None and failure["reason"] == "missing_file" and failure["message"] == "not found"


def test_names_starting_with_dash_or_holding_colons_are_files(tmp_path):
    clip = make_clip(tmp_path / "-x_y.mp4")
    odd = tmp_path / "-i:pipe:1.mp4"
    shutil.copy(clip, odd)
    for path in (clip, odd):
        assert decode_clip(path, 0.0, 2.0, PARAMS).frames_decoded == 8
    cmd = decode_command(odd, 0.0, 2.0, PARAMS, "/tmp/out%02d.jpg")
    assert f"file:{odd}" in cmd and str(odd) not in [a for a in cmd if not a.startswith("file:")]


def test_full_video_mode_seeks_to_the_segment(tmp_path):
    clip = make_clip(tmp_path / "long.mp4", seconds=6.0)
    decoded = decode_clip(clip, 2.0, 2.0, PARAMS)
    assert decoded.frame_times_s == pytest.approx([2.0 + (i + 0.5) * 0.25 for i in range(8)])
    assert decoded.waveform.size == pytest.approx(2.0 * 16000, abs=400)
    whole = decode_clip(clip, 0.0, 2.0, PARAMS)
    assert decoded.frames != whole.frames
    with pytest.raises(DecodeError) as err:
        decode_clip(clip, 7.0, 2.0, PARAMS)
    assert err.value.reason == "no_frames"


def ast_fbank(wave: np.ndarray) -> torch.Tensor:
    """The fbank call of AST's dataloader, written out literally (not from FeatureParams)."""
    w = torch.from_numpy(wave)[None]
    return torchaudio.compliance.kaldi.fbank(
        w - w.mean(), htk_compat=True, sample_frequency=16000, use_energy=False, window_type="hanning",
        num_mel_bins=128, dither=0.0, frame_shift=10,
    )  # fmt: skip


def test_logmel_is_the_ast_recipe():
    rng = np.random.default_rng(0)
    wave = (0.1 * rng.standard_normal(16000 * 2) + 0.3).astype(np.float32)
    ours = compute_logmel(wave, PARAMS)
    ast = ast_fbank(wave)
    assert ast.shape == (198, 128) and ours.frames_computed == 198 and ours.pad_frames == 2
    assert np.array_equal(ours.values[:198], ast.numpy()) and np.all(ours.values[198:] == 0)
    longer = np.concatenate([wave, wave])
    cut = compute_logmel(longer, PARAMS)
    full = ast_fbank(longer)
    assert cut.frames_computed == 398 and cut.cut_frames == 198 and cut.pad_frames == 0
    assert np.array_equal(cut.values, full.numpy()[:200])


def test_logmel_of_a_tone_peaks_at_its_mel_bin():
    t = np.arange(16000 * 2) / 16000
    low = compute_logmel((0.5 * np.sin(2 * np.pi * 300 * t)).astype(np.float32), PARAMS).values
    high = compute_logmel((0.5 * np.sin(2 * np.pi * 1500 * t)).astype(np.float32), PARAMS).values
    assert low[:198].mean(0).argmax() < high[:198].mean(0).argmax()


def test_input_report_parsing():
    report = io.StringIO(
        "[info]   Duration: 00:01:02.50, start: 0.000000, bitrate: 408 kb/s\n"
        "[info]   Stream #0:0[0x1](und): Video: mjpeg (Baseline), yuvj420p, 320x240 [SAR 1:1], 90k tbr (attached pic)\n"
        "[info]   Stream #0:1[0x1](und): Video: h264 (High), yuv420p(progressive), 640x360, 29.97 fps, 29.97 tbr\n"
        "[info]   Stream #0:2(eng): Audio: opus, 48000 Hz, stereo, fltp (default)\n"
        "[info] Stream mapping:\n[info]   Stream #0:1 -> #0:0 (h264 -> mjpeg)\n"
    ).getvalue()
    info = parse_input_report(report)
    assert info.duration_s == pytest.approx(62.5)
    assert (info.video_codec, info.width, info.height, info.fps) == ("h264", 640, 360, 29.97)
    assert (info.audio_codec, info.sample_rate_hz, info.channels) == ("opus", 48000, "stereo")


def test_a_row_shorter_than_the_segment_keeps_the_segments_frame_times(tmp_path):
    """A 0.5 s row in a 1 s segment: the frames at 0.125 and 0.375 s are decoded, those at 0.625 and 0.875 s (past
    the row) repeat the last, as its log-mel is zero-padded: frame i is at (i + 0.5) / 4 s for every row."""
    clip = make_clip(tmp_path / "long.mp4", seconds=2.0)
    params = FeatureParams(num_frames=4, segment_s=1.0)
    decoded = decode_clip(clip, 0.0, 0.5, params)
    assert decoded.frames_decoded == 2 and decoded.frames[2:] == [decoded.frames[1]] * 2
    assert decoded.frame_times_s == pytest.approx([0.125, 0.375, 0.625, 0.875])
    assert decoded.waveform.size == pytest.approx(0.5 * 16000, abs=200)
