"""Files of an output folder that several processes share: atomic writes (a reader or a resumed job sees the old
file or the whole new one, never a part), bounded reads of small state files, and exclusive locks."""

from __future__ import annotations

import fcntl
import os
import socket
import stat
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from shards.text import printable

TMP_SUFFIX = ".tmp"


def tmp_path_for(path: Path) -> Path:
    """The temporary name `path` is written under before the rename."""
    return path.with_name(path.name + TMP_SUFFIX)


@contextmanager
def naming_errors(path: Path) -> Iterator[None]:
    """An OSError raised in the block names `path` when the OS named no file (a failed write() or fsync())."""
    try:
        yield
    except OSError as err:
        if err.filename is None:
            err.filename = os.fspath(path)
        raise


def commit(tmp: Path, path: Path) -> Path:
    """fsync `tmp`, rename it to `path` and fsync the folder so that the rename survives a crash."""
    with naming_errors(tmp), open(tmp, "rb+") as f:
        os.fsync(f.fileno())
    os.replace(tmp, path)
    dir_fd = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(dir_fd)
    finally:
        os.close(dir_fd)
    return path


def write_bytes_atomic(path: Path, data: bytes) -> Path:
    """Write `data` to `path` atomically; safe when several processes write the same file (the last rename wins).
    On failure (a full disk) the temporary file is removed and the OSError names it."""
    tmp = path.with_name(f"{path.name}.{os.getpid()}{TMP_SUFFIX}")
    try:
        with naming_errors(tmp):
            tmp.write_bytes(data)
        return commit(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


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
        with naming_errors(path):
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
