"""Where a split's shards are: `open_split` turns what a user gives (a folder, a list of folders, shard files or brace
patterns of them, `file:` URLs, or `pipe:`/http(s)/s3/gs URLs) into a `Split`, once per run: an indexed `SplitIndex`
(local or mounted files, read at the offsets of their `.idx` files) or a streamed `StreamSplit` (read front to back
through commands). Both have the interface the loaders use: `manifest` (its shards: the ones selected), `folder`
(for messages) and len(). Several folders are read as one split (same features and classes; log-mel statistics
combined exactly from the manifests' sums).
"""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Sequence
from pathlib import Path

from braceexpand import braceexpand

from pipelines.config import LoaderError
from pipelines.pipe import MANIFEST_NAME, PIPE, PipeURL, as_pipe, read_url
from shards.index import parse_index
from shards.manifest import LogmelStats, Manifest, ShardInfo, load_manifest, parse_manifest
from shards.sample_table import SampleTable
from shards.schema import SchemaError


def expand_sources(source: str | Path | Sequence[str | Path]) -> list[tuple[Path, set[str] | None]]:
    """(folder, shard names or None for all) for a split given as a folder, a list of folders, shard files or
    brace patterns of them (`shards/as/train/shard-{000000..000123}.tar`), local paths or `file:` URLs.

    The manifest and index files are read from each shard's folder. Other URLs (`s3:`, `pipe:`, ...) are refused
    with what to do: this index reads shards by offset, which needs a local or mounted file (`pipe:` URLs are
    streamed by `pipelines.reading` instead).
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
    """A checked split: manifest, shard and index paths and every sample's member offsets, in shard order (`samples`,
    a `SampleTable`: `samples[i]` is sample i's `SampleRef`).

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
        tables = []
        for folder, shard in selected:
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
                table = parse_index(folder / shard.index_name, shard)
            except SchemaError as err:
                raise LoaderError(str(err)) from None
            if len(table) != shard.num_samples:
                raise LoaderError(
                    f"{folder / shard.index_name}: {len(table)} samples, the manifest says {shard.num_samples} "
                    f"for {shard.name}; the manifest does not match the shards: re-run the shard job"
                )
            self.shard_paths.append(path)
            self.index_paths.append(folder / shard.index_name)
            tables.append(table)
        # Every sample's offsets in a few arrays, not a Python object each: forked loader workers share its pages.
        self.samples = SampleTable.concat(tables)

    def __len__(self) -> int:
        return len(self.samples)


class StreamSplit:
    """A split read as streams: manifests fetched with the URLs' own commands, shard URLs in split order.

    `source` is a `pipe:` URL or a list of them, brace patterns expanded (`…/shard-{000000..000123}.tar -`); each
    names a shard or a split's manifest.json (all of its shards); http(s), s3 and gs URLs are streamed with the
    command `as_pipe` gives them. Shards of several folders must have the same features and classes, and are read
    as one split (log-mel statistics combined exactly). The interface of `SplitIndex` that the loaders use:
    `manifest` (its shards: the ones selected), `folder` (for messages), len().
    """

    def __init__(self, source: str | Sequence[str]) -> None:
        items = [source] if isinstance(source, str) else list(source)
        urls = [PipeURL.parse(as_pipe(text)) for item in items for text in braceexpand(str(item))]
        if not urls:
            raise LoaderError("no shards given: pass pipe: URLs of shards or of a split's manifest.json")
        # One manifest per folder (the command around the file name), with the shards named (None: all of them).
        folders: dict[tuple[str, str], tuple[PipeURL, set[str] | None]] = {}
        for url in urls:
            names = folders.setdefault(url.folder, (url, set()))[1]
            if url.name == MANIFEST_NAME:
                folders[url.folder] = (url, None)
            elif names is not None:
                names.add(url.name)
        selected: list[tuple[str, ShardInfo]] = []
        manifests: list[tuple[str, Manifest]] = []
        for url, names in folders.values():
            where = url.sibling(MANIFEST_NAME)
            try:
                manifest = parse_manifest(read_url(where), where)
            except SchemaError as err:
                raise LoaderError(str(err)) from None
            known = {s.name for s in manifest.shards}
            if names is not None and names - known:
                raise LoaderError(f"{where}: {sorted(names - known)} not in this manifest; check the pattern")
            selected += [(url.sibling(s.name), s) for s in manifest.shards if names is None or s.name in names]
            manifests.append((where, manifest))
        self.folder = manifests[0][0]
        self.manifest = combine_manifests(manifests, [s for _, s in selected])
        self.urls = [shard_url for shard_url, _ in selected]

    def __len__(self) -> int:
        return self.manifest.num_samples


def is_stream_source(source: str | Path | Sequence[str | Path] | SplitIndex | StreamSplit) -> bool:
    """Whether `source` names streamed shards (`pipe:`, http(s), s3 or gs URLs, or a StreamSplit); mixing them with
    local shards is refused."""
    if isinstance(source, SplitIndex | StreamSplit):
        return isinstance(source, StreamSplit)
    items = [source] if isinstance(source, str | Path) else list(source)
    piped = [isinstance(item, str) and as_pipe(item).startswith(PIPE) for item in items]
    if any(piped) and not all(piped):
        raise LoaderError("a split is streamed URLs or local shards, not both: give the local ones as pipe:cat URLs")
    return bool(items) and all(piped)


def open_split(source: str | Path | Sequence[str | Path] | SplitIndex | StreamSplit) -> SplitIndex | StreamSplit:
    """The split `source` names: streamed (`StreamSplit`) for pipe: URLs, else indexed (`SplitIndex`)."""
    if isinstance(source, SplitIndex | StreamSplit):
        return source
    if is_stream_source(source):
        return StreamSplit(source if isinstance(source, str) else [str(s) for s in source])
    return SplitIndex(source)


def is_plain_path(source: str) -> bool:
    """Whether `source` is one local path: no URL scheme, no brace pattern, not a shard file."""
    return not re.match(r"^[A-Za-z][A-Za-z0-9+.-]*:", source) and "{" not in source and not source.endswith(".tar")


def split_manifest(source: str | Path | Sequence[str | Path]) -> Manifest:
    """The manifest of the split `source` names, for checks before loading (features and classes; the shards
    listed are those of its first folder): streamed splits fetch their manifests, local ones read the first."""
    if is_stream_source(source):
        return StreamSplit(source if isinstance(source, str) else [str(s) for s in source]).manifest
    folder = expand_sources(source)[0][0]
    try:
        return load_manifest(folder)
    except SchemaError as err:
        raise LoaderError(str(err)) from None


Split = SplitIndex | StreamSplit
