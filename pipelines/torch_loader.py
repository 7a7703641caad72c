"""The PyTorch loader: a `torch.utils.data.DataLoader` over the WebDataset shards of a split.

Each DataLoader item is a whole batch, built by a worker from the sample order of `pipelines.split` (so batch b
holds the same samples whichever worker builds it, and a resumed stream starts at any batch). A worker reads a
sample's members straight from the tar at the offsets of the shard's DALI index file, and only the members it
needs (the sampled frames, the log-mel, the labels), decodes the JPEGs with `torchvision.io.decode_jpeg` and
augments as `pipelines.config` says. Random parameters come from a generator seeded by (seed, epoch, position in
the epoch), so a batch is the same whether it was built before or after a resume, by any worker.

Streamed splits (`pipe:` URLs, `pipelines.stream`) have no random access: each worker streams its own shards
(`StreamBatches`, an IterableDataset) and makes every workers-th batch of the rank's epoch from them, with the same
sample decoding and augmentation (`SampleBuilder`).
"""

from __future__ import annotations

import contextlib
import ctypes
import logging
import math
import os
import threading
from collections import OrderedDict
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset, IterableDataset, get_worker_info
from torchvision.io import ImageReadMode, decode_jpeg

from pipelines.config import (
    SHUFFLE_BUFFER_SAMPLES,
    VIDEO_MEAN,
    VIDEO_STD,
    AugmentConfig,
    centre_crop_box,
    eval_resize_shape,
    eval_windows,
)
from pipelines.split import LoaderError, SplitIndex, eval_batches, eval_range, train_batches, train_order
from pipelines.stream import (
    StreamSplit,
    open_split,
    range_samples,
    reader_buffer,
    reader_samples,
    train_units,
)
from shards.index import SampleRef
from shards.manifest import Manifest
from shards.schema import LABELS_EXT, LOGMEL_EXT, SchemaError, frame_ext, frame_size_problem, parse_labels, parse_logmel

log = logging.getLogger(__name__)


def keep_freed_memory() -> None:
    """Let glibc keep freed memory for reuse instead of returning it to the system at once.

    A batch is tens of MB; with glibc's defaults each one is a fresh mmap whose zero-filled pages fault in on
    first touch, which measured 2.4x slower normalization (25.8 ms vs 10.7 ms per batch of 8 clips). The cost:
    the process keeps its peak heap. No-op where glibc's mallopt is not available.
    """
    try:
        libc = ctypes.CDLL("libc.so.6")
    except OSError:
        return
    m_trim_threshold, m_mmap_threshold = -1, -3
    libc.mallopt(m_mmap_threshold, 2**30)
    libc.mallopt(m_trim_threshold, 2**31 - 1)


def dist_rank_world(rank: int | None = None, world_size: int | None = None) -> tuple[int, int]:
    """This process's rank and the world size: as given, else torchrun's RANK / WORLD_SIZE, else (0, 1)."""
    rank = int(os.environ.get("RANK", 0)) if rank is None else rank
    world_size = int(os.environ.get("WORLD_SIZE", 1)) if world_size is None else world_size
    if not 0 <= rank < world_size:
        raise LoaderError(f"rank {rank} is not in a world of size {world_size}")
    return rank, world_size


# Shard files a process keeps open at once: a split may have more shards than the open-file limit (AudioSet-2M:
# ~4,000), and each loader worker has its own.
MAX_OPEN_SHARDS = 64


class SampleReader:
    """Reads members of samples at their index offsets with pread: at most `max_open` shards open per process, the
    least recently read closed first; safe to share between threads (no seek position)."""

    def __init__(self, index: SplitIndex, max_open: int = MAX_OPEN_SHARDS) -> None:
        self.index = index
        self.max_open = max_open
        self._fds: OrderedDict[int, int] = OrderedDict()
        self._pid = os.getpid()
        self._lock = threading.Lock()

    def _pread(self, shard: int, size: int, offset: int) -> bytes:
        with self._lock:
            if self._pid != os.getpid():  # a forked worker opens its own descriptors
                self._fds, self._pid = OrderedDict(), os.getpid()
            fd = self._fds.get(shard)
            if fd is None:
                while len(self._fds) >= self.max_open:
                    os.close(self._fds.popitem(last=False)[1])
                fd = self._fds[shard] = os.open(self.index.shard_paths[shard], os.O_RDONLY)
            self._fds.move_to_end(shard)
            return os.pread(fd, size, offset)

    def read(self, ref: SampleRef, exts: list[str]) -> dict[str, bytes]:
        name = self.index.shard_paths[ref.shard].name
        out = {}
        for ext in exts:
            if ext not in ref.members:
                raise LoaderError(f"{name}: sample {ref.key} has no member {ext}")
            offset, size = ref.members[ext]
            try:
                out[ext] = self._pread(ref.shard, size, offset)
            except OSError as err:
                raise LoaderError(f"{name}: sample {ref.key}: {ext} cannot be read ({err})") from err
            if len(out[ext]) != size:
                raise LoaderError(f"{name}: sample {ref.key}: {ext} is truncated")
        return out

    def close(self) -> None:
        with self._lock:
            if self._pid == os.getpid():
                for fd in self._fds.values():
                    os.close(fd)
            self._fds.clear()


def decode_frames(jpegs: list[bytes]) -> torch.Tensor:
    """uint8 (F, 3, H, W) in channels-last memory (one copy, and the layout the uint8 resize is fast on)."""
    decoded = [
        decode_jpeg(torch.frombuffer(bytearray(data), dtype=torch.uint8), mode=ImageReadMode.RGB) for data in jpegs
    ]
    return torch.stack([image.permute(1, 2, 0) for image in decoded]).permute(0, 3, 1, 2)


_MEAN = torch.tensor(VIDEO_MEAN) * 255
_INV_STD = 1 / (torch.tensor(VIDEO_STD) * 255)


def normalize_video(frames_hwc: torch.Tensor) -> torch.Tensor:
    """float32 (..., 3, H, W) from uint8 (..., H, W, 3) RGB: scaled to [0, 1], minus VIDEO_MEAN, over VIDEO_STD.

    Done once per batch by the consumer (on its device), so that workers pass uint8, 4x less to move; on the
    contiguous channels-last buffer, which is 5x faster than on the (..., 3, H, W) view.
    """
    video = frames_hwc.float().sub_(_MEAN.to(frames_hwc.device)).mul_(_INV_STD.to(frames_hwc.device))
    return video.movedim(-1, -3)


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
    """uint8 (F, 3, crop, crop): one random resized crop (bilinear, antialiased) and one flip for all frames."""
    top, left, h, w = random_resized_crop_box(frames.shape[-2], frames.shape[-1], aug, rng)
    region = frames[..., top : top + h, left : left + w]
    out = torch.nn.functional.interpolate(region, size=(aug.crop_px, aug.crop_px), mode="bilinear", antialias=True)
    return out.flip(-1) if rng.random() < aug.flip_prob else out


def eval_video(frames: torch.Tensor, aug: AugmentConfig) -> torch.Tensor:
    """uint8 (F, 3, crop, crop): short side resized to eval_short_side_px (if it is not already), centre crop."""
    height, width = eval_resize_shape(frames.shape[-2], frames.shape[-1], aug.eval_short_side_px)
    if (height, width) != tuple(frames.shape[-2:]):
        frames = torch.nn.functional.interpolate(frames, size=(height, width), mode="bilinear", antialias=True)
    top, left = centre_crop_box(height, width, aug.crop_px)
    return frames[..., top : top + aug.crop_px, left : left + aug.crop_px]


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


def sample_rng(seed: int, epoch: int, position: int) -> np.random.Generator:
    """The augmentation generator of the sample at `position` of the epoch's global order (rank r's positions
    follow rank r-1's), so no two ranks draw the same crops."""
    return np.random.default_rng([seed, epoch, position])


class SampleBuilder:
    """Rows of one sample from its raw members: frame choice, JPEG decode, crops, log-mel windows, labels (the
    contract of `pipelines.config`); 1 augmented row in training, `num_test_clips` rows in evaluation."""

    def __init__(self, manifest: Manifest, train: bool, augment: AugmentConfig) -> None:
        self.train, self.aug = train, augment
        features = manifest.features
        self.frames_stored = features.num_frames
        self.frames_used = augment.frames_used or features.num_frames
        if not 1 <= self.frames_used <= self.frames_stored:
            raise LoaderError(f"frames_used={self.frames_used}, but the shards hold {self.frames_stored} frames")
        self.time_frames = features.fbank_frames
        self.features, self.short_side_px = features, features.short_side_px
        self.mean, self.std = manifest.logmel.mean, manifest.logmel.std
        self.multi_label = manifest.multi_label
        self.num_classes = manifest.num_classes

    def windows(self, rng: np.random.Generator | None) -> list[tuple[np.ndarray, int]]:
        """(frame ids, log-mel start) of each row: random in training (`rng`), evenly spaced in evaluation."""
        aug = self.aug
        if self.train:
            assert rng is not None
            frame_ids = np.arange(self.frames_stored)
            if self.frames_used < self.frames_stored:
                frame_ids = np.sort(rng.choice(self.frames_stored, self.frames_used, replace=False))
            return [(frame_ids, int(rng.integers(0, max(self.time_frames - aug.audio_frames, 0) + 1)))]
        video_starts = eval_windows(self.frames_stored, self.frames_used, aug.num_test_clips)
        audio_starts = eval_windows(self.time_frames, aug.audio_frames, aug.num_test_clips)
        return [(np.arange(v, v + self.frames_used), a) for v, a in zip(video_starts, audio_starts, strict=True)]

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

    def _labels(self, raw: bytes) -> torch.Tensor:
        labels = parse_labels(raw, self.num_classes, self.multi_label)
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
        where = f"{shard_name}: sample {key}"
        exts = self.member_exts(windows)
        if missing := [ext for ext in exts if ext not in raw]:
            raise LoaderError(f"{where}: no member {', '.join(missing)}")
        needed = sorted({int(i) for ids, _ in windows for i in ids})
        for i in needed:  # a frame claiming a huge size must not be decoded
            if problem := frame_size_problem(raw[frame_ext(i)], self.short_side_px, frame_ext(i)):
                raise LoaderError(f"{where}: bad JPEG ({problem})")
        try:
            decoded = decode_frames([raw[frame_ext(i)] for i in needed])
        except RuntimeError as err:
            raise LoaderError(f"{where}: bad JPEG ({err})") from err
        try:
            logmel = parse_logmel(raw[LOGMEL_EXT], self.features).astype(np.float32)
            labels = self._labels(raw[LABELS_EXT])
        except SchemaError as err:
            raise LoaderError(f"{where}: {err}") from None
        aug = self.aug
        videos, audios = [], []
        for ids, audio_start in windows:
            frames = decoded if len(ids) == len(needed) else decoded[np.searchsorted(needed, ids)]
            audio = torch.from_numpy((audio_window(logmel, audio_start, aug.audio_frames) - self.mean) / self.std)[None]
            if self.train:
                videos.append(train_video(frames, aug, rng))
                audios.append(spec_augment(audio, aug, rng))
            else:
                videos.append(eval_video(frames, aug))
                audios.append(audio)
        count = len(windows)
        return {
            "video": videos,
            "audio": torch.stack(audios),
            "labels": torch.stack([labels] * count),
            "key": [key] * count,
            "clip_index": torch.zeros(1, dtype=torch.int64) if self.train else torch.arange(count, dtype=torch.int64),
        }


class RankBatches:
    """What both datasets share: this rank's part of a split (training or evaluation, batch size, rank of world
    size, seed), the sample builder, and the number of batches per epoch."""

    def __init__(
        self,
        split: SplitIndex | StreamSplit,
        train: bool,
        batch_size: int,
        rank: int,
        world_size: int,
        seed: int,
        augment: AugmentConfig,
        skip_bad_samples: bool,
    ) -> None:
        self.train, self.batch_size = train, batch_size
        self.rank, self.world_size, self.seed = rank, world_size, seed
        self.skip_bad_samples = skip_bad_samples
        self.num_samples = len(split)
        self.builder = SampleBuilder(split.manifest, train, augment)

    def __len__(self) -> int:
        if self.train:
            return train_batches(self.num_samples, self.batch_size, self.world_size)
        return eval_batches(self.num_samples, self.batch_size, self.rank, self.world_size)

    def bad_sample(self, err: LoaderError, skipped: list[str]) -> None:
        """Count a sample that cannot be read in `skipped`, or raise if bad samples are not to be skipped."""
        if not self.skip_bad_samples:
            raise LoaderError(f"{err} (pass --skip-bad-samples to skip such samples)") from None
        skipped.append(str(err))


class BatchDataset(RankBatches, Dataset):
    """Item b is batch b of this rank's order for the current epoch (a dict as in pipelines.config)."""

    def __init__(self, index: SplitIndex, *args: Any) -> None:
        super().__init__(index, *args)
        self.index = index
        self.reader = SampleReader(index)
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

    def load_sample(self, position: int, sample: int) -> dict[str, Any]:
        """Rows of one sample: 1 in training (augmented), num_test_clips in evaluation."""
        ref = self.index.samples[sample]
        rng = sample_rng(self.seed, self.epoch, self.rank * len(self.order) + position) if self.train else None
        windows = self.builder.windows(rng)
        raw = self.reader.read(ref, self.builder.member_exts(windows))
        return self.builder.rows(self.index.shard_paths[ref.shard].name, ref.key, raw, windows, rng)

    def __getitem__(self, item: tuple[int, int]) -> dict[str, Any]:
        """Batch `batch` of epoch `epoch`, for item (epoch, batch): persistent workers follow the epochs.

        A LoaderError comes back as {"error": message} for the consumer to raise: an exception raised inside a
        DataLoader worker leaves persistent workers that take 5 s each to shut down (measured).
        """
        try:
            return self._batch(*item)
        except LoaderError as err:
            return {"error": str(err)}

    def _batch(self, epoch: int, batch: int) -> dict[str, Any]:
        if epoch != self.epoch:
            self.set_epoch(epoch)
        positions = range(batch * self.batch_size, min((batch + 1) * self.batch_size, len(self.order)))
        rows, skipped = [], []
        for position in positions:
            sample = int(self.order[position])
            for attempt in range(len(self.index)):
                try:
                    rows.append(self.load_sample(position, sample))
                    break
                except LoaderError as err:
                    self.bad_sample(err, skipped)
                    if not self.train:
                        break  # evaluation: the sample is dropped (and counted), never replaced
                    sample = (sample + 1) % len(self.index)  # training: the next sample takes its place
                    if attempt == len(self.index) - 1:
                        raise LoaderError(f"{self.index.folder}: no sample of the split can be read") from None
        return collate(rows, skipped)


class StreamBatches(RankBatches, IterableDataset):
    """This rank's batches of a streamed split (`pipelines.stream`) for the epoch and first batch set before a
    pass: worker w of K makes batches w, w+K, ... (the order a DataLoader hands them on in), in training from the
    units `train_units` deals it, through a shuffle buffer of `shuffle_buffer / K` samples; in evaluation from its
    contiguous part of the rank's block (batches are then handed on worker by worker, the rows are the same).

    Resuming at batch b replays the streams up to b without decoding: the same batches follow, as long as the
    world size and worker count are the same (bad samples skipped before b are not replayed).
    """

    def __init__(self, split: StreamSplit, *args: Any, shuffle_buffer: int) -> None:
        super().__init__(split, *args)
        self.split, self.shuffle_buffer = split, shuffle_buffer
        self.exts = self.builder.stream_exts()
        # (epoch, first batch) of the next pass, in shared memory: persistent workers read it when a pass starts.
        self._pass = torch.zeros(2, dtype=torch.int64).share_memory_()

    def set_pass(self, epoch: int, start: int) -> None:
        """Make the next pass (`iter`) read `epoch` from batch `start` on (training)."""
        self._pass[0], self._pass[1] = epoch, start

    def __iter__(self) -> Iterator[dict[str, Any]]:
        info = get_worker_info()
        worker, workers = (info.id, info.num_workers) if info is not None else (0, 1)
        epoch, start = (int(x) for x in self._pass)
        if self.train:  # the DataLoader takes batches from its workers in turn from worker 0: it must own `start`
            worker = (worker + start) % workers
        try:
            yield from self._train(worker, workers, epoch, start) if self.train else self._eval(worker, workers)
        except LoaderError as err:
            yield {"error": str(err)}

    def _train(self, worker: int, workers: int, epoch: int, start: int) -> Iterator[dict[str, Any]]:
        sizes = [s.num_samples for s in self.split.manifest.shards]
        batches = len(self)
        reader, readers = self.rank * workers + worker, self.world_size * workers
        quotas = [len(range(r % workers, batches, workers)) * self.batch_size for r in range(readers)]
        units = train_units(sizes, quotas, self.seed, epoch)[reader]
        if not units:  # fewer batches than workers: this one makes none
            return
        buffer = reader_buffer(units, sizes, math.ceil(self.shuffle_buffer / workers))
        rng = np.random.default_rng([self.seed, epoch, reader, readers])
        with contextlib.closing(reader_samples(self.split, units, self.exts, buffer, rng)) as samples:
            for batch in range(worker, batches, workers):
                if batch < start:
                    for _ in range(self.batch_size):
                        next(samples)
                    continue
                first = (self.rank * batches + batch) * self.batch_size
                yield self._train_batch(samples, epoch, first)

    def _train_batch(
        self, samples: Iterator[tuple[str, str, dict[str, bytes]]], epoch: int, first: int
    ) -> dict[str, Any]:
        rows, skipped = [], []
        while len(rows) < self.batch_size:
            shard_name, key, raw = next(samples)
            rng = sample_rng(self.seed, epoch, first + len(rows))
            try:
                rows.append(self.builder.rows(shard_name, key, raw, self.builder.windows(rng), rng))
            except LoaderError as err:
                self.bad_sample(err, skipped)  # the next sample of the stream takes its place
                if len(skipped) > len(self.split):
                    raise LoaderError(f"{self.split.folder}: no sample of the split can be read") from None
        return collate(rows, skipped)

    def _eval(self, worker: int, workers: int) -> Iterator[dict[str, Any]]:
        block = eval_range(len(self.split), self.rank, self.world_size)
        batches = len(self)
        first, last = batches * worker // workers, batches * (worker + 1) // workers
        start, stop = block.start + first * self.batch_size, min(block.start + last * self.batch_size, block.stop)
        windows = self.builder.windows(None)
        rows, skipped, count = [], [], 0
        for shard_name, key, raw in range_samples(self.split, start, stop, self.exts):
            count += 1
            try:
                rows.append(self.builder.rows(shard_name, key, raw, windows, None))
            except LoaderError as err:
                self.bad_sample(err, skipped)  # evaluation: dropped (and counted), never replaced
            if count == self.batch_size:
                yield collate(rows, skipped)
                rows, skipped, count = [], [], 0
        if count:
            yield collate(rows, skipped)


def collate(rows: list[dict[str, Any]], skipped: list[str]) -> dict[str, Any]:
    """One batch from per-sample rows; `skipped` carries the errors of samples left out.

    The uint8 video is one (R, F, H, W, 3) buffer (the loader normalizes it into the contract's (R, F, 3, H, W)
    float): the frames come out of the resize channels-last, so each copy into it is a plain memcpy.
    """
    if not rows:
        return {"video": None, "audio": None, "labels": None, "key": [], "clip_index": None, "skipped": skipped}
    clips = [clip for r in rows for clip in r["video"]]
    frames, _, height, width = clips[0].shape
    video = torch.empty((len(clips), frames, height, width, 3), dtype=torch.uint8)
    if get_worker_info() is not None:  # built in shared memory: the DataLoader hands it over without a copy
        video.share_memory_()
    for i, clip in enumerate(clips):
        video[i].copy_(clip.permute(0, 2, 3, 1))
    return {
        "video": video,
        "audio": torch.cat([r["audio"] for r in rows]),
        "labels": torch.cat([r["labels"] for r in rows]),
        "key": [k for r in rows for k in r["key"]],
        "clip_index": torch.cat([r["clip_index"] for r in rows]),
        "skipped": skipped,
    }


def _init_worker(worker_id: int) -> None:
    del worker_id
    keep_freed_memory()


class TorchLoader:
    """Batches of one split for this rank: `for batch in loader` runs the rest of the current epoch.

    `folder` is a split as `pipelines.stream.open_split` takes it: local shards are read at their index offsets,
    `pipe:` URLs are streamed (see `StreamBatches`; `shuffle_buffer` is the rank's shuffle buffer in samples, shared
    by its workers).
    `state_dict()` is the stream position (epoch, batches consumed); `load_state_dict()` makes the next
    iteration start there. In evaluation the epoch is irrelevant and each iteration is the whole rank's part.
    Workers hand over uint8 video; the batch is moved to `device` (from pinned memory on CUDA) and normalized
    there, so a GPU consumer gets its float video without the CPU ever writing it.
    """

    def __init__(
        self,
        folder: str | Path | Sequence[str | Path] | SplitIndex | StreamSplit,
        train: bool,
        batch_size: int,
        num_workers: int = 2,
        rank: int | None = None,
        world_size: int | None = None,
        seed: int = 0,
        augment: AugmentConfig | None = None,
        skip_bad_samples: bool = False,
        device: str | torch.device = "cpu",
        shuffle_buffer: int = SHUFFLE_BUFFER_SAMPLES,
    ) -> None:
        if batch_size < 1:
            raise LoaderError(f"batch_size must be at least 1, got {batch_size}")
        if shuffle_buffer < 1:
            raise LoaderError(f"shuffle_buffer must be at least 1, got {shuffle_buffer}")
        self.index = open_split(folder)
        self.rank, self.world_size = dist_rank_world(rank, world_size)
        self.train, self.batch_size, self.num_workers = train, batch_size, num_workers
        self.device = torch.device(device)
        augment = augment or AugmentConfig()
        self.streamed = isinstance(self.index, StreamSplit)
        self.dataset: BatchDataset | StreamBatches
        part = (train, batch_size, self.rank, self.world_size, seed, augment, skip_bad_samples)
        if isinstance(self.index, StreamSplit):
            self.dataset = StreamBatches(self.index, *part, shuffle_buffer=shuffle_buffer)
        else:
            self.dataset = BatchDataset(self.index, *part)
        self.epoch = 0
        self.position = 0
        self.skipped: list[str] = []
        # One DataLoader for the loader's life (persistent workers). Each pass of an indexed split reads the
        # (epoch, batch) items listed here when it starts; a streamed split's workers read the pass from the dataset.
        self._items: list[tuple[int, int]] = []
        self._loader: DataLoader | None = None

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
        state = {"epoch": self.epoch, "batches": self.position}
        if self.streamed:  # a streamed epoch's order depends on how many readers share it
            state["readers"] = self.world_size * max(self.num_workers, 1)
        return state

    def load_state_dict(self, state: dict[str, int]) -> None:
        self.epoch, self.position = int(state["epoch"]), int(state["batches"])
        readers = self.world_size * max(self.num_workers, 1)
        if self.streamed and self.train and self.position and state.get("readers", readers) != readers:
            log.warning(
                "the stream was read by %s readers (ranks x workers), now by %d: epoch %d goes on at batch %d with "
                "another order, so some of its samples may be seen twice or not at all",
                state.get("readers"), readers, self.epoch, self.position,
            )  # fmt: skip

    def _pass_loader(self) -> DataLoader:
        """The DataLoader of this pass, from `self.position` on in training."""
        start = self.position if self.train else 0
        if isinstance(self.dataset, StreamBatches):
            self.dataset.set_pass(self.epoch, start)
        else:
            self._items[:] = [(self.epoch, b) for b in range(start, len(self.dataset))]
        if self._loader is None:
            keep_freed_memory()
            self._loader = DataLoader(
                self.dataset,
                batch_size=None,
                sampler=None if self.streamed else self._items,
                num_workers=self.num_workers,
                pin_memory=self.device.type == "cuda",
                prefetch_factor=4 if self.num_workers else None,
                persistent_workers=self.num_workers > 0,
                worker_init_fn=_init_worker,
            )
        return self._loader

    def __iter__(self) -> Iterator[dict[str, Any]]:
        for batch in self._pass_loader():
            if "error" in batch:
                raise LoaderError(batch["error"])
            if batch["video"] is not None:
                for name in ("video", "audio", "labels", "clip_index"):
                    batch[name] = batch[name].to(self.device, non_blocking=True)
                batch["video"] = normalize_video(batch["video"])
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
