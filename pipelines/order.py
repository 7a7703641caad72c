"""Every sample order both loaders follow, as pure functions of (seed, epoch, rank, world size): which samples rank r
reads in an epoch and in evaluation, which shards a stream reader takes, and the generator of each sample's
augmentation.

Training order (indexed splits): a permutation of all N samples seeded by (seed, epoch), repeated if the split is
smaller than one global batch, cut into `world_size` equal consecutive blocks: rank r reads block r, `num_batches`
batches of `batch_size`. Every rank has the same number of batches whatever the shard sizes; a sample is read by
one rank.
Evaluation order: rank r reads samples [N*r // W, N*(r+1) // W) in shard order, which is how DALI's readers split a
dataset over `num_shards`; every sample is read exactly once across ranks.
Streamed training, per epoch: the split's shards are cut into `parts` units (`parts` > 1 only when there are fewer
shards than readers, i.e. ranks x workers: a unit keeps every parts-th sample of its shard), the units are permuted
by (seed, epoch) and each is dealt to the reader that lacks the most samples; each reader streams its units through
a shuffle buffer (and again if it needs more) until it has made its batches. Every rank makes
`train_batches(N, batch_size, world_size)` batches, as with the indexed loader; a sample is read by one reader; as
shards differ in size, a reader may leave out or repeat a few samples of its units in an epoch (the unit of balance
is a shard, not a sample).
"""

from __future__ import annotations

import heapq
import math
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import TypeVar

import numpy as np

T = TypeVar("T")


def train_order(num_samples: int, batch_size: int, rank: int, world_size: int, seed: int, epoch: int) -> np.ndarray:
    """Sample indices rank `rank` reads in `epoch`, num_batches x batch_size of them (see the module doc)."""
    num_batches = train_batches(num_samples, batch_size, world_size)
    per_rank = num_batches * batch_size
    order = np.random.default_rng([seed, epoch]).permutation(num_samples)
    order = np.resize(order, per_rank * world_size)  # repeats only when the split is smaller than a global batch
    return order[rank * per_rank : (rank + 1) * per_rank]


def train_batches(num_samples: int, batch_size: int, world_size: int) -> int:
    """Batches per rank per epoch: the whole global batches the split holds (at least one)."""
    return max(num_samples // (batch_size * world_size), 1)


def eval_range(num_samples: int, rank: int, world_size: int) -> range:
    """Samples rank `rank` evaluates: the contiguous block DALI's reader gives shard_id=rank of num_shards."""
    return range(num_samples * rank // world_size, num_samples * (rank + 1) // world_size)


def eval_batches(num_samples: int, batch_size: int, rank: int, world_size: int) -> int:
    return math.ceil(len(eval_range(num_samples, rank, world_size)) / batch_size)


def sample_rng(seed: int, epoch: int, position: int) -> np.random.Generator:
    """The augmentation generator of the sample at `position` of the epoch's global order (rank r's positions
    follow rank r-1's), so no two ranks draw the same crops."""
    return np.random.default_rng([seed, epoch, position])


@dataclass(frozen=True)
class StreamUnit:
    """What one reader streams of a shard: the samples i with i % parts == part."""

    shard: int
    part: int = 0
    parts: int = 1

    def size(self, shard_sizes: Sequence[int]) -> int:
        return len(range(self.part, shard_sizes[self.shard], self.parts))


def train_units(shard_sizes: Sequence[int], quotas: Sequence[int], seed: int, epoch: int) -> list[list[StreamUnit]]:
    """For each reader (rank-major: reader = rank * workers + worker), the units it streams in `epoch`, given the
    samples each must deliver (`quotas`): the shards (with fewer shards than readers, parts of them) permuted by
    (seed, epoch), each dealt to the reader that lacks the most samples. A reader with a quota gets a unit with
    samples."""
    readers = len(quotas)
    parts = math.ceil(readers / len(shard_sizes))
    units = [StreamUnit(s, p, parts) for s in range(len(shard_sizes)) for p in range(parts)]
    units = [units[i] for i in np.random.default_rng([seed, epoch]).permutation(len(units))]
    units = [u for u in units if u.size(shard_sizes)]
    dealt: list[list[StreamUnit]] = [[] for _ in range(readers)]
    lacking = [(-quota, reader) for reader, quota in enumerate(quotas) if quota > 0]
    heapq.heapify(lacking)
    for unit in units if lacking else []:
        need, reader = heapq.heappop(lacking)
        dealt[reader].append(unit)
        heapq.heappush(lacking, (need + unit.size(shard_sizes), reader))
    return [d or ([units[r % len(units)]] if quotas[r] else []) for r, d in enumerate(dealt)]


def shuffled(items: Iterator[T], size: int, rng: np.random.Generator) -> Iterator[T]:
    """`items` through a shuffle buffer of `size`: once it is full, each new item takes the place of a random one,
    which comes out; at the end the rest come out in random order."""
    buffer: list[T] = []
    for item in items:
        if len(buffer) < size:
            buffer.append(item)
            continue
        j = int(rng.integers(size))
        buffer[j], item = item, buffer[j]
        yield item
    for j in rng.permutation(len(buffer)):
        yield buffer[j]


def reader_buffer(units: Sequence[StreamUnit], shard_sizes: Sequence[int], per_reader: int) -> int:
    """The shuffle buffer of a reader: `per_reader`, but no more than its units hold (a cycled stream would fill
    it with repeats)."""
    return max(1, min(per_reader, sum(u.size(shard_sizes) for u in units)))
