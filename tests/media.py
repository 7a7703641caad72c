"""Edge-case media files made with ffmpeg at test time, for the decoder's tests (a helper, not a test module).

Video is ``testsrc2`` (a moving pattern and a frame counter), audio a sine tone, so that decoded output can be
checked. Every function writes the file at ``path`` and returns ``path``.
"""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

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
