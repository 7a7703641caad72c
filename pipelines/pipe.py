"""Commands for `pipe:` URLs: a shell command (webdataset's convention) whose standard output is a file of a split, read
front to back with no local copy. http(s), s3 and gs URLs become such commands (curl, the AWS CLI, gsutil).

A `pipe:` URL names one shard file (`….tar`) or the split's `manifest.json` (all of its shards). A shard's siblings
(the manifest) are read by the same command with the file name replaced: the shard name is the last word of the
command that ends in `.tar`, and names put into a command are quoted for the shell (they come from manifests).
A stream counts what it reads, gives up after STREAM_STALL_S without data or when it has kept its reader waiting
longer in all than its deadline (`stream_deadline_s`: a connection that trickles a few bytes every few minutes),
and kills its command's whole process group when it is left half-way.
"""

from __future__ import annotations

import contextlib
import logging
import os
import re
import select
import shlex
import signal
import subprocess
import tempfile
import time
from dataclasses import dataclass
from typing import IO

from pipelines.config import LoaderError
from shards.manifest import MANIFEST_NAME, MAX_MANIFEST_BYTES

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

# A stream may keep its reader waiting this long in all whatever its size, and longer only at this many bytes per
# second (MIN_RATE_ENV sets another): a shard of a few hundred MB takes a few seconds from an object store.
STREAM_DEADLINE_MIN_S = 300.0
STREAM_MIN_BYTES_PER_S = 1 << 20
MIN_RATE_ENV = "MBT_STREAM_MIN_BYTES_PER_S"

_STDERR_TAIL = 2000

# The file name a pipe: command reads: the last word ending in .tar (or manifest.json), after a '/' or ':' or alone,
# before a space, quote or shell operator.
_NAME_RE = re.compile(r"(?:(?<=[\s/:'\"=])|^)([^\s/:'\"=;|&()]+\.tar|manifest\.json)(?=$|[\s'\";|&)])")

log = logging.getLogger(__name__)


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


def min_rate_bytes_per_s() -> float:
    """The slowest a stream may deliver, in bytes per second: the environment variable MBT_STREAM_MIN_BYTES_PER_S, or
    STREAM_MIN_BYTES_PER_S; LoaderError when the variable is not a positive number."""
    text = os.environ.get(MIN_RATE_ENV)
    if text is None:
        return float(STREAM_MIN_BYTES_PER_S)
    try:
        rate = float(text)
    except ValueError:
        rate = 0.0
    if not 0 < rate < float("inf"):
        raise LoaderError(f"{MIN_RATE_ENV}={text!r:.40} is not a positive number of bytes per second")
    return rate


def stream_deadline_s(num_bytes: int) -> float:
    """The most seconds a stream of `num_bytes` may keep its reader waiting in all: max(STREAM_DEADLINE_MIN_S,
    num_bytes / min_rate_bytes_per_s())."""
    return max(STREAM_DEADLINE_MIN_S, num_bytes / min_rate_bytes_per_s())


class PipeStream:
    """The standard output of a `pipe:` URL's shell command, as a binary file that counts what was read.

    A read that waits more than `stall_s` for data raises StreamError, and so does one that brings the time spent
    waiting for data in all past `deadline_s` (None: no deadline): a stalled or trickling connection is retried,
    never waited on for ever. Only waiting counts: a reader that is slow itself never runs out of time.
    `finish()` reads to the end and raises StreamError if the command failed; `close()` before that stops the
    command (a reader that leaves a shard half-way). The command's standard error goes to a temporary file, whose
    end the error messages quote.
    """

    def __init__(self, url: str, stall_s: float | None = None, deadline_s: float | None = None) -> None:
        self.url = url
        self.bytes_read = 0
        self.stall_s = STREAM_STALL_S if stall_s is None else stall_s
        self.deadline_s = deadline_s
        self.waited_s = 0.0
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
        timeout = self.stall_s if self.deadline_s is None else min(self.stall_s, self.deadline_s - self.waited_s)
        started = time.monotonic()
        ready, _, _ = select.select([self._fd], [], [], max(timeout, 0.0))
        self.waited_s += time.monotonic() - started
        if not ready and timeout >= self.stall_s:
            raise StreamError(f"{self.url}: no data for {self.stall_s:.0f} s (a stalled connection or command?)")
        if not ready:
            received = self.bytes_read + len(self._buffer) - self._pos
            raise StreamError(
                f"{self.url}: {received} bytes after waiting {self.waited_s:.0f} s in all for data, past the stream's "
                f"deadline (a trickling connection or command?; {MIN_RATE_ENV} sets the slowest rate allowed)"
            )
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
        with PipeStream(url, deadline_s=stream_deadline_s(MAX_MANIFEST_BYTES)) as stream:
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
