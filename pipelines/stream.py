"""Shards read as streams: `pipe:` URLs (`pipe:aws s3 cp s3://bucket/as/train/shard-000000.tar -`) whose standard
output is the tar, read front to back with no index and no local copy (http(s), s3 and gs URLs become such
commands). The stages here are small and torch-free: where a split's manifest is (`StreamSplit`), one shard's
samples (`shard_samples`, checked against the manifest, retried on a failed command), which shards a reader streams
in an epoch (`train_units`), its samples through a shuffle buffer (`reader_samples`, `shuffled`), and a rank's
evaluation block (`range_samples`). `pipelines.torch_loader` builds batches from them.

A `pipe:` URL names one shard file (`….tar`) or the split's `manifest.json` (all of its shards). A shard's siblings
(the manifest) are read by the same command with the file name replaced: the shard name is the last word of the
command that ends in `.tar`.

Training order, per epoch: the split's shards are cut into `parts` units (`parts` > 1 only when there are fewer
shards than readers, i.e. ranks x workers: a unit keeps every parts-th sample of its shard), the units are permuted
by (seed, epoch) and each is dealt to the reader that lacks the most samples; each reader streams its units through
a shuffle buffer (and again if it needs more) until it has made its batches. Every rank makes
`train_batches(N, batch_size, world_size)` batches, as with the indexed loader; a sample is read by one reader; as
shards differ in size, a reader may leave out or repeat a few samples of its units in an epoch (the unit of balance
is a shard, not a sample).
Evaluation: rank r's block of samples in split order, as `pipelines.split.eval_range` says, each worker streaming
the shards under its part of the block: every sample is evaluated exactly once, the same rows as the indexed loader.
"""

from __future__ import annotations

import contextlib
import heapq
import logging
import math
import os
import re
import select
import shlex
import signal
import subprocess
import tempfile
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import IO, TypeVar

import numpy as np
from braceexpand import braceexpand

from pipelines.split import LoaderError, SplitIndex, combine_manifests, expand_sources
from shards.manifest import Manifest, ShardInfo, load_manifest, parse_manifest
from shards.schema import MANIFEST_NAME, SchemaError
from shards.tar import TarReadError, tar_samples

log = logging.getLogger(__name__)

PIPE = "pipe:"
# A stream that fails (the command exits non-zero, the tar is cut short) is opened again this many times; the
# samples already delivered are skipped, so the output is the same as without the failure.
STREAM_RETRIES = 2
# URLs streamed by a command, as webdataset's gopen does (its `pipe:` form is what they become).
_STREAM_COMMANDS = {
    "http://": "curl -fsSL --retry 3 {}",
    "https://": "curl -fsSL --retry 3 {}",
    "s3://": "aws s3 cp {} -",
    "gs://": "gsutil cat {}",
}
_READ_CHUNK = 1 << 20
# A stream with no data for this long is given up (and read again): object stores answer within seconds.
STREAM_STALL_S = 300.0
# A manifest is a few MB (AudioSet-2M: ~4,000 shards and its failures); more is not one.
MAX_MANIFEST_BYTES = 1 << 29
_STDERR_TAIL = 2000
# The file name a pipe: command reads: the last word ending in .tar (or manifest.json), after a '/' or ':' or alone,
# before a space, quote or shell operator.
_NAME_RE = re.compile(r"(?:(?<=[\s/:'\"=])|^)([^\s/:'\"=;|&()]+\.tar|manifest\.json)(?=$|[\s'\";|&)])")

T = TypeVar("T")


class StreamError(OSError):
    """A stream could not be read to its end: the command failed, or its output is not the shard it should be."""


@dataclass(frozen=True)
class PipeURL:
    """A `pipe:` URL cut around the file name it reads, so that its siblings can be named."""

    url: str
    head: str
    name: str
    tail: str

    @classmethod
    def parse(cls, url: str) -> PipeURL:
        found = list(_NAME_RE.finditer(url, len(PIPE)))
        if not found:
            raise LoaderError(
                f"{url}: a pipe: URL must name the shard (….tar) or the split's {MANIFEST_NAME} it reads, e.g. "
                "'pipe:aws s3 cp s3://bucket/audioset/train/shard-000000.tar -'"
            )
        match = found[-1]
        return cls(url, url[: match.start()], match.group(1), url[match.end() :])

    def sibling(self, name: str) -> str:
        """The URL that reads file `name` of the same folder with the same command (the name quoted for the shell:
        names come from manifests, which may come from anywhere)."""
        return f"{self.head}{shlex.quote(name)}{self.tail}"

    @property
    def folder(self) -> tuple[str, str]:
        return self.head, self.tail


class PipeStream:
    """The standard output of a `pipe:` URL's shell command, as a binary file that counts what was read.

    A read that waits more than `stall_s` for data raises StreamError (a stalled connection is retried, never waited
    on for ever). `finish()` reads to the end and raises StreamError if the command failed; `close()` before that
    stops the command (a reader that leaves a shard half-way). The command's standard error goes to a temporary
    file, whose end the error messages quote.
    """

    def __init__(self, url: str, stall_s: float | None = None) -> None:
        self.url = url
        self.bytes_read = 0
        self.stall_s = STREAM_STALL_S if stall_s is None else stall_s
        self._stderr = tempfile.TemporaryFile()  # noqa: SIM115 (closed by close())
        try:
            # A pipe: URL is a shell command by definition (webdataset's convention); the user writes it.
            self._proc = subprocess.Popen(
                url.removeprefix(PIPE), shell=True, stdout=subprocess.PIPE, stderr=self._stderr, bufsize=0,
                start_new_session=True,
            )  # fmt: skip
        except OSError as err:
            self._stderr.close()
            raise StreamError(f"{url}: could not start the command: {err}") from err
        self._stdout: IO[bytes] = self._proc.stdout  # type: ignore[assignment]
        self._fd = self._stdout.fileno()
        self._buffer = bytearray()
        self._pos = 0
        self._eof = False

    def _fill(self) -> None:
        ready, _, _ = select.select([self._fd], [], [], self.stall_s)
        if not ready:
            raise StreamError(f"{self.url}: no data for {self.stall_s:.0f} s (a stalled connection or command?)")
        chunk = os.read(self._fd, _READ_CHUNK)
        if not chunk:
            self._eof = True
        elif self._pos == len(self._buffer):
            self._buffer[:], self._pos = chunk, 0
        else:
            if self._pos > _READ_CHUNK:
                del self._buffer[: self._pos]
                self._pos = 0
            self._buffer += chunk

    def read(self, size: int = -1) -> bytes:
        """Up to `size` bytes (all that is left for -1); fewer only at the end of the stream."""
        while (size < 0 or len(self._buffer) - self._pos < size) and not self._eof:
            self._fill()
        end = len(self._buffer) if size < 0 else min(self._pos + size, len(self._buffer))
        data = bytes(self._buffer[self._pos : end])
        self._pos = end
        self.bytes_read += len(data)
        return data

    def finish(self, limit: int | None = None) -> None:
        """Read what is left (StreamError past `limit` bytes in all: a stream that never ends), wait for the command,
        StreamError if it exited non-zero."""
        while self.read(_READ_CHUNK):  # counted in bytes_read: more than the manifest's bytes means another file
            if limit is not None and self.bytes_read > limit:
                raise StreamError(
                    f"{self.url}: {self.bytes_read} bytes, the manifest says {limit} (another file, or no end?)"
                )
        try:
            status = self._proc.wait(timeout=self.stall_s)
        except subprocess.TimeoutExpired:
            raise StreamError(f"{self.url}: the command closed its output but did not exit") from None
        if status != 0:
            raise StreamError(f"{self.url}: the command exited with status {status}: {self.stderr_tail() or '-'}")

    def stderr_tail(self) -> str:
        self._stderr.seek(0)
        return self._stderr.read().decode(errors="replace").strip()[-_STDERR_TAIL:]

    def close(self) -> None:
        if self._proc.poll() is None:  # left half-way: stop the whole command (a pipeline has several processes)
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self._proc.pid, signal.SIGKILL)
        self._stdout.close()
        self._proc.wait()
        self._stderr.close()

    def __enter__(self) -> PipeStream:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def read_url(url: str, retries: int = STREAM_RETRIES) -> bytes:
    """All the output of a `pipe:` URL (a manifest), read again up to `retries` times if the command fails; then a
    LoaderError with the command's message."""

    def read_all() -> bytes:
        with PipeStream(url) as stream:
            chunks = []
            while chunk := stream.read(_READ_CHUNK):
                chunks.append(chunk)
                if stream.bytes_read > MAX_MANIFEST_BYTES:
                    raise StreamError(f"{url}: more than {MAX_MANIFEST_BYTES} bytes: not a manifest")
            stream.finish()
        return b"".join(chunks)

    for _ in range(retries):
        try:
            return read_all()
        except StreamError as err:
            log.warning("reading it again: %s", err)
    try:
        return read_all()
    except StreamError as err:
        hint = "check that the command runs in a shell and writes the file to its standard output"
        raise LoaderError(f"{err}\nread {retries + 1} times; {hint}") from None


def as_pipe(url: str) -> str:
    """`url` as a pipe: URL: http(s), s3 and gs URLs become the command that streams them (curl, the AWS CLI,
    gsutil, which must be installed where the loader runs); pipe: URLs stay as they are."""
    for scheme, command in _STREAM_COMMANDS.items():
        if url.startswith(scheme):
            return PIPE + command.format(shlex.quote(url))
    return url


def is_stream_source(source: str | Path | Sequence[str | Path] | SplitIndex | StreamSplit) -> bool:
    """Whether `source` names streamed shards (`pipe:`, http(s), s3 or gs URLs, or a StreamSplit); mixing them with
    local shards is refused."""
    if isinstance(source, SplitIndex | StreamSplit):
        return isinstance(source, StreamSplit)
    items = [source] if isinstance(source, str | Path) else list(source)
    piped = [isinstance(item, str) and as_pipe(item).startswith(PIPE) for item in items]
    if any(piped) and not all(piped):
        raise LoaderError("a split is streamed URLs or local shards, not both: give the local ones as pipe:cat URLs")
    return bool(items) and all(piped)


class StreamSplit:
    """A split read as streams: manifests fetched with the URLs' own commands, shard URLs in split order.

    `source` is a `pipe:` URL or a list of them, brace patterns expanded (`…/shard-{000000..000123}.tar -`); each
    names a shard or a split's manifest.json (all of its shards); http(s), s3 and gs URLs are streamed with the
    command `as_pipe` gives them. Shards of several folders must have the same features and classes, and are read
    as one split (log-mel statistics combined exactly). The interface of `SplitIndex` that the loaders use:
    `manifest` (its shards: the ones selected), `folder` (for messages), len().
    """

    def __init__(self, source: str | Sequence[str]) -> None:
        items = [source] if isinstance(source, str) else list(source)
        urls = [PipeURL.parse(as_pipe(text)) for item in items for text in braceexpand(str(item))]
        if not urls:
            raise LoaderError("no shards given: pass pipe: URLs of shards or of a split's manifest.json")
        # One manifest per folder (the command around the file name), with the shards named (None: all of them).
        folders: dict[tuple[str, str], tuple[PipeURL, set[str] | None]] = {}
        for url in urls:
            names = folders.setdefault(url.folder, (url, set()))[1]
            if url.name == MANIFEST_NAME:
                folders[url.folder] = (url, None)
            elif names is not None:
                names.add(url.name)
        selected: list[tuple[str, ShardInfo]] = []
        manifests: list[tuple[str, Manifest]] = []
        for url, names in folders.values():
            where = url.sibling(MANIFEST_NAME)
            try:
                manifest = parse_manifest(read_url(where), where)
            except SchemaError as err:
                raise LoaderError(str(err)) from None
            known = {s.name for s in manifest.shards}
            if names is not None and names - known:
                raise LoaderError(f"{where}: {sorted(names - known)} not in this manifest; check the pattern")
            selected += [(url.sibling(s.name), s) for s in manifest.shards if names is None or s.name in names]
            manifests.append((where, manifest))
        self.folder = manifests[0][0]
        self.manifest = combine_manifests(manifests, [s for _, s in selected])
        self.urls = [shard_url for shard_url, _ in selected]

    def __len__(self) -> int:
        return self.manifest.num_samples


def open_split(source: str | Path | Sequence[str | Path] | SplitIndex | StreamSplit) -> SplitIndex | StreamSplit:
    """The split `source` names: streamed (`StreamSplit`) for pipe: URLs, else indexed (`SplitIndex`)."""
    if isinstance(source, SplitIndex | StreamSplit):
        return source
    if is_stream_source(source):
        return StreamSplit(source if isinstance(source, str) else [str(s) for s in source])
    return SplitIndex(source)


def is_plain_path(source: str) -> bool:
    """Whether `source` is one local path: no URL scheme, no brace pattern, not a shard file."""
    return not re.match(r"^[A-Za-z][A-Za-z0-9+.-]*:", source) and "{" not in source and not source.endswith(".tar")


def split_manifest(source: str | Path | Sequence[str | Path]) -> Manifest:
    """The manifest of the split `source` names, for checks before loading (features and classes; the shards
    listed are those of its first folder): streamed splits fetch their manifests, local ones read the first."""
    if is_stream_source(source):
        return StreamSplit(source if isinstance(source, str) else [str(s) for s in source]).manifest
    folder = expand_sources(source)[0][0]
    try:
        return load_manifest(folder)
    except SchemaError as err:
        raise LoaderError(str(err)) from None


def shard_samples(
    url: str, shard: ShardInfo, exts: frozenset[str] | None = None, retries: int = STREAM_RETRIES
) -> Iterator[tuple[int, str, dict[str, bytes]]]:
    """(index in the shard, key, members) of every sample of the shard that `url` streams.

    Read to its end, the stream must hold the manifest's number of samples and bytes and the command must exit 0;
    otherwise it is read again (up to `retries` times, skipping the samples already given) and then a LoaderError
    names the URL. A consumer that stops early stops the command.
    """
    delivered = 0
    for attempt in range(retries + 1):
        try:
            with PipeStream(url) as stream:
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


def reader_buffer(units: Sequence[StreamUnit], shard_sizes: Sequence[int], per_reader: int) -> int:
    """The shuffle buffer of a reader: `per_reader`, but no more than its units hold (a cycled stream would fill
    it with repeats)."""
    return max(1, min(per_reader, sum(u.size(shard_sizes) for u in units)))
