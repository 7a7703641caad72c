"""How long a video file may be taken to be: the duration its container header claims, checked against a stated
limit (MAX_MEDIA_S) and against what the file's bytes can hold, before anything is planned from it.

A header is data like any other: a file of 100 KB may claim a duration of years (a rewritten mp4 `mvhd` or mkv
`Duration`), and a plan built from the claim (one window per hop) would be built before a single frame decodes.
What the bytes can hold: each stream's bytes lie in the file, so a file of B bytes whose slowest stream averages r
bytes per second lasts at most B / r seconds (BIT_RATE_MARGIN for rates that ffmpeg estimates); where no stream
states a rate, no second of video takes less than MIN_BYTES_PER_S. The claim is read by a fenced ffmpeg run
(`preprocess.ffmpeg_run`), as the decode reads it.
"""

from __future__ import annotations

import os
import time
from dataclasses import dataclass
from pathlib import Path

from preprocess.decode import (
    FFMPEG_MEMORY_BYTES,
    MEDIA_DEMUXERS,
    OUTPUT_FILE_BASE_BYTES,
    StreamInfo,
    file_url,
    parse_input_report,
    scratch_folder,
    stream_bit_rates_bps,
)
from preprocess.ffmpeg_run import DecodeError, error_lines, ffmpeg_binary, open_regular_file, run_ffmpeg

# The longest a video is planned as (a timeline of windows): a day. A longer claim is capped at it.
MAX_MEDIA_S = 24 * 3600.0
# The fewest bytes a second of video takes in any container (measured: a 64x64 black H.264 at 0.1 fps in mkv, the
# least we could make, takes 4.7 bytes a second).
MIN_BYTES_PER_S = 1.0
# Stream bit rates are averages that ffmpeg may estimate from the first packets: a file may last this many times
# longer than its bytes at the slowest stream's rate.
BIT_RATE_MARGIN = 4.0
# Reading a header takes well under a second; the decode's own limit is 60 s for a short segment.
PROBE_TIMEOUT_S = 60.0


@dataclass(frozen=True)
class MediaProbe:
    """What a video file claims (`streams.duration_s`, the streams' average bit rates) and its size in bytes."""

    path: Path
    file_bytes: int
    streams: StreamInfo
    bit_rates_bps: tuple[int, ...]

    def duration_limit_s(self) -> tuple[float, str]:
        """(the longest the file may be taken to last, what bounds it): MAX_MEDIA_S or what its bytes can hold
        (module doc), whichever is shorter."""
        slowest = min(self.bit_rates_bps, default=0) / 8 / BIT_RATE_MARGIN
        rate = max(slowest, MIN_BYTES_PER_S)
        holds_s = self.file_bytes / rate
        if holds_s >= MAX_MEDIA_S:
            return MAX_MEDIA_S, f"the {MAX_MEDIA_S / 3600:g} h a video is planned as at most"
        what = "its slowest stream's bit rate" if slowest > MIN_BYTES_PER_S else "the least a second of video takes"
        return holds_s, f"the {holds_s:.0f} s its {self.file_bytes} bytes hold ({rate:.0f} bytes/s: {what})"

    def planned_duration_s(self) -> tuple[float | None, str | None]:
        """(the duration to plan from: the claim, capped at `duration_limit_s`; None when the header states none,
        a one-line warning naming the file when the claim was capped, else None)."""
        claimed = self.streams.duration_s
        limit_s, bound = self.duration_limit_s()
        if claimed is None or claimed <= limit_s:
            return claimed, None
        return limit_s, f"{self.path}: its header claims {claimed:.0f} s, more than {bound}: planned as {limit_s:.0f} s"


def probe_command(source: str) -> list[str]:
    """The ffmpeg arguments that print the `Input #0` report of `source` (file protocol and MEDIA_DEMUXERS only) and
    decode nothing (ffmpeg then exits 1: no output file)."""
    return [
        ffmpeg_binary(), "-nostdin", "-hide_banner", "-loglevel", "level+info",
        "-protocol_whitelist", "file", "-format_whitelist", ",".join(MEDIA_DEMUXERS), "-i", file_url(source),
    ]  # fmt: skip


def probe_media(path: str | os.PathLike, timeout_s: float = PROBE_TIMEOUT_S) -> MediaProbe:
    """What the header of the video at `path` claims, read by a fenced ffmpeg run (a regular file only, a time limit,
    memory and output caps); DecodeError naming the file when ffmpeg finds no media in it."""
    fd = open_regular_file(path)
    try:
        file_bytes = os.fstat(fd).st_size
        with scratch_folder() as scratch:
            _, stderr = run_ffmpeg(
                probe_command(f"/dev/fd/{fd}"), os.path.join(scratch, "ffmpeg.log"), time.monotonic() + timeout_s,
                timeout_s, OUTPUT_FILE_BASE_BYTES, FFMPEG_MEMORY_BYTES, fd,
            )  # fmt: skip
    finally:
        os.close(fd)
    if "Input #0" not in stderr:
        message = error_lines(stderr).replace(f"file:/dev/fd/{fd}", os.fspath(path))
        raise DecodeError("unreadable", f"{os.fspath(path)}: no media found: {message}")
    return MediaProbe(Path(path), file_bytes, parse_input_report(stderr), stream_bit_rates_bps(stderr))
