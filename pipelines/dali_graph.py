"""The DALI graph: one `@pipeline_def` function for training and evaluation, on the CPU (`device="cpu"`: tests,
machines without a GPU) or the GPU (`device="gpu"`: JPEG decode with `mixed` decoding, crops, flips, normalization
and SpecAugment on the GPU). It reads the split with DALI's webdataset reader and applies the geometry of
`pipelines.transforms` with DALI operators; `pipelines.dali_loader` runs it.
"""

from __future__ import annotations

from dataclasses import dataclass
from types import SimpleNamespace
from typing import Any

import numpy as np
import torch

from pipelines.augment import (
    BRIGHTNESS_DELTA,
    CONTRAST_RANGE,
    HUE_DELTA,
    IDENTITY_COLOR,
    SATURATION_RANGE,
    scale_jitter_window,
)
from pipelines.config import VIDEO_MEAN, VIDEO_STD, AugmentConfig, LoaderError
from pipelines.dali_windows import Logmel, audio_window, random_int, real_rows, select_members, train_window
from pipelines.windows import eval_clips
from shards.schema import LABELS_EXT, LOGMEL_EXT, FeatureParams, frame_ext, split_member_name

try:
    from nvidia.dali import fn, pipeline_def, types
    from nvidia.dali import math as dmath

    DALI_IMPORT_ERROR: ImportError | None = None
except ImportError as _err:  # the module stays importable; DaliLoader() says how to install DALI
    DALI_IMPORT_ERROR = _err

    def pipeline_def(graph: Any) -> Any:
        return graph


READER_NAME = "reader"

OUTPUT_NAMES = ["video", "audio", "labels", "source", "label_ids", "label_count", "color"]

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
    features: FeatureParams
    frames_used: int
    logmel_mean: float
    logmel_std: float
    num_classes: int
    multi_label: bool
    augment: AugmentConfig

    def frames_read(self, train: bool) -> list[int]:
        """Stored frames the reader outputs: all of them in training, the ones the test clips show otherwise."""
        if train:
            return list(range(self.features.num_frames))
        return sorted({int(i) for ids, _ in eval_clips(self.augment, self.features) for i in ids})


@pipeline_def
def mbt_pipeline(spec: GraphSpec, train: bool, device: str) -> tuple[Any, ...]:
    """Per sample: video, audio, labels, the reader's source info of the labels member (uint8, zero-padded), the
    stored class indices (int32, zero-padded) with their count, and the clip's colour augmentation parameters
    (`pipelines.augment.color_params`' layout; the loader applies them with `apply_color`, as the torch loader does).

    Training: video float32 (F, 3, crop, crop), audio float32 (1, audio_frames, mel_bins).
    Evaluation: video float32 (N, F, 3, crop, crop), audio float32 (N, 1, audio_frames, mel_bins), N test clips.
    Labels: float32 (C,) multi-hot for multi-label splits, else int64 () class index.
    """
    frames_read = spec.frames_read(train)
    *jpegs, logmel, labels = fn.readers.webdataset(
        paths=list(spec.shard_paths),
        index_paths=list(spec.index_paths),
        ext=[frame_ext(i) for i in frames_read] + [LOGMEL_EXT, LABELS_EXT],
        dtypes=[types.UINT8] * len(frames_read) + [types.FLOAT16, types.INT32],
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
    features = spec.features
    values = fn.reshape(fn.cast(logmel, dtype=types.FLOAT), shape=[features.fbank_frames, features.num_mel_bins])
    # the real rows only where audio_pad repeats them: the zeros graph keeps its operators as they were
    real = real_rows(values, features.fbank_frames) if spec.augment.audio_pad == "repeat" else None
    mel = Logmel(values.gpu() if device == "gpu" else values, real)
    if train:
        ids, start = train_window(spec.augment, spec.features)
        chosen = select_members(jpegs, ids, spec.frames_used)
        video, audio, color = train_video(chosen, spec, decoder), train_audio(mel, spec, start), color_params(spec)
    else:
        video, audio = eval_video(jpegs, spec, frames_read, decoder), eval_audio(mel, spec)
        color = fn.constant(fdata=list(IDENTITY_COLOR), shape=[len(IDENTITY_COLOR)])
    if spec.multi_label:
        targets = fn.reductions.sum(fn.one_hot(labels, num_classes=spec.num_classes, axis=-1), axes=[0])
    else:
        targets = fn.cast(labels[0], dtype=types.INT64)
    if device == "gpu":
        targets = targets.gpu()
    source = fn.pad(fn.get_property(labels, key="source_info"), fill_value=0)
    # The stored class indices and their count, checked on the host: DALI would one-hot -1 or 527 silently.
    return video, audio, targets, source, fn.pad(labels, fill_value=0), labels.shape(), color


def normalize_frames(frames: Any, mirror: Any = 0) -> Any:
    """float32 (F, 3, H, W) from uint8 (F, H, W, 3): scaled to [0, 1], minus VIDEO_MEAN, over VIDEO_STD."""
    return fn.crop_mirror_normalize(
        frames, mirror=mirror, mean=_PIXEL_MEAN, std=_PIXEL_STD, dtype=types.FLOAT, output_layout="FCHW"
    )


# `pipelines.augment.scale_jitter_window`'s operations on DataNodes
DALI_OPS = (
    SimpleNamespace(floor=dmath.floor, minimum=dmath.min, maximum=dmath.max) if DALI_IMPORT_ERROR is None else None
)


def crop_window(jpeg: Any, spec: GraphSpec) -> tuple[Any, Any]:
    """(anchor, extent) int32 (2,) per sample, as (rows, columns): the training crop of a clip whose frames have the
    size of `jpeg`'s (read from its header): `pipelines.augment.scale_jitter_window` drawn with DALI's generators,
    or DALI's Inception-style `random_crop_generator` (`video_crop="inception"`)."""
    aug = spec.augment
    shape = fn.peek_image_shape(jpeg, dtype=types.INT32)
    if aug.video_crop == "scale_jitter":
        size = fn.cast(shape[0:2], dtype=types.FLOAT)
        scales = fn.random.uniform(range=list(aug.scale_jitter), shape=[2])
        anchor, extent = scale_jitter_window(
            size, scales, fn.random.uniform(range=[0.0, 1.0], shape=[2]), aug, DALI_OPS
        )
    else:
        anchor, extent = fn.random_crop_generator(
            shape[0:2], random_area=list(aug.resize_scale), random_aspect_ratio=list(aug.resize_ratio)
        )
    return fn.cast(anchor, dtype=types.INT32), fn.cast(extent, dtype=types.INT32)


def decode_window(jpeg: Any, anchor: Any, extent: Any, decoder: str) -> Any:
    """uint8 (h, w, 3): the window at `anchor` of size `extent` (rows, columns) of a JPEG, decoding only that
    region where the decoder can (ROI decoding)."""
    return fn.decoders.image_slice(
        jpeg, anchor, extent, device=decoder, axis_names="HW", normalized_anchor=False, normalized_shape=False,
        output_type=types.RGB, jpeg_fancy_upsampling=True,
    )  # fmt: skip


def train_video(chosen: list[Any], spec: GraphSpec, decoder: str) -> Any:
    """float32 (frames_used, 3, crop, crop) from the clip's chosen encoded frames: one crop window (`crop_window`)
    decoded from each frame (nothing outside it is decoded), resized to crop_px, one flip for all of them."""
    aug = spec.augment
    anchor, extent = crop_window(chosen[0], spec)
    frames = fn.stack(*[decode_window(j, anchor, extent, decoder) for j in chosen], axis_name="F")
    crops = fn.resize(frames, size=[aug.crop_px, aug.crop_px], antialias=True)
    return normalize_frames(crops, mirror=fn.random.coin_flip(probability=aug.flip_prob))


def color_params(spec: GraphSpec) -> Any:
    """float32 (5,) per sample: `pipelines.augment.color_params` drawn with DALI's generators (the identity where
    the colour augmentation or the grey drop is not drawn)."""
    aug = spec.augment
    on = fn.cast(fn.random.coin_flip(probability=aug.color_prob), dtype=types.FLOAT)
    drawn = [
        fn.random.uniform(range=[-BRIGHTNESS_DELTA, BRIGHTNESS_DELTA]),
        fn.random.uniform(range=list(SATURATION_RANGE)),
        fn.random.uniform(range=list(CONTRAST_RANGE)),
        fn.random.uniform(range=[-HUE_DELTA, HUE_DELTA]),
    ]
    params = [identity + (value - identity) * on for value, identity in zip(drawn, IDENTITY_COLOR, strict=False)]
    params.append(fn.cast(fn.random.coin_flip(probability=aug.color_drop_prob), dtype=types.FLOAT))
    return fn.stack(*params)


def eval_video(jpegs: list[Any], spec: GraphSpec, frames_read: list[int], decoder: str) -> Any:
    """float32 (N, F, 3, crop, crop): the torch loader's test clips: the frames of each synchronized window, short
    side resized to eval_short_side_px when the shards' is another, centre crop at centre_crop_box (top/left rounded
    down), normalized. Where no resize is needed only the centre crop is decoded."""
    aug = spec.augment
    if spec.features.short_side_px == aug.eval_short_side_px >= aug.crop_px:  # all frames have that short side
        shape = fn.peek_image_shape(jpegs[0], dtype=types.INT32)[0:2]
        anchor, extent = (shape - aug.crop_px) // 2, fn.constant(idata=[aug.crop_px] * 2, dtype=types.INT32)
        crops = fn.stack(*[decode_window(j, anchor, extent, decoder) for j in jpegs], axis_name="F")
    else:
        frames = fn.stack(*[decode_frame(j, decoder) for j in jpegs], axis_name="F")
        if spec.features.short_side_px != aug.eval_short_side_px:
            frames = fn.resize(frames, resize_shorter=aug.eval_short_side_px)
        top_left = (frames.shape(dtype=types.INT32)[1:3] - aug.crop_px) // 2
        crops = fn.slice(frames, start=top_left, shape=[aug.crop_px, aug.crop_px], axes=[1, 2])
    order = [frames_read.index(int(i)) for ids, _ in eval_clips(aug, spec.features) for i in ids]
    clips = fn.sequence_rearrange(normalize_frames(crops), new_order=order)
    return fn.reshape(clips, shape=[aug.num_test_clips, spec.frames_used, 3, aug.crop_px, aug.crop_px], layout="")


def decode_frame(jpeg: Any, decoder: str) -> Any:
    """uint8 (H, W, 3); fancy upsampling: the GPU decoder upsamples chroma as libjpeg-turbo does on the CPU (and
    torchvision)."""
    return fn.decoders.image(jpeg, device=decoder, output_type=types.RGB, jpeg_fancy_upsampling=True)


def normalize_audio(window: Any, spec: GraphSpec) -> Any:
    return (window - spec.logmel_mean) / spec.logmel_std


def train_audio(mel: Logmel, spec: GraphSpec, start: Any) -> Any:
    """float32 (1, audio_frames, mel_bins): the window at `start`, normalized, then SpecAugment's bands set to 0."""
    aug = spec.augment
    audio = normalize_audio(audio_window(mel, start, aug), spec)
    bands = (
        (1, spec.features.num_mel_bins, aug.freq_mask_px, aug.num_freq_masks),
        (0, aug.audio_frames, aug.time_mask_px, aug.num_time_masks),
    )
    for axis, extent, max_width, count in bands:  # widths and starts drawn as `pipelines.augment.spec_augment`'s
        if max_width <= 0 or count <= 0:
            continue
        widths = [dmath.min(random_int(max_width), extent) for _ in range(count)]
        starts = [random_int(extent - width + 1) for width in widths]
        audio = fn.erase(
            audio, anchor=fn.cast(fn.stack(*starts), dtype=types.FLOAT),
            shape=fn.cast(fn.stack(*widths), dtype=types.FLOAT), axes=[axis], fill_value=0.0,
        )  # fmt: skip
    return fn.expand_dims(audio, axes=[0])


def eval_audio(mel: Logmel, spec: GraphSpec) -> Any:
    """float32 (N, 1, audio_frames, mel_bins): the torch loader's test clips' windows, normalized."""
    clips = eval_clips(spec.augment, spec.features)
    windows = [fn.expand_dims(audio_window(mel, int(start), spec.augment), axes=[0]) for _, start in clips]
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


def parse_source(source: np.ndarray) -> tuple[str, int, str]:
    """(tar path, payload offset, sample key) of a reader's zero-padded source info, `<tar path>:<offset>:<name>`
    (DALI takes the offset and the name from the index file)."""
    path, offset, member = source.tobytes().rstrip(b"\0").decode().rsplit(":", 2)
    return path, int(offset), split_member_name(member)[0]
