"""Clips of natural content for benchmarks: a 480x360 window panning over one of scikit-learn's sample photographs
with light film grain, so that decoding and JPEG sizes cost what real footage costs (the demo's clips are flat
colours and a box)."""

from __future__ import annotations

import subprocess
from pathlib import Path

import numpy as np
import sklearn.datasets

from preprocess.datasets import ClipRow

PHOTOS = ("china.jpg", "flower.jpg")  # the natural photographs scikit-learn ships


def make_photo_clips(videos: Path, clips: int) -> list[ClipRow]:
    """`clips` 10 s clips of natural content: a 480x360 window panning over one of scikit-learn's sample photos
    (640x427) with light film grain, 25 fps H.264 + AAC tone; frames that cost what real footage costs to
    decode (the synthetic demo clips are flat colours). Kept between runs."""
    photo_dir = Path(sklearn.datasets.__file__).parent / "images"
    videos.mkdir(parents=True, exist_ok=True)
    rows = []
    for i in range(clips):
        ytid = f"photo{i:04d}"
        out = videos / f"{ytid}.mp4"
        if not out.exists():
            phase = 2 * np.pi * i / clips
            pan = (
                f"crop=480:360:x='(iw-480)*(0.5+0.5*sin(2*PI*t/10+{phase:.3f}))'"
                f":y='(ih-360)*(0.5+0.5*cos(2*PI*t/10+{phase:.3f}))',noise=alls=4:allf=t"
            )
            subprocess.run(
                ["ffmpeg", "-nostdin", "-loglevel", "error", "-y", "-loop", "1", "-framerate", "25", "-t", "10",
                 "-i", str(photo_dir / PHOTOS[i % 2]), "-f", "lavfi", "-i", f"sine=f={300 + 50 * i}:d=10",
                 "-vf", pan, "-c:v", "libx264", "-preset", "veryfast", "-crf", "23", "-pix_fmt", "yuv420p",
                 "-c:a", "aac", "-shortest", f"{out}.tmp.mp4"],
                check=True,
            )  # fmt: skip
            Path(f"{out}.tmp.mp4").rename(out)
        rows.append(ClipRow(key=f"{ytid}_0", ytid=ytid, start_s=0.0, end_s=10.0, labels=(i % 2,), source="bench"))
    return rows
