"""The PyTorch loader: a `torch.utils.data.DataLoader` over the WebDataset shards of a split.

Each DataLoader item is a whole batch, built by a worker from the sample order of `pipelines.split` (so batch b
holds the same samples whichever worker builds it, and a resumed stream starts at any batch). A worker reads a
sample's members straight from the tar at the offsets of the shard's DALI index file, and only the members it
needs (the sampled frames, the log-mel, the labels), decodes the JPEGs with `torchvision.io.decode_jpeg` and
augments as `pipelines.config` says. Random parameters come from a generator seeded by (seed, epoch, position in
the epoch), so a batch is the same whether it was built before or after a resume, by any worker.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torchvision.transforms.v2.functional as TF
from torch.utils.data import DataLoader, Dataset
from torchvision.io import ImageReadMode, decode_jpeg

from pipelines.config import VIDEO_MEAN, VIDEO_STD, AugmentConfig, centre_crop_box, eval_resize_shape, eval_windows
from pipelines.split import (
    LoaderError,
    SampleRef,
    SplitIndex,
    eval_batches,
    eval_range,
    train_batches,
    train_order,
)
from preprocess.schema import LABELS_DTYPE, LABELS_EXT, LOGMEL_DTYPE, LOGMEL_EXT, Manifest, frame_ext

log = logging.getLogger(__name__)


def dist_rank_world(rank: int | None = None, world_size: int | None = None) -> tuple[int, int]:
    """This process's rank and the world size: as given, else torchrun's RANK / WORLD_SIZE, else (0, 1)."""
    rank = int(os.environ.get("RANK", 0)) if rank is None else rank
    world_size = int(os.environ.get("WORLD_SIZE", 1)) if world_size is None else world_size
    if not 0 <= rank < world_size:
        raise LoaderError(f"rank {rank} is not in a world of size {world_size}")
    return rank, world_size


class SampleReader:
    """Reads members of samples by their index offsets; opens each shard once per process."""

    def __init__(self, index: SplitIndex) -> None:
        self.index = index
        self._files: dict[int, Any] = {}
        self._pid = os.getpid()

    def read(self, ref: SampleRef, exts: list[str]) -> dict[str, bytes]:
        if self._pid != os.getpid():  # a forked worker must not share the parent's file offsets
            self._files, self._pid = {}, os.getpid()
        handle = self._files.get(ref.shard)
        if handle is None:
            handle = self._files[ref.shard] = open(self.index.shard_paths[ref.shard], "rb")  # noqa: SIM115
        out = {}
        for ext in exts:
            if ext not in ref.members:
                raise LoaderError(f"{self.index.shard_paths[ref.shard].name}: sample {ref.key} has no member {ext}")
            offset, size = ref.members[ext]
            handle.seek(offset)
            out[ext] = handle.read(size)
            if len(out[ext]) != size:
                raise LoaderError(f"{self.index.shard_paths[ref.shard].name}: sample {ref.key}: {ext} is truncated")
        return out


def decode_frames(jpegs: list[bytes]) -> torch.Tensor:
    """uint8 (F, 3, H, W) from F JPEG payloads."""
    tensors = [torch.frombuffer(bytearray(data), dtype=torch.uint8) for data in jpegs]
    return torch.stack(decode_jpeg(tensors, mode=ImageReadMode.RGB))


_MEAN = torch.tensor(VIDEO_MEAN).view(1, 3, 1, 1) * 255
_STD = torch.tensor(VIDEO_STD).view(1, 3, 1, 1) * 255


def normalize_video(frames: torch.Tensor) -> torch.Tensor:
    """float32 (..., 3, H, W): uint8 RGB scaled to [0, 1], minus VIDEO_MEAN, over VIDEO_STD."""
    return (frames.float() - _MEAN) / _STD


def random_resized_crop_box(height: int, width: int, aug: AugmentConfig, rng: np.random.Generator) -> tuple[int, ...]:
    """(top, left, h, w) of an Inception-style random crop (torchvision's algorithm, numpy's generator)."""
    area = height * width
    log_ratio = np.log(aug.resize_ratio)
    for _ in range(10):
        target = area * rng.uniform(*aug.resize_scale)
        ratio = np.exp(rng.uniform(*log_ratio))
        w = round(np.sqrt(target * ratio))
        h = round(np.sqrt(target / ratio))
        if 0 < w <= width and 0 < h <= height:
            return int(rng.integers(0, height - h + 1)), int(rng.integers(0, width - w + 1)), h, w
    ratio = min(max(width / height, aug.resize_ratio[0]), aug.resize_ratio[1])
    w, h = (width, round(width / ratio)) if width / height > ratio else (round(height * ratio), height)
    w, h = min(w, width), min(h, height)
    return (height - h) // 2, (width - w) // 2, h, w


def train_video(frames: torch.Tensor, aug: AugmentConfig, rng: np.random.Generator) -> torch.Tensor:
    """float32 (F, 3, crop, crop): one random resized crop and one flip decision for all frames of the clip."""
    top, left, h, w = random_resized_crop_box(frames.shape[-2], frames.shape[-1], aug, rng)
    out = TF.resized_crop(frames, top, left, h, w, [aug.crop_px, aug.crop_px], antialias=True)
    if rng.random() < aug.flip_prob:
        out = out.flip(-1)
    return normalize_video(out)


def eval_video(frames: torch.Tensor, aug: AugmentConfig) -> torch.Tensor:
    """float32 (F, 3, crop, crop): short side resized to eval_short_side_px (if it is not already), centre crop."""
    height, width = eval_resize_shape(frames.shape[-2], frames.shape[-1], aug.eval_short_side_px)
    if (height, width) != tuple(frames.shape[-2:]):
        frames = TF.resize(frames, [height, width], antialias=True)
    top, left = centre_crop_box(height, width, aug.crop_px)
    return normalize_video(frames[..., top : top + aug.crop_px, left : left + aug.crop_px])


def audio_window(logmel: np.ndarray, start: int, frames: int) -> np.ndarray:
    """(frames, bins) from `start`, zero-padded past the end (AST pads with zeros)."""
    window = logmel[start : start + frames]
    if window.shape[0] < frames:
        window = np.concatenate([window, np.zeros((frames - window.shape[0], logmel.shape[1]), logmel.dtype)])
    return window


def spec_augment(audio: torch.Tensor, aug: AugmentConfig, rng: np.random.Generator) -> torch.Tensor:
    """Zero (the mean, after normalization) random frequency and time bands of a (1, T, bins) log-mel."""
    _, frames, bins = audio.shape
    for _ in range(aug.num_freq_masks):
        width = int(rng.integers(0, aug.freq_mask_px)) if aug.freq_mask_px > 0 else 0
        start = int(rng.integers(0, bins - width + 1))
        audio[:, :, start : start + width] = 0
    for _ in range(aug.num_time_masks):
        width = int(rng.integers(0, min(aug.time_mask_px, frames))) if aug.time_mask_px > 0 else 0
        start = int(rng.integers(0, frames - width + 1))
        audio[:, start : start + width, :] = 0
    return audio


class BatchDataset(Dataset):
    """Item b is batch b of this rank's order for the current epoch (a dict as in pipelines.config)."""

    def __init__(
        self,
        index: SplitIndex,
        train: bool,
        batch_size: int,
        rank: int,
        world_size: int,
        seed: int,
        augment: AugmentConfig,
        skip_bad_samples: bool,
    ) -> None:
        self.index, self.train, self.batch_size = index, train, batch_size
        self.rank, self.world_size, self.seed, self.aug = rank, world_size, seed, augment
        self.skip_bad_samples = skip_bad_samples
        self.reader = SampleReader(index)
        features = index.manifest.features
        self.frames_stored = features.num_frames
        self.frames_used = augment.frames_used or features.num_frames
        if not 1 <= self.frames_used <= self.frames_stored:
            raise LoaderError(f"frames_used={self.frames_used}, but the shards hold {self.frames_stored} frames")
        self.mean, self.std = index.manifest.logmel.mean, index.manifest.logmel.std
        self.multi_label = index.manifest.multi_label
        self.num_classes = index.manifest.num_classes
        self.epoch = 0
        self.order = np.zeros(0, dtype=np.int64)
        self.set_epoch(0)

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch
        n = len(self.index)
        if self.train:
            self.order = train_order(n, self.batch_size, self.rank, self.world_size, self.seed, epoch)
        else:
            self.order = np.asarray(eval_range(n, self.rank, self.world_size), dtype=np.int64)

    def __len__(self) -> int:
        n = len(self.index)
        if self.train:
            return train_batches(n, self.batch_size, self.world_size)
        return eval_batches(n, self.batch_size, self.rank, self.world_size)

    def _labels(self, raw: bytes) -> torch.Tensor:
        labels = np.frombuffer(raw, dtype=LABELS_DTYPE)
        if self.multi_label:
            hot = torch.zeros(self.num_classes, dtype=torch.float32)
            hot[torch.from_numpy(labels.astype(np.int64))] = 1.0
            return hot
        return torch.tensor(int(labels[0]), dtype=torch.int64)

    def _logmel(self, raw: bytes, ref: SampleRef) -> np.ndarray:
        shape = self.index.manifest.features.logmel_shape
        if len(raw) != shape[0] * shape[1] * LOGMEL_DTYPE.itemsize:
            raise LoaderError(
                f"{self.index.shard_paths[ref.shard].name}: sample {ref.key}: log-mel of {len(raw)} bytes"
            )
        return np.frombuffer(raw, dtype=LOGMEL_DTYPE).reshape(shape).astype(np.float32)

    def load_sample(self, position: int, sample: int) -> dict[str, Any]:
        """Rows of one sample: 1 in training (augmented), num_test_clips in evaluation."""
        ref = self.index.samples[sample]
        aug = self.aug
        if self.train:
            rng = np.random.default_rng([self.seed, self.epoch, position])
            frame_ids = np.arange(self.frames_stored)
            if self.frames_used < self.frames_stored:
                frame_ids = np.sort(rng.choice(self.frames_stored, self.frames_used, replace=False))
            windows = [(frame_ids, int(rng.integers(0, max(self._time_frames() - aug.audio_frames, 0) + 1)))]
        else:
            rng = None
            video_starts = eval_windows(self.frames_stored, self.frames_used, aug.num_test_clips)
            audio_starts = eval_windows(self._time_frames(), aug.audio_frames, aug.num_test_clips)
            windows = [(np.arange(v, v + self.frames_used), a) for v, a in zip(video_starts, audio_starts, strict=True)]
        needed = sorted({int(i) for ids, _ in windows for i in ids})
        raw = self.reader.read(ref, [frame_ext(i) for i in needed] + [LOGMEL_EXT, LABELS_EXT])
        try:
            decoded = dict(zip(needed, decode_frames([raw[frame_ext(i)] for i in needed]), strict=True))
        except RuntimeError as err:
            raise LoaderError(f"{self.index.shard_paths[ref.shard].name}: sample {ref.key}: bad JPEG ({err})") from err
        logmel = self._logmel(raw[LOGMEL_EXT], ref)
        labels = self._labels(raw[LABELS_EXT])
        videos, audios = [], []
        for ids, audio_start in windows:
            frames = torch.stack([decoded[int(i)] for i in ids])
            audio = torch.from_numpy((audio_window(logmel, audio_start, aug.audio_frames) - self.mean) / self.std)[None]
            if self.train:
                videos.append(train_video(frames, aug, rng))
                audios.append(spec_augment(audio, aug, rng))
            else:
                videos.append(eval_video(frames, aug))
                audios.append(audio)
        return {
            "video": torch.stack(videos),
            "audio": torch.stack(audios),
            "labels": torch.stack([labels] * len(windows)),
            "key": [ref.key] * len(windows),
            "clip_index": torch.arange(len(windows), dtype=torch.int64)
            if not self.train
            else torch.zeros(1, dtype=torch.int64),
        }

    def _time_frames(self) -> int:
        return self.index.manifest.features.fbank_frames

    def __getitem__(self, batch: int) -> dict[str, Any]:
        positions = range(batch * self.batch_size, min((batch + 1) * self.batch_size, len(self.order)))
        rows, skipped = [], []
        for position in positions:
            sample = int(self.order[position])
            for attempt in range(len(self.index)):
                try:
                    rows.append(self.load_sample(position, sample))
                    break
                except LoaderError as err:
                    if not self.skip_bad_samples:
                        raise LoaderError(f"{err} (pass --skip-bad-samples to skip such samples)") from None
                    skipped.append(str(err))
                    if not self.train:
                        break  # evaluation: the sample is dropped (and counted), never replaced
                    sample = (sample + 1) % len(self.index)  # training: the next sample takes its place
                    if attempt == len(self.index) - 1:
                        raise LoaderError(f"{self.index.folder}: no sample of the split can be read") from None
        return collate(rows, skipped)


def collate(rows: list[dict[str, Any]], skipped: list[str]) -> dict[str, Any]:
    """One batch from per-sample rows; `skipped` carries the errors of samples left out."""
    if not rows:
        return {"video": None, "audio": None, "labels": None, "key": [], "clip_index": None, "skipped": skipped}
    return {
        "video": torch.cat([r["video"] for r in rows]),
        "audio": torch.cat([r["audio"] for r in rows]),
        "labels": torch.cat([r["labels"] for r in rows]),
        "key": [k for r in rows for k in r["key"]],
        "clip_index": torch.cat([r["clip_index"] for r in rows]),
        "skipped": skipped,
    }


class TorchLoader:
    """Batches of one split for this rank: `for batch in loader` runs the rest of the current epoch.

    `state_dict()` is the stream position (epoch, batches consumed); `load_state_dict()` makes the next
    iteration start there. In evaluation the epoch is irrelevant and each iteration is the whole rank's part.
    """

    def __init__(
        self,
        folder: str | Path,
        train: bool,
        batch_size: int,
        num_workers: int = 2,
        rank: int | None = None,
        world_size: int | None = None,
        seed: int = 0,
        augment: AugmentConfig | None = None,
        skip_bad_samples: bool = False,
        pin_memory: bool = False,
    ) -> None:
        if batch_size < 1:
            raise LoaderError(f"batch_size must be at least 1, got {batch_size}")
        self.index = folder if isinstance(folder, SplitIndex) else SplitIndex(folder)
        self.rank, self.world_size = dist_rank_world(rank, world_size)
        self.train, self.batch_size, self.num_workers, self.pin_memory = train, batch_size, num_workers, pin_memory
        self.dataset = BatchDataset(
            self.index, train, batch_size, self.rank, self.world_size, seed, augment or AugmentConfig(),
            skip_bad_samples,
        )  # fmt: skip
        self.epoch = 0
        self.position = 0
        self.skipped: list[str] = []

    @property
    def manifest(self) -> Manifest:
        return self.index.manifest

    def __len__(self) -> int:
        """Batches per epoch on this rank."""
        return len(self.dataset)

    def set_epoch(self, epoch: int) -> None:
        if epoch != self.epoch:
            self.epoch, self.position = epoch, 0

    def state_dict(self) -> dict[str, int]:
        return {"epoch": self.epoch, "batches": self.position}

    def load_state_dict(self, state: dict[str, int]) -> None:
        self.epoch, self.position = int(state["epoch"]), int(state["batches"])

    def __iter__(self) -> Iterator[dict[str, Any]]:
        self.dataset.set_epoch(self.epoch)
        start = self.position if self.train else 0
        loader = DataLoader(
            self.dataset,
            batch_size=None,
            sampler=range(start, len(self.dataset)),
            num_workers=self.num_workers,
            pin_memory=self.pin_memory,
            prefetch_factor=4 if self.num_workers else None,
        )
        for batch in loader:
            skipped = batch.pop("skipped")
            if skipped:
                self.skipped += skipped
                for message in skipped:
                    log.warning("skipped a bad sample: %s", message)
            self.position += 1
            if batch["key"]:
                yield batch
        self.position = 0
        if self.train:
            self.epoch += 1
