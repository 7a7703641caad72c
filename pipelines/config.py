"""The loaders' contract, defined once: normalization, augmentation parameters, test-time clips, batch keys, the
options every loader is built from (`LoaderOptions`, validated once) and its error type.

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
import os
from dataclasses import dataclass, field
from typing import Any

from shards.manifest import LogmelStats
from shards.schema import FeatureParams

# ViT weights pre-trained with inputs in [-1, 1] (timm augreg, MBT's zero-centering): mean 0.5, std 0.5.
VIDEO_MEAN = (0.5, 0.5, 0.5)
VIDEO_STD = (0.5, 0.5, 0.5)

BATCH_KEYS = ("video", "audio", "labels", "key", "clip_index")

# Training shuffle buffer of a rank, in samples, where the order is a stream (the DALI reader; streamed pipe: splits,
# shared by the workers): about 0.8 GB of encoded samples at the default 20 frames of 256 px (758 KB each); 6.5 GB at
# 25 frames per second (6.5 MB each: `--preset scenic_as` keeps 128).
SHUFFLE_BUFFER_SAMPLES = 1024


class LoaderError(RuntimeError):
    """The shards cannot be read as asked; the message names the shard/key and says what to do."""


VIDEO_CROPS = ("scale_jitter", "inception")
# Which stored frames a clip shows (`pipelines.windows`): spread over its audio window (this project's), or
# consecutive at a stride from where the audio window starts (scenic's DMVR sampling).
FRAME_SAMPLINGS = ("spread", "consecutive")
# What fills an audio window past the clip's real log-mel: zeros (AST's ZeroPad2d) or the log-mel again from its
# start (DMVR's `sample_sequence`, which tiles a short sequence).
AUDIO_PADS = ("zeros", "repeat")


@dataclass(frozen=True)
class AugmentConfig:
    """Training augmentation and evaluation cropping; the defaults are MBT's reference (scenic's AudioSet config,
    DMVR's ops) at 224 px, 8 frames and 800 log-mel frames. `pipelines.augment` says what each does."""

    crop_px: int = 224
    # Frames per clip (None: as many as stored), taken by `frame_sampling`: "spread", one from each of `frames_used`
    # equal parts of the clip's audio window; "consecutive", every `frame_stride`-th stored frame from the window's
    # start (scenic: 32 at stride 2 of 25 per second, 2.56 s).
    frames_used: int | None = 8
    frame_sampling: str = "spread"
    frame_stride: int = 1
    video_crop: str = "scale_jitter"  # scenic: resize, scale each axis by U(scale_jitter), random crop; or "inception"
    scale_jitter: tuple[float, float] = (0.9, 1.33)  # scenic's scale_min_factor, scale_max_factor
    resize_scale: tuple[float, float] = (0.08, 1.0)  # "inception": random resized crop, area fraction (AST, timm)
    resize_ratio: tuple[float, float] = (3 / 4, 4 / 3)  # ... and aspect ratio range
    flip_prob: float = 0.5
    color_prob: float = 0.8  # DMVR colour augmentation (scenic's prob_color_augment)
    color_drop_prob: float = 0.1  # ... and grey scale (scenic's prob_color_drop)
    eval_short_side_px: int = 256  # frames resized to this short side before cropping (scenic's min_resize)
    audio_frames: int = 800  # log-mel frames fed to the model (MBT: 800 of 1000, 8 s)
    audio_pad: str = "zeros"  # a window past the clip's real log-mel: zeros, or "repeat" it from its start (scenic)
    freq_mask_px: int = 48  # SpecAugment as scenic runs it (lingvo's): frequency masks of width U[0, 48) bins
    time_mask_px: int = 48  # ... and time masks of width U[0, 48) frames, where num_time_masks > 0 (AST: U[0, 192))
    num_freq_masks: int = 1
    # scenic's config lists 4 time masks and a time warp but sets their max ratios to 0: lingvo applies neither
    num_time_masks: int = 0
    num_test_clips: int = 4  # evaluation: evenly spaced synchronized clips per sample, logits averaged (MBT)
    mixup_alpha: float = 0.0  # training side: Beta(α, α) mixup, one λ for both modalities; 0 turns it off
    # Log-mel normalization: the model's (its training split's statistics, which training fills in and checkpoints
    # keep); None reads the split's own manifest statistics.
    logmel_mean: float | None = None
    logmel_std: float | None = None

    def __post_init__(self) -> None:
        choices_of = {"video_crop": VIDEO_CROPS, "frame_sampling": FRAME_SAMPLINGS, "audio_pad": AUDIO_PADS}
        for name, choices in choices_of.items():
            if getattr(self, name) not in choices:
                raise ValueError(f"{name} must be one of {', '.join(choices)}, got {getattr(self, name)!r}")

    def replace(self, **changes: object) -> AugmentConfig:
        return dataclasses.replace(self, **changes)


def logmel_norm(augment: AugmentConfig, stats: LogmelStats) -> tuple[float, float]:
    """(mean, std) log-mels are normalized with: the model's (`augment.logmel_mean`, `augment.logmel_std`), each
    where it is set, else the split's statistics `stats` (its manifest's). The one normalization rule: training
    writes its answer for the training split into the config (`with_logmel_norm`), the loaders normalize by it, and
    a checkpoint that records no normalization (`records_logmel_norm`) is evaluated and served by it."""
    mean = stats.mean if augment.logmel_mean is None else augment.logmel_mean
    std = stats.std if augment.logmel_std is None else augment.logmel_std
    return mean, std


def with_logmel_norm(augment: AugmentConfig, stats: LogmelStats) -> AugmentConfig:
    """`augment` with the normalization `logmel_norm` gives for the split of statistics `stats` written in: both
    fields set, so that config.yaml, checkpoints and exports keep the model's normalization."""
    mean, std = logmel_norm(augment, stats)
    return augment.replace(logmel_mean=mean, logmel_std=std)


def records_logmel_norm(augment: AugmentConfig) -> bool:
    """Whether `augment` holds the model's whole log-mel normalization, so that no split's statistics are asked for
    (the config of an older checkpoint does not)."""
    return augment.logmel_mean is not None and augment.logmel_std is not None


def frames_fed(augment: AugmentConfig, stored: int) -> int:
    """Frames per clip the loaders feed from shards holding `stored` frames: `augment.frames_used`, or all of them
    (`frames_problem` says when that cannot be)."""
    return augment.frames_used or stored


def consecutive_misfit(augment: AugmentConfig, features: FeatureParams) -> tuple[float, float, float] | None:
    """(seconds the clip's frames span, seconds of the audio window, the least frame rate that fits them) when
    `frame_sampling` is "consecutive" and its frames at `frame_stride` need more stored frames than a clip of
    `features` holds or span more time than the audio window; None otherwise."""
    if augment.frame_sampling != "consecutive":
        return None
    fed, stride = frames_fed(augment, features.num_frames), augment.frame_stride
    span = (fed - 1) * stride + 1
    clip_s, audio_s = fed * stride / features.frames_per_s, augment.audio_frames * features.frame_shift_ms / 1000
    if span <= features.num_frames and clip_s <= audio_s:
        return None
    return clip_s, audio_s, max(fed * stride / audio_s, span / features.segment_s)


def frames_problem(augment: AugmentConfig, features: FeatureParams) -> str | None:
    """Why the loaders cannot feed `augment.frames_used` frames from shards of `features`, or None: more frames than
    stored, or consecutive frames that do not fit (`consecutive_misfit`)."""
    stored = features.num_frames
    fed = frames_fed(augment, stored)
    if not 1 <= fed <= stored:
        return f"frames_used={fed}, but the shards hold {stored} frames"
    if misfit := consecutive_misfit(augment, features):
        clip_s, audio_s, least_fps = misfit
        return (
            f"frames_used={fed} consecutive frames at frame_stride={augment.frame_stride} span {clip_s:g} s of shards "
            f"of {features.frames_per_s:g} frames per second ({stored} per clip), more than the {audio_s:g} s audio "
            f"window or the clip: shards of at least {least_fps:g} frames per second are needed"
        )
    return None


@dataclass(frozen=True)
class LoaderOptions:
    """How a loader reads its split on this rank, one for both loaders, validated when made (`resolve`).

    `device`: where batches are delivered ("cpu", "cuda[:N]", DALI's "gpu" or a torch.device); `num_threads`: DALI's
    CPU threads (default `num_workers`, at least 1); `shuffle_buffer`: the rank's training shuffle buffer in samples
    where the order is a stream (DALI's reader, streamed splits).
    """

    train: bool
    batch_size: int
    rank: int
    world_size: int
    num_workers: int = 2
    seed: int = 0
    augment: AugmentConfig = field(default_factory=AugmentConfig)
    skip_bad_samples: bool = False
    device: Any = "cpu"
    shuffle_buffer: int = SHUFFLE_BUFFER_SAMPLES
    num_threads: int | None = None

    @classmethod
    def resolve(
        cls,
        train: bool,
        batch_size: int,
        rank: int | None = None,
        world_size: int | None = None,
        augment: AugmentConfig | None = None,
        **options: Any,
    ) -> LoaderOptions:
        """The options of this process: rank and world size as given, else torchrun's RANK / WORLD_SIZE, else 0 of
        1; LoaderError naming the value that cannot work."""
        rank = int(os.environ.get("RANK", 0)) if rank is None else rank
        world_size = int(os.environ.get("WORLD_SIZE", 1)) if world_size is None else world_size
        resolved = cls(train, batch_size, rank, world_size, augment=augment or AugmentConfig(), **options)
        if batch_size < 1:
            raise LoaderError(f"batch_size must be at least 1, got {batch_size}")
        if resolved.shuffle_buffer < 1:
            raise LoaderError(f"shuffle_buffer must be at least 1, got {resolved.shuffle_buffer}")
        if not 0 <= rank < world_size:
            raise LoaderError(f"rank {rank} is not in a world of size {world_size}")
        return resolved
