"""ffmpeg decoding of one clip: F evenly spaced frames as JPEG and 16 kHz mono audio, in one ffmpeg run.

Commands are built with ffmpeg-python and run as argument lists, never through a shell. Every input path is
given as `file:/absolute/path`, so a name starting with '-' (YouTube ids often do) or holding ':' can never be
read as an option or a protocol. Each ffmpeg runs single-threaded: the batch job parallelises over clips.

The streams are probed by the same ffmpeg run that decodes (its `Input #0` report, read at log level info):
a separate ffprobe process per clip would cost a third of the decode time of a small clip.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import tempfile
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import ffmpeg
import numpy as np

from preprocess.schema import FeatureParams


class DecodeError(RuntimeError):
    """A clip could not be decoded; `reason` is a short code for reports, the message quotes ffmpeg."""

    def __init__(self, reason: str, message: str) -> None:
        super().__init__(message)
        self.reason = reason


class ToolMissingError(RuntimeError):
    """ffmpeg is not installed."""


def require_ffmpeg() -> None:
    """Raise ToolMissingError saying what to install when ffmpeg is not on PATH."""
    if shutil.which("ffmpeg") is None:
        raise ToolMissingError("ffmpeg not found on PATH; install it (Debian/Ubuntu: apt-get install -y ffmpeg)")


def file_url(path: str | os.PathLike) -> str:
    """`path` as an ffmpeg input that cannot be read as an option or another protocol."""
    return "file:" + os.path.abspath(path)


@dataclass(frozen=True)
class StreamInfo:
    """The input's first video and first audio stream, as ffmpeg reported them while decoding."""

    duration_s: float | None = None
    has_video: bool = False
    has_audio: bool = False
    video_codec: str = ""
    width: int = 0
    height: int = 0
    fps: float | None = None
    audio_codec: str = ""
    sample_rate_hz: int = 0
    channels: str = ""

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


_DURATION_RE = re.compile(r"Duration: (\d+):(\d\d):(\d\d(?:\.\d+)?)")
_STREAM_RE = re.compile(r"Stream #0:\d+.*?: (Video|Audio): (\w+)(.*)")
_SIZE_RE = re.compile(r", (\d+)x(\d+)")
_FPS_RE = re.compile(r", ([\d.]+)(k?) fps")
_AUDIO_RE = re.compile(r", (\d+) Hz, ([^,]+)")
_LEVEL_RE = re.compile(r"\[(panic|fatal|error)\] (.*)")


def parse_input_report(stderr: str) -> StreamInfo:
    """StreamInfo from the `Input #0` part of ffmpeg's log (everything before 'Stream mapping:')."""
    report = stderr.split("Stream mapping:", 1)[0]
    fields: dict[str, Any] = {}
    if m := _DURATION_RE.search(report):
        fields["duration_s"] = int(m[1]) * 3600 + int(m[2]) * 60 + float(m[3])
    for m in _STREAM_RE.finditer(report):
        kind, codec, rest = m[1], m[2], m[3]
        if kind == "Video" and "has_video" not in fields and "(attached pic)" not in rest:
            fields.update(has_video=True, video_codec=codec)
            if size := _SIZE_RE.search(rest):
                fields.update(width=int(size[1]), height=int(size[2]))
            if fps := _FPS_RE.search(rest):
                fields["fps"] = float(fps[1]) * (1000 if fps[2] else 1)
        elif kind == "Audio" and "has_audio" not in fields:
            fields.update(has_audio=True, audio_codec=codec)
            if audio := _AUDIO_RE.search(rest):
                fields.update(sample_rate_hz=int(audio[1]), channels=audio[2].strip())
    return StreamInfo(**fields)


def error_lines(stderr: str, n: int = 3) -> str:
    """ffmpeg's last `n` error messages (or its last lines when it logged none), on one line."""
    lines = [line.strip() for line in stderr.splitlines() if line.strip()]
    errors = [m[2] if (m := _LEVEL_RE.search(line)) else None for line in lines]
    picked = [e for e in errors if e] or lines
    return " | ".join(picked[-n:]) or "no message from ffmpeg"


@dataclass
class DecodedClip:
    """F JPEG frames (the last repeated when the video ended early), the mono waveform, what ffmpeg saw."""

    frames: list[bytes]
    waveform: np.ndarray
    frames_decoded: int
    frame_times_s: list[float]
    duration_s: float
    streams: StreamInfo


def frame_times(start_s: float, duration_s: float, num_frames: int) -> list[float]:
    """Centres of `num_frames` equal slices of the segment, relative to the decode start."""
    del start_s  # times are relative: ffmpeg's input seek makes the segment start at t=0
    return [(i + 0.5) * duration_s / num_frames for i in range(num_frames)]


def _select_expr(times: list[float]) -> str:
    # The first frame at or after each target time (a frame covering two targets is taken once).
    terms = [f"gte(t,{t:.6f})*(isnan(prev_t)+lt(prev_t,{t:.6f}))" for t in times]
    return "gt(" + "+".join(terms) + ",0)"


def _scratch_dir() -> str | None:
    return "/dev/shm" if os.access("/dev/shm", os.W_OK) else None


def decode_command(
    path: str | os.PathLike,
    start_s: float,
    duration_s: float,
    params: FeatureParams,
    frames_target: str,
    audio_target: str = "pipe:",
    null_outputs: bool = False,
    with_audio: bool = True,
) -> list[str]:
    """The ffmpeg argument list that decodes [start_s, start_s + duration_s) of `path`.

    Video: the frames at the centres of F equal slices of the segment, scaled so that the short side is
    `short_side_px`, encoded as JPEG files `frames_target` (an image2 pattern). Audio (`with_audio`; ffmpeg
    fails on a file without an audio stream): mono float32 at `sample_rate_hz` to `audio_target`.
    With `null_outputs` both go to ffmpeg's null muxer (the bare decode that the benchmark compares against).
    """
    source = ffmpeg.input(file_url(path), ss=f"{start_s:.6f}", t=f"{duration_s:.6f}", threads=1)
    video = (
        source["v:0"]
        .filter("select", _select_expr(frame_times(start_s, duration_s, params.num_frames)))
        .filter(
            "scale",
            w=params.short_side_px,
            h=params.short_side_px,
            force_original_aspect_ratio="increase",
            force_divisible_by=2,
        )
    )
    video_opts: dict[str, Any] = {"frames:v": params.num_frames, "fps_mode": "passthrough", "threads": 1}
    audio_opts: dict[str, Any] = {"ac": 1, "ar": params.sample_rate_hz, "threads": 1}
    if null_outputs:
        outputs = [video.output("-", f="null", **video_opts), source["a:0"].output("-", f="null", **audio_opts)]
    else:
        video_opts.update({"c:v": "mjpeg", "q:v": params.jpeg_qscale, "pix_fmt": "yuvj420p", "start_number": 0})
        outputs = [
            video.output(frames_target, f="image2", **video_opts),
            source["a:0"].output(audio_target, f="f32le", **audio_opts),
        ]
    graph = ffmpeg.merge_outputs(*outputs[: 2 if with_audio else 1]).global_args(
        "-nostdin", "-hide_banner", "-nostats", "-loglevel", "level+info", "-filter_complex_threads", "1"
    )
    return graph.compile(cmd="ffmpeg", overwrite_output=True)


def _run_decode(
    path: str | os.PathLike, start_s: float, duration_s: float, params: FeatureParams
) -> tuple[list[bytes], bytes, StreamInfo, str]:
    with tempfile.TemporaryDirectory(prefix="mbt-frames-", dir=_scratch_dir()) as frames_dir:
        target = os.path.join(frames_dir, "%02d.jpg")
        proc = subprocess.run(decode_command(path, start_s, duration_s, params, target), capture_output=True)
        stderr = proc.stderr.decode(errors="replace")
        streams = parse_input_report(stderr)
        if proc.returncode != 0 and streams.has_video and not streams.has_audio:
            # No audio stream (rare): decode the video alone rather than probe every clip first.
            cmd = decode_command(path, start_s, duration_s, params, target, with_audio=False)
            proc = subprocess.run(cmd, capture_output=True)
            stderr = proc.stderr.decode(errors="replace")
        if proc.returncode != 0:
            if "Input #0" in stderr and not streams.has_video:
                raise DecodeError("no_video", f"no video stream (audio: {streams.audio_codec or 'none'})")
            raise DecodeError("unreadable", f"ffmpeg exit {proc.returncode}: {error_lines(stderr)}")
        frames = [Path(frames_dir, name).read_bytes() for name in sorted(os.listdir(frames_dir))]
    return frames, proc.stdout, streams, stderr


def decode_clip(path: str | os.PathLike, start_s: float, duration_s: float, params: FeatureParams) -> DecodedClip:
    """Decode the segment [start_s, start_s + duration_s) of `path`; the waveform is empty without an audio stream.

    A file that ends inside the segment is decoded again over the part it has, so that its F frames still
    spread over the whole of it (short files are rare: the second run costs little overall).
    Raises DecodeError with reason 'unreadable' (not media, truncated, corrupt: ffmpeg's message),
    'no_video' (no video stream) or 'no_frames' (the segment holds no video frame).
    """
    frames, audio, streams, stderr = _run_decode(path, start_s, duration_s, params)
    available_s = (streams.duration_s or 0.0) - start_s
    if len(frames) < params.num_frames and 0 < available_s < duration_s:
        duration_s = available_s
        frames, audio, streams, stderr = _run_decode(path, start_s, duration_s, params)
    if not frames:
        raise DecodeError(
            "no_frames",
            f"no video frame in [{start_s:.3f}s, {start_s + duration_s:.3f}s) "
            f"(file duration {streams.duration_s}s): {error_lines(stderr)}",
        )
    decoded = len(frames)
    frames += [frames[-1]] * (params.num_frames - decoded)
    times = [start_s + t for t in frame_times(start_s, duration_s, params.num_frames)]
    return DecodedClip(
        frames=frames,
        waveform=np.frombuffer(audio, dtype="<f4"),
        frames_decoded=decoded,
        frame_times_s=times,
        duration_s=duration_s,
        streams=streams,
    )
