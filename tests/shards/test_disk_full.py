"""A full disk under every kind of writer (`shards.atomic`): the error names the file being written and says "free
space, then rerun the same command", nothing partial is left, and the previous file stays whole. Each writer is run
against a write that fails part-way (fault injected, so it runs anywhere) and against a real full tmpfs."""

from __future__ import annotations

import builtins
import csv
import errno
import os
import pickle
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from full_disk import FullDisk

import shards.atomic
from shards.atomic import (
    RERUN,
    DiskFullError,
    append_bytes,
    atomic_path,
    atomic_write,
    disk_full_errno,
    write_bytes_atomic,
)
from shards.writer import ShardWriter

ENOSPC_TEXT = os.strerror(errno.ENOSPC)


class FillingFile:
    """A file opened for writing whose writes fail with ENOSPC once `room` bytes are in (the part that fits first,
    as a disk does); everything else is the real file's."""

    def __init__(self, file: Any, room: int) -> None:
        self._file, self._room = file, room

    def write(self, data: Any) -> int:
        fits = data[: self._room]
        self._room -= len(fits)
        self._file.write(fits)
        if len(fits) < len(data):
            self._file.flush()
            raise OSError(errno.ENOSPC, ENOSPC_TEXT)
        return len(data)

    def __getattr__(self, name: str) -> Any:
        return getattr(self._file, name)

    def __enter__(self) -> FillingFile:
        return self

    def __exit__(self, *exc: object) -> None:
        self._file.close()


def fill_after(monkeypatch: pytest.MonkeyPatch, room: int) -> None:
    """Files `shards.atomic` opens for writing take `room` bytes, then fail with ENOSPC."""

    def filling_open(path: Any, mode: str = "r", *args: Any, **kwargs: Any) -> Any:
        file = builtins.open(path, mode, *args, **kwargs)  # noqa: SIM115 - the caller closes it
        return FillingFile(file, room) if "w" in mode else file

    monkeypatch.setattr(shards.atomic, "open", filling_open, raising=False)


def fail_with_enospc(*args: Any) -> None:
    raise OSError(errno.ENOSPC, ENOSPC_TEXT)


def save_tensors(path: Path) -> None:
    with atomic_write(path) as f:
        torch.save({"weights": torch.arange(200_000, dtype=torch.float32)}, f)


def save_arrays(path: Path) -> None:
    with atomic_write(path) as f:
        np.savez(f, keys=np.asarray(["a", "b"]), logits=np.ones((2, 100_000), np.float32))


def save_csv(path: Path) -> None:
    with atomic_write(path, "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerows([i, f"class {i}", 0.5] for i in range(20_000))


def save_named(path: Path) -> None:  # a writer that takes a file name only, as safetensors' save_file
    with atomic_path(path) as tmp:
        tmp.write_bytes(bytes(500_000))


def save_bytes(path: Path) -> None:
    write_bytes_atomic(path, bytes(500_000))


WRITERS: dict[str, Callable[[Path], None]] = {
    "torch.save": save_tensors,
    "np.savez": save_arrays,
    "csv": save_csv,
    "by name": save_named,
    "bytes": save_bytes,
}


def assert_disk_full_error(err: pytest.ExceptionInfo[DiskFullError], path: Path) -> None:
    assert str(err.value) == f"cannot write {path}: {ENOSPC_TEXT}; {RERUN}"
    assert isinstance(err.value, OSError)


@pytest.mark.parametrize("writer", WRITERS)
def test_a_write_that_fails_part_way_is_a_named_error_and_leaves_the_old_file(tmp_path, monkeypatch, writer):
    path = tmp_path / "out.bin"
    path.write_bytes(b"the previous version")
    if writer == "by name":  # its writer opens the file itself: the disk is found full at the fsync
        monkeypatch.setattr(shards.atomic.os, "fsync", fail_with_enospc)
    else:
        fill_after(monkeypatch, 10_000)
    with pytest.raises(DiskFullError) as err:
        WRITERS[writer](path)
    assert_disk_full_error(err, path)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out.bin"]
    assert path.read_bytes() == b"the previous version"


@pytest.mark.parametrize("writer", WRITERS)
def test_a_real_full_disk_is_a_named_error_and_leaves_nothing(full_disk: FullDisk, writer):
    path = full_disk.folder / "out.bin"
    full_disk.fill(leave_bytes=64 << 10)
    with pytest.raises(DiskFullError) as err:
        WRITERS[writer](path)
    assert_disk_full_error(err, path)
    assert full_disk.files() == []
    full_disk.free()
    WRITERS[writer](path)  # the rerun after freeing space
    assert full_disk.files() == [Path("out.bin")]


def test_the_shard_writer_on_a_full_disk_leaves_neither_tar_nor_index(full_disk: FullDisk):
    path = full_disk.folder / "shard-000000.tar"
    full_disk.fill(leave_bytes=100 << 10)
    with pytest.raises(DiskFullError) as err, ShardWriter(path) as writer:
        for i in range(40):
            writer.add(f"k{i}", [(f"k{i}.bin", bytes(10_000))])
        writer.close()
    assert_disk_full_error(err, path)
    assert full_disk.files() == []


def test_an_append_that_fails_part_way_is_cut_back(tmp_path, monkeypatch):
    path = tmp_path / "metrics.jsonl"
    path.write_bytes(b'{"step": 1}\n')
    real_write = os.write

    def half_then_full(fd: int, data: Any) -> int:
        if len(data) > 4:
            return real_write(fd, bytes(data[: len(data) // 2]))
        raise OSError(errno.EDQUOT, os.strerror(errno.EDQUOT))

    monkeypatch.setattr(shards.atomic.os, "write", half_then_full)
    with pytest.raises(DiskFullError, match=f"cannot write {path}: {os.strerror(errno.EDQUOT)}; {RERUN}"):
        append_bytes(path, b'{"step": 2, "loss": 0.5}\n')
    assert path.read_bytes() == b'{"step": 1}\n'


def test_a_full_disk_behind_a_library_error_is_found():
    class SafetensorError(Exception):  # safetensors reports Rust's io::Error as text
        pass

    try:
        try:
            raise OSError(errno.ENOSPC, ENOSPC_TEXT)
        except OSError:
            raise RuntimeError("[enforce fail at inline_container.cc:672] . unexpected pos 768 vs 662") from None
    except RuntimeError as wrapped:  # torch.save: raised while the OSError was handled
        assert wrapped.__context__ is not None
        assert disk_full_errno(wrapped) == errno.ENOSPC
    rust = SafetensorError("Error while serializing: I/O error: No space left on device (os error 28)")
    assert disk_full_errno(rust) == errno.ENOSPC
    assert disk_full_errno(OSError(errno.EFBIG, "File too large")) == errno.EFBIG
    assert disk_full_errno(OSError(errno.EACCES, "Permission denied")) is None
    assert disk_full_errno(SafetensorError("header too large")) is None


def test_the_error_travels_between_processes():
    err = shards.atomic.disk_full(Path("/runs/a/step-00000004.pt"))
    copy = pickle.loads(pickle.dumps(err))
    assert type(copy) is DiskFullError and str(copy) == str(err) and isinstance(copy, OSError)
