"""A split of natural-looking clips written straight through the shard writer, for benchmarks that need thousands of
clips in seconds (`tools/gpu_check.py`): no video is made or decoded. Frames are windows panning over scikit-learn's
sample photographs with film grain, JPEG-encoded at the shard job's quality, so that decoding them costs what real
frames cost; log-mels are smooth noise at AudioSet's level. A pool of distinct frames is encoded once and each clip
takes its frames from it at its own offset: the bytes a loader reads and decodes per clip are those of a real split.
"""

from __future__ import annotations

import importlib.util
import math
from pathlib import Path

import numpy as np
import torch
from torchvision.io import decode_jpeg, encode_jpeg

from shards.manifest import LogmelStats, Manifest
from shards.schema import SHARD_PATTERN, FeatureParams, Sample, encode_sample
from shards.writer import ShardWriter

JPEG_QUALITY = 90  # what the shard job's ffmpeg -q:v 2 matches (shards.schema.FeatureParams.jpeg_qscale)
SOURCE_ASPECT = 4 / 3  # the frames of a 480x360 video


def photos() -> list[torch.Tensor]:
    """uint8 (3, H, W) natural photographs: scikit-learn's sample images, or, where scikit-learn is not installed,
    a procedural stand-in (1/f noise, the spectrum of natural images)."""
    spec = importlib.util.find_spec("sklearn")  # its images only: importing sklearn.datasets takes seconds
    folder = Path(spec.origin).parent / "datasets" / "images" if spec and spec.origin else None
    if folder is not None and sorted(folder.glob("*.jpg")):
        return [
            decode_jpeg(torch.frombuffer(bytearray(p.read_bytes()), dtype=torch.uint8))
            for p in sorted(folder.glob("*.jpg"))
        ]
    else:
        rng = np.random.default_rng(0)
        fy, fx = np.meshgrid(np.fft.fftfreq(427), np.fft.rfftfreq(640), indexing="ij")
        spectrum = rng.standard_normal((3, *fy.shape)) + 1j * rng.standard_normal((3, *fy.shape))
        image = np.fft.irfft2(spectrum / np.maximum(np.hypot(fy, fx), 1 / 640), s=(427, 640))
        image = (image - image.min()) / (image.max() - image.min()) * 255
        return [torch.from_numpy(image.astype(np.uint8))]


def frame_pool(features: FeatureParams, count: int, seed: int = 0) -> list[bytes]:
    """`count` JPEG frames of short side `features.short_side_px` (4:3): windows panning over the photographs
    (each resized once so that a window is three quarters of its height), light film grain, at JPEG_QUALITY."""
    generator = torch.Generator().manual_seed(seed)
    short = features.short_side_px
    height, width = short, 2 * round(short * SOURCE_ASPECT / 2)
    scaled = []
    for photo in photos():
        scale = height / (min(photo.shape[1], round(photo.shape[2] / SOURCE_ASPECT)) * 3 / 4)
        size = (max(round(photo.shape[1] * scale), height), max(round(photo.shape[2] * scale), width))
        scaled.append(
            torch.nn.functional.interpolate(photo[None].float(), size=size, mode="bilinear", antialias=True)[0]
        )
    grains = [4 * torch.randn((3, height, width), generator=generator) for _ in range(4)]
    pool = []
    for i in range(count):
        photo = scaled[i % len(scaled)]
        phase = 2 * math.pi * i / count
        top = round((photo.shape[1] - height) * (0.5 + 0.5 * math.cos(phase)))
        left = round((photo.shape[2] - width) * (0.5 + 0.5 * math.sin(phase)))
        frame = (photo[:, top : top + height, left : left + width] + grains[i % len(grains)]).clamp(0, 255)
        pool.append(bytes(encode_jpeg(frame.to(torch.uint8), quality=JPEG_QUALITY).numpy()))
    return pool


def logmel_pool(features: FeatureParams, count: int, seed: int = 0) -> list[np.ndarray]:
    """`count` float16 log-mels (T, bins): smooth noise about -4.5 with a standard deviation near 3 (AudioSet's)."""
    rng = np.random.default_rng(seed)
    frames, bins = features.logmel_shape
    out = []
    for _ in range(count):
        coarse = rng.normal(-4.5, 3.0, (frames // 10 + 2, bins // 8 + 2))
        smooth = np.kron(coarse, np.ones((10, 8)))[:frames, :bins] + rng.normal(0, 0.5, (frames, bins))
        out.append(smooth.astype(np.float16))
    return out


def write_photo_split(
    out: Path,
    clips: int,
    features: FeatureParams | None = None,
    num_classes: int = 527,
    shard_size: int = 256,
    distinct_frames: int = 240,
) -> Path:
    """The split folder `out` holding `clips` clips of `features` (default: the shard job's) in shards of
    `shard_size`, with `num_classes` classes (1 to 3 labels a clip), its manifest (log-mel statistics of the
    pool) and index files; made afresh in seconds."""
    features = features or FeatureParams()
    frames, logmels = frame_pool(features, distinct_frames), logmel_pool(features, 8)
    rng = np.random.default_rng(1)
    out.mkdir(parents=True, exist_ok=True)
    infos = []
    for shard in range(math.ceil(clips / shard_size)):
        with ShardWriter(out / SHARD_PATTERN.format(shard)) as writer:
            for n in range(shard * shard_size, min((shard + 1) * shard_size, clips)):
                offset = (n * 37) % distinct_frames
                picked = [frames[(offset + k) % distinct_frames] for k in range(features.num_frames)]
                labels = np.sort(rng.choice(num_classes, size=1 + n % 3, replace=False)).astype(np.int32)
                sample = Sample(f"photo{n:06d}_0", picked, logmels[n % len(logmels)], labels, {"source": "photo"})
                writer.add(sample.key, encode_sample(sample, features))
            infos.append(writer.close())
    values = np.stack(logmels).astype(np.float64)
    stats = LogmelStats(values.size, float(values.sum()), float(np.square(values).sum()))
    classes = [{"index": c, "id": f"/m/{c:05d}", "name": f"class {c}"} for c in range(num_classes)]
    Manifest("photo", "train", features, classes, True, infos, stats, [], {}).write(out)
    return out
