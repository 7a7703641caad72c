"""A small synthetic labelled audio-visual dataset in AudioSet layout, generated with ffmpeg's lavfi sources.

Each clip has a coloured background (red or yellow: warm; green or blue: cool), maybe a white box sweeping across
the frame, a low or high tone, maybe gated on and off (beeping), maybe pink noise; every attribute is drawn uniformly
and independently. Three kinds of labels:

- seen: the background colour and the moving box (only the frames show them),
- heard: the pitch, beeping and noise (only the sound has them),
- cross-modal: whether a seen and a heard attribute agree (warm colour with the low tone or cool with the high one;
  the box exactly when the tone beeps; noise exactly over a cool colour). Each is an XOR of a seen and a heard bit:
  true for half the clips whatever one modality shows, so neither modality alone, nor a sum of per-modality logits,
  can predict it.

The output folder holds:

- ``class_labels_indices.csv``: ``index,mid,display_name`` quoted as in AudioSet
  (``0,/m/demo_red,"Red background"``),
- ``balanced_train_segments.csv`` and ``eval_segments.csv``: AudioSet segment CSVs (three ``#`` lines, then
  ``YTID, 0.000, 10.000, "/m/a,/m/b"``),
- ``videos/{YTID}.mp4``: H.264 yuv420p at 25 fps + AAC (16 or 44.1 kHz, mono or stereo), cut to the segment.
"""

from __future__ import annotations

import os
import random
import shutil
import string
import subprocess
from collections.abc import Iterable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

from shards.atomic import commit, remove_stale_tmp, tmp_path_for, write_bytes_atomic

CLASS_LABELS_CSV = "class_labels_indices.csv"
TRAIN_CSV = "balanced_train_segments.csv"
EVAL_CSV = "eval_segments.csv"
VIDEOS_DIR = "videos"

FPS = 25
SAMPLE_RATES_HZ = (16000, 44100)
LOW_TONE_HZ = 300.0
HIGH_TONE_HZ = 1500.0
BEEP_PERIOD_S = 0.1  # 10 Hz on/off gating, half the period on: a 160 ms audio patch holds whole periods
BOX_SWEEP_S = 2.0  # the box crosses the frame once every two seconds
TONE_VOLUME = 4.0  # sine's output peaks at 1/8 of full scale: the tone peaks at 0.5
NOISE_AMPLITUDE = 0.2
BACKGROUND_RGB = {"red": "0xFF0000", "green": "0x00FF00", "blue": "0x0000FF", "yellow": "0xFFFF00"}
WARM_BACKGROUNDS = ("red", "yellow")

YTID_LENGTH = 11
YTID_ALPHABET = string.ascii_letters + string.digits + "_-"
DASH_EVERY = 3  # every third YTID begins with '-', like real ones that break naive command lines
# The date of the real AudioSet CSVs, so that the files are byte-for-byte deterministic.
CSV_CREATED = "Sun Mar  5 10:54:31 2017"


@dataclass(frozen=True)
class DemoClass:
    """One label of the demo dataset; ``modality`` is ``"visual"``, ``"audible"`` or ``"cross"`` (both at once)."""

    index: int
    name: str
    display_name: str
    modality: str

    @property
    def mid(self) -> str:
        """The AudioSet-style machine id, ``/m/demo_{name}``."""
        return f"/m/demo_{self.name}"


DEMO_CLASSES: tuple[DemoClass, ...] = (
    DemoClass(0, "red", "Red background", "visual"),
    DemoClass(1, "green", "Green background", "visual"),
    DemoClass(2, "blue", "Blue background", "visual"),
    DemoClass(3, "moving_box", "Moving box", "visual"),
    DemoClass(4, "low_tone", "Low tone", "audible"),
    DemoClass(5, "high_tone", "High tone", "audible"),
    DemoClass(6, "beeping", "Beeping", "audible"),
    DemoClass(7, "noise", "Noise", "audible"),
    DemoClass(8, "yellow", "Yellow background", "visual"),
    DemoClass(9, "colour_pitch", "Colour matches pitch", "cross"),
    DemoClass(10, "box_beeping", "Box if and only if beeping", "cross"),
    DemoClass(11, "colour_noise", "Noise if and only if cool colour", "cross"),
)
MODALITIES = ("visual", "audible", "cross")


class FFmpegNotFoundError(RuntimeError):
    """ffmpeg is not on PATH."""


@dataclass(frozen=True)
class DemoClip:
    """The drawn attributes of one clip; ``mids`` are its labels."""

    ytid: str
    split: str  # "train" or "eval"
    background: str
    moving_box: bool
    tone_hz: float
    beeping: bool
    noise: bool
    sample_rate_hz: int
    channels: int
    noise_seed: int

    @property
    def warm(self) -> bool:
        """Whether the background is a warm colour (`WARM_BACKGROUNDS`)."""
        return self.background in WARM_BACKGROUNDS

    @property
    def mids(self) -> tuple[str, ...]:
        """The clip's label MIDs in class-index order."""
        low = self.tone_hz == LOW_TONE_HZ
        present = {
            self.background,
            "moving_box" if self.moving_box else "",
            "low_tone" if low else "high_tone",
            "beeping" if self.beeping else "",
            "noise" if self.noise else "",
            "colour_pitch" if self.warm == low else "",
            "box_beeping" if self.moving_box == self.beeping else "",
            "colour_noise" if self.warm != self.noise else "",
        }
        return tuple(c.mid for c in DEMO_CLASSES if c.name in present)


@dataclass(frozen=True)
class DemoDataset:
    """Paths of a generated demo dataset, its clips, and how many videos this call encoded."""

    class_labels_csv: Path
    train_csv: Path
    eval_csv: Path
    videos_dir: Path
    clips: tuple[DemoClip, ...]
    num_generated: int


def _draw_ytid(rng: random.Random, leading_dash: bool) -> str:
    first = "-" if leading_dash else rng.choice(YTID_ALPHABET.replace("-", ""))
    return first + "".join(rng.choice(YTID_ALPHABET) for _ in range(YTID_LENGTH - 1))


def draw_demo_clips(clips: int, eval_fraction: float = 0.25, seed: int = 0) -> list[DemoClip]:
    """Draw ``clips`` clips deterministically from ``seed``; clip i does not depend on ``clips``.

    Eval clips are spread evenly (clip i is eval when ``floor((i+1)*f) > floor(i*f)``), giving
    ``floor(clips * eval_fraction)`` of them. YTIDs are unique and every third begins with '-'.
    Raises ValueError when either split would be empty.
    """
    num_eval = int(clips * eval_fraction)
    if not 0.0 < eval_fraction < 1.0 or num_eval < 1 or num_eval >= clips:
        raise ValueError(
            f"clips={clips} with eval_fraction={eval_fraction} leaves a split empty; "
            "use more clips or a fraction strictly between 0 and 1"
        )
    drawn: list[DemoClip] = []
    seen: set[str] = set()
    for index in range(clips):
        # v3: the 10 Hz gate (v2: the cross-modal classes); new YTIDs, so that no video rendered otherwise is reused
        rng = random.Random(f"mbt-demo-v3:{seed}:{index}")
        ytid = _draw_ytid(rng, leading_dash=index % DASH_EVERY == 0)
        while ytid in seen:
            ytid = _draw_ytid(rng, leading_dash=index % DASH_EVERY == 0)
        seen.add(ytid)
        is_eval = int((index + 1) * eval_fraction) > int(index * eval_fraction)
        drawn.append(
            DemoClip(
                ytid=ytid,
                split="eval" if is_eval else "train",
                background=rng.choice(list(BACKGROUND_RGB)),
                moving_box=rng.random() < 0.5,
                tone_hz=rng.choice((LOW_TONE_HZ, HIGH_TONE_HZ)),
                beeping=rng.random() < 0.5,
                noise=rng.random() < 0.5,
                sample_rate_hz=rng.choice(SAMPLE_RATES_HZ),
                channels=rng.choice((1, 2)),
                noise_seed=rng.randrange(2**31),
            )
        )
    return drawn


def class_labels_csv_text() -> str:
    """The class CSV of the demo classes, quoted like AudioSet's ``class_labels_indices.csv``."""
    rows = [f'{c.index},{c.mid},"{c.display_name}"' for c in DEMO_CLASSES]
    return "\n".join(["index,mid,display_name", *rows]) + "\n"


def segments_csv_text(clips: Iterable[DemoClip], seconds: float) -> str:
    """An AudioSet segments CSV (three ``#`` lines, then ``YTID, start, end, "mids"``) for ``clips``."""
    clips = list(clips)
    mids = [mid for clip in clips for mid in clip.mids]
    header = [
        f"# Segments csv created {CSV_CREATED}",
        f"# num_ytids={len(clips)}, num_segs={len(clips)}, num_unique_labels={len(set(mids))}, "
        f"num_positive_labels={len(mids)}",
        "# YTID, start_seconds, end_seconds, positive_labels",
    ]
    rows = [f'{clip.ytid}, {0.0:.3f}, {seconds:.3f}, "{",".join(clip.mids)}"' for clip in clips]
    return "\n".join(header + rows) + "\n"


def _write_if_changed(path: Path, text: str) -> None:
    """Write ``text`` atomically (temp name, then rename), leaving an identical file untouched."""
    data = text.encode()
    if not (path.is_file() and path.read_bytes() == data):
        write_bytes_atomic(path, data)


def _ffmpeg_command(
    ffmpeg: str, clip: DemoClip, seconds: float, size: tuple[int, int], out: Path, grain: int = 0
) -> list[str]:
    """The one ffmpeg command (argument list) that renders ``clip`` as mp4 into the absolute path ``out``.

    ``grain`` > 0 adds temporal noise of that strength, so that bitrate and decode cost resemble real footage.
    """
    width, height = size
    box_px = max(2, height // 4 // 2 * 2)
    sr = clip.sample_rate_hz
    duration = f"{seconds:.3f}"  # the same rounding as the CSVs' end_seconds
    video = f"color=c={BACKGROUND_RGB[clip.background]}:s={width}x{height}:r={FPS}:d={duration}"
    if clip.moving_box:
        video += (
            f"[bg];color=c=white:s={box_px}x{box_px}:r={FPS}:d={duration}[box];"
            f"[bg][box]overlay=x='mod(t/{BOX_SWEEP_S},1)*(W+w)-w':y='(H-h)/2':eval=frame"
        )
    if grain:
        video += f",noise=alls={grain}:allf=t"
    gate = f"*lt(mod(t,{BEEP_PERIOD_S}),{BEEP_PERIOD_S / 2})" if clip.beeping else ""
    # 10 ms audio frames so that the per-frame volume gate switches on time.
    audio = (
        f"sine=f={clip.tone_hz}:r={sr}:d={duration}:samples_per_frame={sr // 100},"
        f"volume=volume='{TONE_VOLUME}{gate}':eval=frame"
    )
    if clip.noise:
        audio += (
            f"[tone];anoisesrc=c=pink:r={sr}:a={NOISE_AMPLITUDE}:d={duration}:seed={clip.noise_seed}[noise];"
            "[tone][noise]amix=inputs=2:normalize=0:duration=first"
        )
    layout = "stereo" if clip.channels == 2 else "mono"
    audio += f",aformat=sample_fmts=fltp:sample_rates={sr}:channel_layouts={layout}"
    return [
        ffmpeg, "-nostdin", "-hide_banner", "-loglevel", "error", "-y",
        "-filter_complex", f"{video}[v];{audio}[a]",
        "-map", "[v]", "-map", "[a]",
        "-c:v", "libx264", "-preset", "veryfast", "-pix_fmt", "yuv420p", "-r", str(FPS),
        "-c:a", "aac", "-b:a", "64k",
        "-t", duration, "-movflags", "+faststart", "-f", "mp4", str(out),
    ]  # fmt: skip


def _render_clip(
    ffmpeg: str, clip: DemoClip, seconds: float, size: tuple[int, int], videos: Path, grain: int = 0
) -> bool:
    """Render ``videos/{ytid}.mp4`` unless it exists; returns whether it was rendered.

    The file only ever appears complete: ffmpeg writes it under a temporary name, which is then renamed.
    """
    final = videos / f"{clip.ytid}.mp4"
    if final.is_file():
        return False
    tmp = tmp_path_for(final)
    result = subprocess.run(_ffmpeg_command(ffmpeg, clip, seconds, size, tmp, grain), capture_output=True, text=True)
    if result.returncode != 0:
        tmp.unlink(missing_ok=True)
        raise RuntimeError(f"ffmpeg failed on clip {clip.ytid}: {result.stderr.strip()}")
    commit(tmp, final)
    return True


def make_demo_dataset(
    out: Path,
    clips: int = 64,
    seconds: float = 10.0,
    eval_fraction: float = 0.25,
    seed: int = 0,
    size: tuple[int, int] = (160, 120),
    workers: int | None = None,
    grain: int = 0,
) -> DemoDataset:
    """Generate (or complete) the demo dataset under ``out`` and return its paths.

    Deterministic: the same ``seed`` gives the same YTIDs, labels and CSV bytes. Idempotent: videos and
    CSVs that already exist with the right content are left untouched, so a rerun after an interruption only
    renders what is missing. Videos are keyed by YTID alone: use a fresh ``out`` when changing ``seconds`` or
    ``size``.
    ``grain`` > 0 adds film grain (the benchmark's realistic clips).
    ``workers`` ffmpeg processes run at once (default: all cores). Raises FFmpegNotFoundError without ffmpeg,
    ValueError on bad arguments, RuntimeError when ffmpeg fails.
    """
    width, height = size
    if width < 16 or height < 16 or width % 2 or height % 2:
        raise ValueError(f"size {width}x{height}: width and height must be even and at least 16 (yuv420p)")
    if seconds < 1 / FPS:
        raise ValueError(f"seconds must be at least one frame (1/{FPS} s), got {seconds}")
    if workers is not None and workers < 1:
        raise ValueError(f"workers must be at least 1, got {workers}")
    drawn = draw_demo_clips(clips, eval_fraction, seed)
    ffmpeg = shutil.which("ffmpeg")
    if ffmpeg is None:
        raise FFmpegNotFoundError("ffmpeg not found on PATH; install it with `apt-get install ffmpeg`")

    out = Path(out).absolute()
    videos = out / VIDEOS_DIR
    videos.mkdir(parents=True, exist_ok=True)
    remove_stale_tmp(videos)  # left by a killed run; their names would match the `{ytid}.*` video lookup
    # ffmpeg does the work in its own process; threads only wait on it.
    with ThreadPoolExecutor(max_workers=workers or os.cpu_count()) as pool:
        rendered = list(pool.map(lambda clip: _render_clip(ffmpeg, clip, seconds, size, videos, grain), drawn))

    dataset = DemoDataset(
        class_labels_csv=out / CLASS_LABELS_CSV,
        train_csv=out / TRAIN_CSV,
        eval_csv=out / EVAL_CSV,
        videos_dir=videos,
        clips=tuple(drawn),
        num_generated=sum(rendered),
    )
    _write_if_changed(dataset.class_labels_csv, class_labels_csv_text())
    _write_if_changed(dataset.train_csv, segments_csv_text([c for c in drawn if c.split == "train"], seconds))
    _write_if_changed(dataset.eval_csv, segments_csv_text([c for c in drawn if c.split == "eval"], seconds))
    return dataset
