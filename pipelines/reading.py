"""How the bytes of samples are read: `SampleReader` reads members of an indexed split at their `.idx` offsets (pread,
a bounded number of shard files open per process, each member's tar header checked against its index entry);
`shard_samples`, `reader_samples` and `range_samples` read streamed shards front to back (each stream checked against
its manifest entry and read again on a failed command), for a training reader's units through a shuffle buffer, and
for a rank's evaluation block.
"""

from __future__ import annotations

import contextlib
import logging
import os
import threading
from collections import OrderedDict
from collections.abc import Iterator, Sequence

import numpy as np

from pipelines.config import LoaderError
from pipelines.order import StreamUnit, shuffled
from pipelines.pipe import STREAM_RETRIES, PipeStream, StreamError, stream_deadline_s
from pipelines.sources import SplitIndex, StreamSplit
from shards.index import member_header_problem
from shards.manifest import ShardInfo
from shards.sample_table import SampleRef
from shards.tar import BLOCK, TarReadError, tar_samples

# Shard files a process keeps open at once: a split may have more shards than the open-file limit (AudioSet-2M:
# ~4,000), and each loader worker has its own.
MAX_OPEN_SHARDS = 64

log = logging.getLogger(__name__)


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
        """{ext: payload} of the members `exts` of sample `ref`; LoaderError naming the shard and key (and the index
        file when the tar header before a payload is not that member's: `member_header_problem`)."""
        return {ext: self._member(ref, ext, with_payload=True) for ext in exts}

    def check_headers(self, ref: SampleRef, exts: list[str]) -> None:
        """Check the tar header of each member `exts` of sample `ref` against its index entry, as `read` does,
        reading the headers only (for a reader that reads the payloads itself: DALI)."""
        for ext in exts:
            self._member(ref, ext, with_payload=False)

    def _member(self, ref: SampleRef, ext: str, with_payload: bool) -> bytes:
        name = self.index.shard_paths[ref.shard].name
        if ext not in ref.members:
            raise LoaderError(f"{name}: sample {ref.key} has no member {ext}")
        offset, size = ref.members[ext]
        try:
            header = self._pread(ref.shard, BLOCK, offset - BLOCK)
            if problem := member_header_problem(header, f"{ref.key}.{ext}", size):
                raise LoaderError(
                    f"{self.index.index_paths[ref.shard]}: sample {ref.key}: {ext} at byte {offset} of {name}: "
                    f"{problem}; the index does not match its shard: re-run the shard job (or DALI's wds2idx)"
                )
            payload = self._pread(ref.shard, size, offset) if with_payload else b""
        except OSError as err:
            raise LoaderError(f"{name}: sample {ref.key}: {ext} cannot be read ({err})") from err
        if len(payload) != (size if with_payload else 0):
            raise LoaderError(f"{name}: sample {ref.key}: {ext} is truncated")
        return payload

    def close(self) -> None:
        with self._lock:
            if self._pid == os.getpid():
                for fd in self._fds.values():
                    os.close(fd)
            self._fds.clear()


class HeaderCheck:
    """For a reader that reads payloads at the index offsets itself (DALI's, which never reads a tar header): the
    first time a sample comes, the tar headers of its members `exts` are checked against the index
    (`SampleReader.check_headers`); a sample is found by its shard's path and the offset of its member `by_ext`."""

    def __init__(self, index: SplitIndex, exts: list[str], by_ext: str) -> None:
        self.index, self.exts, self.by_ext = index, exts, by_ext
        self._shards = {str(path.resolve()): number for number, path in enumerate(index.shard_paths)}
        self._by_offset: dict[int, dict[int, int]] = {}  # shard -> {offset of by_ext: sample}, made when first read
        self._checked = np.zeros(len(index), dtype=bool)

    def check(self, sources: Sequence[tuple[str, int]]) -> None:
        """Check the samples of (shard path, offset of member `by_ext`) not checked yet; LoaderError naming the index
        file and key of the first whose headers do not match, or a source that is not a sample of the index."""
        reader = SampleReader(self.index)
        try:
            for path, offset in sources:
                sample = self._sample(path, offset)
                if not self._checked[sample]:
                    reader.check_headers(self.index.samples[sample], self.exts)
                    self._checked[sample] = True
        finally:
            reader.close()

    def _sample(self, path: str, offset: int) -> int:
        shard = self._shards.get(path)
        if shard is not None and shard not in self._by_offset:
            first, end = self.index.samples.shard_starts[shard : shard + 2]
            refs = {i: self.index.samples[i] for i in range(first, end)}
            self._by_offset[shard] = {r.members[self.by_ext][0]: i for i, r in refs.items() if self.by_ext in r.members}
        sample = None if shard is None else self._by_offset[shard].get(offset)
        if sample is None:
            raise LoaderError(f"{path}: no sample of the split has {self.by_ext} at byte {offset}")
        return sample


def shard_samples(
    url: str, shard: ShardInfo, exts: frozenset[str] | None = None, retries: int = STREAM_RETRIES
) -> Iterator[tuple[int, str, dict[str, bytes]]]:
    """(index in the shard, key, members) of every sample of the shard that `url` streams.

    Read to its end, the stream must hold the manifest's number of samples and bytes, keep its reader waiting no
    longer than `stream_deadline_s` of the manifest's bytes and the command must exit 0; otherwise it is read again
    (up to `retries` times, skipping the samples already given) and then a LoaderError names the URL. A consumer
    that stops early stops the command.
    """
    delivered = 0
    for attempt in range(retries + 1):
        try:
            with PipeStream(url, deadline_s=stream_deadline_s(shard.bytes)) as stream:
                count = 0
                for count, (key, members) in enumerate(tar_samples(stream, shard.bytes, exts), start=1):
                    if count > shard.num_samples:
                        raise StreamError(f"more than the manifest's {shard.num_samples} samples")
                    if count > delivered:
                        delivered = count
                        yield count - 1, key, members
                stream.finish(shard.bytes)
                if count != shard.num_samples:
                    raise StreamError(f"{count} samples, the manifest says {shard.num_samples} (cut short?)")
                if stream.bytes_read != shard.bytes:
                    raise StreamError(f"{stream.bytes_read} bytes, the manifest says {shard.bytes} (another file?)")
            return
        except (OSError, TarReadError) as err:  # StreamError too
            message = str(err) if str(err).startswith(url) else f"{url}: {err}"
            if attempt == retries:
                raise LoaderError(
                    f"{message}\nread {attempt + 1} times; check the command and the shard "
                    f"({shard.name}: run tools/verify_shards.py on its folder)"
                ) from None
            log.warning("stream failed after %d samples, reading it again: %s", delivered, message)


def reader_samples(
    split: StreamSplit, units: Sequence[StreamUnit], exts: frozenset[str] | None, buffer: int, rng: np.random.Generator
) -> Iterator[tuple[str, str, dict[str, bytes]]]:
    """(shard name, key, members) of the units, pass after pass without end, each pass through a shuffle buffer of
    `buffer` samples that is emptied at its end: a reader repeats a sample only after it gave all of them."""
    shards = split.manifest.shards

    def one_pass() -> Iterator[tuple[str, str, dict[str, bytes]]]:
        for unit in units:
            for i, key, members in shard_samples(split.urls[unit.shard], shards[unit.shard], exts):
                if i % unit.parts == unit.part:
                    yield shards[unit.shard].name, key, members

    while True:
        yield from shuffled(one_pass(), buffer, rng)


def range_samples(
    split: StreamSplit, start: int, stop: int, exts: frozenset[str] | None
) -> Iterator[tuple[str, str, dict[str, bytes]]]:
    """(shard name, key, members) of the split's samples [start, stop) in split order: only the shards under the
    range are streamed, the first from its beginning, the last until `stop`."""
    offset = 0
    for url, shard in zip(split.urls, split.manifest.shards, strict=True):
        first, offset = offset, offset + shard.num_samples
        if offset <= start:
            continue
        if first >= stop:
            return
        with contextlib.closing(shard_samples(url, shard, exts)) as samples:
            for i, key, members in samples:
                if first + i >= stop:
                    break
                if first + i >= start:
                    yield shard.name, key, members
