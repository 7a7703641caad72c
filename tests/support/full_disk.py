"""A real full disk for the tests: a small tmpfs mounted over a folder (as root; where mounting is not permitted the
test is skipped, saying so), filled to its last byte when the test asks, unmounted after the test."""

from __future__ import annotations

import errno
import math
import subprocess
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest

FILLER = ".filler"
PAGE = 4096  # tmpfs allocates in pages


class FullDisk:
    """A tmpfs at `folder`: `fill()` takes its free space (all but `leave_bytes`), `free()` gives it back."""

    def __init__(self, folder: Path) -> None:
        self.folder = folder
        self.filler = folder / FILLER

    def fill(self, leave_bytes: int = 0) -> None:
        """Write zeros until the disk is full (to its last page), then give back `leave_bytes` rounded up to pages."""
        with open(self.filler, "ab", buffering=0) as f:
            for chunk in (1 << 16, PAGE):
                try:
                    while True:
                        f.write(bytes(chunk))
                except OSError as err:
                    assert err.errno == errno.ENOSPC, err
            f.truncate(max(f.tell() - math.ceil(leave_bytes / PAGE) * PAGE, 0))

    def free(self) -> None:
        self.filler.unlink(missing_ok=True)

    def files(self) -> list[Path]:
        """Every file on the disk but the filler, relative to it."""
        return sorted(p.relative_to(self.folder) for p in self.folder.rglob("*") if p.is_file() and p != self.filler)


@contextmanager
def small_tmpfs(folder: Path, size: str = "3m") -> Iterator[FullDisk]:
    """A tmpfs of `size` mounted at `folder` (made) for the block; skips the test where mount is not permitted."""
    folder.mkdir(parents=True, exist_ok=True)
    mount = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(folder)], capture_output=True, text=True
    )
    if mount.returncode != 0:
        pytest.skip(f"a full disk here is a small tmpfs, and mounting one is not permitted: {mount.stderr.strip()}")
    try:
        yield FullDisk(folder)
    finally:
        if subprocess.run(["umount", str(folder)], capture_output=True).returncode != 0:
            subprocess.run(["umount", "--lazy", str(folder)], check=True)  # a file still open (a killed child's)
