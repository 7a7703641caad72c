"""A split's `manifest.json`: the shards it lists (name, samples, bytes, sha256), the log-mel statistics, the
classes, the feature parameters and every failure of the job that wrote it; parsed strictly, because manifests travel
through shared buckets: a manifest names only shards the writer names, its counts and sizes are bounded, and its
numbers are finite.
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

from shards.atomic import write_bytes_atomic
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

# What SHARD_PATTERN writes: a manifest naming anything else (a path, `../`, a shell word) is refused.
SHARD_NAME_RE = re.compile(r"^shard-[0-9]{6,9}\.tar$")
_SHA256_RE = re.compile(r"^[0-9a-f]{64}$")
# Bounds on what a manifest may claim: numbers read from data size allocations and loops.
MAX_SHARD_SAMPLES = 10_000_000
MAX_SHARD_BYTES = 1 << 40
MAX_CLASSES = 1_000_000
MAX_SHARDS = 10_000_000


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
                f"{where}: a shard entry must hold exactly name, num_samples, bytes, sha256: {data!r:.200}"
            )
        name, count, size, digest = data["name"], data["num_samples"], data["bytes"], data["sha256"]
        if not isinstance(name, str) or not SHARD_NAME_RE.fullmatch(name):
            raise SchemaError(
                f"{where}: shard name {name!r:.100} is not one the shard writer gives (shard-NNNNNN.tar); "
                "a manifest may name only shards of its own folder"
            )
        if not (is_int(count) and 1 <= count <= MAX_SHARD_SAMPLES):
            raise SchemaError(f"{where}: {name}: num_samples {count!r:.50} is not in 1..{MAX_SHARD_SAMPLES}")
        if not (is_int(size) and 2 * 512 <= size <= MAX_SHARD_BYTES and size % 512 == 0):
            raise SchemaError(
                f"{where}: {name}: bytes {size!r:.50} is not a tar's size (a multiple of 512 up to 1 TiB)"
            )
        if not isinstance(digest, str) or not _SHA256_RE.fullmatch(digest):
            raise SchemaError(f"{where}: {name}: sha256 {digest!r:.80} is not 64 lowercase hex digits")
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
                f"log-mel statistics count={count!r:.40} sum={total!r:.40} sum_sq={total_sq!r:.40} are not a count and "
                "finite sums (a clip with NaN or infinite audio was summed?)"
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
        }

    def write(self, folder: Path) -> Path:
        return write_bytes_atomic(folder / MANIFEST_NAME, (json.dumps(self.to_dict(), indent=1) + "\n").encode())


def load_manifest(folder: str | Path) -> Manifest:
    """The manifest of the split in `folder`; SchemaError naming the file if it is missing, invalid or of
    another schema version."""
    path = Path(folder) / MANIFEST_NAME
    if not path.is_file():
        raise SchemaError(f"{path}: no manifest; shard the split first (tools/shard_audioset.py, shard_vggsound.py)")
    return parse_manifest(path.read_bytes(), str(path))


def _no_json_constants(name: str) -> None:
    raise ValueError(f"{name} is not a number JSON allows")


def parse_manifest(text: str | bytes, where: str) -> Manifest:
    """A manifest from its JSON text, read from `where` (a path or URL that errors name); SchemaError if it is
    invalid, of another schema version, or claims what a manifest cannot (a shard name that is not the writer's,
    counts or sizes out of bounds, NaN or infinite statistics)."""
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
        if not isinstance(classes, list) or not 1 <= len(classes) <= MAX_CLASSES:
            raise SchemaError(f"classes must be a list of 1..{MAX_CLASSES} entries")
        if not all(isinstance(c, dict) and isinstance(c.get("name", ""), str) for c in classes):
            raise SchemaError("each class must be a mapping whose name is a string")
        if not isinstance(failures, list) or not all(isinstance(f, dict) for f in failures):
            raise SchemaError("failures must be a list of mappings")
        if not isinstance(data["multi_label"], bool):
            raise SchemaError(f"multi_label must be true or false, got {data['multi_label']!r:.40}")
        if not all(isinstance(data[k], str) for k in ("dataset", "split")):
            raise SchemaError("dataset and split must be strings")
        infos = [ShardInfo.from_dict(entry, where) for entry in shards]
        if len({info.name for info in infos}) != len(infos):
            raise SchemaError("a shard is listed twice")
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
        )
    except SchemaError as err:
        message = str(err) if str(err).startswith(where) else f"{where}: {err}"
        raise SchemaError(f"{message}; re-run the shard job to rewrite it") from None
    except (KeyError, TypeError, ValueError, AttributeError) as err:
        raise SchemaError(f"{where}: missing or malformed field ({err!r}); re-run the shard job to rewrite it") from err
