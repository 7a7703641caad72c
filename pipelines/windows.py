"""Which stored frames and which log-mel rows each row of a sample shows: the one place that decides it, for the
PyTorch loader (`pipelines.transforms.SampleBuilder`), the DALI graph (`pipelines.dali_graph`, which runs the same
arithmetic on its DataNodes) and prediction.

Frames are stored at (i + 0.5) · segment / F (`shards.schema`), log-mel row t covers [t, t + 1) hops, so stored frame
i and row t show the same moment when t / T = (i + 0.5) / F. `augment.frame_sampling` picks a clip's frames:

  spread       (this project's) the audio window [start, start + A) cut into N = frames_used equal parts, from each
               the stored frame nearest a time in it (training: a random time; evaluation: the middle). Training draws
               the window's start uniformly from 0..T - A; the test clips start at `eval_windows(T, A, n)`.
  consecutive  (scenic's, with DMVR's samplers) N stored frames at `frame_stride` s: first, first + s, ...
               Training draws the first frame uniformly from 0..max(F - (N - 1)·s, 1) - 1 (DMVR `sample_sequence`)
               and starts the audio window at the same moment, round(first · T / F) (DMVR's shared
               `sample_offset_proportion`), so that it may run past the clip's end (filled by `augment.audio_pad`).
               Test clip k takes its frames from `eval_windows(F, N·s, n)[k]` and its audio from
               `eval_windows(T, A, n)[k]`: each modality's own evenly spaced windows (DMVR
               `sample_linspace_sequence`; one clip: each modality's middle window).

The log-mel rows of a window past the clip's real log-mel (`real_frames`: the shard job zero-pads a short clip's,
meta.json's `fbank_pad_frames`) are zeros (`audio_pad="zeros"`, AST's) or the log-mel again from its start
(`"repeat"`, DMVR's `sample_or_pad_sequence_indices`, which tiles a short sequence).
"""

from __future__ import annotations

from typing import Any

import numpy as np

from pipelines.config import AugmentConfig, frames_fed
from shards.schema import FeatureParams


def eval_windows(total: int, window: int, num_clips: int) -> list[int]:
    """Start offsets of `num_clips` evenly spaced windows of `window` items over `total`: floor(k · span / (n - 1))
    with span = max(total - window, 0) (DMVR's `sample_linspace_sequence`, a float linspace cast to int), or the
    middle window, span // 2, for one clip (DMVR's `sample_sequence` without randomness)."""
    if num_clips < 1:
        raise ValueError(f"num_test_clips must be at least 1, got {num_clips}")
    span = max(total - window, 0)
    if num_clips == 1:
        return [span // 2]
    return [k * span // (num_clips - 1) for k in range(num_clips)]


def spread_ids(start: int, augment: AugmentConfig, features: FeatureParams, jitter: np.ndarray | None) -> np.ndarray:
    """int64 (N,): the stored frames of the audio window [start, start + audio_frames) cut into N = frames_used
    equal parts, from each the stored frame nearest a time in it: a random one (`jitter`, U[0, 1) per part:
    training) or its middle (evaluation), in time order."""
    used = frames_fed(augment, features.num_frames)
    offsets = np.arange(used) + (0.5 if jitter is None else jitter)
    positions = (start + offsets * augment.audio_frames / used) * features.num_frames / features.fbank_frames
    return np.clip(np.floor(positions), 0, features.num_frames - 1).astype(np.int64)


def consecutive_offsets(augment: AugmentConfig, features: FeatureParams) -> np.ndarray:
    """int64 (N,): the frames of a consecutive clip relative to its first, 0, s, 2s, ... (s = frame_stride)."""
    return np.arange(frames_fed(augment, features.num_frames), dtype=np.int64) * augment.frame_stride


def first_frame_choices(augment: AugmentConfig, features: FeatureParams) -> int:
    """How many first frames training draws a consecutive clip from: max(F - (N - 1)·s, 1) (DMVR's offsets, each
    leaving the whole clip inside the stored frames)."""
    span = (frames_fed(augment, features.num_frames) - 1) * augment.frame_stride
    return max(features.num_frames - span, 1)


def synced_audio_start(first: Any, features: FeatureParams) -> Any:
    """The log-mel row at the moment of stored frame `first`: first · T / F rounded half to even (DMVR's
    `tf.math.round` of the shared offset proportion), in integer arithmetic, so that the same expression runs on
    ints, numpy arrays and DALI DataNodes."""
    frames, rows = features.num_frames, features.fbank_frames
    twice = 2 * first * rows + frames  # 2F · (first · T / F + 1/2)
    rounded = twice // (2 * frames)
    tie = (twice - rounded * (2 * frames)) == 0
    odd = rounded - (rounded // 2) * 2
    return rounded - tie * odd


def train_window(rng: np.random.Generator, augment: AugmentConfig, features: FeatureParams) -> tuple[np.ndarray, int]:
    """(frame ids (N,), log-mel start) of a training row, drawn with `rng` by `augment.frame_sampling`."""
    if augment.frame_sampling == "consecutive":
        first = int(rng.integers(0, first_frame_choices(augment, features)))
        return first + consecutive_offsets(augment, features), int(synced_audio_start(first, features))
    start = int(rng.integers(0, max(features.fbank_frames - augment.audio_frames, 0) + 1))
    return spread_ids(start, augment, features, rng.random(frames_fed(augment, features.num_frames))), start


def eval_clips(augment: AugmentConfig, features: FeatureParams) -> list[tuple[np.ndarray, int]]:
    """(frame ids (N,), log-mel start) of each of the `num_test_clips` test clips of a sample."""
    starts = eval_windows(features.fbank_frames, augment.audio_frames, augment.num_test_clips)
    if augment.frame_sampling == "consecutive":
        offsets = consecutive_offsets(augment, features)
        span = len(offsets) * augment.frame_stride  # DMVR's linspace leaves room for N·s frames
        firsts = eval_windows(features.num_frames, span, augment.num_test_clips)
        return [(first + offsets, start) for first, start in zip(firsts, starts, strict=True)]
    return [(spread_ids(start, augment, features, None), start) for start in starts]


def real_frames(logmel: np.ndarray) -> int:
    """The rows of a stored (T, bins) log-mel up to its last row that is not all zeros: its real length (the shard
    job pads a short clip's with rows of zeros; a computed log-mel row is never all zeros, log(0) being floored at
    log(eps))."""
    nonzero = np.flatnonzero(np.any(logmel != 0, axis=1))
    return int(nonzero[-1]) + 1 if nonzero.size else 0


def audio_window(logmel: np.ndarray, start: int, frames: int, pad: str) -> np.ndarray:
    """(frames, bins) of the stored log-mel from row `start`; rows past its real log-mel are zeros (`pad="zeros"`:
    the stored padding, then zeros past the end) or its real rows again from the first (`pad="repeat"`: row
    (start + j) mod real_frames; a log-mel of padding only stays zeros)."""
    if pad == "repeat":
        return logmel[(start + np.arange(frames)) % max(real_frames(logmel), 1)]
    window = logmel[start : start + frames]
    if window.shape[0] < frames:
        window = np.concatenate([window, np.zeros((frames - window.shape[0], logmel.shape[1]), logmel.dtype)])
    return window
