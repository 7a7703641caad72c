"""The PyTorch loader's datasets: what a `torch.utils.data.DataLoader` worker makes, one whole batch per item.

`BatchDataset` (indexed splits): item (epoch, b) is batch b of this rank's order for the epoch (`pipelines.order`),
its samples read at their index offsets (`pipelines.reading`) and built into rows (`pipelines.transforms`); batch b
holds the same samples whichever worker builds it. `StreamBatches` (streamed splits, an IterableDataset): worker w
of K makes batches w, w+K, ... from the shards it streams. `collate` puts a batch's rows together in shared memory.
A bad sample is skipped and counted (`skip_bad_samples`) or its error travels back as {"error": message}.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Iterator
from typing import Any

import numpy as np
import torch
from torch.utils.data import Dataset, IterableDataset, get_worker_info

from pipelines.config import LoaderError, LoaderOptions
from pipelines.order import eval_batches, eval_range, reader_buffer, sample_rng, train_batches, train_order, train_units
from pipelines.reading import SampleReader, range_samples, reader_samples
from pipelines.sources import Split, SplitIndex, StreamSplit
from pipelines.transforms import SampleBuilder


class RankBatches:
    """What both datasets share: this rank's part of a split (training or evaluation, batch size, rank of world
    size, seed: `LoaderOptions`), the sample builder, and the number of batches per epoch."""

    def __init__(self, split: Split, options: LoaderOptions) -> None:
        self.train, self.batch_size = options.train, options.batch_size
        self.rank, self.world_size, self.seed = options.rank, options.world_size, options.seed
        self.skip_bad_samples = options.skip_bad_samples
        self.num_samples = len(split)
        self.builder = SampleBuilder(split.manifest, options.train, options.augment)

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

    def __init__(self, index: SplitIndex, options: LoaderOptions) -> None:
        super().__init__(index, options)
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
    """This rank's batches of a streamed split (`pipelines.reading`) for the epoch and first batch set before a
    pass: worker w of K makes batches w, w+K, ... (the order a DataLoader hands them on in), in training from the
    units `train_units` deals it, through a shuffle buffer of `shuffle_buffer / K` samples; in evaluation from its
    contiguous part of the rank's block (batches are then handed on worker by worker, the rows are the same).

    Resuming at batch b replays the streams up to b without decoding: the same batches follow, as long as the
    world size and worker count are the same (bad samples skipped before b are not replayed).
    """

    def __init__(self, split: StreamSplit, options: LoaderOptions) -> None:
        super().__init__(split, options)
        self.split, self.shuffle_buffer = split, options.shuffle_buffer
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
        return {
            "video": None, "audio": None, "labels": None, "key": [], "clip_index": None, "color": None,
            "skipped": skipped,
        }  # fmt: skip
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
        "color": torch.cat([r["color"] for r in rows]) if rows[0]["color"] is not None else None,
        "skipped": skipped,
    }
