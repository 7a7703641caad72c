"""The DALI graph: one `@pipeline_def` function for training and evaluation, on the CPU (`device="cpu"`: tests,
machines without a GPU) or the GPU (`device="gpu"`: JPEG decode with `mixed` decoding, crops, flips, normalization
and SpecAugment on the GPU). It reads the split with DALI's webdataset reader and applies the geometry of
`pipelines.transforms` with DALI operators; `pipelines.dali_loader` runs it.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from pipelines.config import VIDEO_MEAN, VIDEO_STD, AugmentConfig, LoaderError
from pipelines.transforms import eval_windows
from shards.schema import LABELS_EXT, LOGMEL_EXT, frame_ext, split_member_name

try:
    from nvidia.dali import fn, pipeline_def, types
    from nvidia.dali import math as dmath

    DALI_IMPORT_ERROR: ImportError | None = None
except ImportError as _err:  # the module stays importable; DaliLoader() says how to install DALI
    DALI_IMPORT_ERROR = _err

    def pipeline_def(graph: Any) -> Any:
        return graph


READER_NAME = "reader"

OUTPUT_NAMES = ["video", "audio", "labels", "source", "label_ids", "label_count"]

_PIXEL_MEAN = [m * 255 for m in VIDEO_MEAN]

_PIXEL_STD = [s * 255 for s in VIDEO_STD]


@dataclass(frozen=True)
class GraphSpec:
    """What the graph of one split on one rank is built from; all of it is fixed when the pipeline is built."""

    shard_paths: tuple[str, ...]
    index_paths: tuple[str, ...]
    shard_id: int
    num_shards: int
    shuffle_buffer: int
    frames_stored: int
    frames_used: int
    frame_short_side_px: int
    fbank_frames: int
    mel_bins: int
    logmel_mean: float
    logmel_std: float
    num_classes: int
    multi_label: bool
    augment: AugmentConfig

    def frames_read(self, train: bool) -> list[int]:
        """Stored frames the reader outputs: all of them in training, the union of the test windows otherwise."""
        if train:
            return list(range(self.frames_stored))
        starts = eval_windows(self.frames_stored, self.frames_used, self.augment.num_test_clips)
        return sorted({v + i for v in starts for i in range(self.frames_used)})


@pipeline_def
def mbt_pipeline(spec: GraphSpec, train: bool, device: str) -> tuple[Any, ...]:
    """Per sample: video, audio, labels, the reader's source info of the labels member (uint8, zero-padded), and the
    stored class indices (int32, zero-padded) with their count.

    Training: video float32 (F, 3, crop, crop), audio float32 (1, audio_frames, mel_bins).
    Evaluation: video float32 (N, F, 3, crop, crop), audio float32 (N, 1, audio_frames, mel_bins), N test clips.
    Labels: float32 (C,) multi-hot for multi-label splits, else int64 () class index.
    """
    frame_ids = spec.frames_read(train)
    *jpegs, logmel, labels = fn.readers.webdataset(
        paths=list(spec.shard_paths),
        index_paths=list(spec.index_paths),
        ext=[frame_ext(i) for i in frame_ids] + [LOGMEL_EXT, LABELS_EXT],
        dtypes=[types.UINT8] * len(frame_ids) + [types.FLOAT16, types.INT32],
        missing_component_behavior="error",
        shard_id=spec.shard_id,
        num_shards=spec.num_shards,
        stick_to_shard=True,
        random_shuffle=train,
        initial_fill=spec.shuffle_buffer,
        pad_last_batch=not train,
        name=READER_NAME,
    )
    decoder = "mixed" if device == "gpu" else "cpu"
    # fancy upsampling: the GPU decoder upsamples chroma as libjpeg-turbo does on the CPU (and torchvision)
    decoded = [fn.decoders.image(j, device=decoder, output_type=types.RGB, jpeg_fancy_upsampling=True) for j in jpegs]
    frames = fn.stack(*decoded, axis_name="F")
    mel = fn.reshape(fn.cast(logmel, dtype=types.FLOAT), shape=[spec.fbank_frames, spec.mel_bins])
    if device == "gpu":
        mel = mel.gpu()
    if train:
        video, audio = train_video(frames, spec), train_audio(mel, spec)
    else:
        video, audio = eval_video(frames, spec, frame_ids), eval_audio(mel, spec)
    if spec.multi_label:
        targets = fn.reductions.sum(fn.one_hot(labels, num_classes=spec.num_classes, axis=-1), axes=[0])
    else:
        targets = fn.cast(labels[0], dtype=types.INT64)
    if device == "gpu":
        targets = targets.gpu()
    source = fn.pad(fn.get_property(labels, key="source_info"), fill_value=0)
    # The stored class indices and their count, checked on the host: DALI would one-hot -1 or 527 silently.
    return video, audio, targets, source, fn.pad(labels, fill_value=0), labels.shape()


def random_int(high: Any) -> Any:
    """int32 () per sample, uniform over [0, high); `high` an int or a per-sample DataNode, at least 1."""
    draw = dmath.floor(fn.random.uniform(range=[0.0, 1.0]) * high)
    return fn.cast(dmath.clamp(draw, 0, high - 1), dtype=types.INT32)  # u * high can round up to high


def random_sorted_subset(total: int, size: int) -> Any:
    """int32 (size,) per sample: a uniformly random subset of range(total), ascending.

    Item i is kept when fewer than `size` random keys lie below its own; the k-th kept item is the number of items
    whose running count of kept items (inclusive) is at most k.
    """

    def count(flags: Any, axis: int) -> Any:
        return fn.reductions.sum(fn.cast(flags, dtype=types.INT32), axes=[axis])

    keys = fn.random.uniform(range=[0.0, 1.0], shape=[total])
    kept = fn.cast(
        count(fn.reshape(keys, shape=[1, total]) < fn.reshape(keys, shape=[total, 1]), 1) < size, dtype=types.INT32
    )
    upto = fn.constant(idata=np.tril(np.ones((total, total), np.int32)).ravel().tolist(), shape=[total, total])
    running = fn.reductions.sum(upto * fn.reshape(kept, shape=[1, total]), axes=[1])
    positions = fn.constant(idata=list(range(size)), shape=[1, size])
    return fn.cast(count(fn.reshape(running, shape=[total, 1]) <= positions, 0), dtype=types.INT32)


def normalize_frames(frames: Any, mirror: Any = 0) -> Any:
    """float32 (F, 3, H, W) from uint8 (F, H, W, 3): scaled to [0, 1], minus VIDEO_MEAN, over VIDEO_STD."""
    return fn.crop_mirror_normalize(
        frames, mirror=mirror, mean=_PIXEL_MEAN, std=_PIXEL_STD, dtype=types.FLOAT, output_layout="FCHW"
    )


def train_video(frames: Any, spec: GraphSpec) -> Any:
    """float32 (F, 3, crop, crop): frames_used sorted frames, one random resized crop and one flip for all of them."""
    aug = spec.augment
    if spec.frames_used < spec.frames_stored:  # all frames were decoded: DALI cannot pick reader outputs per sample
        frames = fn.sequence_rearrange(frames, new_order=random_sorted_subset(spec.frames_stored, spec.frames_used))
    crops = fn.random_resized_crop(
        frames, size=[aug.crop_px, aug.crop_px], random_area=list(aug.resize_scale),
        random_aspect_ratio=list(aug.resize_ratio),
    )  # fmt: skip
    return normalize_frames(crops, mirror=fn.random.coin_flip(probability=aug.flip_prob))


def eval_video(frames: Any, spec: GraphSpec, frame_ids: list[int]) -> Any:
    """float32 (N, F, 3, crop, crop): the torch loader's test clips: short side resized to eval_short_side_px when
    the shards' is another, centre crop at centre_crop_box (top/left rounded down), normalized."""
    aug = spec.augment
    if spec.frame_short_side_px != aug.eval_short_side_px:  # the shards' frames all have that short side
        frames = fn.resize(frames, resize_shorter=aug.eval_short_side_px)
    top_left = (frames.shape(dtype=types.INT32)[1:3] - aug.crop_px) // 2
    crops = fn.slice(frames, start=top_left, shape=[aug.crop_px, aug.crop_px], axes=[1, 2])
    starts = eval_windows(spec.frames_stored, spec.frames_used, aug.num_test_clips)
    order = [frame_ids.index(v + i) for v in starts for i in range(spec.frames_used)]
    clips = fn.sequence_rearrange(normalize_frames(crops), new_order=order)
    return fn.reshape(clips, shape=[aug.num_test_clips, spec.frames_used, 3, aug.crop_px, aug.crop_px], layout="")


def normalize_audio(window: Any, spec: GraphSpec) -> Any:
    return (window - spec.logmel_mean) / spec.logmel_std


def audio_window(mel: Any, start: Any, frames: int) -> Any:
    """(frames, mel_bins) from row `start`, zero-padded past the end (before normalization, as the torch loader)."""
    return fn.slice(mel, start=start, shape=[frames], axes=[0], out_of_bounds_policy="pad", fill_values=0)


def train_audio(mel: Any, spec: GraphSpec) -> Any:
    """float32 (1, audio_frames, mel_bins): a random window, normalized, then SpecAugment's bands set to 0."""
    aug = spec.augment
    start = random_int(max(spec.fbank_frames - aug.audio_frames, 0) + 1)
    audio = normalize_audio(audio_window(mel, fn.reshape(start, shape=[1]), aug.audio_frames), spec)
    bands = (
        (1, spec.mel_bins, aug.freq_mask_px, aug.num_freq_masks),
        (0, aug.audio_frames, min(aug.time_mask_px, aug.audio_frames), aug.num_time_masks),
    )
    for axis, extent, max_width, count in bands:
        if max_width <= 0 or count <= 0:
            continue
        widths = [random_int(max_width) for _ in range(count)]
        starts = [random_int(extent - width + 1) for width in widths]
        audio = fn.erase(
            audio, anchor=fn.cast(fn.stack(*starts), dtype=types.FLOAT),
            shape=fn.cast(fn.stack(*widths), dtype=types.FLOAT), axes=[axis], fill_value=0.0,
        )  # fmt: skip
    return fn.expand_dims(audio, axes=[0])


def eval_audio(mel: Any, spec: GraphSpec) -> Any:
    """float32 (N, 1, audio_frames, mel_bins): the torch loader's evenly spaced windows, normalized."""
    aug = spec.augment
    starts = eval_windows(spec.fbank_frames, aug.audio_frames, aug.num_test_clips)
    windows = [fn.expand_dims(audio_window(mel, [a], aug.audio_frames), axes=[0]) for a in starts]
    return normalize_audio(fn.stack(*windows), spec)


def dali_cause(message: str) -> str:
    """The failing operator and DALI's reason from a pipeline error message, on one line."""
    lines = [line.strip() for line in message.splitlines() if line.strip()]
    operator = next((line.rstrip(",") for line in lines if line.startswith("Error in")), "")
    reason = lines[lines.index("encountered:") + 1] if "encountered:" in lines[:-1] else lines[0] if lines else ""
    return f"{operator}: {reason}" if operator else reason


def dali_device(device: str | torch.device) -> tuple[str, int | None]:
    """("cpu", None) or ("gpu", CUDA device id) for "cpu", "gpu", "cuda", "cuda:1" or a torch.device."""
    try:
        parsed = torch.device("cuda" if device == "gpu" else device)
    except (RuntimeError, TypeError):
        parsed = None
    if parsed is None or parsed.type not in ("cpu", "cuda"):
        raise LoaderError(f"device must be 'cpu', 'gpu' or a CUDA device, got {device!r}")
    if parsed.type == "cpu":
        return "cpu", None
    if not torch.cuda.is_available():
        raise LoaderError(f"device {device!r} needs CUDA; use device='cpu' or the torch loader")
    return "gpu", torch.cuda.current_device() if parsed.index is None else parsed.index


def key_of_source(source: np.ndarray) -> str:
    """The sample key from a reader's zero-padded source info, `<tar path>:<offset>:<key>.<ext>`."""
    member = source.tobytes().rstrip(b"\0").decode().rsplit(":", 1)[-1]
    return split_member_name(member)[0]
