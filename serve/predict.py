"""Prediction on raw videos with the shards' own preprocessing: each window of a video is decoded and featurized by
the shard job's code (`preprocess.clip.process_clip`: the same fenced ffmpeg run, frames at the same times, the same
log-mel, encoded as the same tar members), then turned into the model's rows by the loaders' evaluation code
(`pipelines.transforms.SampleBuilder`: `num_test_clips` synchronized clips, crops, the model's log-mel
normalization; `collate` and `normalize_video`), so that a video gets the logits its shard sample would get.

A window is `features.segment_s` long (the training segment) unless `window_s` says otherwise (at least the model's
audio input, `augment.audio_frames` log-mel frames: shorter, it would hear padding); frames are kept at the shards'
rate. Without a window length a video is predicted from its first window (a segment from its start, as the
shard job reads a file); with one, windows every `hop_s` cover the whole file (a timeline). A file that cannot be
decoded or is shorter than one window raises InputError naming it. A video without an audio stream is predicted as
the shard job stores it (a log-mel of silence: zero samples) and its prediction says so (`has_audio`, a warning).

A timeline is planned from the duration the file's header claims, capped by `preprocess.probe` (at most a day,
and what the file's bytes can hold), and its windows are made one batch at a time as they are decoded; it ends at
the content's end: the first window that decodes nothing, or whose content ends before the window does, is left
out with a warning naming the file, and the windows before it are kept (a header may claim more than there is).
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from tqdm import tqdm

from mbt.embeddings import Embedding, forward_with_embeddings, mean_embedding, rows_as_numpy
from mbt.model import MBT
from pipelines.config import LoaderError
from pipelines.torch_datasets import collate
from pipelines.transforms import SampleBuilder, normalize_video
from preprocess.clip import ClipTask, process_clip
from preprocess.datasets import ClipRow
from preprocess.ffmpeg_run import DecodeError
from preprocess.probe import probe_media
from serve.load import Preprocessing
from serve.segments import Segment
from shards.schema import MAX_FRAMES, META_EXT, FeatureParams, SchemaError

CLIP_KEY = "clip"  # the key each window's sample is built under
PROGRESS_MIN_WINDOWS = 4  # a progress bar for inputs of at least this many windows


class InputError(RuntimeError):
    """A video cannot be predicted (missing, not a video, shorter than one window); the message names the file."""


def probabilities(logits: np.ndarray, multi_label: bool) -> np.ndarray:
    """Class probabilities of logits (..., C): sigmoid for multi-label models, softmax for single-label ones."""
    scores = torch.from_numpy(np.asarray(logits, dtype=np.float64))
    return (torch.sigmoid(scores) if multi_label else torch.softmax(scores, dim=-1)).numpy()


def top_classes(probs: np.ndarray, names: list[str], k: int) -> list[tuple[str, float]]:
    """The `k` most probable (name, probability) of probs (C,), most probable first (ties by class index)."""
    order = np.argsort(-probs, kind="stable")[:k]
    return [(names[i], float(probs[i])) for i in order]


@dataclass
class Prediction:
    """A segment's windows [(start_s, end_s)], their clip-averaged logits (W, C), the model's class names and
    whether they are multi-label, if asked embeddings, the warnings of its prediction (one line each, naming the
    file) and whether the file has an audio stream (without one the model heard silence, as training does)."""

    name: str
    windows: list[tuple[float, float]]
    logits: np.ndarray
    class_names: list[str]
    multi_label: bool
    embeddings: list[Embedding] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)
    has_audio: bool = True

    @property
    def probabilities(self) -> np.ndarray:
        """Each window's class probabilities (W, C): sigmoid of multi-label logits, else softmax."""
        return probabilities(self.logits, self.multi_label)

    def top(self, k: int = 5) -> list[tuple[str, float]]:
        """The `k` (at most all) most probable (class name, probability) of the whole segment: the mean of its
        windows' probabilities."""
        return top_classes(self.probabilities.mean(axis=0), self.class_names, k)


def window_features(features: FeatureParams, window_s: float | None) -> FeatureParams:
    """The feature parameters of a window of `window_s` seconds (None: the shards' segment), frames at the
    shards' rate; ValueError when that holds no frame."""
    if window_s is None or window_s == features.segment_s:
        return features
    num_frames = round(window_s * features.frames_per_s)
    if not 1 <= num_frames <= MAX_FRAMES or window_s <= 0:
        raise ValueError(f"--window-s {window_s:g} holds {num_frames} frames at {features.frames_per_s:g} per second")
    return dataclasses.replace(features, segment_s=float(window_s), num_frames=num_frames).validate()


class Predictor:
    """Runs `model` (eval mode) on videos with the preprocessing `prep`; `window_s`/`hop_s` as in the module doc,
    `batch_windows` windows (each `num_test_clips` rows) per forward, on `device`."""

    def __init__(
        self,
        model: MBT,
        prep: Preprocessing,
        device: str | torch.device = "cpu",
        window_s: float | None = None,
        hop_s: float | None = None,
        batch_windows: int = 4,
        decode_timeout_s: float | None = None,
    ) -> None:
        self.model, self.prep, self.device = model.eval().to(device), prep, torch.device(device)
        self.sliding = window_s is not None
        self.features = window_features(prep.features, window_s)
        self.window_s = self.features.segment_s
        self.hop_s = hop_s or self.window_s
        if self.hop_s <= 0:
            raise ValueError(f"--hop-s must be positive, got {hop_s}")
        self.batch_windows, self.decode_timeout_s = batch_windows, decode_timeout_s
        self.hears = "audio" in model.cfg.modalities
        # A window fits a file that ends within half a stored frame interval of the window's end.
        self.tolerance_s = 0.5 / self.features.frames_per_s
        audio_s = prep.augment.audio_frames * self.features.frame_shift_ms / 1000
        if self.hears and self.features.fbank_frames < prep.augment.audio_frames:
            raise ValueError(
                f"--window-s {self.window_s:g} is shorter than the model's audio input of {audio_s:g} s "
                f"({prep.augment.audio_frames} log-mel frames): it would hear padding it was never trained on"
            )
        manifest = dataclasses.replace(prep.manifest(), features=self.features)
        try:
            self.builder = SampleBuilder(manifest, train=False, augment=prep.augment)
        except LoaderError as err:
            raise ValueError(f"the window does not fit the model: {err}") from None
        self.windows = self.builder.windows(None)

    def _decode(self, segment: Segment, start_s: float) -> tuple[dict[str, Any] | None, dict[str, Any]]:
        """(the evaluation rows of the window at `start_s` of `segment`, its sample's meta record), or (None, the
        shard job's failure record) when the window cannot be stored as a sample."""
        row = ClipRow(CLIP_KEY, "", start_s, start_s + self.window_s, (0,), str(segment.path))
        task = ClipTask(row=row, path=str(segment.path), missing=None, start_s=start_s, duration_s=self.window_s)
        # A file without audio is kept with silent audio, as the shard job keeps it (training learns from such clips).
        members, result = process_clip(task, self.features, False, self.decode_timeout_s)
        if members is None:
            return None, result
        raw = {name.split(".", 1)[1]: data for name, data in members}
        try:
            rows = self.builder.rows(str(segment.path), CLIP_KEY, raw, self.windows, None)
        except (LoaderError, SchemaError) as err:
            raise InputError(str(err)) from None
        return rows, json.loads(raw[META_EXT])

    def _refused(self, segment: Segment, failure: dict[str, Any]) -> InputError:
        problem = failure["message"]
        return InputError(problem if problem.startswith(str(segment.path)) else f"{segment.path}: {problem}")

    def _short(self, meta: dict[str, Any]) -> bool:
        """Whether a decoded window's content ends before the window does: its frames repeat (the video ended, or
        holds fewer frames than asked) and its audio stream ended before the window's last frame time."""
        ended = meta["streams"]["has_audio"] and meta["audio_decoded_s"] < self.window_s - self.tolerance_s
        return meta["frames_repeated"] > 0 and ended

    def _end_s(self, segment: Segment, meta: dict[str, Any], warnings: list[str]) -> float:
        """Where `segment` ends: its end, or the file's as its header claims it (as far as the first window's audio
        decoded when it claims none), a timeline's capped by `preprocess.probe` (a warning in `warnings` says so)."""
        duration = meta["streams"].get("duration_s")
        if self.sliding:
            try:
                duration, capped = probe_media(segment.path).planned_duration_s()
            except DecodeError as err:
                raise InputError(str(err)) from None
            warnings += [capped] if capped else []
        if duration is None:
            duration = segment.start_s + meta["audio_decoded_s"]
        return min(duration, segment.end_s) if segment.end_s is not None else duration

    def _starts(self, start_s: float, end_s: float) -> Iterator[float]:
        """The windows' starts, made one at a time: `start_s`, then (a timeline) every `hop_s` while the window ends
        by `end_s`."""
        yield start_s
        while self.sliding and start_s + self.hop_s + self.window_s <= end_s + self.tolerance_s:
            start_s += self.hop_s
            yield start_s

    def predict(self, segment: Segment, embeddings: bool = False, progress: bool = False) -> Prediction:
        """The windows of `segment` and their logits; InputError naming the file when it cannot be predicted."""
        rows, meta = self._decode(segment, segment.start_s)
        if rows is None:
            raise self._refused(segment, meta)
        warnings: list[str] = []
        has_audio = bool(meta["has_audio"])
        if not has_audio and self.hears:
            warnings.append(
                f"{segment.path}: no audio stream: predicted with silent audio, as training sees such clips"
            )
        end_s = self._end_s(segment, meta, warnings)
        held_s = end_s - segment.start_s
        if self._short(meta):  # the content ends inside the first window, whatever the header claims
            held_s = min(held_s, meta["audio_decoded_s"])
        if self.window_s > held_s + self.tolerance_s:
            raise InputError(
                f"{segment.path}: {max(held_s, 0):.2f} s from {segment.start_s:g} s, shorter than one window of "
                f"{self.window_s:g} s"
            )
        planned = 1 + int(max(end_s + self.tolerance_s - segment.start_s - self.window_s, 0) // self.hop_s)
        show = progress and self.sliding and planned >= PROGRESS_MIN_WINDOWS
        bar = tqdm(total=planned, desc=segment.name, unit="window", disable=not show, leave=False)
        windows: list[tuple[float, float]] = []
        logits: list[np.ndarray] = []
        pooled: list[Embedding] = []
        pending: list[dict[str, Any]] = []
        for start in self._starts(segment.start_s, end_s):
            if windows:  # the first window is decoded already
                rows, meta = self._decode(segment, start)
            if rows is None and meta["reason"] != "no_frames":
                raise self._refused(segment, meta)
            if rows is None or self._short(meta):  # the content ends before the header says
                what = "nothing decodes" if rows is None else f"only {meta['audio_decoded_s']:.2f} s decode"
                warnings.append(
                    f"{segment.path}: {what} from {start:g} s on (of the {end_s:g} s planned): the timeline stops "
                    f"at {windows[-1][1]:g} s"
                )
                break
            windows.append((start, start + self.window_s))
            pending.append(rows)
            if len(pending) == self.batch_windows:
                self._run(pending, logits, pooled, embeddings)
                pending = []
            bar.update(1)
        if pending:
            self._run(pending, logits, pooled, embeddings)
        bar.close()
        names, multi = self.prep.class_names, self.prep.multi_label
        return Prediction(segment.name, windows, np.stack(logits), names, multi, pooled, warnings, has_audio)

    def _run(self, rows: list[dict[str, Any]], logits: list[np.ndarray], pooled: list[Embedding], embed: bool) -> None:
        """Forward the rows of some windows as one batch, as `mbt.evaluate` does; append each window's logits (C,)
        averaged over its test clips in clip order (and its embeddings' average)."""
        batch = collate(rows, [])
        video = normalize_video(batch["video"].to(self.device), None)
        audio = batch["audio"].to(self.device)
        with torch.no_grad():
            if embed:
                out, features = forward_with_embeddings(self.model, video, audio)
                rows_embedded = rows_as_numpy(features)
            else:
                out = self.model(video, audio)
        out_np = out.float().cpu().numpy()
        clips = len(self.windows)
        for w in range(len(rows)):
            logits.append(np.stack([out_np[w * clips + c] for c in range(clips)]).mean(axis=0))
            if embed:
                pooled.append(mean_embedding(rows_embedded[w * clips : (w + 1) * clips]))
