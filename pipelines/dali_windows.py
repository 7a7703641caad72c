"""Which stored frames and log-mel rows a row of the DALI graph shows: `pipelines.windows` on DALI DataNodes, drawn
with DALI's generators (training) or from the same constants (evaluation), and the chosen frames' members picked
from a sample's JPEGs without decoding the others. `pipelines.dali_graph` builds its graph from these.
"""

from __future__ import annotations

from typing import Any, NamedTuple

from pipelines.config import AugmentConfig, frames_fed
from pipelines.windows import consecutive_offsets, first_frame_choices, synced_audio_start
from shards.schema import FeatureParams

try:
    from nvidia.dali import fn, types
    from nvidia.dali import math as dmath
except ImportError:  # importable without DALI, as pipelines.dali_graph is (DaliLoader() says how to install it)
    pass


def random_int(high: Any) -> Any:
    """int32 () per sample, uniform over [0, high); `high` an int or a per-sample DataNode, at least 1."""
    draw = dmath.floor(fn.random.uniform(range=[0.0, 1.0]) * high)
    return fn.cast(dmath.clamp(draw, 0, high - 1), dtype=types.INT32)  # u * high can round up to high


def train_window(aug: AugmentConfig, features: FeatureParams) -> tuple[Any, Any]:
    """(frame ids int32 (frames_used,), log-mel start int32 ()) per sample: `pipelines.windows.train_window` drawn
    with DALI's generators."""
    if aug.frame_sampling == "consecutive":
        first = random_int(first_frame_choices(aug, features))
        offsets = fn.constant(idata=consecutive_offsets(aug, features).tolist(), dtype=types.INT32)
        return first + offsets, fn.cast(synced_audio_start(first, features), dtype=types.INT32)
    start = random_int(max(features.fbank_frames - aug.audio_frames, 0) + 1)
    return spread_frame_ids(start, aug, features), start


def spread_frame_ids(start: Any, aug: AugmentConfig, features: FeatureParams) -> Any:
    """int32 (frames_used,) per sample: `pipelines.windows.spread_ids` with jitter, for the audio window at `start`:
    one stored frame from each of frames_used equal parts of the window, nearest a random time in its part."""
    used = frames_fed(aug, features.num_frames)
    parts = fn.constant(fdata=[float(k) for k in range(used)], shape=[used])
    offsets = parts + fn.random.uniform(range=[0.0, 1.0], shape=[used])
    scale = features.num_frames / features.fbank_frames
    positions = (fn.cast(start, dtype=types.FLOAT) + offsets * (aug.audio_frames / used)) * scale
    return fn.cast(dmath.clamp(dmath.floor(positions), 0, features.num_frames - 1), dtype=types.INT32)


def select_members(jpegs: list[Any], ids: Any, count: int) -> list[Any]:
    """`count` encoded frames per sample, the k-th being member `ids[k]` of `jpegs` (ids: int32 (count,) per
    sample): the members joined into one byte string and the chosen ones sliced out (their offsets computed for all
    k at once: fewer, larger operators), so that only the frames a clip shows are decoded."""
    lengths = fn.reshape(fn.stack(*[j.shape(dtype=types.INT32) for j in jpegs]), shape=[1, len(jpegs)])
    positions = fn.constant(idata=list(range(len(jpegs))), shape=[1, len(jpegs)], dtype=types.INT32)
    wanted = fn.reshape(ids, shape=[count, 1])
    starts = fn.cast(fn.reductions.sum(lengths * (positions < wanted), axes=[1]), dtype=types.INT32)
    sizes = fn.cast(fn.reductions.sum(lengths * (positions == wanted), axes=[1]), dtype=types.INT32)
    packed = fn.cat(*jpegs, axis=0)
    return [fn.slice(packed, start=starts[k : k + 1], shape=sizes[k : k + 1], axes=[0]) for k in range(count)]


class Logmel(NamedTuple):
    """A sample's stored log-mel: `values` float32 (T, mel_bins) on the graph's device, `real` int32 () on the CPU
    (`real_rows`; None where `audio_pad` is "zeros", which does not need it)."""

    values: Any
    real: Any


def real_rows(values: Any, rows: int) -> Any:
    """int32 () per sample: `pipelines.windows.real_frames` of a (rows, mel_bins) log-mel on the CPU: the rows up
    to its last row that is not all zeros (the largest 1-based index of a row with a value other than 0)."""
    nonzero = fn.cast(fn.reductions.max(dmath.abs(values), axes=[1]) > 0, dtype=types.INT32)
    return fn.reductions.max(nonzero * fn.constant(idata=list(range(1, rows + 1)), dtype=types.INT32))


def audio_window(mel: Logmel, start: Any, aug: AugmentConfig) -> Any:
    """(audio_frames, mel_bins) from row `start` (int32 () per sample, or an int), before normalization:
    `pipelines.windows.audio_window`, zero-padded past the end (`audio_pad="zeros"`) or row (start + j) mod the real
    rows (`"repeat"`, gathered with `sequence_rearrange`)."""
    frames = aug.audio_frames
    if aug.audio_pad == "zeros":
        start = fn.reshape(start, shape=[1]) if not isinstance(start, int) else [start]
        return fn.slice(mel.values, start=start, shape=[frames], axes=[0], out_of_bounds_policy="pad", fill_values=0)
    period = dmath.max(mel.real, 1)
    rows = start + fn.constant(idata=list(range(frames)), dtype=types.INT32)
    return fn.sequence_rearrange(fn.reshape(mel.values, layout="FW"), new_order=rows - (rows // period) * period)
