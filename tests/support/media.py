"""Edge-case media files made with ffmpeg at test time, for the decoder's tests (a helper, not a test module).

Video is ``testsrc2`` (a moving pattern and a frame counter), audio a sine tone, so that decoded output can be
checked. Every function that makes a file writes it at ``path`` and returns ``path``. Hostile inputs too: float
PCM holding NaN, forged metadata, playlists that point ffmpeg at a FIFO or a device.
"""

from __future__ import annotations

import os
import struct
import subprocess
from pathlib import Path

import numpy as np

FFMPEG = "ffmpeg"
FFMPEG_FLAGS = ("-nostdin", "-hide_banner", "-loglevel", "error", "-y")

# Options that keep each encoder fast on tiny test clips.
_VIDEO_CODEC_OPTIONS: dict[str, tuple[str, ...]] = {
    "libx264": ("-preset", "veryfast"),
    "libvpx-vp9": ("-deadline", "realtime", "-cpu-used", "8", "-b:v", "200k"),
}


def _run_ffmpeg(args: list[str]) -> None:
    """Run ffmpeg with the standard flags; raises RuntimeError with ffmpeg's message when it fails."""
    result = subprocess.run([FFMPEG, *FFMPEG_FLAGS, *args], capture_output=True, text=True)
    if result.returncode != 0:
        raise RuntimeError(f"ffmpeg {' '.join(args)} failed: {result.stderr.strip()}")


def _output_path(path: Path) -> str:
    """An absolute output path, so that a name beginning with '-' is never read as an option."""
    return os.path.abspath(path)


def make_clip(
    path: Path,
    seconds: float = 2.0,
    fps: str = "25",
    size: tuple[int, int] = (96, 64),
    vcodec: str = "libx264",
    acodec: str = "aac",
    sample_rate: int = 16000,
    channels: int = 1,
    audio: bool = True,
    video: bool = True,
    tone_hz: float = 440.0,
    faststart: bool = False,
) -> Path:
    """A constant-frame-rate clip of ``seconds`` with the container chosen by ``path``'s extension.

    ``fps`` is an ffmpeg rate such as ``"25"``, ``"60"`` or ``"30000/1001"``; video is yuv420p ``testsrc2`` of
    ``size`` (width, height), audio a ``tone_hz`` sine of ``sample_rate`` Hz and ``channels`` channels.
    ``audio=False`` / ``video=False`` leave that stream out. ``faststart`` puts the mp4 index before the data
    (without it the index is at the end, so a truncated copy has none).
    """
    if not (audio or video):
        raise ValueError("a clip needs audio, video or both")
    width, height = size
    args: list[str] = []
    if video:
        args += ["-f", "lavfi", "-i", f"testsrc2=s={width}x{height}:r={fps}:d={seconds}"]
    if audio:
        args += ["-f", "lavfi", "-i", f"sine=f={tone_hz}:r={sample_rate}:d={seconds}"]
    if video:
        args += ["-c:v", vcodec, *_VIDEO_CODEC_OPTIONS.get(vcodec, ()), "-pix_fmt", "yuv420p"]
    if audio:
        args += ["-c:a", acodec, "-ar", str(sample_rate), "-ac", str(channels)]
    if faststart:
        args += ["-movflags", "+faststart"]
    _run_ffmpeg([*args, _output_path(path)])
    return path


def make_vfr_clip(path: Path, size: tuple[int, int] = (96, 64), tone_hz: float = 440.0) -> Path:
    """A 3 s H.264 + AAC clip whose frame rate really varies: 30 fps for 1 s, then 10 fps, then 60 fps.

    Rendered at 60 fps and thinned by ``select`` with ``-fps_mode vfr``, so frame timestamps are kept uneven
    (100 frames in 3 s; r_frame_rate 60 but avg_frame_rate about 33).
    """
    width, height = size
    keep = "if(lt(t,1),not(mod(n,2)),if(lt(t,2),not(mod(n,6)),1))"
    _run_ffmpeg(
        [
            "-f", "lavfi", "-i", f"testsrc2=s={width}x{height}:r=60:d=3",
            "-f", "lavfi", "-i", f"sine=f={tone_hz}:r=16000:d=3",
            "-vf", f"select='{keep}'", "-fps_mode", "vfr",
            "-c:v", "libx264", "-preset", "veryfast", "-pix_fmt", "yuv420p", "-c:a", "aac",
            _output_path(path),
        ]
    )  # fmt: skip
    return path


def truncate_file(src: Path, dst: Path, fraction: float = 0.5) -> Path:
    """Copy the first ``fraction`` of ``src``'s bytes to ``dst``: a truncated, corrupt media file."""
    data = Path(src).read_bytes()
    Path(dst).write_bytes(data[: int(len(data) * fraction)])
    return dst


def make_not_a_video(path: Path) -> Path:
    """Text bytes under a video name (e.g. ``.mp4``): a file no demuxer recognizes."""
    Path(path).write_text("this is not a video, just text with a .mp4 name\n" * 20)
    return path


def write_float_wav(path: Path, samples: np.ndarray, sample_rate: int = 16000) -> Path:
    """A mono 32-bit float WAV (format tag 3, which the ``wave`` module cannot write) holding ``samples`` as they
    are, NaN and infinities included."""
    data = np.asarray(samples, dtype="<f4").tobytes()
    fmt = struct.pack("<HHIIHH", 3, 1, sample_rate, sample_rate * 4, 4, 32)
    body = b"WAVE" + b"fmt " + struct.pack("<I", len(fmt)) + fmt + b"data" + struct.pack("<I", len(data)) + data
    Path(path).write_bytes(b"RIFF" + struct.pack("<I", len(body)) + body)
    return path


def mux_with_video(path: Path, audio: Path, seconds: float = 2.0, size: tuple[int, int] = (96, 64)) -> Path:
    """A ``testsrc2`` H.264 video with ``audio``'s stream copied in unchanged (``-c:a copy``); ``path``'s extension
    picks the container (.mkv carries float PCM)."""
    width, height = size
    _run_ffmpeg(
        [
            "-f", "lavfi", "-i", f"testsrc2=s={width}x{height}:r=25:d={seconds}", "-i", _output_path(audio),
            "-map", "0:v", "-map", "1:a", "-c:v", "libx264", *_VIDEO_CODEC_OPTIONS["libx264"], "-pix_fmt", "yuv420p",
            "-c:a", "copy", _output_path(path),
        ]
    )  # fmt: skip
    return path


def make_long_clip(path: Path, seconds: int, size: tuple[int, int] = (320, 180)) -> Path:
    """A clip of about ``seconds`` made fast (a 2 s clip repeated by stream copy) that takes ffmpeg long to decode."""
    base = make_clip(Path(path).with_name("base-" + Path(path).name), seconds=2.0, size=size)
    _run_ffmpeg(["-stream_loop", str(max(seconds // 2 - 1, 0)), "-i", _output_path(base), "-c", "copy",
                 _output_path(path)])  # fmt: skip
    base.unlink()
    return path


def with_metadata(src: Path, dst: Path, **tags: str) -> Path:
    """A stream copy of ``src`` with container metadata ``tags`` (values may hold newlines)."""
    metadata = [arg for key, value in tags.items() for arg in ("-metadata", f"{key}={value}")]
    _run_ffmpeg(["-i", _output_path(src), "-map", "0", "-c", "copy", *metadata, _output_path(dst)])
    return dst


def with_claimed_duration(src: Path, dst: Path, seconds: float) -> Path:
    """A copy of ``src`` (an .mkv or .mp4 that ffmpeg wrote) whose container header claims ``seconds``: the mkv
    Segment Info ``Duration`` float, or every mp4 ``mvhd``, ``tkhd`` and ``mdhd`` duration (32-bit: capped at 2^32 - 1
    units of each box's time scale); the frames and samples are unchanged."""
    data = bytearray(Path(src).read_bytes())
    if Path(src).suffix == ".mkv":
        at = data.index(b"\x44\x89\x88") + 3  # EBML id 0x4489 (Duration), an 8-byte float in milliseconds
        data[at : at + 8] = struct.pack(">d", seconds * 1000.0)
    else:
        # Version-0 boxes (ffmpeg's), after the box type: version and flags, two times, then mvhd and mdhd hold their
        # time scale and duration, tkhd a track id, 4 reserved bytes and the duration in the movie's (mvhd) scale.
        movie = data.index(b"mvhd") + 4
        for box, field in ((b"mvhd", 16), (b"tkhd", 20), (b"mdhd", 16)):
            at = data.find(box)
            while at >= 0:
                body = at + 4
                units = struct.unpack(">I", data[(movie if box == b"tkhd" else body) + 12 :][:4])[0]
                data[body + field : body + field + 4] = struct.pack(">I", min(round(seconds * units), 2**32 - 1))
                at = data.find(box, at + 4)
    Path(dst).write_bytes(data)
    return dst


def clips_claiming(folder: Path, seconds: float, claims: dict[str, float]) -> dict[str, Path]:
    """An honest clip of `seconds` as .mkv and .mp4 (`honest.mkv`, `honest.mp4`) and, for each name -> claimed
    duration of `claims`, a copy of each whose header claims it (`{name}.mkv`, `{name}.mp4`)."""
    out = {}
    for suffix in ("mkv", "mp4"):
        honest = out[f"honest.{suffix}"] = make_clip(folder / f"honest.{suffix}", seconds=seconds)
        for name, claimed in claims.items():
            out[f"{name}.{suffix}"] = with_claimed_duration(honest, folder / f"{name}.{suffix}", claimed)
    return out


def tone(seconds: float = 2.0, rate: int = 16000) -> np.ndarray:
    """A 440 Hz sine at half scale, float32."""
    t = np.arange(round(seconds * rate)) / rate
    return (0.5 * np.sin(2 * np.pi * 440 * t)).astype(np.float32)


def clip_with_audio(folder: Path, name: str, samples: np.ndarray) -> Path:
    """An H.264 video in .mkv whose audio track is `samples` as float PCM, copied without a conversion."""
    wav = write_float_wav(folder / f"{name}.wav", samples)
    return mux_with_video(folder / f"{name}.mkv", wav)


def hostile_lists(folder: Path) -> list[Path]:
    """An HLS playlist and an ffconcat list whose entries are a FIFO and a link to /dev/zero (names and extensions
    that ffmpeg's own safety checks accept), under names the clip lookup matches. Without the demuxer whitelist
    ffmpeg blocks on the FIFO for ever, deaf to SIGTERM."""
    os.mkfifo(folder / "seg.ts")
    (folder / "zero.ts").symlink_to("/dev/zero")
    lists = []
    for i, entry in enumerate(["seg.ts", "zero.ts"]):
        hls = folder / f"clip{i}.m3u8"
        hls.write_text(f"#EXTM3U\n#EXT-X-TARGETDURATION:10\n#EXTINF:10,\n{folder / entry}\n#EXT-X-ENDLIST\n")
        concat = folder / f"clip{i}.mp4"
        concat.write_text(f"ffconcat version 1.0\nfile {entry}\n")
        lists += [hls, concat]
    return lists
