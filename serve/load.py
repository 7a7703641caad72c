"""A trained model ready to use, with its preprocessing, from what training or an export leaves: a training
checkpoint or a run folder (its latest checkpoint: `from_checkpoint`), or an exported folder (`load_pretrained`,
the format `serve.export` writes: model.safetensors and config.json); `load_model` takes any of them.

    model, prep = serve.load_pretrained("exported/demo")   # eval mode; prep feeds serve.predict.Predictor

An older checkpoint does not record the shards' feature parameters (frames per second, segment, log-mel settings),
its classes or its log-mel normalization: they are read from the manifest of its training split (the run's
config.yaml names it), or of the split given instead.
"""

from __future__ import annotations

import json
import math
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file

from mbt.checkpoint import (
    TRAINED_ON,
    CheckpointFileError,
    build_model,
    latest_checkpoint,
    load_trained,
    non_finite_tensors,
)
from mbt.classes import ClassListError, checked_record, class_record
from mbt.config import ConfigError, config_from_dict
from mbt.config_io import read_yaml
from mbt.model import MBT, MBTConfig
from mbt.model_size import MAX_MODEL_FILE_BYTES, ModelFitError, build_fitted, check_fit
from mbt.validate import validate
from pipelines import LoaderError
from pipelines.config import AugmentConfig, records_logmel_norm, with_logmel_norm
from pipelines.sources import split_manifest
from shards.bounded import ContainerError, safetensors_header
from shards.manifest import LogmelStats, Manifest
from shards.schema import FeatureParams, SchemaError, check_schema_version

# The export format, written by serve.export and read here.
WEIGHTS_FILE = "model.safetensors"
CONFIG_FILE = "config.json"
FORMAT = "mbt-export"
FORMAT_VERSION = 1
MAX_CONFIG_BYTES = 64 << 20  # 527 AudioSet classes take ~40 KB


class ExportError(RuntimeError):
    """An exported model cannot be read; the message names the file."""


@dataclass(frozen=True)
class Preprocessing:
    """What turns a video into the model's input and its logits into names: the shards' feature parameters, the
    evaluation settings with the model's log-mel normalization (`augment.logmel_mean/std`, always set), the
    classes ({index, id, name}) and whether they are multi-label."""

    features: FeatureParams
    augment: AugmentConfig
    classes: list[dict[str, Any]]
    multi_label: bool
    schema_version: int

    @property
    def class_names(self) -> list[str]:
        return [c["name"] or c["id"] for c in self.classes]

    def manifest(self) -> Manifest:
        """A manifest without shards that `pipelines.transforms.SampleBuilder` builds evaluation rows from."""
        return Manifest(
            dataset="", split="", features=self.features, classes=self.classes, multi_label=self.multi_label,
            shards=[], logmel=LogmelStats(), failures=[], job={}, schema_version=self.schema_version,
        )  # fmt: skip


def resolve_checkpoint(path: str | Path) -> Path:
    """`path` if it is a file, else the latest checkpoint of the run folder `path`; CheckpointFileError otherwise."""
    path = Path(path)
    if path.is_dir():
        found = latest_checkpoint(path)
        if found is None:
            raise CheckpointFileError(f"{path}: a folder without checkpoints/step-*.pt (not a training run)")
        return found
    return path


def _training_split(checkpoint: Path) -> str:
    """The training split named by the config.yaml of the run that holds `checkpoint` (run/checkpoints/x.pt)."""
    config = checkpoint.parent.parent / "config.yaml"
    if not config.is_file():
        raise CheckpointFileError(
            f"{checkpoint}: no {config} names its training split, whose manifest holds the feature parameters; "
            "pass --features-from with the split it was trained on"
        )
    try:
        source = read_yaml(config).get("train_shards")
    except ConfigError as err:
        raise CheckpointFileError(f"{config}: {err}") from None
    if not isinstance(source, str) or not source:
        raise CheckpointFileError(f"{config}: names no train_shards; pass --features-from with the training split")
    return source


def from_checkpoint(path: str | Path, features_from: str | None = None) -> tuple[MBT, Preprocessing]:
    """The model of a training checkpoint (or the latest of a run folder) in eval mode on the CPU, and its
    preprocessing: feature parameters, classes and normalization from the checkpoint; from the manifest of
    `features_from` or else of the run's training split (config.yaml) for what an older checkpoint lacks."""
    checkpoint = resolve_checkpoint(path)
    trained = load_trained(checkpoint)
    augment = trained.augment
    recorded = trained.features is not None and trained.classes is not None and records_logmel_norm(augment)
    if features_from is None and recorded:
        record, features, version = trained.classes, trained.features, trained.schema_version
    else:  # an older checkpoint, or features asked for from another split
        source = features_from or _training_split(checkpoint)
        try:
            manifest = split_manifest(source)
            record = trained.classes or class_record(manifest, source)
        except (LoaderError, ClassListError) as err:
            problem = f"the feature parameters of {source} cannot be read: {err}"
            raise CheckpointFileError(f"{checkpoint}: {problem}") from None
        augment = with_logmel_norm(augment, manifest.logmel)
        features, version = manifest.features, manifest.schema_version
    prep = Preprocessing(features, augment, record["classes"], record["multi_label"], version)
    return build_model(trained, checkpoint).eval(), prep


def _read_config(path: Path) -> dict[str, Any]:
    if not path.is_file():
        raise ExportError(f"{path}: no such file; export the model again (tools/export_model.py)")
    if os.path.getsize(path) > MAX_CONFIG_BYTES:
        raise ExportError(f"{path}: larger than {MAX_CONFIG_BYTES >> 20} MiB, not an export's config")
    try:
        data = json.loads(path.read_bytes(), parse_constant=_no_constant)
    except (UnicodeDecodeError, ValueError, RecursionError) as err:
        raise ExportError(f"{path}: not valid JSON ({err})") from None
    if not isinstance(data, dict) or data.get("format") != FORMAT or data.get("format_version") != FORMAT_VERSION:
        raise ExportError(f"{path}: not a config.json of {FORMAT} version {FORMAT_VERSION}")
    return data


def _no_constant(name: str) -> None:
    raise ValueError(f"{name} is not a number JSON allows")


def _preprocessing(data: dict[str, Any], path: Path) -> tuple[MBTConfig, Preprocessing]:
    """The model config and preprocessing of a parsed config.json; ExportError naming `path` when one is not valid."""
    try:
        norm = data["normalization"]
        mean, std = float(norm["logmel_mean"]), float(norm["logmel_std"])
        if not (math.isfinite(mean) and math.isfinite(std) and std > 0):
            raise ValueError(f"log-mel normalization mean {mean}, std {std} is not finite with std > 0")
        cfg = config_from_dict({"model": data["model"], "augment": data["augment"]})
        validate(cfg.replace(train_shards="", eval_shards=""), train=False)
        record = checked_record({"classes": data["classes"], "multi_label": data["multi_label"]}, str(path))
        features = FeatureParams.from_dict(data["features"])
        version = check_schema_version(data["schema_version"], TRAINED_ON)
    except (KeyError, TypeError, ValueError, ConfigError, ClassListError, SchemaError) as err:
        problem = str(err).replace("\n", "; ") if not isinstance(err, KeyError) else f"no field {err}"
        raise ExportError(f"{path}: not a usable export config: {problem}") from None
    if cfg.model.num_classes != len(record["classes"]):
        classes = len(record["classes"])
        raise ExportError(f"{path}: the model has {cfg.model.num_classes} classes, the class list {classes}")
    augment = cfg.augment.replace(logmel_mean=mean, logmel_std=std)
    return cfg.model, Preprocessing(features, augment, record["classes"], record["multi_label"], version)


def load_pretrained(folder: str | Path, device: str | torch.device = "cpu") -> tuple[MBT, Preprocessing]:
    """The exported model in `folder` on `device`, in eval mode, and its preprocessing. ExportError naming the file
    when config.json or model.safetensors is missing or not valid, or the tensors its header states are not the
    config's model's (missing, unexpected, of another shape, or a model over `mbt.model_size.MAX_MODEL_PARAMS`):
    all checked before anything is allocated from either file; or when the weights are not finite."""
    folder = Path(folder)
    config_path, weights_path = folder / CONFIG_FILE, folder / WEIGHTS_FILE
    model_cfg, prep = _preprocessing(_read_config(config_path), config_path)
    if not weights_path.is_file():
        raise ExportError(f"{weights_path}: no such file; export the model again (tools/export_model.py)")
    try:
        header = safetensors_header(weights_path, MAX_MODEL_FILE_BYTES)
        check_fit(model_cfg, {name: shape for name, (_, shape) in header.items()})
    except ContainerError as err:
        raise ExportError(f"{weights_path}: not a readable safetensors file ({err.problem})") from None
    except ModelFitError as err:
        raise ExportError(f"{weights_path}: the tensors do not fit {config_path.name}'s model: {err}") from None
    try:
        state = load_file(str(weights_path))
    except (SafetensorError, OSError, ValueError) as err:
        raise ExportError(f"{weights_path}: not a readable safetensors file ({err})") from None
    if bad := non_finite_tensors(state):
        raise ExportError(f"{weights_path}: NaN or infinite weights in {', '.join(bad[:5])}")
    return build_fitted(model_cfg, state).to(device).eval(), prep


def load_model(source: str | Path, features_from: str | None = None) -> tuple[MBT, Preprocessing]:
    """An exported folder (it holds config.json) by `load_pretrained`, else a checkpoint or run by
    `from_checkpoint`; on the CPU, in eval mode."""
    source = Path(source)
    if source.is_dir() and (source / CONFIG_FILE).exists():
        return load_pretrained(source)
    return from_checkpoint(source, features_from)
