"""ffmpeg decoding of one clip: F evenly spaced frames as JPEG and 16 kHz mono audio, in one ffmpeg run.

Commands are built with ffmpeg-python and run as argument lists, never through a shell. Every input path is
given as `file:/absolute/path`, so a name starting with '-' (YouTube ids often do) or holding ':' can never be
read as an option or a protocol. Each ffmpeg runs single-threaded: the batch job parallelises over clips.

Files come from the open web, so each decode is fenced in (`preprocess.ffmpeg_run`: a regular file read as
`/dev/fd/N`, a deadline, a parent-death signal, caps on output files and memory); the commands built here let
ffmpeg use the file protocol only and only the usual video containers (a playlist or concat list cannot send it
to other files, FIFOs or devices), and write into a scratch folder of their own.

The streams are probed by the same ffmpeg run that decodes (its `Input #0` report, read at log level info):
a separate ffprobe process per clip would cost a third of the decode time of a small clip.
"""

from __future__ import annotations

import os
import re
import shutil
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import ffmpeg
import numpy as np

from preprocess.ffmpeg_run import DecodeError, error_lines, ffmpeg_binary, open_regular_file, run_ffmpeg
from shards.atomic import DiskFullError, disk_full
from shards.schema import FeatureParams

# Demuxers of downloaded videos (ffmpeg matches a name within a demuxer's alias list: "mov" is mov,mp4,m4a,3gp,...).
MEDIA_DEMUXERS: tuple[str, ...] = (
    "mov", "matroska", "avi", "flv", "mpegts", "mpeg", "ogg", "wav", "mp3", "aac", "flac", "asf",
)  # fmt: skip
# ffmpeg writes at most a few frames, the segment's audio and its log; anything near this is hostile input.
OUTPUT_FILE_BASE_BYTES = 16 << 20
# ffmpeg's address space: a 4K decode needs ~0.1 GiB; a header claiming 16384x16384 frames would take many GiB.
FFMPEG_MEMORY_BYTES = 4 << 30
SCRATCH_PREFIX = "mbt-frames-"  # then the decoding process's pid: remove_stale_scratch knows whose it is
_SCRATCH_RE = re.compile(re.escape(SCRATCH_PREFIX) + r"([0-9]+)-\w+")


def default_decode_timeout_s(segment_s: float) -> float:
    """The time one clip's decode may take: 12 s per second of segment (120 s for 10 s), at least 60 s."""
    return max(60.0, 12.0 * segment_s)


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


# Anchored at ffmpeg's own indentation: a metadata tag (a title) may hold "Duration: " or "Stream #0:0: Video",
# but ffmpeg prints tags indented deeper and indents their continuation lines without the level prefix.
_DURATION_RE = re.compile(r"^\[info\]   Duration: (\d+):(\d\d):(\d\d(?:\.\d+)?)", re.MULTILINE)
_STREAM_RE = re.compile(r"^\[info\]   Stream #0:\d+.*?: (Video|Audio): (\w+)(.*)", re.MULTILINE)
_MAPPING_RE = re.compile(r"^\[info\] Stream mapping:", re.MULTILINE)
_SIZE_RE = re.compile(r", (\d+)x(\d+)")
_FPS_RE = re.compile(r", ([\d.]+)(k?) fps")
_AUDIO_RE = re.compile(r", (\d+) Hz, ([^,]+)")
_BIT_RATE_RE = re.compile(r", (\d+) kb/s")
_NOT_ALLOWED_RE = re.compile(r"^\[(\w+) @ 0x[0-9a-f]+\] \[error\] Format not on whitelist", re.MULTILINE)
_OUT_OF_MEMORY_RE = re.compile(
    r"^(?:\[[^\]]* @ 0x[0-9a-f]+\] )?\[(?:error|fatal|panic)\] .*(?:Cannot allocate memory|get_buffer\(\) failed)",
    re.MULTILINE,
)


def parse_input_report(stderr: str) -> StreamInfo:
    """StreamInfo from the `Input #0` part of ffmpeg's log (everything before 'Stream mapping:'), read at log level
    `level+info`."""
    report = _MAPPING_RE.split(stderr, 1)[0]
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


def stream_bit_rates_bps(stderr: str) -> tuple[int, ...]:
    """The average bit rates (bits/s) that the `Input #0` part of ffmpeg's log gives its audio and video streams
    (cover art and rates of 0 left out; a container may give none)."""
    report = _MAPPING_RE.split(stderr, 1)[0]
    rates = [_BIT_RATE_RE.search(m[3]) for m in _STREAM_RE.finditer(report) if "(attached pic)" not in m[3]]
    return tuple(int(rate[1]) * 1000 for rate in rates if rate and int(rate[1]) > 0)


@dataclass
class DecodedClip:
    """F JPEG frames (the last repeated when the video ended early), the mono waveform, what ffmpeg saw."""

    frames: list[bytes]
    waveform: np.ndarray
    frames_decoded: int
    frame_times_s: list[float]
    duration_s: float
    streams: StreamInfo


def frame_times(segment_s: float, num_frames: int) -> list[float]:
    """Centres of `num_frames` equal slices of the segment, relative to its start: the same for every clip, even one
    whose row or file is shorter than the segment (its frames past the end repeat its last one; schema 2)."""
    return [(i + 0.5) * segment_s / num_frames for i in range(num_frames)]


def _select_expr(times: list[float]) -> str:
    # The first frame at or after each target time (a frame covering two targets is taken once). The terms are
    # summed as a balanced tree: ffmpeg's expression parser fails ("Cannot allocate memory") on a chain of about
    # 90 sums, and a tree of 250 terms is 8 levels deep.
    terms = [f"gte(t,{t:.6f})*(isnan(prev_t)+lt(prev_t,{t:.6f}))" for t in times]
    while len(terms) > 1:
        terms = [f"({'+'.join(terms[i : i + 2])})" for i in range(0, len(terms), 2)]
    return f"gt({terms[0]},0)"


def _scratch_dir() -> str:
    return "/dev/shm" if os.access("/dev/shm", os.W_OK) else tempfile.gettempdir()


def _scratch_full(duration_s: float, params: FeatureParams) -> DiskFullError | None:
    """The error of a failed decode that was the scratch folder's, not the clip's: its own files removed, the folder
    has less room than one decode may write (`output_cap_bytes`), so every clip would fail alike. A hostile clip that
    filled the folder freed it again, and stays the clip's failure."""
    folder = _scratch_dir()
    if shutil.disk_usage(folder).free >= output_cap_bytes(duration_s, params):
        return None
    return disk_full(f"{folder} (the scratch folder of ffmpeg's decoded frames)")


def scratch_folder() -> tempfile.TemporaryDirectory:
    """A scratch folder for one ffmpeg run (its outputs, its log), named so that remove_stale_scratch knows whose."""
    return tempfile.TemporaryDirectory(prefix=f"{SCRATCH_PREFIX}{os.getpid()}-", dir=_scratch_dir())


def remove_stale_scratch() -> list[str]:
    """Delete the scratch folders of decodes whose process is gone (a SIGKILLed worker leaves its frames there,
    in RAM when that is /dev/shm); returns their paths."""
    removed = []
    with os.scandir(_scratch_dir()) as entries:
        for entry in entries:
            m = _SCRATCH_RE.fullmatch(entry.name)
            if m and entry.is_dir(follow_symlinks=False) and not _alive(int(m[1])):
                shutil.rmtree(entry.path, ignore_errors=True)
                removed.append(entry.path)
    return removed


def _alive(pid: int) -> bool:
    """Whether process `pid` runs (a zombie, dead but not yet reaped, does not)."""
    try:
        stat_line = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    return stat_line.rpartition(")")[2].split()[0] != "Z"


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
    The input may use the file protocol and the MEDIA_DEMUXERS only.
    """
    source = ffmpeg.input(
        file_url(path),
        ss=f"{start_s:.6f}",
        t=f"{duration_s:.6f}",
        threads=1,
        protocol_whitelist="file",
        format_whitelist=",".join(MEDIA_DEMUXERS),
    )
    video = (
        source["v:0"]
        .filter("select", _select_expr(frame_times(params.segment_s, params.num_frames)))
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
    return graph.compile(cmd=ffmpeg_binary(), overwrite_output=True)


def output_cap_bytes(duration_s: float, params: FeatureParams) -> int:
    """The most bytes ffmpeg may write to any one file (a frame, the audio, its log) for a segment: twice the
    segment's float32 audio plus OUTPUT_FILE_BASE_BYTES."""
    return OUTPUT_FILE_BASE_BYTES + 2 * round(duration_s * params.sample_rate_hz) * 4


def _run_decode(
    fd: int, start_s: float, duration_s: float, params: FeatureParams, deadline: float, timeout_s: float
) -> tuple[list[bytes], np.ndarray, StreamInfo, str]:
    """Decode the open file `fd`; ffmpeg reads it as /dev/fd/N: the file checked, and a name that is always text."""
    max_file_bytes = output_cap_bytes(duration_s, params)
    source = f"/dev/fd/{fd}"
    with scratch_folder() as scratch:
        target = os.path.join(scratch, "%02d.jpg")
        audio_path = os.path.join(scratch, "audio.f32")
        log_path = os.path.join(scratch, "ffmpeg.log")
        cmd = decode_command(source, start_s, duration_s, params, target, audio_target=file_url(audio_path))
        returncode, stderr = run_ffmpeg(cmd, log_path, deadline, timeout_s, max_file_bytes, FFMPEG_MEMORY_BYTES, fd)
        streams = parse_input_report(stderr)
        with_audio = not (returncode != 0 and streams.has_video and not streams.has_audio)
        if not with_audio:
            # No audio stream (rare): decode the video alone rather than probe every clip first.
            cmd = decode_command(source, start_s, duration_s, params, target, with_audio=False)
            returncode, stderr = run_ffmpeg(cmd, log_path, deadline, timeout_s, max_file_bytes, FFMPEG_MEMORY_BYTES, fd)
        if _OUT_OF_MEMORY_RE.search(stderr):  # frames dropped (exit 0) or the run failed
            limit = f"{FFMPEG_MEMORY_BYTES / 2**30:g} GiB"
            raise DecodeError("too_large", f"ffmpeg needed more than {limit} of memory: {error_lines(stderr)}")
        if returncode != 0:
            if m := _NOT_ALLOWED_RE.search(stderr):
                allowed = ", ".join(MEDIA_DEMUXERS)
                raise DecodeError("not_media", f"a {m[1]} file, not one of the containers read: {allowed}")
            if "Input #0" in stderr and not streams.has_video:
                raise DecodeError("no_video", f"no video stream (audio: {streams.audio_codec or 'none'})")
            raise DecodeError("unreadable", f"ffmpeg exit {returncode}: {error_lines(stderr)}")
        names = sorted((name for name in os.listdir(scratch) if name.endswith(".jpg")), key=lambda n: int(n[:-4]))
        frames = [Path(scratch, name).read_bytes() for name in names]  # in numeric order: 99.jpg, then 100.jpg
        has_audio_file = with_audio and os.path.exists(audio_path)
        audio = np.fromfile(audio_path, dtype="<f4") if has_audio_file else np.zeros(0, dtype="<f4")
    return frames, audio, streams, stderr


def decode_clip(
    path: str | os.PathLike, start_s: float, duration_s: float, params: FeatureParams, timeout_s: float | None = None
) -> DecodedClip:
    """Decode the segment [start_s, start_s + duration_s) of `path`; the waveform is empty without an audio stream.

    The F frames are the first at or after the centres of F equal slices of the segment, the same times for every
    clip; a file that ends inside the segment repeats its last frame (`frames_decoded` says how many it had), as its
    log-mel is zero-padded, so frames and audio stay in step. The ffmpeg run gets `timeout_s` (default:
    default_decode_timeout_s of the segment).
    Raises DecodeError with reason 'unreadable' (not media, truncated, corrupt: ffmpeg's message), 'not_media' (a
    playlist, a concat list, an image: a format outside MEDIA_DEMUXERS), 'no_video' (no video stream), 'no_frames'
    (the segment holds no video frame), 'missing_file', 'not_a_file' (FIFO, device), 'timeout' or 'too_large' (an
    output file over its cap); DiskFullError when the decode failed for want of room in its scratch folder.
    """
    timeout_s = default_decode_timeout_s(duration_s) if timeout_s is None else timeout_s
    deadline = time.monotonic() + timeout_s
    fd = open_regular_file(path)
    try:
        frames, audio, streams, stderr = _run_decode(fd, start_s, duration_s, params, deadline, timeout_s)
    except DecodeError as err:  # ffmpeg's messages name the input /dev/fd/N: name the file instead
        if full := _scratch_full(duration_s, params):
            raise full from None
        raise DecodeError(err.reason, str(err).replace(f"file:/dev/fd/{fd}", os.fspath(path))) from None
    finally:
        os.close(fd)
    if not frames:
        raise DecodeError(
            "no_frames",
            f"no video frame in [{start_s:.3f}s, {start_s + duration_s:.3f}s) "
            f"(file duration {streams.duration_s}s): {error_lines(stderr)}",
        )
    decoded = len(frames)
    frames += [frames[-1]] * (params.num_frames - decoded)
    times = [start_s + t for t in frame_times(params.segment_s, params.num_frames)]
    return DecodedClip(
        frames=frames,
        waveform=audio,
        frames_decoded=decoded,
        frame_times_s=times,
        duration_s=duration_s,
        streams=streams,
    )
