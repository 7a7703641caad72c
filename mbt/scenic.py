"""scenic's trained MBT (google-research/scenic, `projects/mbt`, JAX/Flax) as this project's checkpoint: the same
logits, or refused.

`convert` reads a flax msgpack file (`mbt.flax_msgpack`): a variables dict (`{'params': tree}`), a scenic training
state (optax era: `params`; flax.optim era, 2021-22, when MBT's were released: `optimizer/target`), or a bare tree,
and maps its arrays with `mbt.scenic_map.scenic_to_mbt`. What the arrays do not record (scenic's model.fusion_layer,
model.test_with_bottlenecks, a classifier other than 'token', the frames and mel bins behind the grids) comes from
`ScenicOptions`; the checkpoint records what it was told (`converted_from_scenic`), and `conversion_note` says it
whenever the checkpoint is evaluated.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
import torch

from mbt.config import ConfigError, TrainConfig, config_to_dict
from mbt.flax_msgpack import FlaxMsgpackError, read_flax_msgpack
from mbt.model import MBTConfig
from mbt.model_size import fit_problems
from mbt.scenic_map import CLASSIFIERS, ScenicOptions, scenic_to_mbt
from mbt.validate import validate
from pipelines.config import AugmentConfig
from shards.atomic import atomic_write
from shards.text import printable

__all__ = ["ScenicCheckpointError", "ScenicOptions", "conversion_note", "convert", "write_checkpoint"]

# Where scenic's layouts keep the parameter tree: variables, optax TrainState, flax.optim TrainState, bare tree.
PARAM_PATHS = (("params",), ("optimizer", "target"), ("optimizer", "target", "params"), ("target",), ())
# scenic's config fields that a file does not record and the conversion is told, with the MBTConfig field of each.
TOLD = {"model.fusion_layer": "fusion_layer", "model.test_with_bottlenecks": "test_with_bottlenecks",
        "model.classifier": "pool"}  # fmt: skip


class ScenicCheckpointError(ValueError):
    """A file that is not a scenic MBT checkpoint this converter maps; the message names the file and the key."""


def find_params(tree: Mapping[str, Any]) -> tuple[dict[str, Any], str]:
    """(scenic's parameter tree, where it was: 'params', 'optimizer/target', …) in a restored msgpack tree."""
    for keys in PARAM_PATHS:
        node: Any = tree
        for key in keys:
            node = node.get(key) if isinstance(node, Mapping) else None
        if isinstance(node, Mapping) and "Transformer" in node:
            return dict(node), "/".join(keys) or "the top level"
    places = ", ".join("/".join(k) + "/" if k else "the top level" for k in PARAM_PATHS)
    raise ValueError(
        f"no scenic MBT parameters (a 'Transformer' tree) at {places}; its top-level keys are {sorted(tree)[:12]}: "
        "restore the state with flax and save its parameters as {'params': tree} (flax.serialization.to_bytes)"
    )


def flatten(tree: Mapping[str, Any], prefix: str = "") -> dict[str, np.ndarray]:
    """{'Transformer/encoderblock_0/…/kernel': array}; ValueError naming the key of a leaf that is no float array."""
    flat = {}
    for key, value in tree.items():
        name = f"{prefix}{key}"
        if isinstance(value, Mapping):
            flat.update(flatten(value, f"{name}/"))
        elif isinstance(value, np.ndarray) and value.dtype.kind == "f":
            flat[name] = value
        else:
            raise ValueError(f"{name!r} is a {type(value).__name__}, not an array of floats")
    return flat


def told(cfg: MBTConfig) -> list[str]:
    """The scenic config fields of TOLD that the model `cfg` depends on and its file does not record."""
    fields = ["model.classifier"] if cfg.pool != "cls" else []
    if len(cfg.modalities) == 2:
        fields.append("model.fusion_layer")
    if cfg.fusion == "bottleneck" and cfg.fusion_layer < cfg.depth:
        fields.append("model.test_with_bottlenecks")
    return fields


def check_state(cfg: MBTConfig, state: dict[str, torch.Tensor]) -> None:
    """ValueError listing what keeps `state` from being MBT(cfg)'s weights (`mbt.model_size.fit_problems`: a model
    over its bound, keys missing, unexpected or of another shape; nothing allocated) or its keys holding NaN or
    infinite values."""
    problems = fit_problems(cfg, {k: v.shape for k, v in state.items()})[:8]
    if bad := [k for k, v in state.items() if not bool(torch.isfinite(v).all())]:
        problems.append(f"not finite {bad[:8]}")
    if problems:
        raise ValueError(f"the converted weights do not fit MBT({cfg}): {'; '.join(problems)}")


def convert(path: str | Path, options: ScenicOptions) -> dict[str, Any]:
    """A model-only checkpoint of this project (`{'model': state dict, 'config': resolved TrainConfig dict,
    'converted_from_scenic': {file, params_at, told, unused}}`, what `mbt.checkpoint.load_trained` and `mbt.evaluate`
    read) from the scenic MBT checkpoint at `path`; ScenicCheckpointError naming the file (and the key or scenic's
    config field) when it cannot be converted exactly."""
    try:
        params, where = find_params(read_flax_msgpack(path))
        cfg, state, unused = scenic_to_mbt(flatten(params), options)
        augment = AugmentConfig(
            crop_px=cfg.img_size, frames_used=cfg.num_frames, audio_frames=cfg.audio_frames,
            eval_short_side_px=max(AugmentConfig.eval_short_side_px, cfg.img_size),
            logmel_mean=options.logmel_mean, logmel_std=options.logmel_std,
        )  # fmt: skip
        train_cfg = validate(TrainConfig(model=cfg, augment=augment), train=False)  # sizes bounded before a build
        check_state(cfg, state)
    except FlaxMsgpackError as err:
        raise ScenicCheckpointError(str(err)) from None
    except (ValueError, ConfigError, RuntimeError) as err:  # RuntimeError: torch's, for an array it cannot reshape
        problems = " ".join(str(err).split())
        raise ScenicCheckpointError(f"{path}: not a scenic MBT checkpoint this converter maps: {problems}") from None
    source = {"file": Path(path).name, "params_at": where, "told": told(cfg), "unused": unused}
    return {"model": state, "config": config_to_dict(train_cfg), "converted_from_scenic": source}


def scenic_settings(cfg: MBTConfig, fields: list[str]) -> str:
    """'model.fusion_layer=8, model.test_with_bottlenecks=True': `fields` of TOLD with the values of `cfg`."""
    values = {"model.classifier": {pool: name for name, pool in CLASSIFIERS.items()}[cfg.pool]}
    return ", ".join(f"{field}={values.get(field, getattr(cfg, TOLD[field]))!r}" for field in fields)


def conversion_note(record: Any, cfg: MBTConfig) -> str | None:
    """What a checkpoint converted from scenic (`record`: its 'converted_from_scenic', read from the file) assumes:
    the scenic config fields its file did not record, with the values the model `cfg` has; None for a checkpoint
    that was not converted."""
    if not isinstance(record, Mapping):
        return None
    fields = record.get("told")
    fields = [f for f in TOLD if f in fields] if isinstance(fields, list) else told(cfg)
    name = printable(str(record.get("file")), 120)
    if not fields:
        return f"converted from scenic's {name}"
    return (
        f"converted from scenic's {name}, which does not record {scenic_settings(cfg, fields)}: the conversion was "
        "told these (tools/convert_scenic.py); its logits are scenic's only if the model was trained with them"
    )


def write_checkpoint(checkpoint: dict[str, Any], out: str | Path) -> Path:
    """Write `checkpoint` (`convert`'s) to `out` atomically (a temporary name, then a rename; a full disk is
    DiskFullError naming `out`); parents made."""
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    with atomic_write(out) as f:
        torch.save(checkpoint, f)
    return out
