"""Training checkpoints: one dict with everything needed to resume, written atomically, the last K kept.

`run_dir/checkpoints/step-00001234.pt` holds model, optimizer, schedule, step, epoch, the loader's stream position
and RNG state of each rank, the resolved config, the class record of the training split (`mbt.classes`) and its
feature parameters and shard schema version (what `tools/predict.py` decodes new videos with). Writes
go to a temporary name, then a rename: a killed run leaves the previous checkpoint whole. Loading reads the zip's
central directory first (`shards.bounded.zip_members`: records stored as torch writes them, no more than the file
holds), then `torch.load(weights_only=True)`: tensors and plain containers only; `check_resume_state` checks the
parts a resume reads before any of them is used, `load_trained` the parts evaluation reads, and `build_model` builds
a model only once its config's size and shapes fit the weights (`mbt.model_size`).
"""

from __future__ import annotations

import json
import math
import pickle
import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any, NamedTuple

import torch
from torch.nn.modules.utils import consume_prefix_in_state_dict_if_present

from mbt.classes import ClassListError, checked_record
from mbt.config import ConfigError, config_from_dict
from mbt.model import MBT, MBTConfig
from mbt.model_size import MAX_MODEL_FILE_BYTES, ModelFitError, build_fitted, unstored_problems
from mbt.validate import validate
from pipelines.config import AugmentConfig
from shards.atomic import DiskFullError, atomic_write, read_small_file, write_bytes_atomic
from shards.bounded import ContainerError, zip_members
from shards.schema import FeatureParams, SchemaError, check_schema_version

CHECKPOINT_DIR = "checkpoints"
BEST_NAME, BEST_RECORD = "best.pt", "best.json"  # the best evaluation's weights and its record, beside the last K
_NAME = re.compile(r"^step-(\d{8})\.pt$")
RESUME_KEYS = ("model", "optimizer", "schedule", "step", "loader", "rng", "config")
RESUME_ADVICE = "delete it to resume from the previous checkpoint"
TRAINED_ON = "the shards it was trained on"  # what a checkpoint's or an export's schema version belongs to


class CheckpointFileError(RuntimeError):
    """A training checkpoint is missing, unreadable or not one of this project's; the message names the file."""


def checkpoint_path(run_dir: Path, step: int) -> Path:
    return Path(run_dir) / CHECKPOINT_DIR / f"step-{step:08d}.pt"


def list_checkpoints(run_dir: Path) -> list[Path]:
    """The run's checkpoints, oldest first."""
    folder = Path(run_dir) / CHECKPOINT_DIR
    if not folder.is_dir():
        return []
    return sorted(p for p in folder.iterdir() if _NAME.match(p.name) and p.is_file())


def latest_checkpoint(run_dir: Path) -> Path | None:
    found = list_checkpoints(run_dir)
    return found[-1] if found else None


def save_checkpoint(run_dir: Path, step: int, state: dict[str, Any], keep: int) -> Path:
    """Write `state` as the checkpoint of `step` (temporary file, fsync, rename), then keep only the last `keep`.
    A full disk is DiskFullError naming the file and the checkpoint a rerun resumes from; nothing of it is left."""
    path = checkpoint_path(run_dir, step)
    path.parent.mkdir(parents=True, exist_ok=True)
    try:
        with atomic_write(path) as f:
            torch.save(state, f)
    except DiskFullError as err:
        previous = latest_checkpoint(run_dir)
        raise DiskFullError(f"{err} (it resumes from {previous or 'the start'})") from err
    for old in list_checkpoints(run_dir)[: -max(keep, 1)]:
        old.unlink()
    return path


def save_best(run_dir: Path, state: dict[str, Any], record: dict[str, Any]) -> Path:
    """Write `state` (the weights and what evaluation and serving read with them) as checkpoints/best.pt, then
    `record` ({"step", "metric", "value"}) as best.json, each atomically; the rotation of step-*.pt leaves both."""
    path = Path(run_dir) / CHECKPOINT_DIR / BEST_NAME
    path.parent.mkdir(parents=True, exist_ok=True)
    with atomic_write(path) as f:
        torch.save({**state, "best": record}, f)
    write_bytes_atomic(path.with_name(BEST_RECORD), (json.dumps(record) + "\n").encode())
    return path


def read_best(run_dir: Path) -> dict[str, Any] | None:
    """The record of the run's best evaluation ({"step", "metric", "value"}), or None: none yet, or a best.json
    that is not such a record (then the next evaluation writes best.pt again)."""
    path = Path(run_dir) / CHECKPOINT_DIR / BEST_RECORD
    try:
        record = json.loads(read_small_file(path, 4096))
    except (OSError, ValueError):
        return None
    valid = (
        isinstance(record, dict)
        and isinstance(record.get("step"), int)
        and isinstance(record.get("metric"), str)
        and isinstance(record.get("value"), float)
        and math.isfinite(record["value"])
        and (path.parent / BEST_NAME).is_file()
    )
    return record if valid else None


def load_checkpoint(path: Path) -> dict[str, Any]:
    """The checkpoint dict at `path` (weights_only: no code is run); CheckpointFileError naming the file when it is
    missing, unreadable, not a dict, or not a torch zip whose records are stored, within MAX_MODEL_FILE_BYTES and
    the file's size (checked before torch reads it)."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointFileError(f"{path}: no such checkpoint file")
    try:
        zip_members(path, MAX_MODEL_FILE_BYTES)
        state = torch.load(path, map_location="cpu", weights_only=True)
    except ContainerError as err:
        raise CheckpointFileError(f"{path}: not a readable checkpoint ({err.problem})") from None
    except pickle.UnpicklingError:  # torch's message would suggest weights_only=False, which runs the file's code
        raise CheckpointFileError(
            f"{path}: not a checkpoint of tensors and plain values (it holds other objects, which are not loaded)"
        ) from None
    except Exception as err:  # truncated, not a zip, unreadable: the same thing to the user
        raise CheckpointFileError(f"{path}: not a readable checkpoint ({error_summary(err)})") from None
    if not isinstance(state, dict):
        raise CheckpointFileError(f"{path}: holds a {type(state).__name__}, not a checkpoint dict")
    return state


class TrainedModel(NamedTuple):
    """What evaluation reads from a training checkpoint."""

    state: dict[str, torch.Tensor]  # the model's weights, wrapper prefixes removed
    model: MBTConfig
    augment: AugmentConfig
    classes: dict[str, Any] | None  # the training split's class record (mbt.classes); None in older checkpoints
    features: FeatureParams | None = None  # the training split's feature parameters; None in older checkpoints
    schema_version: int | None = None  # the shard schema of the training split; None in older checkpoints
    converted_from: Any = None  # a checkpoint converted from scenic: its record, as read (mbt.scenic.conversion_note)
    step: int | None = None  # the optimizer steps taken; None where not recorded (an export)


def load_trained(path: Path) -> TrainedModel:
    """The weights, model and augmentation configs and class record of a training checkpoint; CheckpointFileError
    naming the file when it is not one, its config is not valid or its weights are not finite."""
    checkpoint = load_checkpoint(path)
    config, weights = checkpoint.get("config"), checkpoint.get("model")
    if not isinstance(config, dict) or not isinstance(weights, dict) or not {"model", "augment"} <= set(config):
        raise CheckpointFileError(
            f"{path}: not a training checkpoint (a dict with 'model' and a 'config' holding 'model' and 'augment')"
        )
    if not all(isinstance(name, str) and isinstance(value, torch.Tensor) for name, value in weights.items()):
        raise CheckpointFileError(f"{path}: its 'model' is not a mapping of parameter names to tensors")
    if problems := unstored_problems(weights):
        raise CheckpointFileError(f"{path}: its weights are not the tensors it stores: {problems[0]}")
    if bad := non_finite_tensors(weights):
        raise CheckpointFileError(f"{path}: its weights hold NaN or infinite values ({', '.join(bad[:5])})")
    state = dict(weights)
    for prefix in ("module.", "_orig_mod."):  # saved from a DDP or torch.compile wrapper
        consume_prefix_in_state_dict_if_present(state, prefix)
    try:
        train_cfg = config_from_dict(config)  # the training config as the trainer saved it (lists back to tuples)
        validate(train_cfg.replace(train_shards="", eval_shards=""), train=False)  # bounded model sizes
        classes = None if "data" not in checkpoint else checked_record(checkpoint["data"], str(path))
        features, schema_version = _features(checkpoint.get("features"))
    except (ConfigError, ClassListError, SchemaError) as err:
        problems = str(err).replace("\n", "; ")
        raise CheckpointFileError(
            f"{path}: the checkpoint's config or class record cannot be used: {problems}"
        ) from None
    converted_from = checkpoint.get("converted_from_scenic")
    step = checkpoint.get("step")
    step = step if isinstance(step, int) and not isinstance(step, bool) and step >= 0 else None
    return TrainedModel(
        state, train_cfg.model, train_cfg.augment, classes, features, schema_version, converted_from, step
    )


def build_model(trained: TrainedModel, path: str | Path) -> MBT:
    """The MBT of `trained`'s model config holding its weights (on the CPU, as `MBT` builds it), allocated only
    once the config's size and shapes fit the weights (`mbt.model_size.build_fitted`); CheckpointFileError naming
    `path`, the checkpoint it was read from, listing what does not fit."""
    try:
        return build_fitted(trained.model, trained.state)
    except ModelFitError as err:
        raise CheckpointFileError(f"{path}: the weights do not fit its model config: {err}") from None


def _features(record: Any) -> tuple[FeatureParams | None, int | None]:
    """The feature parameters and schema version a checkpoint records (`{"params": ..., "schema_version": v}`), or
    (None, None) when it records none; SchemaError when the record is not one."""
    if record is None:
        return None, None
    if not isinstance(record, dict) or not isinstance(record.get("params"), dict):
        raise SchemaError("its 'features' record is not a mapping with 'params'")
    version = check_schema_version(record.get("schema_version"), TRAINED_ON)
    try:
        return FeatureParams.from_dict(record["params"]), version
    except SchemaError:
        raise
    except (TypeError, ValueError) as err:
        raise SchemaError(f"its feature parameters are not this version's: {err}") from None


def check_resume_state(state: Mapping[str, Any], path: Path) -> None:
    """Raise CheckpointFileError naming `path` unless `state` holds every part a resume reads, of the right kind:
    tensors for the weights (all finite), a step count, one loader state and one RNG state per saved rank."""
    missing = [key for key in RESUME_KEYS if key not in state]
    if missing:
        raise CheckpointFileError(f"{path}: not a training checkpoint (no {', '.join(missing)}); {RESUME_ADVICE}")
    step, loader, rng = state["step"], state["loader"], state["rng"]
    problems = []
    if not isinstance(state["model"], Mapping) or not all(isinstance(v, torch.Tensor) for v in state["model"].values()):
        problems.append("'model' is not a mapping of tensors")
    elif unstored := unstored_problems(state["model"]):
        problems.append(f"its weights are not the tensors it stores: {unstored[0]}")
    elif bad := non_finite_tensors(state["model"]):
        problems.append(f"its weights hold NaN or infinite values ({', '.join(bad[:5])})")
    if not all(isinstance(state[key], Mapping) for key in ("optimizer", "schedule", "config")):
        problems.append("'optimizer', 'schedule' and 'config' are not all mappings")
    if not isinstance(step, int) or isinstance(step, bool) or step < 0:
        problems.append(f"'step' is {step!r:.40}, not a count of steps")
    ranks_ok = isinstance(loader, list) and isinstance(rng, list) and 1 <= len(loader) == len(rng)
    if not ranks_ok:
        problems.append("'loader' and 'rng' are not lists of one state per rank, of one length")
    elif not all(_is_loader_state(s) for s in loader):
        problems.append("a 'loader' state is not a mapping of a non-negative epoch and batch count")
    elif not all(isinstance(s, Mapping) and isinstance(s.get("torch"), torch.Tensor) for s in rng):
        problems.append("an 'rng' state holds no torch generator state")
    if problems:
        raise CheckpointFileError(f"{path}: not a usable training checkpoint: {'; '.join(problems)}; {RESUME_ADVICE}")


def error_summary(err: BaseException) -> str:
    """The first sentence of a library's error message on one line (torch's run to paragraphs), or its type."""
    text = " ".join(str(err).split())
    return text.split(". ")[0][:300] if text else type(err).__name__


def non_finite_tensors(state_dict: Mapping[str, torch.Tensor]) -> list[str]:
    """The names of the floating-point tensors of `state_dict` that hold a NaN or an infinity."""
    return [
        name
        for name, tensor in state_dict.items()
        if tensor.is_floating_point() and not bool(torch.isfinite(tensor).all())
    ]


def _is_loader_state(state: Any) -> bool:
    if not isinstance(state, Mapping):
        return False
    counts = state.get("epoch"), state.get("batches")
    return all(isinstance(n, int) and not isinstance(n, bool) and n >= 0 for n in counts)


def rng_state() -> dict[str, Any]:
    """Torch's CPU and CUDA generator states (dropout and stochastic depth draw from them)."""
    state: dict[str, Any] = {"torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])
