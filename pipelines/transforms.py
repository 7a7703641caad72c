"""The data path from a sample's raw members to its rows, shared by both loaders: JPEG decode, evaluation crops,
log-mel windows, normalization, labels (the contract of `pipelines.config`; which frames and log-mel rows a row shows
is `pipelines.windows`, training's random augmentation `pipelines.augment`). The PyTorch loader runs
`SampleBuilder`; the DALI graph (`pipelines.dali_graph`) runs the same geometry (`pipelines.windows`,
`centre_crop_box`, `eval_resize_shape`) with DALI operators.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch
from torchvision.io import ImageReadMode, decode_jpeg

from pipelines.augment import IDENTITY_COLOR, apply_color, color_params, spec_augment, train_video
from pipelines.config import VIDEO_MEAN, VIDEO_STD, AugmentConfig, LoaderError, frames_problem, logmel_norm
from pipelines.windows import audio_window, eval_clips, train_window
from shards.manifest import Manifest
from shards.schema import (
    LABELS_EXT,
    LOGMEL_EXT,
    SchemaError,
    frame_ext,
    frame_size_problem,
    parse_labels,
    parse_logmel,
)
from shards.text import printable


def centre_crop_box(height: int, width: int, crop_px: int) -> tuple[int, int]:
    """(top, left) of the centred crop_px square in a height x width image."""
    return max((height - crop_px) // 2, 0), max((width - crop_px) // 2, 0)


def eval_resize_shape(height: int, width: int, short_side_px: int) -> tuple[int, int]:
    """(height, width) after resizing the short side to `short_side_px`, aspect kept (rounded as DALI does)."""
    if min(height, width) == short_side_px:
        return height, width
    scale = short_side_px / min(height, width)
    return (short_side_px, round(width * scale)) if height <= width else (round(height * scale), short_side_px)


def decode_jpegs(jpegs: list[bytes]) -> list[torch.Tensor]:
    """uint8 (3, H, W) RGB of each JPEG (torchvision's decode_jpeg: libjpeg-turbo)."""
    return [decode_jpeg(torch.frombuffer(bytearray(data), dtype=torch.uint8), mode=ImageReadMode.RGB) for data in jpegs]


def stack_frames(frames: list[torch.Tensor]) -> torch.Tensor:
    """uint8 (F, 3, H, W) in channels-last memory from (3, H, W) frames (one copy, and the layout the uint8 resize is
    fast on)."""
    return torch.stack([image.permute(1, 2, 0) for image in frames]).permute(0, 3, 1, 2)


def decode_frames(jpegs: list[bytes]) -> torch.Tensor:
    """uint8 (F, 3, H, W) in channels-last memory."""
    return stack_frames(decode_jpegs(jpegs))


_INV_STD = 1 / torch.tensor(VIDEO_STD)  # on [0, 1] pixels

_BIAS = -torch.tensor(VIDEO_MEAN) * _INV_STD


def normalize_video(frames_hwc: torch.Tensor, color: torch.Tensor | None = None) -> torch.Tensor:
    """float32 (..., 3, H, W) from uint8 (B, F, H, W, 3) RGB: scaled to [0, 1], colour-augmented with each clip's
    `color` parameters (B, 5) if given (`pipelines.augment.apply_color`), minus VIDEO_MEAN, over VIDEO_STD.

    Done once per batch by the consumer (on its device), so that workers pass uint8, 4x less to move; on the
    contiguous channels-last buffer, which is 5x faster than on the (..., 3, H, W) view; in one fused pass
    (addcmul reads the uint8 and writes the float: 2.5x faster than converting, subtracting and scaling).
    """
    device = frames_hwc.device
    if color is not None and not bool((color == torch.tensor(IDENTITY_COLOR)).all()):
        video = apply_color(frames_hwc.float().div_(255), color)
        return torch.addcmul(_BIAS.to(device), video, _INV_STD.to(device)).movedim(-1, -3)
    scale = (_INV_STD / 255).to(device)
    return torch.addcmul(_BIAS.to(device), frames_hwc, scale).movedim(-1, -3)


def eval_video(frames: torch.Tensor, aug: AugmentConfig) -> torch.Tensor:
    """uint8 (F, 3, crop, crop): short side resized to eval_short_side_px (if it is not already), centre crop."""
    height, width = eval_resize_shape(frames.shape[-2], frames.shape[-1], aug.eval_short_side_px)
    if (height, width) != tuple(frames.shape[-2:]):
        frames = torch.nn.functional.interpolate(frames, size=(height, width), mode="bilinear", antialias=True)
    top, left = centre_crop_box(height, width, aug.crop_px)
    return frames[..., top : top + aug.crop_px, left : left + aug.crop_px]


def decode_members(
    where: str, raw: dict[str, bytes], frame_ids: list[int], manifest: Manifest
) -> tuple[list[torch.Tensor], np.ndarray, np.ndarray]:
    """The frames `frame_ids` decoded (uint8 (3, H, W) each), the log-mel (float16 (T, bins)) and the class indices of
    a sample's raw members, each checked first (a frame claiming a size other than the split's is not decoded; a
    non-finite log-mel or labels outside the classes are refused): LoaderError naming `where` otherwise. Both loaders'
    one check of a sample's members (the DALI loader runs it to name a sample its graph failed on)."""
    exts = [frame_ext(i) for i in frame_ids] + [LOGMEL_EXT, LABELS_EXT]
    if missing := [ext for ext in exts if ext not in raw]:
        raise LoaderError(f"{where}: no member {', '.join(missing)}")
    features = manifest.features
    for i in frame_ids:  # a frame claiming a huge size must not be decoded
        if problem := frame_size_problem(raw[frame_ext(i)], features.short_side_px, frame_ext(i)):
            raise LoaderError(f"{where}: bad JPEG ({problem})")
    try:
        decoded = decode_jpegs([raw[frame_ext(i)] for i in frame_ids])
    except RuntimeError as err:
        raise LoaderError(f"{where}: bad JPEG ({err})") from err
    try:
        logmel = parse_logmel(raw[LOGMEL_EXT], features)
        labels = parse_labels(raw[LABELS_EXT], manifest.num_classes, manifest.multi_label)
    except SchemaError as err:
        raise LoaderError(f"{where}: {err}") from None
    return decoded, logmel, labels


class SampleBuilder:
    """Rows of one sample from its raw members: frame choice, JPEG decode, crops, log-mel windows, labels (the
    contract of `pipelines.config`); 1 augmented row in training, `num_test_clips` rows in evaluation."""

    def __init__(self, manifest: Manifest, train: bool, augment: AugmentConfig) -> None:
        self.train, self.aug = train, augment
        features = manifest.features
        self.frames_stored = features.num_frames
        if problem := frames_problem(augment, features):
            raise LoaderError(problem)
        self.manifest = manifest
        self.mean, self.std = logmel_norm(augment, manifest.logmel)
        self.multi_label = manifest.multi_label
        self.num_classes = manifest.num_classes

    def windows(self, rng: np.random.Generator | None) -> list[tuple[np.ndarray, int]]:
        """(frame ids, log-mel start) of each row (`pipelines.windows`): one drawn with `rng` in training, the
        `num_test_clips` test clips in evaluation."""
        if self.train:
            assert rng is not None
            return [train_window(rng, self.aug, self.manifest.features)]
        return eval_clips(self.aug, self.manifest.features)

    @staticmethod
    def member_exts(windows: list[tuple[np.ndarray, int]]) -> list[str]:
        """The members the rows read: the frames the windows use, the log-mel and the labels."""
        frames = sorted({int(i) for ids, _ in windows for i in ids})
        return [frame_ext(i) for i in frames] + [LOGMEL_EXT, LABELS_EXT]

    def stream_exts(self) -> frozenset[str]:
        """The members a stream keeps: every frame in training (which are used is drawn later), else the ones the
        evaluation windows use."""
        if self.train:
            return frozenset([frame_ext(i) for i in range(self.frames_stored)] + [LOGMEL_EXT, LABELS_EXT])
        return frozenset(self.member_exts(self.windows(None)))

    def _labels(self, labels: np.ndarray) -> torch.Tensor:
        if self.multi_label:
            hot = torch.zeros(self.num_classes, dtype=torch.float32)
            hot[torch.from_numpy(labels.astype(np.int64))] = 1.0
            return hot
        return torch.tensor(int(labels[0]), dtype=torch.int64)

    def rows(
        self,
        shard_name: str,
        key: str,
        raw: dict[str, bytes],
        windows: list[tuple[np.ndarray, int]],
        rng: np.random.Generator | None,
    ) -> dict[str, Any]:
        """The sample's rows from its members `raw` (at least `member_exts(windows)`); LoaderError naming the shard
        and key if a member is missing or cannot be decoded."""
        needed = sorted({int(i) for ids, _ in windows for i in ids})
        decoded, logmel, label_ids = decode_members(
            f"{shard_name}: sample {printable(key)}", raw, needed, self.manifest
        )
        by_id = dict(zip(needed, decoded, strict=True))
        labels = self._labels(label_ids)
        aug = self.aug
        videos, audios = [], []
        colors = []
        for ids, audio_start in windows:
            frames = [by_id[int(i)] for i in ids]
            window = np.array(audio_window(logmel, audio_start, aug.audio_frames, aug.audio_pad))  # float16, writable
            audio = torch.from_numpy(window).float().sub_(self.mean).div_(self.std)[None]  # torch: fast from float16
            if self.train:
                videos.append(train_video(frames, aug, rng))
                audios.append(spec_augment(audio, aug, rng))
                colors.append(color_params(aug, rng))
            else:
                videos.append(eval_video(stack_frames(frames), aug))
                audios.append(audio)
        count = len(windows)
        return {
            "color": torch.stack(colors) if colors else None,
            "video": videos,
            "audio": torch.stack(audios),
            "labels": torch.stack([labels] * count),
            "key": [key] * count,
            "clip_index": torch.zeros(1, dtype=torch.int64) if self.train else torch.arange(count, dtype=torch.int64),
        }
