"""scenic's trained MBT (google-research/scenic, `projects/mbt`, JAX/Flax) as this project's MBT: the same logits.

`convert` reads a flax msgpack file (`mbt.flax_msgpack`): a variables dict (`{'params': tree}`), a scenic training
state (optax era: `params`; flax.optim era, 2021-22, when MBT's were released: `optimizer/target`), or a bare tree.
The model's sizes come from the arrays' shapes; what shapes do not record (the fusion layer, the image size or frame
count behind the tubelet grid, the mel bins behind the spectrogram grid) comes from `ScenicOptions`. scenic's
`MBT` maps onto MBTConfig(video_embed="tubelet", gelu="tanh") with:
  cls, clsspectrogram           the towers' CLS tokens ('token' classifier → pool="cls"; none → pool="gap")
  embedding, embedding_spectrogram   the Conv3D tubelets (kt, kh, kw, C, D) and the Conv2D (time, mel, 3, D), whose
                                three tiled channels become one (summed: the log-mel here has one channel)
  posembed_input[_spectrogram]  position embeddings over [CLS, patches], as here (the bottleneck has none)
  encoderblock_N[_spectrogram]  timm Blocks: q/k/v (D, heads, head_dim) → qkv, out (heads, head_dim, D) → proj
  encoder_norm                  one LayerNorm over the concatenated towers: each tower's final norm here
  bottleneck                    (1, n, D): n = n_bottlenecks + 1 with the 'token' classifier, num_bottlenecks=n here
  output_projection             the shared head
The rgb tower is this project's video tower, the spectrogram tower its audio tower.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from mbt.config import ConfigError, TrainConfig, config_to_dict
from mbt.flax_msgpack import FlaxMsgpackError, read_flax_msgpack
from mbt.model import MBTConfig
from mbt.model_size import fit_problems
from mbt.validate import validate
from pipelines.config import AugmentConfig
from shards.atomic import atomic_write

# Where scenic's layouts keep the parameter tree: variables, optax TrainState, flax.optim TrainState, bare tree.
PARAM_PATHS = (("params",), ("optimizer", "target"), ("optimizer", "target", "params"), ("target",), ())
SCENIC_IMG_SIZE = 224  # scenic's crop_size, when neither --img-size nor --num-frames is given
SCENIC_MEL_BINS = 128
TOWERS = {"video": "", "audio": "_spectrogram"}  # scenic's name suffix of each tower (rgb, spectrogram)


class ScenicCheckpointError(ValueError):
    """A file that is not a scenic MBT checkpoint this converter maps; the message names the file and the key."""


@dataclass(frozen=True)
class ScenicOptions:
    """What the arrays' shapes do not record. img_size / num_frames: one is enough to split the tubelet grid
    (neither: scenic's 224 px); fusion_layer: needed for two towers (scenic's released AudioSet config: 8)."""

    fusion_layer: int | None = None
    img_size: int | None = None
    num_frames: int | None = None
    num_mel_bins: int = SCENIC_MEL_BINS
    logmel_mean: float | None = None
    logmel_std: float | None = None


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
        f"no scenic MBT parameters (a 'Transformer' tree) at {places}; its top-level keys are {sorted(tree)[:12]}"
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


class _Params:
    """The flat tree, each array taken once: what is never taken is left over (`unused`)."""

    def __init__(self, flat: dict[str, np.ndarray]) -> None:
        self.flat, self.taken = flat, set()

    def __contains__(self, key: str) -> bool:
        return key in self.flat

    def shape(self, key: str, ndim: int) -> tuple[int, ...]:
        if key not in self.flat:
            raise ValueError(f"no {key!r}")
        if self.flat[key].ndim != ndim:
            raise ValueError(f"{key!r} has shape {self.flat[key].shape}, not {ndim} axes")
        return self.flat[key].shape

    def take(self, key: str) -> torch.Tensor:
        if key not in self.flat:
            raise ValueError(f"no {key!r}")
        self.taken.add(key)
        return torch.from_numpy(np.array(self.flat[key], dtype=np.float32))

    def unused(self) -> list[str]:
        return sorted(set(self.flat) - self.taken)


def _tower_names(params: _Params, tower: str, two: bool) -> dict[str, str]:
    suffix = TOWERS[tower]
    block = f"Transformer/encoderblock_{{}}{suffix}"
    if f"{block.format(0)}/LayerNorm_0/scale" not in params:  # share_encoder: both towers use the rgb blocks
        block = "Transformer/encoderblock_{}"
    cls = "cls" if tower == "video" or not two else "clsspectrogram"
    pos = f"Transformer/posembed_input{suffix}/pos_embedding"
    return {"embed": f"embedding{suffix}", "pos": pos, "cls": cls, "block": block}


def _block(params: _Params, name: str, dim: int) -> dict[str, torch.Tensor]:
    """One timm Block's state from scenic's EncoderBlock `name`."""
    attn, mlp = f"{name}/MultiHeadDotProductAttention_0", f"{name}/MlpBlock_0"
    qkv = [f"{attn}/{p}" for p in ("query", "key", "value")]
    return {
        "norm1.weight": params.take(f"{name}/LayerNorm_0/scale"),
        "norm1.bias": params.take(f"{name}/LayerNorm_0/bias"),
        "attn.qkv.weight": torch.cat([params.take(f"{p}/kernel").reshape(dim, dim).T for p in qkv]),
        "attn.qkv.bias": torch.cat([params.take(f"{p}/bias").reshape(dim) for p in qkv]),
        "attn.proj.weight": params.take(f"{attn}/out/kernel").reshape(dim, dim).T,
        "attn.proj.bias": params.take(f"{attn}/out/bias"),
        "norm2.weight": params.take(f"{name}/LayerNorm_1/scale"),
        "norm2.bias": params.take(f"{name}/LayerNorm_1/bias"),
        "mlp.fc1.weight": params.take(f"{mlp}/Dense_0/kernel").T,
        "mlp.fc1.bias": params.take(f"{mlp}/Dense_0/bias"),
        "mlp.fc2.weight": params.take(f"{mlp}/Dense_1/kernel").T,
        "mlp.fc2.bias": params.take(f"{mlp}/Dense_1/bias"),
    }


def _video_grid(tokens: int, patch: int, tubelet: int, options: ScenicOptions) -> tuple[int, int]:
    """(img_size, num_frames) whose tubelet grid has `tokens` tokens."""
    if options.num_frames is not None and options.img_size is None:
        side = math.isqrt(tokens * tubelet // max(options.num_frames, 1))
        img_size, num_frames = side * patch, options.num_frames
    else:
        img_size = options.img_size or SCENIC_IMG_SIZE
        num_frames = tokens // max((img_size // patch) ** 2, 1) * tubelet
    if num_frames % tubelet or (num_frames // tubelet) * (img_size // patch) ** 2 != tokens:
        raise ValueError(
            f"its rgb position embedding has {tokens} tubelet tokens, which {img_size} px and {num_frames} frames in "
            f"tubelets of {tubelet}x{patch}x{patch} do not make: give the clip's --img-size or --num-frames"
        )
    return img_size, num_frames


def scenic_to_mbt(flat: dict[str, np.ndarray], options: ScenicOptions) -> tuple[MBTConfig, dict[str, torch.Tensor]]:
    """This project's MBTConfig and state dict for scenic MBT parameters `flat` (`flatten`); ValueError naming the
    key that is missing, of another shape, or not used by the mapping."""
    params = _Params(flat)
    towers = [t for t in TOWERS if f"embedding{TOWERS[t]}/kernel" in params]
    if not towers:
        raise ValueError("no 'embedding/kernel' (rgb) or 'embedding_spectrogram/kernel' (spectrogram)")
    if "pre_logits/kernel" in params:
        raise ValueError("'pre_logits' (representation_size): a pre-logits layer this project's MBT does not have")
    names = {t: _tower_names(params, t, len(towers) == 2) for t in towers}
    first = names[towers[0]]
    dim = params.shape(f"{first['embed']}/bias", 1)[0]
    heads, head_dim = params.shape(f"{first['block'].format(0)}/MultiHeadDotProductAttention_0/query/kernel", 3)[1:]
    if heads * head_dim != dim:
        raise ValueError(f"attention of {heads} heads of {head_dim} is not the width {dim}")
    mlp_dim = params.shape(f"{first['block'].format(0)}/MlpBlock_0/Dense_0/kernel", 2)[1]
    depth = 0
    while f"{first['block'].format(depth)}/LayerNorm_0/scale" in params:
        depth += 1
    pool = "cls" if first["cls"] in params else "gap"
    sizes: dict[str, Any] = {}
    if "video" in towers:
        shape = params.shape(f"{names['video']['embed']}/kernel", 5)  # 4 axes: 'temporal_sampling', not mapped
        if shape[1] != shape[2] or shape[3] != 3:
            raise ValueError(f"'embedding/kernel' of shape {shape}: not square tubelets over 3 colour channels")
        tokens = params.shape(names["video"]["pos"], 3)[1] - (pool == "cls")
        sizes["tubelet_frames"], sizes["patch_size"] = shape[0], shape[1]
        sizes["img_size"], sizes["num_frames"] = _video_grid(tokens, shape[1], shape[0], options)
    if "audio" in towers:
        shape = params.shape(f"{names['audio']['embed']}/kernel", 4)
        patch = sizes.setdefault("patch_size", shape[0])
        if shape[:2] != (patch, patch):
            raise ValueError(f"'embedding_spectrogram/kernel' of shape {shape}: not {patch}x{patch} patches")
        mel_patches = (options.num_mel_bins - patch) // patch + 1
        tokens = params.shape(names["audio"]["pos"], 3)[1] - (pool == "cls")
        if mel_patches < 1 or tokens % mel_patches:
            raise ValueError(f"its spectrogram position embedding's {tokens} patches are not rows of "
                             f"{options.num_mel_bins} mel bins / {patch}: give the model's --num-mel-bins")  # fmt: skip
        sizes["audio_frames"], sizes["num_mel_bins"] = tokens // mel_patches * patch, options.num_mel_bins
    bottlenecks = params.shape("bottleneck", 3)[1] if "bottleneck" in params else 0
    if len(towers) == 2 and options.fusion_layer is None:
        raise ValueError("the checkpoint does not record its fusion layer: give --fusion-layer (scenic's released "
                         "AudioSet config: 8)")  # fmt: skip
    fusion_layer = depth if len(towers) == 1 else options.fusion_layer
    if len(towers) == 1:
        fusion = towers[0]
    else:
        fusion = "bottleneck" if bottlenecks else "late" if fusion_layer >= depth else "cross"
    cfg = MBTConfig(
        num_classes=params.shape("output_projection/kernel", 2)[1], fusion=fusion, fusion_layer=fusion_layer,
        num_bottlenecks=bottlenecks or MBTConfig.num_bottlenecks, pool=pool, embed_dim=dim, depth=depth,
        num_heads=heads, mlp_ratio=mlp_dim / dim, audio_patch_stride=sizes["patch_size"], video_embed="tubelet",
        gelu="tanh", **sizes,
    )  # fmt: skip
    state = {"head.weight": params.take("output_projection/kernel").T}
    state["head.bias"] = params.take("output_projection/bias")
    if bottlenecks:
        state["bottleneck"] = params.take("bottleneck")
    for tower in towers:
        name, prefix = names[tower], f"towers.{tower}."
        kernel = params.take(f"{name['embed']}/kernel")
        kernel = kernel.permute(4, 3, 0, 1, 2) if tower == "video" else kernel.sum(2, keepdim=True).permute(3, 2, 0, 1)
        state[f"{prefix}patch_embed.proj.weight"] = kernel
        state[f"{prefix}patch_embed.proj.bias"] = params.take(f"{name['embed']}/bias")
        state[f"{prefix}pos_embed"] = params.take(name["pos"])
        if pool == "cls":
            state[f"{prefix}cls_token"] = params.take(name["cls"])
        for layer in range(depth):
            for key, value in _block(params, name["block"].format(layer), dim).items():
                state[f"{prefix}blocks.{layer}.{key}"] = value
        state[f"{prefix}norm.weight"] = params.take("Transformer/encoder_norm/scale")
        state[f"{prefix}norm.bias"] = params.take("Transformer/encoder_norm/bias")
    if unused := params.unused():
        raise ValueError(f"{len(unused)} arrays this mapping does not know: {unused[:8]}")
    return cfg, state


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
    """A model-only checkpoint of this project (`{'model': state dict, 'config': resolved TrainConfig dict}`, what
    `mbt.checkpoint.load_trained` and `mbt.evaluate` read) from the scenic MBT checkpoint at `path`;
    ScenicCheckpointError naming the file (and the key) when it cannot be converted."""
    try:
        params, where = find_params(read_flax_msgpack(path))
        cfg, state = scenic_to_mbt(flatten(params), options)
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
    source = {"file": Path(path).name, "params_at": where}
    return {"model": state, "config": config_to_dict(train_cfg), "converted_from_scenic": source}


def write_checkpoint(checkpoint: dict[str, Any], out: str | Path) -> Path:
    """Write `checkpoint` (`convert`'s) to `out` atomically (a temporary name, then a rename; a full disk is
    DiskFullError naming `out`); parents made."""
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    with atomic_write(out) as f:
        torch.save(checkpoint, f)
    return out
