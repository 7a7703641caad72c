"""Whether a model fits its inputs: the split it reads (`fits`: frames per clip, log-mel frames, mel bins, classes)
and its own input sizes (`token_problems`). Training's `mbt.config.validate` and `mbt.evaluate` ask the same
questions here, so that a split refused by one is refused by the other with the same words.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from mbt.classes import ClassListError, class_record
from mbt.model import MBTConfig
from pipelines import LoaderError
from pipelines.config import AugmentConfig, frames_fed, frames_problem
from pipelines.sources import is_plain_path, split_manifest
from shards.layout import legacy_hint
from shards.manifest import Manifest
from shards.schema import MANIFEST_NAME

MAX_TOKENS = 16_384  # per tower: attention's memory grows with its square (MBT-B/16: 1568 video, 400 audio tokens)


def fits(model: MBTConfig, augment: AugmentConfig, manifest: Manifest, where: str = "the shards") -> list[str]:
    """What keeps `model`, fed by the loaders with `augment`, from reading the split of `manifest` (its shards are
    called `where`), each problem with the setting to change; empty when it fits. Frames are checked for a video
    tower, log-mel frames and mel bins for an audio tower, and frames the loaders cannot feed for any model."""
    features, stored = manifest.features, manifest.features.num_frames
    fed, video, audio = frames_fed(augment, stored), "video" in model.modalities, "audio" in model.modalities
    problems = []
    if video and model.num_frames > stored:
        problems.append(
            f"--model.num_frames {model.num_frames}, but {where} hold {stored} frames per clip: "
            f"lower --model.num_frames to at most {stored}"
        )
    if frames_problem(augment, stored):
        problems.append(
            f"--augment.frames_used {augment.frames_used}, but {where} hold {stored} frames per clip: "
            f"lower it to at most {stored}"
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


def split_problems(
    model: MBTConfig, augment: AugmentConfig, key: str, source: str
) -> tuple[list[str], dict[str, Any] | None]:
    """What keeps `model` from reading the split `source` (given as --key): its manifest is missing or cannot be
    read, or `fits` finds problems; with the split's class record (None when it cannot be read). Reads the manifest
    only, not the shards."""
    if is_plain_path(source) and not (Path(source) / MANIFEST_NAME).is_file():
        return [
            f"--{key} {source}: no {MANIFEST_NAME} there; shard the split first (tools/shard_audioset.py or "
            f"tools/shard_vggsound.py; `make demo-shards` makes the demo's) or point --{key} at a sharded split"
            + legacy_hint(source)
        ], None
    try:
        manifest = split_manifest(source)
        record = class_record(manifest, f"--{key} {source}")
    except LoaderError as err:
        return [f"--{key}: {err}"], None
    except ClassListError as err:
        return [str(err)], None
    return fits(model, augment, manifest, f"the shards in {source}"), record


def token_problems(model: MBTConfig) -> list[str]:
    """Patches that do not fit their input, or towers of more than MAX_TOKENS tokens."""
    if model.patch_size < 1 or model.audio_patch_stride < 1:  # reported by the config's bounds
        return []
    if model.patch_size > min(model.img_size, model.audio_frames, model.num_mel_bins):
        return [
            f"--model.patch_size {model.patch_size} is larger than --model.img_size {model.img_size}, "
            f"--model.audio_frames {model.audio_frames} or --model.num_mel_bins {model.num_mel_bins}: lower it"
        ]
    tokens = {
        "video": model.num_frames
        // (model.tubelet_frames if model.video_embed == "tubelet" else 1)
        * (model.img_size // model.patch_size) ** 2,
        "audio": model.audio_grid[0] * model.audio_grid[1],
    }
    return [
        f"the {modality} tower would have {tokens[modality]} tokens, more than {MAX_TOKENS}: raise "
        "--model.patch_size (or --model.audio_patch_stride) or lower the input size"
        for modality in model.modalities
        if tokens[modality] > MAX_TOKENS
    ]
