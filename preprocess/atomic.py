"""Atomic file writes: a reader (or a resumed job) sees the old file or the whole new one, never a part."""

from __future__ import annotations

import os
from pathlib import Path

TMP_SUFFIX = ".tmp"


def tmp_path_for(path: Path) -> Path:
    """The temporary name `path` is written under before the rename."""
    return path.with_name(path.name + TMP_SUFFIX)


def commit(tmp: Path, path: Path) -> Path:
    """fsync `tmp`, rename it to `path` and fsync the folder so that the rename survives a crash."""
    with open(tmp, "rb+") as f:
        os.fsync(f.fileno())
    os.replace(tmp, path)
    dir_fd = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(dir_fd)
    finally:
        os.close(dir_fd)
    return path


def write_bytes_atomic(path: Path, data: bytes) -> Path:
    """Write `data` to `path` atomically; safe when several processes write the same file (the last rename wins)."""
    tmp = path.with_name(f"{path.name}.{os.getpid()}{TMP_SUFFIX}")
    tmp.write_bytes(data)
    return commit(tmp, path)


def remove_stale_tmp(folder: Path) -> list[Path]:
    """Delete the temporary files a killed writer left in `folder` (not recursive); returns them."""
    stale = sorted(folder.glob(f"*{TMP_SUFFIX}"))
    for path in stale:
        path.unlink()
    return stale
