"""Writes one WebDataset shard: a plain ustar tar of `{key}.{ext}` members plus its DALI index file.

The tar is written member by member with deterministic headers (mtime 0, root owner, mode 0644), so the same
samples always give the same bytes and sha256. The index is DALI's wds2idx format (`v1.2 N`, then per sample
`ext data_offset size name` for each member), built from the offsets while writing: no second pass, no DALI.
Both files are written under temporary names and renamed when complete; a full disk is `shards.atomic`'s
DiskFullError naming the shard or its index, with nothing of either left behind.
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import tarfile
from pathlib import Path

from shards.atomic import atomic_write, commit, tmp_path_for, writing
from shards.index import format_index
from shards.manifest import ShardInfo
from shards.schema import INDEX_SUFFIX, SchemaError, split_member_name

BLOCK = tarfile.BLOCKSIZE
_END_OF_ARCHIVE = b"\0" * (2 * BLOCK)


def _header(name: str, size: int) -> bytes:
    info = tarfile.TarInfo(name)
    info.size = size
    info.mtime = 0
    info.mode = 0o644
    info.uname = info.gname = ""
    try:
        return info.tobuf(format=tarfile.USTAR_FORMAT, encoding="ascii", errors="strict")
    except (ValueError, UnicodeEncodeError) as err:
        raise SchemaError(f"member name {name!r} does not fit a ustar header ({err})") from err


class ShardWriter:
    """Appends samples to `path` (written as `path.tmp` until `close()` renames it) and indexes them.

    Use as a context manager; leaving the block on an exception removes the temporary file.
    """

    def __init__(self, path: Path) -> None:
        self.path = Path(path)
        self.index_path = self.path.with_suffix(INDEX_SUFFIX)
        self._tmp = tmp_path_for(self.path)
        self._file: io.BufferedWriter | None = open(self._tmp, "wb")  # noqa: SIM115 - closed in close()/abort()
        self._sha = hashlib.sha256()
        self._offset = 0
        self._index: list[list[tuple[str, int, int, str]]] = []
        self.keys: list[str] = []

    def __enter__(self) -> ShardWriter:
        return self

    def __exit__(self, exc_type: object, exc: object, tb: object) -> None:
        if exc_type is not None:
            self.abort()

    def _write(self, data: bytes) -> None:
        assert self._file is not None, "shard already closed"
        with writing(self.path):
            self._file.write(data)
        self._sha.update(data)
        self._offset += len(data)

    def add(self, key: str, members: list[tuple[str, bytes]]) -> None:
        """Append one sample; `members` are (name, payload) pairs whose names all start with `key.`."""
        entries = []
        for name, payload in members:
            if split_member_name(name)[0] != key:
                raise SchemaError(f"member {name!r} does not belong to sample {key!r}")
            self._write(_header(name, len(payload)))
            entries.append((split_member_name(name)[1], self._offset, len(payload), name))
            self._write(payload)
            self._write(b"\0" * (-len(payload) % BLOCK))
        self._index.append(entries)
        self.keys.append(key)

    def close(self) -> ShardInfo:
        """Finish the tar, write the index, rename both into place; returns what the manifest lists. On an OSError
        (a full disk: DiskFullError naming the file) no temporary file is left once the `with` block is left."""
        self._write(_END_OF_ARCHIVE)
        assert self._file is not None
        with writing(self.path):
            self._file.close()
        self._file = None
        with atomic_write(self.index_path, "w") as f:
            f.write(format_index(self._index))
        commit(self._tmp, self.path)
        return ShardInfo(
            name=self.path.name, num_samples=len(self.keys), bytes=self._offset, sha256=self._sha.hexdigest()
        )

    def abort(self) -> None:
        """Drop the unfinished shard."""
        if self._file is not None:
            with contextlib.suppress(OSError):  # the failed write is the error being raised; closing repeats it
                self._file.close()
            self._file = None
        self._tmp.unlink(missing_ok=True)
