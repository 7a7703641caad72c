"""The shard schema: the one definition of what a shard sample and a split's manifest hold.

Writer (`preprocess.shard_writer`, `preprocess.job`) and readers (`preprocess.verify`, `pipelines/`) import this
module and nothing else decides a member name, a dtype, a shape or the manifest's fields. Bump `SCHEMA_VERSION`
on any change a reader could notice.

A sample is the tar members `{key}.{ext}` for, in this order:
  frame00.jpg … frame{F-1}.jpg   F JPEG frames, evenly spaced over the segment, short side `short_side_px`
  logmel.f16                    raw little-endian float16, shape (fbank_frames, num_mel_bins), row-major, unnormalized
  labels.i32                    raw little-endian int32 class indices, sorted (one for single-label datasets)
  meta.json                     UTF-8 JSON: source file, segment, what was decoded, padding applied
Per-frame JPEG members (rather than one mosaic image) let a loader decode only the frames it samples and let DALI
batch-decode frames without slicing a mosaic; see shards/README.md.
"""

from __future__ import annotations

import dataclasses
import json
import math
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

SCHEMA_VERSION = 1

LOGMEL_EXT = "logmel.f16"
LABELS_EXT = "labels.i32"
META_EXT = "meta.json"
LOGMEL_DTYPE = np.dtype("<f2")
LABELS_DTYPE = np.dtype("<i4")
MANIFEST_NAME = "manifest.json"
FAILURES_NAME = "failures.csv"
SHARD_PATTERN = "shard-{:06d}.tar"
INDEX_SUFFIX = ".idx"
# DALI's index files (tools/wds2idx.py in DALI) start with this version tag.
WDS_INDEX_VERSION = "v1.2"

_KEY_RE = re.compile(r"^[A-Za-z0-9_\-]+$")


class SchemaError(ValueError):
    """A shard, sample or manifest does not follow this schema; the message names the file/key."""


def frame_ext(index: int) -> str:
    """Member extension of frame `index` (0-based): 'frame00.jpg'."""
    return f"frame{index:02d}.jpg"


def sample_exts(num_frames: int) -> list[str]:
    """Member extensions of one sample, in the order they are written."""
    return [*(frame_ext(i) for i in range(num_frames)), LOGMEL_EXT, LABELS_EXT, META_EXT]


def check_key(key: str) -> str:
    """Return `key` if it is a valid sample key (letters, digits, '_' and '-'; no dots, no slashes)."""
    if not _KEY_RE.match(key):
        raise SchemaError(
            f"sample key {key!r} is not valid: keys may hold only letters, digits, '_' and '-' "
            "(DALI and webdataset take everything after the first dot as the extension)"
        )
    return key


@dataclass(frozen=True)
class FeatureParams:
    """What the offline stage extracts from a clip; stored in the manifest, read by both loaders.

    The log-mel parameters are the AST/MBT recipe: torchaudio.compliance.kaldi.fbank over 16 kHz mono with the
    waveform mean removed, 128 bins, 25 ms Hann window, 10 ms hop, htk_compat=True, dither=0, no energy.
    """

    num_frames: int = 8
    short_side_px: int = 256
    jpeg_qscale: int = 2  # ffmpeg mjpeg; measured to match libjpeg quality 90 in size and PSNR
    sample_rate_hz: int = 16000
    num_mel_bins: int = 128
    frame_length_ms: float = 25.0
    frame_shift_ms: float = 10.0
    window_type: str = "hanning"
    htk_compat: bool = True
    dither: float = 0.0
    use_energy: bool = False
    segment_s: float = 10.0

    @property
    def fbank_frames(self) -> int:
        """T: the stored log-mel length, the segment in hops (10 s → 1000)."""
        return round(self.segment_s * 1000.0 / self.frame_shift_ms)

    @property
    def logmel_shape(self) -> tuple[int, int]:
        return (self.fbank_frames, self.num_mel_bins)

    @property
    def logmel_bytes(self) -> int:
        return self.fbank_frames * self.num_mel_bins * LOGMEL_DTYPE.itemsize

    def validate(self) -> FeatureParams:
        if not 1 <= self.num_frames <= 99:
            raise SchemaError(f"num_frames must be in 1..99, got {self.num_frames}")
        if self.short_side_px < 16:
            raise SchemaError(f"short_side_px must be at least 16, got {self.short_side_px}")
        if not 1 <= self.jpeg_qscale <= 31:
            raise SchemaError(f"jpeg_qscale must be in 1..31, got {self.jpeg_qscale}")
        if self.segment_s <= 0:
            raise SchemaError(f"segment_s must be positive, got {self.segment_s}")
        return self

    def to_dict(self) -> dict[str, Any]:
        return {**dataclasses.asdict(self), "fbank_frames": self.fbank_frames}

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> FeatureParams:
        names = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: v for k, v in data.items() if k in names}).validate()


@dataclass
class Sample:
    """One clip as stored: JPEG frames, log-mel (T, 128) float16, sorted class indices, meta."""

    key: str
    frames: list[bytes]
    logmel: np.ndarray
    labels: np.ndarray
    meta: dict[str, Any] = field(default_factory=dict)


def encode_sample(sample: Sample, params: FeatureParams) -> list[tuple[str, bytes]]:
    """Tar members (name, payload) of `sample`, in schema order; checks shapes and dtypes first."""
    key = check_key(sample.key)
    if len(sample.frames) != params.num_frames:
        raise SchemaError(f"{key}: {len(sample.frames)} frames, the schema wants {params.num_frames}")
    if sample.logmel.shape != params.logmel_shape:
        raise SchemaError(f"{key}: log-mel shape {sample.logmel.shape}, the schema wants {params.logmel_shape}")
    logmel = np.ascontiguousarray(sample.logmel, dtype=LOGMEL_DTYPE)
    labels = np.ascontiguousarray(sample.labels, dtype=LABELS_DTYPE)
    meta = json.dumps(sample.meta, sort_keys=True, separators=(",", ":")).encode()
    payloads = [*sample.frames, logmel.tobytes(), labels.tobytes(), meta]
    return [(f"{key}.{ext}", data) for ext, data in zip(sample_exts(params.num_frames), payloads, strict=True)]


def decode_sample(key: str, members: Mapping[str, bytes], params: FeatureParams, num_classes: int) -> Sample:
    """Sample from its members keyed by extension; raises SchemaError naming the key on any deviation.

    JPEG payloads are checked for their markers only; decoding them is the reader's business.
    """
    check_key(key)
    expected = sample_exts(params.num_frames)
    if sorted(members) != sorted(expected):
        missing = sorted(set(expected) - set(members))
        extra = sorted(set(members) - set(expected))
        raise SchemaError(f"{key}: members do not match schema v{SCHEMA_VERSION} (missing {missing}, extra {extra})")
    frames = [members[frame_ext(i)] for i in range(params.num_frames)]
    for i, jpeg in enumerate(frames):
        if not (jpeg[:2] == b"\xff\xd8" and jpeg[-2:] == b"\xff\xd9"):
            raise SchemaError(f"{key}: {frame_ext(i)} is not a complete JPEG")
    raw_mel = members[LOGMEL_EXT]
    if len(raw_mel) != params.logmel_bytes:
        raise SchemaError(f"{key}: {LOGMEL_EXT} has {len(raw_mel)} bytes, the schema wants {params.logmel_bytes}")
    logmel = np.frombuffer(raw_mel, dtype=LOGMEL_DTYPE).reshape(params.logmel_shape)
    raw_labels = members[LABELS_EXT]
    if len(raw_labels) % LABELS_DTYPE.itemsize:
        raise SchemaError(f"{key}: {LABELS_EXT} has {len(raw_labels)} bytes, not a whole number of int32")
    labels = np.frombuffer(raw_labels, dtype=LABELS_DTYPE)
    if labels.size and (labels.min() < 0 or labels.max() >= num_classes or np.any(np.diff(labels) <= 0)):
        raise SchemaError(f"{key}: labels {labels.tolist()} are not sorted distinct indices below {num_classes}")
    try:
        meta = json.loads(members[META_EXT])
    except (UnicodeDecodeError, json.JSONDecodeError) as err:
        raise SchemaError(f"{key}: {META_EXT} is not valid JSON ({err})") from err
    return Sample(key=key, frames=frames, logmel=logmel, labels=labels, meta=meta)


def split_member_name(name: str) -> tuple[str, str]:
    """('key', 'ext') of a tar member name, splitting at the first dot of the basename as webdataset and DALI do."""
    base_start = name.rfind("/") + 1
    dot = name.find(".", base_start)
    if dot < 0:
        return name, ""
    return name[:dot], name[dot + 1 :]


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
        if not self.count:
            return 1.0
        return math.sqrt(max(self.total_sq / self.count - self.mean**2, 0.0))

    def to_dict(self) -> dict[str, float | int]:
        return {"mean": self.mean, "std": self.std, "count": self.count, "sum": self.total, "sum_sq": self.total_sq}

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> LogmelStats:
        return cls(int(data["count"]), float(data["sum"]), float(data["sum_sq"]))


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
        from preprocess.atomic import write_bytes_atomic

        return write_bytes_atomic(folder / MANIFEST_NAME, (json.dumps(self.to_dict(), indent=1) + "\n").encode())


def load_manifest(folder: str | Path) -> Manifest:
    """The manifest of the split in `folder`; SchemaError naming the file if it is missing, invalid or of
    another schema version."""
    path = Path(folder) / MANIFEST_NAME
    if not path.is_file():
        raise SchemaError(f"{path}: no manifest; shard the split first (tools/shard_audioset.py, shard_vggsound.py)")
    return parse_manifest(path.read_bytes(), str(path))


def parse_manifest(text: str | bytes, where: str) -> Manifest:
    """A manifest from its JSON text, read from `where` (a path or URL that errors name); SchemaError if it is
    invalid or of another schema version."""
    try:
        data = json.loads(text)
    except (UnicodeDecodeError, json.JSONDecodeError) as err:
        raise SchemaError(f"{where}: not valid JSON ({err}); re-run the shard job to rewrite it") from err
    if not isinstance(data, dict):
        raise SchemaError(f"{where}: not a manifest (a JSON {type(data).__name__}); re-run the shard job to rewrite it")
    version = data.get("schema_version")
    if version != SCHEMA_VERSION:
        raise SchemaError(
            f"{where}: schema version {version}, this code reads version {SCHEMA_VERSION}; "
            "re-shard the split with this version of tools/shard_*.py"
        )
    try:
        return Manifest(
            dataset=data["dataset"],
            split=data["split"],
            features=FeatureParams.from_dict(data["features"]),
            classes=list(data["classes"]),
            multi_label=bool(data["multi_label"]),
            shards=[ShardInfo(**s) for s in data["shards"]],
            logmel=LogmelStats.from_dict(data["logmel"]),
            failures=list(data["failures"]),
            job=dict(data["job"]),
        )
    except (KeyError, TypeError, ValueError, AttributeError) as err:
        raise SchemaError(f"{where}: missing or malformed field ({err!r}); re-run the shard job to rewrite it") from err
