"""A split's samples as a few numpy arrays: what the loaders index into (`table[i]` gives sample i's `SampleRef`,
built on access). At AudioSet-2M a list of per-sample Python objects held ~1 KB per sample (2 GB per rank), and every
DataLoader worker forked from it copied the pages it read (reading a Python object writes its reference count); a
worker reading these arrays writes none of their pages.
"""

from __future__ import annotations

import operator
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True)
class SampleRef:
    """One sample: its shard, its key and (offset, size) of each member's payload in the tar."""

    shard: int
    key: str
    members: dict[str, tuple[int, int]]


def _smallest(values: np.ndarray) -> np.ndarray:
    """`values` (non-negative integers) as uint32 when they all fit, else int64: offsets in shards of a few hundred
    MB fit in 4 bytes, and a shard past 4 GiB still reads."""
    fits = values.size == 0 or int(values.max()) < 1 << 32
    return values.astype(np.uint32 if fits else np.int64, copy=False)


@dataclass(frozen=True, eq=False)
class SampleTable(Sequence[SampleRef]):
    """Samples in shard order: sample i is in shard s where `shard_starts[s] <= i < shard_starts[s + 1]`; its key is
    `keys[key_ends[i]:key_ends[i + 1]]` (ASCII); its members are `first_member[i]:first_member[i + 1]` of the flat
    member arrays (`member_ext` indexes `exts`; payload offset and size in bytes)."""

    exts: tuple[str, ...]
    shard_starts: np.ndarray  # (shards + 1,)
    keys: bytes
    key_ends: np.ndarray  # (N + 1,)
    first_member: np.ndarray  # (N + 1,)
    member_ext: np.ndarray  # (M,)
    member_offset: np.ndarray  # (M,)
    member_size: np.ndarray  # (M,)

    @classmethod
    def of_shard(
        cls, keys: list[bytes], ext_names: list[bytes], offsets: np.ndarray, sizes: np.ndarray, counts: np.ndarray
    ) -> SampleTable:
        """The table of one shard whose samples have keys `keys` and `counts[i]` members each, the members given
        flat (extension, payload offset, size), extensions as they appear in the index (ASCII)."""
        names = list(dict.fromkeys(ext_names))
        ids = dict(zip(names, range(len(names)), strict=True))
        member_ext = np.fromiter(map(ids.__getitem__, ext_names), np.min_scalar_type(len(names)), len(ext_names))
        return cls(
            exts=tuple(name.decode("ascii") for name in names),
            shard_starts=np.array([0, len(keys)], dtype=np.int64),
            keys=b"".join(keys),
            key_ends=_smallest(np.cumsum([0, *map(len, keys)], dtype=np.int64)),
            first_member=_smallest(np.concatenate([[0], np.cumsum(counts, dtype=np.int64)])),
            member_ext=member_ext,
            member_offset=_smallest(offsets),
            member_size=_smallest(sizes),
        )

    @classmethod
    def concat(cls, tables: Sequence[SampleTable]) -> SampleTable:
        """One table of `tables` in order, each a shard (shard s is `tables[s]`); extensions merged into one table,
        ids stored in the smallest dtype that holds them."""
        exts = list(dict.fromkeys(ext for table in tables for ext in table.exts))
        ext_dtype = np.min_scalar_type(len(exts))
        to_merged = {ext: i for i, ext in enumerate(exts)}
        member_ext = [np.array([to_merged[e] for e in t.exts], dtype=ext_dtype)[t.member_ext] for t in tables]

        def joined(arrays: list[np.ndarray]) -> np.ndarray:
            starts = np.cumsum([0] + [a[-1] for a in arrays], dtype=np.int64)[:-1]
            return _smallest(np.concatenate([[0]] + [a[1:] + start for a, start in zip(arrays, starts, strict=True)]))

        return cls(
            exts=tuple(exts),
            shard_starts=np.cumsum([0] + [len(t) for t in tables], dtype=np.int64),
            keys=b"".join(t.keys for t in tables),
            key_ends=joined([t.key_ends.astype(np.int64) for t in tables]),
            first_member=joined([t.first_member.astype(np.int64) for t in tables]),
            member_ext=np.concatenate(member_ext, dtype=ext_dtype) if tables else np.zeros(0, ext_dtype),
            member_offset=_smallest(np.concatenate([t.member_offset for t in tables] or [np.zeros(0, np.uint32)])),
            member_size=_smallest(np.concatenate([t.member_size for t in tables] or [np.zeros(0, np.uint32)])),
        )

    @property
    def nbytes(self) -> int:
        """Bytes the table's arrays and keys hold."""
        arrays = (self.shard_starts, self.key_ends, self.first_member, self.member_ext, self.member_offset)
        return len(self.keys) + sum(a.nbytes for a in arrays) + self.member_size.nbytes

    def __len__(self) -> int:
        return len(self.key_ends) - 1

    def __getitem__(self, index: int) -> SampleRef:  # type: ignore[override]  # samples, not slices
        i = operator.index(index)
        i += len(self) if i < 0 else 0
        if not 0 <= i < len(self):
            raise IndexError(f"sample {index} of {len(self)}")
        shard = int(np.searchsorted(self.shard_starts, i, side="right")) - 1
        key = self.keys[self.key_ends[i] : self.key_ends[i + 1]].decode("ascii")
        first, end = self.first_member[i], self.first_member[i + 1]
        rows = zip(
            self.member_ext[first:end].tolist(),
            self.member_offset[first:end].tolist(),
            self.member_size[first:end].tolist(),
            strict=True,
        )
        return SampleRef(shard=shard, key=key, members={self.exts[ext]: (offset, size) for ext, offset, size in rows})
