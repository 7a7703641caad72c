"""The loaders' contract, defined once: normalization, augmentation parameters, test-time clips, batch keys.

Both `pipelines.torch_loader` and `pipelines.dali_loader` import these; nothing here depends on either.

A batch is a dict:
  video       float32 (B, F, 3, H, W), RGB scaled to [0, 1] then normalized with VIDEO_MEAN / VIDEO_STD
  audio       float32 (B, 1, T, 128), log-mel normalized with the split's manifest mean / std
  labels      float32 (B, C) multi-hot for multi-label splits, int64 (B,) class index for single-label ones
  key         list[str] of clip ids
  clip_index  int64 (B,): which of the `num_test_clips` temporal clips of its sample a row is (0 in training)
In evaluation every (sample, clip) pair appears once across all ranks; a consumer averages logits by key.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

# ViT weights pre-trained with inputs in [-1, 1] (timm augreg, MBT's zero-centering): mean 0.5, std 0.5.
VIDEO_MEAN = (0.5, 0.5, 0.5)
VIDEO_STD = (0.5, 0.5, 0.5)

BATCH_KEYS = ("video", "audio", "labels", "key", "clip_index")

# Training shuffle buffer of a rank, in samples, where the order is a stream (the DALI reader; streamed pipe: splits,
# shared by the workers): about 0.4 GB of encoded samples at the default 8 frames of 256 px and 1000 log-mel frames.
SHUFFLE_BUFFER_SAMPLES = 1024


@dataclass(frozen=True)
class AugmentConfig:
    """Training augmentation and evaluation cropping; the defaults are the MBT/AST recipe at 224 px, 800 frames."""

    crop_px: int = 224
    frames_used: int | None = None  # None: all frames stored; fewer: a random sorted choice in training
    resize_scale: tuple[float, float] = (0.08, 1.0)  # random resized crop: area fraction (Inception crop)
    resize_ratio: tuple[float, float] = (3 / 4, 4 / 3)  # ... and aspect ratio range
    flip_prob: float = 0.5
    eval_short_side_px: int = 256  # evaluation: resize short side to this (a no-op on default shards), centre crop
    audio_frames: int = 800  # log-mel frames fed to the model (AST/MBT: 800 of 1000)
    freq_mask_px: int = 48  # SpecAugment (AST AudioSet sizes): one frequency mask of width U[0, 48) bins
    time_mask_px: int = 192  # ... and one time mask of width U[0, 192) frames
    num_freq_masks: int = 1
    num_time_masks: int = 1
    num_test_clips: int = 4  # evaluation: evenly spaced temporal clips per sample, logits averaged (MBT)
    mixup_alpha: float = 0.0  # training side: Beta(α, α) mixup, one λ for both modalities; 0 turns it off

    def replace(self, **changes: object) -> AugmentConfig:
        return dataclasses.replace(self, **changes)


def frames_fed(augment: AugmentConfig, stored: int) -> int:
    """Frames per clip the loaders feed from shards holding `stored` frames: `augment.frames_used`, or all of them
    (`frames_problem` says when that cannot be)."""
    return augment.frames_used or stored


def frames_problem(augment: AugmentConfig, stored: int) -> str | None:
    """Why the loaders cannot feed `augment.frames_used` frames from shards holding `stored`, or None."""
    fed = frames_fed(augment, stored)
    if not 1 <= fed <= stored:
        return f"frames_used={fed}, but the shards hold {stored} frames"
    return None


def eval_windows(total: int, window: int, num_clips: int) -> list[int]:
    """Start offsets of `num_clips` evenly spaced windows of `window` items over `total` (all 0 if it fits once)."""
    if num_clips < 1:
        raise ValueError(f"num_test_clips must be at least 1, got {num_clips}")
    span = max(total - window, 0)
    if num_clips == 1:
        return [span // 2]
    return [round(i * span / (num_clips - 1)) for i in range(num_clips)]


def centre_crop_box(height: int, width: int, crop_px: int) -> tuple[int, int]:
    """(top, left) of the centred crop_px square in a height x width image."""
    return max((height - crop_px) // 2, 0), max((width - crop_px) // 2, 0)


def eval_resize_shape(height: int, width: int, short_side_px: int) -> tuple[int, int]:
    """(height, width) after resizing the short side to `short_side_px`, aspect kept (rounded as DALI does)."""
    if min(height, width) == short_side_px:
        return height, width
    scale = short_side_px / min(height, width)
    return (short_side_px, round(width * scale)) if height <= width else (round(height * scale), short_side_px)
