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

import dataclasses
import math
import re
from collections.abc import Sequence
from pathlib import Path

import numpy as np
from braceexpand import braceexpand

from shards.index import SampleRef, parse_index
from shards.manifest import LogmelStats, Manifest, ShardInfo, load_manifest
from shards.schema import SchemaError


class LoaderError(RuntimeError):
    """The shards cannot be read as asked; the message names the shard/key and says what to do."""


def expand_sources(source: str | Path | Sequence[str | Path]) -> list[tuple[Path, set[str] | None]]:
    """(folder, shard names or None for all) for a split given as a folder, a list of folders, shard files or
    brace patterns of them (`shards/as/train/shard-{000000..000123}.tar`), local paths or `file:` URLs.

    The manifest and index files are read from each shard's folder. Other URLs (`s3:`, `pipe:`, ...) are refused
    with what to do: this index reads shards by offset, which needs a local or mounted file (`pipe:` URLs are
    streamed by `pipelines.stream` instead).
    """
    items = [source] if isinstance(source, str | Path) else list(source)
    if not items:
        raise LoaderError("no shards given: pass a split folder, shard files or a brace pattern")
    out: dict[Path, set[str] | None] = {}
    for item in items:
        for text in braceexpand(str(item)):
            if text.startswith("file:"):
                text = text.removeprefix("file:").removeprefix("//")
            elif re.match(r"^[A-Za-z][A-Za-z0-9+.-]*:", text):
                raise LoaderError(
                    f"{text}: not a local path; stream shards with a pipe: URL whose command writes them to standard "
                    "output (e.g. 'pipe:aws s3 cp s3://bucket/as/train/shard-{000000..000099}.tar -'; http(s), s3 "
                    "and gs URLs are streamed too; PyTorch loader), or mount the bucket (s3fs, gcsfuse, NFS) and "
                    "pass the split's folder"
                )
            path = Path(text)
            if path.is_dir():
                out[path] = None
            elif path.suffix == ".tar":
                names = out.setdefault(path.parent, set())
                if names is not None:
                    names.add(path.name)
            else:
                raise LoaderError(f"{path}: neither a split folder nor a .tar shard")
    return list(out.items())


def combine_manifests(manifests: Sequence[tuple[str | Path, Manifest]], shards: list[ShardInfo]) -> Manifest:
    """One manifest for the `shards` selected from several folders' manifests (`(where, manifest)`, in order): the
    first's features and classes, which every other must have too, and the log-mel statistics of all of them
    (combined exactly from their sums). LoaderError if they differ or no shard is selected."""
    where, first = manifests[0]
    for other, manifest in manifests[1:]:
        same = (manifest.features, manifest.classes, manifest.multi_label) == (
            first.features, first.classes, first.multi_label)  # fmt: skip
        if not same:
            raise LoaderError(f"{other} and {where} hold shards of different features or classes")
    if not shards:
        raise LoaderError(f"{where}: the manifest lists no shards (every clip failed?); see failures.csv")
    return dataclasses.replace(first, shards=shards, logmel=sum((m.logmel for _, m in manifests), LogmelStats()))


class SplitIndex:
    """A checked split: manifest, shard and index paths and every sample's member offsets, in shard order.

    `source` is anything `expand_sources` takes; several folders must hold shards of the same schema, features and
    classes, and are read as one split (log-mel statistics combined exactly from the manifests' sums).
    """

    def __init__(self, source: str | Path | Sequence[str | Path]) -> None:
        selected = []
        manifests = []
        for folder, names in expand_sources(source):
            try:
                manifest = load_manifest(folder)
            except SchemaError as err:
                raise LoaderError(str(err)) from None
            known = {s.name for s in manifest.shards}
            if names is not None and names - known:
                raise LoaderError(f"{folder}: {sorted(names - known)} not in its manifest; check the pattern")
            selected += [(folder, s) for s in manifest.shards if names is None or s.name in names]
            manifests.append((folder, manifest))
        self.folder = manifests[0][0]
        self.manifest = combine_manifests(manifests, [s for _, s in selected])
        self.shard_paths: list[Path] = []
        self.index_paths: list[Path] = []
        self.samples: list[SampleRef] = []
        for number, (folder, shard) in enumerate(selected):
            path = folder / shard.name
            if not path.is_file():
                raise LoaderError(f"{path}: shard listed in the manifest is missing; re-run the shard job")
            size = path.stat().st_size
            if size != shard.bytes:
                raise LoaderError(
                    f"{path}: {size} bytes, the manifest says {shard.bytes} (truncated or replaced); "
                    "run tools/verify_shards.py on the folder and re-run the shard job"
                )
            try:
                refs = parse_index(folder / shard.index_name, shard)
            except SchemaError as err:
                raise LoaderError(str(err)) from None
            if len(refs) != shard.num_samples:
                raise LoaderError(
                    f"{folder / shard.index_name}: {len(refs)} samples, the manifest says {shard.num_samples} "
                    f"for {shard.name}; the manifest does not match the shards: re-run the shard job"
                )
            self.shard_paths.append(path)
            self.index_paths.append(folder / shard.index_name)
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
