"""A split's `manifest.json`: the shards it lists (name, samples, bytes, sha256), the log-mel statistics, the
classes, the feature parameters and every failure of the job that wrote it; parsed strictly, because manifests travel
through shared buckets: a manifest names only shards the writer names, its size, counts and sizes are bounded (a
shard's samples by its bytes), its numbers are finite and its class names printable.
"""

from __future__ import annotations

import dataclasses
import json
import math
import re
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from shards.atomic import read_small_file, write_bytes_atomic
from shards.schema import (
    INDEX_SUFFIX,
    MANIFEST_NAME,
    SCHEMA_VERSION,
    FeatureParams,
    SchemaError,
    check_schema_version,
    finite,
    is_int,
)
from shards.text import excerpt, name_problem

# What SHARD_PATTERN writes: a manifest naming anything else (a path, `../`, a shell word) is refused.
SHARD_NAME_RE = re.compile(r"^shard-[0-9]{6,9}\.tar$")
_SHA256_RE = re.compile(r"^[0-9a-f]{64}$")
# Bounds on what a manifest may claim: numbers read from data size allocations and loops.
MAX_SHARD_SAMPLES = 10_000_000
MAX_SHARD_BYTES = 1 << 40
MAX_CLASSES = 1_000_000
MAX_SHARDS = 10_000_000
# A split's samples: AudioSet-2M has 2,041,789; loaders allocate an order over all of them (8 bytes each).
MAX_SPLIT_SAMPLES = 100_000_000
# A manifest is a few MB (AudioSet-2M: ~4,000 shards and its failures); more is not one.
MAX_MANIFEST_BYTES = 1 << 29
# The least a sample takes in a tar: a header each for a frame, the log-mel, the labels and meta.json.
MIN_SAMPLE_BYTES = 4 * 512
# What the shard job counts of the samples it kept (`Manifest.clips`): without an audio stream (silence stored), and
# shorter than the segment (frames repeated or the log-mel zero-padded). Manifests of older jobs have no counts.
CLIP_COUNTS = ("no_audio", "padded")


@dataclass(frozen=True)
class ShardInfo:
    """One shard as the manifest lists it."""

    name: str
    num_samples: int
    bytes: int
    sha256: str

    @property
    def index_name(self) -> str:
        return self.name.removesuffix(".tar") + INDEX_SUFFIX

    @classmethod
    def from_dict(cls, data: object, where: str) -> ShardInfo:
        """A manifest's shard entry, checked: a name the writer gives (never a path or a shell word), counts and
        sizes in bounds, a sha256 in hex; SchemaError naming `where` otherwise."""
        if not isinstance(data, Mapping) or set(data) != {"name", "num_samples", "bytes", "sha256"}:
            raise SchemaError(
                f"{where}: a shard entry must hold exactly name, num_samples, bytes, sha256: {excerpt(data, 200)}"
            )
        name, count, size, digest = data["name"], data["num_samples"], data["bytes"], data["sha256"]
        if not isinstance(name, str) or not SHARD_NAME_RE.fullmatch(name):
            raise SchemaError(
                f"{where}: shard name {excerpt(name)} is not one the shard writer gives (shard-NNNNNN.tar); "
                "a manifest may name only shards of its own folder"
            )
        if not (is_int(count) and 1 <= count <= MAX_SHARD_SAMPLES):
            raise SchemaError(f"{where}: {name}: num_samples {excerpt(count)} is not in 1..{MAX_SHARD_SAMPLES}")
        if not (is_int(size) and 2 * 512 <= size <= MAX_SHARD_BYTES and size % 512 == 0):
            raise SchemaError(
                f"{where}: {name}: bytes {excerpt(size)} is not a tar's size (a multiple of 512 up to 1 TiB)"
            )
        if count * MIN_SAMPLE_BYTES > size:
            raise SchemaError(
                f"{where}: {name}: {count} samples cannot fit in {size} bytes (each takes at least {MIN_SAMPLE_BYTES})"
            )
        if not isinstance(digest, str) or not _SHA256_RE.fullmatch(digest):
            raise SchemaError(f"{where}: {name}: sha256 {excerpt(digest)} is not 64 lowercase hex digits")
        return cls(name, count, size, digest)


@dataclass(frozen=True)
class LogmelStats:
    """Running sums over every real (not padded) log-mel value of clips with audio; merges exactly."""

    count: int = 0
    total: float = 0.0
    total_sq: float = 0.0

    def __add__(self, other: LogmelStats) -> LogmelStats:
        return LogmelStats(self.count + other.count, self.total + other.total, self.total_sq + other.total_sq)

    @property
    def mean(self) -> float:
        return self.total / self.count if self.count else 0.0

    @property
    def std(self) -> float:
        """The standard deviation, or 1 where it is 0 (no clip with audio, all alike): normalization divides by it."""
        if not self.count:
            return 1.0
        return math.sqrt(max(self.total_sq / self.count - self.mean**2, 0.0)) or 1.0

    def to_dict(self) -> dict[str, float | int]:
        return {"mean": self.mean, "std": self.std, "count": self.count, "sum": self.total, "sum_sq": self.total_sq}

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> LogmelStats:
        """The sums as written by `to_dict`; SchemaError if they are not finite numbers (a NaN here would make every
        normalized log-mel of the split NaN) or cannot be sums of squares."""
        count, total, total_sq = data["count"], data["sum"], data["sum_sq"]
        if not (is_int(count) and count >= 0 and finite(total) and finite(total_sq) and total_sq >= 0):
            raise SchemaError(
                f"log-mel statistics count={excerpt(count, 40)} sum={excerpt(total, 40)} "
                f"sum_sq={excerpt(total_sq, 40)} are not a count and finite sums (a clip with NaN or infinite audio "
                "was summed?)"
            )
        stats = cls(count, float(total), float(total_sq))
        if not (math.isfinite(stats.mean) and math.isfinite(stats.std)):
            raise SchemaError(f"log-mel statistics give mean {stats.mean} and std {stats.std}, which are not finite")
        return stats


@dataclass
class Manifest:
    """`manifest.json` of one split: what a loader needs to read it and what verification checks."""

    dataset: str
    split: str
    features: FeatureParams
    classes: list[dict[str, Any]]
    multi_label: bool
    shards: list[ShardInfo]
    logmel: LogmelStats
    failures: list[dict[str, str]]
    job: dict[str, Any]
    schema_version: int = SCHEMA_VERSION
    clips: dict[str, int] | None = None  # {CLIP_COUNTS name: samples}; None: not counted (an older job)

    @property
    def num_samples(self) -> int:
        return sum(s.num_samples for s in self.shards)

    @property
    def num_classes(self) -> int:
        return len(self.classes)

    def to_dict(self) -> dict[str, Any]:
        return {
            "schema_version": self.schema_version,
            "dataset": self.dataset,
            "split": self.split,
            "num_samples": self.num_samples,
            "num_failures": len(self.failures),
            "multi_label": self.multi_label,
            "features": self.features.to_dict(),
            "classes": self.classes,
            "logmel": self.logmel.to_dict(),
            "shards": [dataclasses.asdict(s) for s in self.shards],
            "failures": self.failures,
            "job": self.job,
            **({} if self.clips is None else {"clips": self.clips}),
        }

    def write(self, folder: Path) -> Path:
        return write_bytes_atomic(folder / MANIFEST_NAME, (json.dumps(self.to_dict(), indent=1) + "\n").encode())


def load_manifest(folder: str | Path) -> Manifest:
    """The manifest of the split in `folder`; SchemaError naming the file if it is missing, invalid, larger than
    MAX_MANIFEST_BYTES (checked before it is read) or of another schema version."""
    path = Path(folder) / MANIFEST_NAME
    if not path.is_file():
        raise SchemaError(f"{path}: no manifest; shard the split first (tools/shard_audioset.py, shard_vggsound.py)")
    try:
        text = read_small_file(path, MAX_MANIFEST_BYTES)
    except (OSError, ValueError) as err:
        raise SchemaError(f"{path}: cannot be read as a manifest ({err}); re-run the shard job to rewrite it") from None
    return parse_manifest(text, str(path))


def check_classes(classes: object, where: str) -> list[dict[str, Any]]:
    """`classes` if it is a manifest's class list: 1..MAX_CLASSES mappings whose name (where given) is a string and
    whose name and id hold text a person can be shown (`shards.text.name_problem`); SchemaError naming `where`
    otherwise. (What a model needs of a class, an index and string id and name, is `mbt.classes`' check.)"""
    if not isinstance(classes, list) or not 1 <= len(classes) <= MAX_CLASSES:
        raise SchemaError(f"{where}: classes must be a list of 1..{MAX_CLASSES} entries")
    for i, entry in enumerate(classes):
        if not (isinstance(entry, dict) and isinstance(entry.get("name", ""), str)):
            raise SchemaError(f"{where}: each class must be a mapping whose name is a string (class {i} is not)")
        for field_name in ("name", "id"):
            value = entry.get(field_name)
            if isinstance(value, str) and (problem := name_problem(value)):
                raise SchemaError(f"{where}: class {i}'s {field_name} {excerpt(value)} {problem}")
    return classes


def _no_json_constants(name: str) -> None:
    raise ValueError(f"{name} is not a number JSON allows")


def _clip_counts(clips: object, samples: int) -> dict[str, int] | None:
    """A manifest's `clips` counts (None when it has none); SchemaError unless each of CLIP_COUNTS is a count of at
    most the split's `samples`."""
    if clips is None:
        return None
    if not (
        isinstance(clips, dict)
        and set(clips) == set(CLIP_COUNTS)
        and all(is_int(n) and 0 <= n <= samples for n in clips.values())
    ):
        raise SchemaError(
            f"clips must map {' and '.join(CLIP_COUNTS)} to counts of at most its {samples} samples, got "
            f"{excerpt(clips, 120)}"
        )
    return dict(clips)


def parse_manifest(text: str | bytes, where: str) -> Manifest:
    """A manifest from its JSON text, read from `where` (a path or URL that errors name); SchemaError if it is
    invalid, of another schema version, or claims what a manifest cannot (a shard name that is not the writer's,
    counts or sizes out of bounds, NaN or infinite statistics, a class name holding control characters)."""
    if len(text) > MAX_MANIFEST_BYTES:
        raise SchemaError(f"{where}: more than {MAX_MANIFEST_BYTES} bytes, not a manifest; re-run the shard job")
    try:
        data = json.loads(text, parse_constant=_no_json_constants)
    except (UnicodeDecodeError, ValueError, RecursionError) as err:
        raise SchemaError(f"{where}: not valid JSON ({err}); re-run the shard job to rewrite it") from err
    if not isinstance(data, dict):
        raise SchemaError(f"{where}: not a manifest (a JSON {type(data).__name__}); re-run the shard job to rewrite it")
    try:
        version = check_schema_version(data.get("schema_version"), where)
    except SchemaError as err:
        raise SchemaError(f"{err}; re-shard the split with this version of tools/shard_*.py") from None
    try:
        shards, classes, failures = data["shards"], data["classes"], data["failures"]
        if not isinstance(shards, list) or len(shards) > MAX_SHARDS:
            raise SchemaError(f"shards must be a list of at most {MAX_SHARDS} entries")
        check_classes(classes, where)
        if not isinstance(failures, list) or not all(isinstance(f, dict) for f in failures):
            raise SchemaError("failures must be a list of mappings")
        if not isinstance(data["multi_label"], bool):
            raise SchemaError(f"multi_label must be true or false, got {excerpt(data['multi_label'], 40)}")
        if not all(isinstance(data[k], str) for k in ("dataset", "split")):
            raise SchemaError("dataset and split must be strings")
        infos = [ShardInfo.from_dict(entry, where) for entry in shards]
        if len({info.name for info in infos}) != len(infos):
            raise SchemaError("a shard is listed twice")
        if (samples := sum(info.num_samples for info in infos)) + len(failures) > MAX_SPLIT_SAMPLES:
            raise SchemaError(
                f"its shards hold {samples} samples and it lists {len(failures)} failures, more rows than a split may "
                f"have ({MAX_SPLIT_SAMPLES})"
            )
        return Manifest(
            dataset=data["dataset"],
            split=data["split"],
            features=FeatureParams.from_dict(data["features"]),
            classes=classes,
            multi_label=data["multi_label"],
            shards=infos,
            logmel=LogmelStats.from_dict(data["logmel"]),
            failures=failures,
            job=dict(data["job"]),
            schema_version=version,
            clips=_clip_counts(data.get("clips"), samples),
        )
    except SchemaError as err:
        message = str(err) if str(err).startswith(where) else f"{where}: {err}"
        raise SchemaError(f"{message}; re-run the shard job to rewrite it") from None
    except (KeyError, TypeError, ValueError, AttributeError) as err:
        raise SchemaError(
            f"{where}: missing or malformed field ({excerpt(err, 200)}); re-run the shard job to rewrite it"
        ) from err
