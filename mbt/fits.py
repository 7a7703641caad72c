"""The data's rules: whether a model reads the splits it is given (`fits`: frames per clip, log-mel frames, mel
bins, classes) and whether a run's training and evaluation splits agree (`data_problems`). Training's validation
(`mbt.validate`) and `mbt.evaluate` ask the same questions here, so that a split refused by one is refused by the
other with the same words.
"""

from __future__ import annotations

from typing import Any

from mbt.classes import ClassListError, class_record, record_difference
from mbt.model import MBTConfig
from mbt.splits import RunSplits
from pipelines.config import AugmentConfig, consecutive_misfit, frames_fed
from shards.manifest import Manifest


def fits(model: MBTConfig, augment: AugmentConfig, manifest: Manifest, where: str = "the shards") -> list[str]:
    """What keeps `model`, fed by the loaders with `augment`, from reading the split of `manifest` (its shards are
    called `where`), each problem with the setting to change; empty when it fits. Frames are checked for a video
    tower, log-mel frames and mel bins for an audio tower, and frames the loaders cannot feed for any model (more
    than stored, or consecutive frames that span more than the clip or the audio window)."""
    features, stored = manifest.features, manifest.features.num_frames
    fed, video, audio = frames_fed(augment, stored), "video" in model.modalities, "audio" in model.modalities
    problems = []
    if video and model.num_frames > stored:
        problems.append(
            f"--model.num_frames {model.num_frames}, but {where} hold {stored} frames per clip: "
            f"lower --model.num_frames to at most {stored}"
        )
    if not 1 <= fed <= stored:
        problems.append(
            f"--augment.frames_used {augment.frames_used}, but {where} hold {stored} frames per clip: "
            f"lower it to at most {stored}"
        )
    elif misfit := consecutive_misfit(augment, features):
        clip_s, audio_s, least_fps = misfit
        problems.append(
            f"--augment.frames_used {fed} consecutive frames at --augment.frame_stride {augment.frame_stride} span "
            f"{clip_s:g} s of {where} ({features.frames_per_s:g} frames per second, {stored} per clip), more than "
            f"the {audio_s:g} s audio window or the clip: re-shard with --fps {least_fps:g} or more (scenic's clips: "
            "32 frames at stride 2 of --fps 25, 2.56 s), or lower --augment.frame_stride"
        )
    elif video and model.num_frames <= stored and fed != model.num_frames:
        problems.append(
            f"the loader feeds {fed} frames per clip from {where} but --model.num_frames is {model.num_frames}: "
            f"set --augment.frames_used {model.num_frames}"
        )
    if audio and augment.audio_frames > features.fbank_frames:
        problems.append(
            f"--augment.audio_frames {augment.audio_frames}, but {where} hold {features.fbank_frames} log-mel frames "
            f"per clip: lower --model.audio_frames and --augment.audio_frames to at most {features.fbank_frames}"
        )
    if audio and model.num_mel_bins != features.num_mel_bins:
        problems.append(
            f"--model.num_mel_bins {model.num_mel_bins}, but {where} hold {features.num_mel_bins} mel bins: "
            f"set --model.num_mel_bins {features.num_mel_bins}"
        )
    if model.num_classes != manifest.num_classes:
        problems.append(
            f"--model.num_classes {model.num_classes}, but {where} have {manifest.num_classes} classes: set "
            f"--model.num_classes {manifest.num_classes}"
        )
    return problems


def data_problems(model: MBTConfig, augment: AugmentConfig, splits: RunSplits) -> list[str]:
    """What keeps `model`, fed by the loaders with `augment`, from reading the run's `splits` (training's first): a
    split given that could not be opened (`splits.problems`), a class list that cannot be read, a split that does
    not `fit`, and training and evaluation splits of different classes. Reads the opened splits' manifests only."""
    problems: list[str] = []
    records: dict[str, dict[str, Any]] = {}
    for key, source in splits.sources.items():
        split = splits.opened.get(key)
        if split is None:
            problems.append(splits.problems[key])
            continue
        try:
            records[key] = class_record(split.manifest, f"--{key} {source}")
        except ClassListError as err:
            problems.append(str(err))
            continue
        problems += fits(model, augment, split.manifest, f"the shards in {source}")
    if {"train_shards", "eval_shards"} <= records.keys():
        names = (f"--{key} {splits.sources[key]}" for key in ("train_shards", "eval_shards"))
        if difference := record_difference(records["train_shards"], records["eval_shards"], *names):
            problems.append(
                f"the training and evaluation splits have different classes: {difference}; evaluate on a split "
                "sharded with the training split's class list"
            )
    return problems
