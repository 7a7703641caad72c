"""Files of an output folder that several processes share: atomic writes (a reader or a resumed job sees the old
file or the whole new one, never a part), bounded reads of small state files, and exclusive locks.

Every file the project writes goes through here: `atomic_write` (a file object: torch.save, np.savez, savefig, csv),
`atomic_path` (a name, for writers that take only one: safetensors), `write_bytes_atomic`, `append_bytes` (logs),
or `writing` around a writer that streams (the shard writer). So a full disk is one error everywhere: a write that
fails for want of space (ENOSPC, EDQUOT, EFBIG; also when a library wrapped it in an error of its own) raises
DiskFullError, one line naming the file being written (its final name) and saying "free space, then rerun the same
command"; the partial file is removed (an appended file is cut back to its old length), so the previous files stay
whole and a rerun starts from them.
"""

from __future__ import annotations

import errno
import fcntl
import os
import re
import socket
import stat
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import IO, Any

from shards.text import printable

TMP_SUFFIX = ".tmp"
DISK_FULL_ERRNOS = frozenset({errno.ENOSPC, errno.EDQUOT, errno.EFBIG})
RERUN = "free space, then rerun the same command"
_OS_ERROR_TEXT = re.compile(r"\(os error (\d+)\)")  # how a Rust library (safetensors) reports an OS error


class DiskFullError(OSError):
    """A file could not be written for want of space (a full disk, a quota, a file-size limit); the message, one
    line, names the file and what to do. An OSError, so that each command's `except OSError` prints it as its one
    `error:` line; made from the message alone, so that it pickles (a worker's or a rank's error travels)."""


def disk_full(path: str | os.PathLike[str], code: int = errno.ENOSPC) -> DiskFullError:
    """The DiskFullError of writing `path` that failed with errno `code`."""
    return DiskFullError(f"cannot write {os.fspath(path)}: {os.strerror(code)}; {RERUN}")


def disk_full_errno(err: BaseException) -> int | None:
    """The errno of the full disk behind `err`: its own, that of an error it was raised from or while handling
    (torch.save raises a RuntimeError while the OSError of its write is handled), or one its text reports as
    '(os error N)'; None when no full disk is behind it."""
    seen: set[int] = set()
    current: BaseException | None = err
    while current is not None and id(current) not in seen:
        seen.add(id(current))
        code = current.errno if isinstance(current, OSError) else None
        if code is None and (m := _OS_ERROR_TEXT.search(str(current))):
            code = int(m[1])
        if code in DISK_FULL_ERRNOS:
            return code
        current = current.__cause__ or current.__context__
    return None


def tmp_path_for(path: Path) -> Path:
    """The temporary name `path` is written under before the rename."""
    return path.with_name(path.name + TMP_SUFFIX)


@contextmanager
def writing(path: Path, tmp: Path | None = None) -> Iterator[None]:
    """The block writes `path` (through the temporary file `tmp`, if given). When it raises, `tmp` is removed, a
    full disk becomes DiskFullError naming `path`, and another OSError that names no file (a failed write() or
    fsync()) names `tmp` (else `path`)."""
    try:
        yield
    except BaseException as err:
        if tmp is not None:
            tmp.unlink(missing_ok=True)
        if isinstance(err, DiskFullError):  # raised by a `writing` inside this one: it names the file already
            raise
        if (code := disk_full_errno(err)) is not None:
            raise disk_full(path, code) from err
        if isinstance(err, OSError) and err.filename is None:
            err.filename = os.fspath(tmp or path)
        raise


def commit(tmp: Path, path: Path) -> Path:
    """fsync `tmp`, rename it to `path` and fsync the folder so that the rename survives a crash."""
    with writing(path):
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
        dir_fd = os.open(path.parent, os.O_RDONLY)
        try:
            os.fsync(dir_fd)
        finally:
            os.close(dir_fd)
    return path


@contextmanager
def atomic_path(path: Path, unique: bool = False) -> Iterator[Path]:
    """A temporary name for a writer that takes a file name: when the block ends without an error the file is
    committed as `path` (fsync, rename); when it raises, the file is removed and a full disk is DiskFullError naming
    `path`. `unique`: a name of this process's own, for a file several processes may write (the last rename wins)."""
    tmp = path.with_name(f"{path.name}.{os.getpid()}{TMP_SUFFIX}") if unique else tmp_path_for(path)
    with writing(path, tmp):
        yield tmp
        commit(tmp, path)


@contextmanager
def atomic_write(path: Path, mode: str = "wb", unique: bool = False, **open_args: Any) -> Iterator[IO[Any]]:
    """`path` opened for writing under a temporary name (`mode` "wb", or "w" in UTF-8 with `open_args` such as
    newline="" for csv), committed as `path` when the block ends without an error; see `atomic_path`."""
    if "b" not in mode:
        open_args.setdefault("encoding", "utf-8")
    with atomic_path(path, unique) as tmp, open(tmp, mode, **open_args) as f:
        yield f


def write_bytes_atomic(path: Path, data: bytes) -> Path:
    """Write `data` to `path` atomically; safe when several processes write the same file (the last rename wins).
    On failure the temporary file is removed; a full disk is DiskFullError naming `path`."""
    with atomic_write(path, unique=True) as f:
        f.write(data)
    return path


def append_bytes(path: Path, data: bytes) -> Path:
    """Append `data` to `path` (made if missing) whole or not at all: when a write fails, the file is cut back to
    its old length (a full disk: DiskFullError naming `path`)."""
    with writing(path):
        fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_CLOEXEC, 0o644)
        try:
            size = os.fstat(fd).st_size
            try:
                view = memoryview(data)
                while view:
                    view = view[os.write(fd, view) :]
            except BaseException:
                os.ftruncate(fd, size)
                raise
        finally:
            os.close(fd)
    return path


def read_small_file(path: Path, max_bytes: int) -> bytes:
    """The bytes of the regular file `path`; FileNotFoundError when there is none, ValueError saying why when it is
    not a regular file (a FIFO would block, a device never end) or holds more than `max_bytes` (its size is
    checked before it is read)."""
    fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC)
    with os.fdopen(fd, "rb") as f:
        info = os.fstat(fd)
        if not stat.S_ISREG(info.st_mode):
            raise ValueError("not a regular file")
        if info.st_size > max_bytes:
            raise ValueError(f"larger than {max_bytes} bytes")
        data = f.read(max_bytes + 1)
    if len(data) > max_bytes:
        raise ValueError(f"larger than {max_bytes} bytes")
    return data


class LockedError(RuntimeError):
    """Another process holds the lock; `holder` is what it wrote in the lock file (its pid), or ''."""

    def __init__(self, path: Path, holder: str) -> None:
        super().__init__(f"{path} is locked by {holder or 'another process'}")
        self.holder = holder


@contextmanager
def exclusive_lock(path: Path, wait_s: float = 0.0) -> Iterator[None]:
    """Hold an exclusive flock on `path` (created if needed; this pid and host written in it) for the block, as soon
    as no other open file holds it, or LockedError when one still does after `wait_s` seconds (0: at once). The
    kernel drops the lock when the holder dies, even by SIGKILL."""
    fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
    try:
        deadline = time.monotonic() + wait_s
        while True:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                if time.monotonic() >= deadline:
                    holder = printable(os.pread(fd, 256, 0).decode(errors="replace").strip())
                    raise LockedError(path, holder) from None
                time.sleep(0.01)
        with writing(path):
            os.ftruncate(fd, 0)
            os.pwrite(fd, f"pid {os.getpid()} on {socket.gethostname()}\n".encode(), 0)
        yield
    finally:
        os.close(fd)


def remove_stale_tmp(folder: Path) -> list[Path]:
    """Delete the temporary files a killed writer left in `folder` (not recursive); returns them."""
    stale = sorted(folder.glob(f"*{TMP_SUFFIX}"))
    for path in stale:
        path.unlink()
    return stale
