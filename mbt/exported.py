"""The export format, read: a folder that stands alone, `model.safetensors` (the weights) and `config.json` (the model
config, the classes, the feature parameters and schema version of the shards it was trained on, its input
normalization and evaluation settings). `serve.export` writes it; `read_export` reads it back as the `TrainedModel`
a training checkpoint gives, so that every tool that takes a model (`mbt.evaluate`, `serve.load`) takes an export.
"""

from __future__ import annotations

import json
import math
import os
from pathlib import Path
from typing import Any

from safetensors import SafetensorError
from safetensors.torch import load_file

from mbt.checkpoint import TRAINED_ON, TrainedModel, non_finite_tensors
from mbt.classes import ClassListError, checked_record
from mbt.config import ConfigError, config_from_dict
from mbt.model_size import MAX_MODEL_FILE_BYTES, ModelFitError, check_fit
from mbt.validate import validate
from shards.bounded import ContainerError, safetensors_header
from shards.schema import FeatureParams, SchemaError, check_schema_version

WEIGHTS_FILE = "model.safetensors"
CONFIG_FILE = "config.json"
FORMAT = "mbt-export"
FORMAT_VERSION = 1
MAX_CONFIG_BYTES = 64 << 20  # 527 AudioSet classes take ~40 KB


class ExportError(RuntimeError):
    """An exported model cannot be read; the message names the file."""


def is_export(folder: str | Path) -> bool:
    """Whether `folder` is meant as an export's folder (it holds config.json or model.safetensors)."""
    return Path(folder).is_dir() and any((Path(folder) / name).exists() for name in (CONFIG_FILE, WEIGHTS_FILE))


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


def _described(data: dict[str, Any], path: Path) -> TrainedModel:
    """The model of a parsed config.json without its weights (`state` empty); ExportError naming `path` when a
    field is not valid."""
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
    return TrainedModel({}, cfg.model, augment, record, features, version)


def read_export(folder: str | Path) -> TrainedModel:
    """The weights, model and evaluation configs (with the log-mel normalization), class record, feature parameters
    and schema version of the export in `folder`. ExportError naming the file when config.json or
    model.safetensors is missing or not valid, or the tensors its header states are not the config's model's
    (missing, unexpected, of another shape, or a model over `mbt.model_size.MAX_MODEL_PARAMS`): all checked before
    anything is allocated from either file; or when the weights are not finite."""
    folder = Path(folder)
    config_path, weights_path = folder / CONFIG_FILE, folder / WEIGHTS_FILE
    described = _described(_read_config(config_path), config_path)
    if not weights_path.is_file():
        raise ExportError(f"{weights_path}: no such file; export the model again (tools/export_model.py)")
    try:
        header = safetensors_header(weights_path, MAX_MODEL_FILE_BYTES)
        check_fit(described.model, {name: shape for name, (_, shape) in header.items()})
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
    return described._replace(state=state)
