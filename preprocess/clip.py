"""One clip of the shard job: decode it, check its frames, compute its log-mel and encode its tar members, or say
in a failure record why it cannot be stored (a bad clip never stops the job)."""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from preprocess.datasets import ClipRow
from preprocess.decode import decode_clip
from preprocess.features import NonFiniteAudioError, compute_logmel
from preprocess.ffmpeg_run import DecodeError
from shards.manifest import LogmelStats
from shards.schema import FeatureParams, Sample, encode_sample, frame_ext, frame_size_problem, jpeg_size


@dataclass(frozen=True)
class KeptClip:
    """What the shard job sums over the clips it keeps: the log-mel sums (clips with audio), whether the clip had an
    audio stream, and whether it was shorter than the segment and padded (frames repeated or log-mel zero-padded)."""

    logmel: LogmelStats
    has_audio: bool
    padded: bool


@dataclass(frozen=True)
class ClipTask:
    """One clip for a worker: where to read it and what to store with it."""

    row: ClipRow
    path: str | None
    missing: str | None
    start_s: float
    duration_s: float


def _file_name(path: str) -> str:
    """The file name as text that encodes to UTF-8 (a name of undecodable bytes keeps them as \\xNN escapes)."""
    return os.fsencode(Path(path).name).decode(errors="backslashreplace")


def _failure(task: ClipTask, reason: str, message: str) -> dict[str, str]:
    return {
        "key": task.row.key,
        "source": task.row.source,
        "file": _file_name(task.path) if task.path else "",
        "reason": reason,
        "message": message.encode(errors="surrogateescape").decode(errors="backslashreplace"),
    }


def _frames_problem(frames: list[bytes], params: FeatureParams) -> str | None:
    """Why the readers would refuse these frames (an extreme aspect ratio, sizes that change), or None."""
    for i, jpeg in enumerate(frames):
        if problem := frame_size_problem(jpeg, params.short_side_px, frame_ext(i)):
            return f"the video's frames cannot be stored: {problem}"
    if len(sizes := {jpeg_size(jpeg) for jpeg in frames}) > 1:
        return f"the video changes size within the segment: frames of {sorted(sizes)} (height, width)"
    return None


def process_clip(
    task: ClipTask, params: FeatureParams, require_audio: bool, decode_timeout_s: float | None = None
) -> tuple[list | None, Any]:
    """Decode and featurize one clip: (tar members, KeptClip) or (None, failure record). Never raises for a bad
    clip: a batch job records it and goes on."""
    if task.path is None:
        return None, _failure(task, "missing_file", task.missing or "no file")
    try:
        clip = decode_clip(task.path, task.start_s, task.duration_s, params, decode_timeout_s)
    except DecodeError as err:
        return None, _failure(task, err.reason, str(err))
    if problem := _frames_problem(clip.frames, params):
        return None, _failure(task, "bad_frame_size", problem)
    streams = clip.streams
    has_audio = streams.has_audio and clip.waveform.size > 0
    if require_audio and not has_audio:
        return None, _failure(task, "no_audio", "no audio stream (--require-audio)")
    waveform = clip.waveform if has_audio else np.zeros(round(task.duration_s * params.sample_rate_hz), np.float32)
    try:
        logmel = compute_logmel(waveform, params)
    except NonFiniteAudioError as err:
        return None, _failure(task, "non_finite_audio", str(err))
    meta = {
        "key": task.row.key,
        "ytid": task.row.ytid,
        "source": task.row.source,
        "file": _file_name(task.path),
        "segment_s": [task.row.start_s, task.row.end_s],
        "decode_start_s": task.start_s,
        "decode_duration_s": clip.duration_s,
        "labels": list(task.row.labels),
        "streams": streams.to_dict(),
        "has_audio": has_audio,
        "audio_decoded_s": clip.waveform.size / params.sample_rate_hz,
        "frames_decoded": clip.frames_decoded,
        "frames_repeated": params.num_frames - clip.frames_decoded,
        "frame_times_s": [round(t, 6) for t in clip.frame_times_s],
        "fbank_frames_computed": logmel.frames_computed,
        "fbank_pad_frames": logmel.pad_frames,
        "fbank_cut_frames": logmel.cut_frames,
    }
    sample = Sample(
        key=task.row.key,
        frames=clip.frames,
        logmel=logmel.values,
        labels=np.asarray(task.row.labels, dtype=np.int32),
        meta=meta,
    )
    stats = logmel.stats() if has_audio else LogmelStats()
    return encode_sample(sample, params), KeptClip(stats, has_audio, is_padded(meta, task.duration_s, params))


def is_padded(meta: dict[str, Any], duration_s: float, params: FeatureParams) -> bool:
    """Whether the clip of `meta` (its sample's record) is shorter than the segment: its row asks for less than a
    segment, its video ended early (its last frame repeated) or its audio did (the log-mel zero-padded beyond the
    window's own few frames). Half a stored frame interval is tolerated, as a codec's few missing samples are."""
    tolerance_s = 0.5 / params.frames_per_s
    audio_short = meta["has_audio"] and meta["audio_decoded_s"] < duration_s - tolerance_s
    return duration_s < params.segment_s - tolerance_s or meta["frames_repeated"] > 0 or audio_short
