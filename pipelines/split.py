"""A split on disk, checked and indexed: its manifest, its shards and, from the DALI index files, where every
member of every sample lies. Also the sample orders both loaders follow: which samples rank r reads in an
epoch and in evaluation.

Training order: a permutation of all N samples seeded by (seed, epoch), repeated if the split is smaller than one
global batch, cut into `world_size` equal consecutive blocks: rank r reads block r, `num_batches` batches of
`batch_size`. Every rank has the same number of batches whatever the shard sizes; a sample is read by one rank.
Evaluation order: rank r reads samples [N*r // W, N*(r+1) // W) in shard order, which is how DALI's readers split
a dataset over `num_shards`; every sample is read exactly once across ranks.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from preprocess.schema import WDS_INDEX_VERSION, Manifest, SchemaError, load_manifest


class LoaderError(RuntimeError):
    """The shards cannot be read as asked; the message names the shard/key and says what to do."""


@dataclass(frozen=True)
class SampleRef:
    """One sample: its shard, its key and (offset, size) of each member's payload in the tar."""

    shard: int
    key: str
    members: dict[str, tuple[int, int]]


def parse_index(path: Path, shard_name: str) -> list[SampleRef]:
    """The samples listed by a wds2idx index file (`v1.2 N`, then `ext offset size name ...` per sample)."""
    try:
        lines = path.read_text().splitlines()
    except FileNotFoundError:
        raise LoaderError(
            f"{path}: index file missing for shard {shard_name}; re-run the shard job, or write it with "
            f"DALI's `wds2idx {shard_name} {path.name}`"
        ) from None
    header = lines[0].split() if lines else []
    if len(header) != 2 or header[0] != WDS_INDEX_VERSION or not header[1].isdigit():
        raise LoaderError(f"{path}: not a {WDS_INDEX_VERSION} wds2idx index file; re-run the shard job to rewrite it")
    refs = []
    for line_no, line in enumerate(lines[1:], start=2):
        fields = line.split()
        if not fields or len(fields) % 4:
            raise LoaderError(f"{path}:{line_no}: malformed index line; re-run the shard job to rewrite it")
        members = {}
        for i in range(0, len(fields), 4):
            ext, offset, size, _name = fields[i : i + 4]
            members[ext] = (int(offset), int(size))
        key = fields[3].split(".", 1)[0]
        refs.append(SampleRef(shard=-1, key=key, members=members))
    if len(refs) != int(header[1]):
        raise LoaderError(f"{path}: header says {header[1]} samples, {len(refs)} listed; re-run the shard job")
    return refs


class SplitIndex:
    """A checked split: manifest, shard paths and every sample's member offsets, in shard order."""

    def __init__(self, folder: str | Path) -> None:
        self.folder = Path(folder)
        try:
            self.manifest: Manifest = load_manifest(self.folder)
        except SchemaError as err:
            raise LoaderError(str(err)) from None
        if not self.manifest.shards:
            raise LoaderError(f"{self.folder}: the manifest lists no shards (every clip failed?); see failures.csv")
        self.shard_paths: list[Path] = []
        self.samples: list[SampleRef] = []
        for number, shard in enumerate(self.manifest.shards):
            path = self.folder / shard.name
            if not path.is_file():
                raise LoaderError(f"{path}: shard listed in the manifest is missing; re-run the shard job")
            size = path.stat().st_size
            if size != shard.bytes:
                raise LoaderError(
                    f"{path}: {size} bytes, the manifest says {shard.bytes} (truncated or replaced); "
                    "run tools/verify_shards.py on the folder and re-run the shard job"
                )
            refs = parse_index(self.folder / shard.index_name, shard.name)
            if len(refs) != shard.num_samples:
                raise LoaderError(
                    f"{self.folder / shard.index_name}: {len(refs)} samples, the manifest says {shard.num_samples} "
                    f"for {shard.name}; the manifest does not match the shards: re-run the shard job"
                )
            self.shard_paths.append(path)
            self.samples += [SampleRef(shard=number, key=r.key, members=r.members) for r in refs]

    def __len__(self) -> int:
        return len(self.samples)


def train_order(num_samples: int, batch_size: int, rank: int, world_size: int, seed: int, epoch: int) -> np.ndarray:
    """Sample indices rank `rank` reads in `epoch`, num_batches x batch_size of them (see the module doc)."""
    num_batches = train_batches(num_samples, batch_size, world_size)
    per_rank = num_batches * batch_size
    order = np.random.default_rng([seed, epoch]).permutation(num_samples)
    order = np.resize(order, per_rank * world_size)  # repeats only when the split is smaller than a global batch
    return order[rank * per_rank : (rank + 1) * per_rank]


def train_batches(num_samples: int, batch_size: int, world_size: int) -> int:
    """Batches per rank per epoch: the whole global batches the split holds (at least one)."""
    return max(num_samples // (batch_size * world_size), 1)


def eval_range(num_samples: int, rank: int, world_size: int) -> range:
    """Samples rank `rank` evaluates: the contiguous block DALI's reader gives shard_id=rank of num_shards."""
    return range(num_samples * rank // world_size, num_samples * (rank + 1) // world_size)


def eval_batches(num_samples: int, batch_size: int, rank: int, world_size: int) -> int:
    return math.ceil(len(eval_range(num_samples, rank, world_size)) / batch_size)
