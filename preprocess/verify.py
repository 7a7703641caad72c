"""Verification of a sharded split against its manifest, before hours of training find the damage.

`verify_split` checks that the manifest loads; that every shard it lists exists with the listed size and sha256,
has an `.idx` equal byte for byte to the index computed from the tar, reads to the end, holds the listed number of
samples, each of which follows the schema, has a finite log-mel, one label if the dataset is single-label and, when
asked, JPEG frames that decode to one size with the manifest's short side; that keys are unique across the split;
and that no stray `.tar`/`.idx` lies beside the listed shards. It never raises for a damaged split: every problem
is an error line naming the file, the sample key where there is one, and what to do.
"""

from __future__ import annotations

import hashlib
import json
import multiprocessing
import os
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path

import torch
from torchvision.io import decode_jpeg as torch_decode_jpeg

from preprocess.job_state import STATE_DIR
from shards.index import index_from_tar
from shards.manifest import Manifest, ShardInfo, load_manifest
from shards.schema import (
    INDEX_SUFFIX,
    MANIFEST_NAME,
    SchemaError,
    decode_sample,
    frame_ext,
    sample_exts,
    split_member_name,
)
from shards.tar import TarReadError, tar_members
from shards.text import printable

HASH_CHUNK_BYTES = 1 << 20
# A shard whose every sample is bad would otherwise print thousands of lines saying the same thing.
MAX_SAMPLE_ERRORS_PER_SHARD = 10


@dataclass
class VerifyReport:
    """What `verify_split` found: `errors` is empty exactly when the split is sound.

    `num_shards` shards listed in the manifest, `num_samples` samples read from them, `num_bytes` bytes hashed,
    `frames_decoded` JPEG frames of sound samples decoded (0 without decoding).
    """

    folder: Path
    num_shards: int = 0
    num_samples: int = 0
    num_bytes: int = 0
    frames_decoded: int = 0
    errors: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.errors

    def summary(self) -> str:
        """One line: 'OK: N samples in M shards (...)' or 'FAILED: K errors in FOLDER (...)'."""
        if self.ok:
            return (
                f"OK: {self.num_samples} samples in {self.num_shards} shards ({self.folder}; "
                f"{self.num_bytes / 1e6:.1f} MB hashed, {self.frames_decoded} JPEG frames decoded)"
            )
        noun = "error" if len(self.errors) == 1 else "errors"
        return (
            f"FAILED: {len(self.errors)} {noun} in {self.folder} "
            f"({self.num_samples} samples read from {self.num_shards} shards)"
        )


@dataclass
class ShardCheck:
    """What verifying one shard found: its keys in tar order, bytes hashed, frames decoded, errors."""

    name: str
    keys: list[str] = field(default_factory=list)
    num_bytes: int = 0
    frames_decoded: int = 0
    errors: list[str] = field(default_factory=list)


def redo_hint(manifest: Manifest, shard_name: str | None = None) -> str:
    """How to get `shard_name` (None: any shard, to rewrite the manifest) written again: the shard job redoes
    every shard whose state record is gone."""
    record = f"{STATE_DIR}/{Path(shard_name).stem}.json" if shard_name else f"one record in {STATE_DIR}/"
    return (
        f"delete {record} and re-run tools/shard_{manifest.dataset}.py with the original arguments "
        "(the job rewrites every shard whose record is gone, then the manifest)"
    )


def file_size_sha256(path: Path) -> tuple[int, str]:
    """(size in bytes, hex sha256) of the file at `path`, read in chunks."""
    digest = hashlib.sha256()
    size = 0
    with open(path, "rb") as f:
        while chunk := f.read(HASH_CHUNK_BYTES):
            digest.update(chunk)
            size += len(chunk)
    return size, digest.hexdigest()


def read_samples(path: Path, exts: list[str]) -> tuple[list[tuple[str, dict[str, bytes]]], str | None]:
    """The samples of the tar at `path` read by the strict reader until it ends or fails, and why it failed (None:
    read to its end-of-archive marker). A sample cut off by the failure is kept when all its `exts` were read."""
    samples: list[tuple[str, dict[str, bytes]]] = []
    try:
        with open(path, "rb") as f:
            for member in tar_members(f, os.fstat(f.fileno()).st_size):
                if not samples or samples[-1][0] != member.key:
                    samples.append((member.key, {}))
                if member.ext in samples[-1][1]:
                    raise TarReadError(f"sample {printable(member.key)}: member {printable(member.ext)} twice")
                samples[-1][1][member.ext] = member.payload or b""
    except (OSError, SchemaError) as err:  # TarReadError: not a whole, sound tar
        if samples and set(samples[-1][1]) != set(exts):
            samples.pop()  # the sample being read when the tar failed
        return samples, str(err)
    return samples, None


def check_frames(key: str, frames: list[bytes], short_side_px: int) -> list[str]:
    """Errors (prefixed with `key`) if a JPEG does not decode, the frames differ in size or their short side is
    not `short_side_px`; empty when all frames are sound."""
    sizes = []
    for i, jpeg in enumerate(frames):
        try:
            image = torch_decode_jpeg(torch.frombuffer(bytearray(jpeg), dtype=torch.uint8))
        except RuntimeError as err:
            return [f"{key}: {frame_ext(i)} does not decode ({err})"]
        sizes.append(tuple(image.shape[-2:]))
    if len(set(sizes)) > 1:
        listed = ", ".join(f"{frame_ext(i)} {w}x{h}" for i, (h, w) in enumerate(sizes))
        return [f"{key}: frames differ in size ({listed}); a batch needs one size"]
    height, width = sizes[0]
    if min(height, width) != short_side_px:
        return [
            f"{key}: frames are {width}x{height}, short side {min(height, width)} px; "
            f"the manifest says {short_side_px} px"
        ]
    return []


def check_sample(key: str, members: dict[str, bytes], manifest: Manifest, decode_jpeg: bool) -> list[str]:
    """Errors (prefixed with `key`) of one sample: schema (sizes, finite log-mel, labels, declared frame sizes) and,
    with `decode_jpeg`, its decoded frames (see `check_frames`); empty when the sample is sound."""
    try:
        sample = decode_sample(key, members, manifest.features, manifest.num_classes, manifest.multi_label)
    except SchemaError as err:
        return [str(err)]
    if decode_jpeg:
        return check_frames(key, sample.frames, manifest.features.short_side_px)
    return []


def _index_error(index_path: Path, tar_name: str, actual: bytes, expected: str) -> str | None:
    """Error naming the first line (and its sample) where the index file differs from `expected`, the index
    computed from the tar `tar_name`; None when they are equal byte for byte."""
    if actual == expected.encode():
        return None
    actual_lines = actual.decode(errors="replace").splitlines()
    expected_lines = expected.splitlines()
    line = next(
        (i for i, (a, e) in enumerate(zip(actual_lines, expected_lines, strict=False)) if a != e),
        min(len(actual_lines), len(expected_lines)),
    )
    where = f"line {line + 1}"
    if 0 < line < len(expected_lines):
        where += f" (sample {split_member_name(expected_lines[line].split()[3])[0]})"
    elif line == 0:
        where += f" (the header; it should be {expected_lines[0]!r})"
    return f"{index_path.name}: {where} differs from the index computed from {tar_name}"


def verify_shard(folder: Path, info: ShardInfo, manifest: Manifest, decode_jpeg: bool = True) -> ShardCheck:
    """Check the shard `info` of the split in `folder` against the manifest (see the module docstring).

    Never raises for a damaged shard: an unreadable tar is an error naming the last sample read.
    """
    check = ShardCheck(name=info.name)
    hint = redo_hint(manifest, info.name)
    tar_path = folder / info.name
    if not tar_path.is_file():
        check.errors.append(f"{info.name}: listed in {MANIFEST_NAME} but missing; {hint}")
        return check
    try:
        size, sha256 = file_size_sha256(tar_path)
    except OSError as err:
        check.errors.append(f"{info.name}: cannot be read ({err}); check the file's permissions and the disk")
        return check
    check.num_bytes = size
    if size != info.bytes:
        check.errors.append(f"{info.name}: {size} bytes, {MANIFEST_NAME} lists {info.bytes}; {hint}")
    elif sha256 != info.sha256:
        check.errors.append(
            f"{info.name}: sha256 {sha256} differs from {MANIFEST_NAME}'s {info.sha256} (the file changed "
            f"after it was written); {hint}"
        )

    sample_errors: list[str] = []
    samples, read_error = read_samples(tar_path, sample_exts(manifest.features.num_frames))
    for key, members in samples:
        check.keys.append(key)
        errors = check_sample(key, members, manifest, decode_jpeg)
        if not errors and decode_jpeg:
            check.frames_decoded += manifest.features.num_frames
        sample_errors.extend(errors)
    readable = read_error is None
    if read_error is not None:
        after = f"after sample {check.keys[-1]}" if check.keys else "before its first sample"
        check.errors.append(f"{info.name}: cannot be read {after} ({read_error}; truncated or corrupt?); {hint}")
    for error in sample_errors[:MAX_SAMPLE_ERRORS_PER_SHARD]:
        check.errors.append(f"{info.name}: {error}; {hint}")
    if len(sample_errors) > MAX_SAMPLE_ERRORS_PER_SHARD:
        check.errors.append(
            f"{info.name}: {len(sample_errors) - MAX_SAMPLE_ERRORS_PER_SHARD} more sample errors not listed; {hint}"
        )
    if readable and len(check.keys) != info.num_samples:
        check.errors.append(f"{info.name}: {len(check.keys)} samples, {MANIFEST_NAME} lists {info.num_samples}; {hint}")

    index_path = folder / info.index_name
    if not index_path.is_file():
        check.errors.append(f"{info.index_name}: index of {info.name} is missing (DALI needs it); {hint}")
    elif readable and (error := _index_error(index_path, info.name, index_path.read_bytes(), index_from_tar(tar_path))):
        check.errors.append(f"{error}: DALI would read wrong members; {hint}")
    return check


def _manifest_total_errors(folder: Path, manifest: Manifest) -> list[str]:
    """Errors if the manifest's stored totals disagree with its shard and failure lists."""
    path = folder / MANIFEST_NAME
    stored = json.loads(path.read_text())
    errors = []
    for field_name, derived in (("num_samples", manifest.num_samples), ("num_failures", len(manifest.failures))):
        if stored.get(field_name) != derived:
            errors.append(
                f"{path}: {field_name} is {stored.get(field_name)} but its lists add up to {derived}; "
                f"to rewrite it, {redo_hint(manifest)}"
            )
    return errors


def _duplicate_key_errors(checks: list[ShardCheck]) -> list[str]:
    """Errors for keys read more than once, naming the shard of the first copy."""
    first_shard_of: dict[str, str] = {}
    errors = []
    for check in checks:
        for key in check.keys:
            if key not in first_shard_of:
                first_shard_of[key] = check.name
                continue
            first = first_shard_of[key]
            where = "twice in this shard" if first == check.name else f"also in {first}"
            errors.append(
                f"{check.name}: {key}: key {where}; a clip must be in a split once (shards of two runs mixed?): "
                "re-shard the split into an empty folder"
            )
    return errors


def _stray_errors(folder: Path, manifest: Manifest) -> list[str]:
    """Errors for `.tar` and `.idx` files in `folder` that the manifest does not list."""
    listed = {name for shard in manifest.shards for name in (shard.name, shard.index_name)}
    stray = sorted(
        p.name for p in folder.iterdir() if p.suffix in (".tar", INDEX_SUFFIX) and p.name not in listed and p.is_file()
    )
    return [
        f"{name}: not listed in {MANIFEST_NAME}; delete it (or move it away) if it is left "
        f"over from another run or split; if the manifest is stale instead, {redo_hint(manifest)}"
        for name in stray
    ]


def verify_split(folder: str | Path, decode_jpeg: bool = True, workers: int = 1) -> VerifyReport:
    """Check the split in `folder` against its manifest; the report lists every problem found (none: sound).

    `decode_jpeg=False` skips decoding frames (hashes, index, schema and counts are still checked); `workers`
    processes check shards in parallel. A missing or unreadable manifest is the report's only error.
    """
    folder = Path(folder)
    report = VerifyReport(folder=folder)
    try:
        manifest = load_manifest(folder)
    except SchemaError as err:
        report.errors.append(str(err))
        return report
    report.num_shards = len(manifest.shards)
    report.errors.extend(_manifest_total_errors(folder, manifest))

    check_one = partial(verify_shard, folder, manifest=manifest, decode_jpeg=decode_jpeg)
    if workers > 1 and len(manifest.shards) > 1:
        context = multiprocessing.get_context("fork")
        with ProcessPoolExecutor(min(workers, len(manifest.shards)), mp_context=context) as pool:
            checks = list(pool.map(check_one, manifest.shards))
    else:
        checks = [check_one(info) for info in manifest.shards]

    for check in checks:
        report.errors.extend(check.errors)
        report.num_samples += len(check.keys)
        report.num_bytes += check.num_bytes
        report.frames_decoded += check.frames_decoded
    report.errors.extend(_duplicate_key_errors(checks))
    report.errors.extend(_stray_errors(folder, manifest))
    return report
