"""The shard schema: the one definition of what a shard sample holds and how a split's folder is laid out.

The writer (`shards.writer`, `preprocess.job_state`) and the readers (`preprocess.verify`, `pipelines/`) import this
package (`shards.schema`, `shards.manifest`, `shards.index`, `shards.tar`) and nothing else decides a member name, a
dtype, a shape or the manifest's fields. Bump `SCHEMA_VERSION` on any change a reader could notice.

A sample is the tar members `{key}.{ext}` for, in this order:
  frame00.jpg … frame{F-1}.jpg   F JPEG frames at the centres of F equal slices of the segment, (i + 0.5) · S / F
                                 seconds from its start (2 per second by default), short side `short_side_px`
  logmel.f16                    raw little-endian float16, shape (fbank_frames, num_mel_bins), row-major, unnormalized;
                                a short clip's followed by rows of zeros (meta.json: fbank_frames_computed)
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
from typing import Any

import numpy as np

# 2: every clip's frames at the same times, (i + 0.5) · segment / F (a clip that ends early repeats its last frame, as
# its log-mel is zero-padded), so that a window of the log-mel and the frames inside it show the same moment.
# 1: a clip shorter than the segment spread its F frames over what it had; read as version 2 (those clips' frames are
# then a little early).
SCHEMA_VERSION = 2
READABLE_SCHEMA_VERSIONS = (1, 2)
# Frames per clip are 1..MAX_FRAMES wherever they are counted (the shard job's options, feature parameters, the model
# and the loaders' settings, a prediction window): 25 per second of a 10 s segment, the video rate scenic's released
# models sample 32 consecutive frames at stride 2 from. Member names keep at least two digits: frame00.jpg …
# frame249.jpg.
MAX_FRAMES = 250

LOGMEL_EXT = "logmel.f16"
LABELS_EXT = "labels.i32"
META_EXT = "meta.json"
LOGMEL_DTYPE = np.dtype("<f2")
LABELS_DTYPE = np.dtype("<i4")
MANIFEST_NAME = "manifest.json"
FAILURES_NAME = "failures.csv"
SHARD_PATTERN = "shard-{:06d}.tar"
INDEX_SUFFIX = ".idx"

_KEY_RE = re.compile(r"^[A-Za-z0-9_\-]+$")


class SchemaError(ValueError):
    """A shard, sample or manifest does not follow this schema; the message names the file/key."""


def check_schema_version(version: object, where: str) -> int:
    """`version` when this code reads shards of that schema version (READABLE_SCHEMA_VERSIONS); otherwise SchemaError
    '`where`: schema version V, this code reads versions 1, 2'. The one check of every record of a schema version:
    a manifest, a checkpoint's features, an export's config."""
    if not is_int(version) or version not in READABLE_SCHEMA_VERSIONS:
        readable = ", ".join(map(str, READABLE_SCHEMA_VERSIONS))
        raise SchemaError(f"{where}: schema version {version!r:.40}, this code reads versions {readable}")
    return version


def is_int(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def finite(value: object) -> bool:
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

    num_frames: int = 20  # 2 per second of a 10 s segment (`frames_per_s`)
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
    def frames_per_s(self) -> float:
        """Stored frames per second of segment."""
        return self.num_frames / self.segment_s

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
                is_int(self.num_frames) and 1 <= self.num_frames <= MAX_FRAMES,
                f"num_frames must be in 1..{MAX_FRAMES}, got {self.num_frames}",
            ),
            (
                is_int(self.short_side_px) and 16 <= self.short_side_px <= 4096 and self.short_side_px % 2 == 0,
                f"short_side_px must be an even number in 16..4096 (ffmpeg scales to even sizes), got "
                f"{self.short_side_px}",
            ),
            (
                is_int(self.jpeg_qscale) and 1 <= self.jpeg_qscale <= 31,
                f"jpeg_qscale must be in 1..31, got {self.jpeg_qscale}",
            ),
            (
                finite(self.segment_s) and 0 < self.segment_s <= 3600,
                f"segment_s must be in (0, 3600], got {self.segment_s}",
            ),
            (
                is_int(self.sample_rate_hz) and 1000 <= self.sample_rate_hz <= 192_000,
                f"sample_rate_hz must be in 1000..192000, got {self.sample_rate_hz}",
            ),
            (
                is_int(self.num_mel_bins) and 1 <= self.num_mel_bins <= 1024,
                f"num_mel_bins must be in 1..1024, got {self.num_mel_bins}",
            ),
            (
                finite(self.frame_shift_ms) and 1 <= self.frame_shift_ms <= 1000,
                f"frame_shift_ms must be in [1, 1000], got {self.frame_shift_ms}",
            ),
            (
                finite(self.frame_length_ms) and 1 <= self.frame_length_ms <= 1000,
                f"frame_length_ms must be in [1, 1000], got {self.frame_length_ms}",
            ),
            (finite(self.dither), f"dither must be a finite number, got {self.dither}"),
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
