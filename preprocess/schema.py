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
# What SHARD_PATTERN writes: a manifest naming anything else (a path, `../`, a shell word) is refused.
SHARD_NAME_RE = re.compile(r"^shard-[0-9]{6,9}\.tar$")
_SHA256_RE = re.compile(r"^[0-9a-f]{64}$")
# Bounds on what a manifest may claim: numbers read from data size allocations and loops.
MAX_SHARD_SAMPLES = 10_000_000
MAX_SHARD_BYTES = 1 << 40
MAX_CLASSES = 1_000_000
MAX_SHARDS = 10_000_000


class SchemaError(ValueError):
    """A shard, sample or manifest does not follow this schema; the message names the file/key."""


def _is_int(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _finite(value: object) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value)


def frame_ext(index: int) -> str:
    """Member extension of frame `index` (0-based): 'frame00.jpg'."""
    return f"frame{index:02d}.jpg"


def sample_exts(num_frames: int) -> list[str]:
    """Member extensions of one sample, in the order they are written."""
    return [*(frame_ext(i) for i in range(num_frames)), LOGMEL_EXT, LABELS_EXT, META_EXT]


def check_key(key: str) -> str:
    """Return `key` if it is a valid sample key (letters, digits, '_' and '-'; no dots, no slashes)."""
    if not _KEY_RE.fullmatch(key):
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
        """`self` if every value can be produced and read (bounded sizes); SchemaError naming the field otherwise."""
        checks = [
            (
                _is_int(self.num_frames) and 1 <= self.num_frames <= 99,
                f"num_frames must be in 1..99, got {self.num_frames}",
            ),
            (
                _is_int(self.short_side_px) and 16 <= self.short_side_px <= 4096 and self.short_side_px % 2 == 0,
                f"short_side_px must be an even number in 16..4096 (ffmpeg scales to even sizes), got "
                f"{self.short_side_px}",
            ),
            (
                _is_int(self.jpeg_qscale) and 1 <= self.jpeg_qscale <= 31,
                f"jpeg_qscale must be in 1..31, got {self.jpeg_qscale}",
            ),
            (
                _finite(self.segment_s) and 0 < self.segment_s <= 3600,
                f"segment_s must be in (0, 3600], got {self.segment_s}",
            ),
            (
                _is_int(self.sample_rate_hz) and 1000 <= self.sample_rate_hz <= 192_000,
                f"sample_rate_hz must be in 1000..192000, got {self.sample_rate_hz}",
            ),
            (
                _is_int(self.num_mel_bins) and 1 <= self.num_mel_bins <= 1024,
                f"num_mel_bins must be in 1..1024, got {self.num_mel_bins}",
            ),
            (
                _finite(self.frame_shift_ms) and 1 <= self.frame_shift_ms <= 1000,
                f"frame_shift_ms must be in [1, 1000], got {self.frame_shift_ms}",
            ),
            (
                _finite(self.frame_length_ms) and 1 <= self.frame_length_ms <= 1000,
                f"frame_length_ms must be in [1, 1000], got {self.frame_length_ms}",
            ),
            (_finite(self.dither), f"dither must be a finite number, got {self.dither}"),
            (isinstance(self.window_type, str), f"window_type must be a string, got {self.window_type!r}"),
            (isinstance(self.htk_compat, bool), f"htk_compat must be true or false, got {self.htk_compat!r}"),
            (isinstance(self.use_energy, bool), f"use_energy must be true or false, got {self.use_energy!r}"),
        ]
        problems = [message for ok, message in checks if not ok]
        if problems:
            raise SchemaError("; ".join(problems))
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


# A frame's long side may be at most this many times its short side (the writer scales the short side to
# short_side_px; real videos stay far below 16:1): a JPEG header claiming more is refused before decoding.
MAX_FRAME_ASPECT = 16
_SOF_MARKERS = frozenset(range(0xC0, 0xD0)) - {0xC4, 0xC8, 0xCC}  # start-of-frame; C4/C8/CC are not


def jpeg_size(data: bytes) -> tuple[int, int]:
    """(height, width) that a baseline or progressive JPEG declares in its frame header, read without decoding;
    SchemaError if no frame header is found."""
    if data[:2] != b"\xff\xd8":
        raise SchemaError("not a JPEG (no start-of-image marker)")
    pos = 2
    while pos + 4 <= len(data):
        if data[pos] != 0xFF:
            raise SchemaError(f"not a JPEG (no marker at byte {pos})")
        marker = data[pos + 1]
        if marker == 0xFF:  # fill byte
            pos += 1
            continue
        length = int.from_bytes(data[pos + 2 : pos + 4], "big")
        if marker in _SOF_MARKERS:
            if pos + 9 > len(data) or length < 8:
                break
            return int.from_bytes(data[pos + 5 : pos + 7], "big"), int.from_bytes(data[pos + 7 : pos + 9], "big")
        if length < 2:
            break
        pos += 2 + length
    raise SchemaError("not a JPEG (no frame header)")


def frame_size_problem(jpeg: bytes, short_side_px: int, name: str) -> str | None:
    """What is wrong with a stored frame's declared size, or None: its short side must be the manifest's and its
    long side at most MAX_FRAME_ASPECT times that (so that no frame decodes into an unbounded allocation)."""
    try:
        height, width = jpeg_size(jpeg)
    except SchemaError as err:
        return f"{name} does not decode ({err})"
    if min(height, width) != short_side_px or max(height, width) > MAX_FRAME_ASPECT * short_side_px:
        return (
            f"frames are {width}x{height} ({name}), short side {min(height, width)} px; the manifest says "
            f"{short_side_px} px (and a long side of at most {MAX_FRAME_ASPECT * short_side_px} px)"
        )
    return None


def parse_logmel(raw: bytes, params: FeatureParams) -> np.ndarray:
    """The stored log-mel (fbank_frames, num_mel_bins) float16 of a logmel member; SchemaError if its size is not
    the schema's or it holds NaN or infinite values (the caller names the key)."""
    if len(raw) != params.logmel_bytes:
        raise SchemaError(f"{LOGMEL_EXT} has {len(raw)} bytes, the schema wants {params.logmel_bytes}")
    logmel = np.frombuffer(raw, dtype=LOGMEL_DTYPE).reshape(params.logmel_shape)
    bad = int(logmel.size - np.count_nonzero(np.isfinite(logmel)))
    if bad:
        raise SchemaError(f"{LOGMEL_EXT} holds {bad} NaN or infinite values")
    return logmel


def parse_labels(raw: bytes, num_classes: int, multi_label: bool) -> np.ndarray:
    """The class indices of a labels member: sorted, distinct, each in [0, num_classes), exactly one for a
    single-label split; SchemaError saying what is wrong otherwise (the caller names the key)."""
    if len(raw) % LABELS_DTYPE.itemsize:
        raise SchemaError(f"{LABELS_EXT} has {len(raw)} bytes, not a whole number of int32")
    labels = np.frombuffer(raw, dtype=LABELS_DTYPE)
    if labels.size and (labels.min() < 0 or labels.max() >= num_classes or np.any(np.diff(labels) <= 0)):
        raise SchemaError(f"labels {labels.tolist()[:16]} are not sorted distinct indices in 0..{num_classes - 1}")
    if not multi_label and labels.size != 1:
        raise SchemaError(f"labels {labels.tolist()[:16]}: the split is single-label (one class index per clip)")
    return labels


def decode_sample(
    key: str, members: Mapping[str, bytes], params: FeatureParams, num_classes: int, multi_label: bool = True
) -> Sample:
    """Sample from its members keyed by extension; raises SchemaError naming the key on any deviation.

    JPEG payloads are checked for their markers and declared size only; decoding them is the reader's business.
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
        if problem := frame_size_problem(jpeg, params.short_side_px, frame_ext(i)):
            raise SchemaError(f"{key}: {problem}")
    try:
        logmel = parse_logmel(members[LOGMEL_EXT], params)
        labels = parse_labels(members[LABELS_EXT], num_classes, multi_label)
    except SchemaError as err:
        raise SchemaError(f"{key}: {err}") from None
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
        if not (_is_int(count) and 1 <= count <= MAX_SHARD_SAMPLES):
            raise SchemaError(f"{where}: {name}: num_samples {count!r:.50} is not in 1..{MAX_SHARD_SAMPLES}")
        if not (_is_int(size) and 2 * 512 <= size <= MAX_SHARD_BYTES and size % 512 == 0):
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
        if not (_is_int(count) and count >= 0 and _finite(total) and _finite(total_sq) and total_sq >= 0):
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
        from preprocess.atomic import write_bytes_atomic

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
    version = data.get("schema_version")
    if version != SCHEMA_VERSION:
        raise SchemaError(
            f"{where}: schema version {version!r:.40}, this code reads version {SCHEMA_VERSION}; "
            "re-shard the split with this version of tools/shard_*.py"
        )
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
        )
    except SchemaError as err:
        message = str(err) if str(err).startswith(where) else f"{where}: {err}"
        raise SchemaError(f"{message}; re-run the shard job to rewrite it") from None
    except (KeyError, TypeError, ValueError, AttributeError) as err:
        raise SchemaError(f"{where}: missing or malformed field ({err!r}); re-run the shard job to rewrite it") from err
