"""The PyTorch loader: a `torch.utils.data.DataLoader` over the WebDataset shards of a split.

Each DataLoader item is a whole batch, built by a worker from the sample order of `pipelines.order` (so batch b
holds the same samples whichever worker builds it, and a resumed stream starts at any batch). A worker reads a
sample's members straight from the tar at the offsets of the shard's DALI index file (`pipelines.reading`), and
only the members it needs (the sampled frames, the log-mel, the labels), and builds its rows with
`pipelines.transforms.SampleBuilder` (decode and augmentation). Random parameters come from a generator seeded by
(seed, epoch, position in the epoch), so a batch is the same whether it was built before or after a resume, by any
worker.

Streamed splits (`pipe:` URLs) have no random access: each worker streams its own shards (`StreamBatches`, an
IterableDataset) and makes every workers-th batch of the rank's epoch from them, with the same sample building.
"""

from __future__ import annotations

import atexit
import ctypes
import logging
import multiprocessing.util  # noqa: F401  its exit hook (join every child) registered before ours, so ours runs first
import signal
import weakref
from collections.abc import Iterator
from typing import Any

import torch
from torch.utils.data import DataLoader

from pipelines.config import LoaderError, LoaderOptions
from pipelines.sources import Split, SplitIndex, StreamSplit
from pipelines.torch_datasets import BatchDataset, StreamBatches
from pipelines.transforms import normalize_video
from shards.manifest import Manifest

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


def _init_worker(worker_id: int) -> None:
    del worker_id
    keep_freed_memory()
    # Ctrl-C and SIGTERM reach a worker too (the terminal's process group, a scheduler); the rank decides when to
    # stop (mbt.interrupt) and may still need a batch, then ends its workers itself.
    for signum in (signal.SIGINT, signal.SIGTERM):
        signal.signal(signum, signal.SIG_IGN)


def _close_live_loaders() -> None:
    """At interpreter exit, end every loader's persistent workers the orderly way: multiprocessing's own exit hook
    would send them SIGTERM, which they ignore (above), and then wait for them forever."""
    for loader in list(_LIVE_LOADERS):
        loader.close()


_LIVE_LOADERS: weakref.WeakSet[TorchLoader] = weakref.WeakSet()
atexit.register(_close_live_loaders)


class TorchLoader:
    """Batches of one split for this rank: `for batch in loader` runs the rest of the current epoch.

    `split` comes from `pipelines.open_split`: local shards are read at their index offsets, streamed ones front to
    back (see `StreamBatches`). `options` are `LoaderOptions` fields (`rank`, `world_size`, `num_workers`, `seed`,
    `augment`, `skip_bad_samples`, `device`, `shuffle_buffer`).
    `state_dict()` is the stream position (epoch, batches consumed); `load_state_dict()` makes the next
    iteration start there. In evaluation the epoch is irrelevant and each iteration is the whole rank's part.
    Workers hand over uint8 video; the batch is moved to `device` (from pinned memory on CUDA) and normalized
    there, so a GPU consumer gets its float video without the CPU ever writing it.
    """

    def __init__(self, split: Split, train: bool, batch_size: int, **options: Any) -> None:
        if not isinstance(split, SplitIndex | StreamSplit):
            raise TypeError(f"TorchLoader reads a split object: pass pipelines.open_split({split!r})")
        self.options = opts = LoaderOptions.resolve(train, batch_size, **options)
        self.index = split
        self.rank, self.world_size = opts.rank, opts.world_size
        self.train, self.batch_size, self.num_workers = train, batch_size, opts.num_workers
        self.device = torch.device("cuda" if opts.device == "gpu" else opts.device)  # "gpu": DALI's name for it
        self.streamed = isinstance(split, StreamSplit)
        self.dataset: BatchDataset | StreamBatches
        self.dataset = StreamBatches(split, opts) if self.streamed else BatchDataset(split, opts)
        self.epoch = 0
        self.position = 0
        self.skipped: list[str] = []
        # One DataLoader for the loader's life (persistent workers). Each pass of an indexed split reads the
        # (epoch, batch) items listed here when it starts; a streamed split's workers read the pass from the dataset.
        self._items: list[tuple[int, int]] = []
        self._loader: DataLoader | None = None
        _LIVE_LOADERS.add(self)

    def close(self) -> None:
        """End the persistent workers now (a later pass starts new ones)."""
        iterator = getattr(self._loader, "_iterator", None)
        if iterator is not None and hasattr(iterator, "_shutdown_workers"):
            iterator._shutdown_workers()  # DataLoader has no public way to end persistent workers
        self._loader = None

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
                batch["video"] = normalize_video(batch["video"], batch["color"])
            del batch["color"]
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
