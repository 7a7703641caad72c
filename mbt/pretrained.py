"""Initialisation of MBT from ImageNet ViT checkpoints, offline: local files, never a download.

MBT (the paper and scenic) starts both towers from an ImageNet-21k ViT-B/16. Two kinds of file are read:
  timm       `.safetensors`, or a `.pth`/`.pt`/`.bin` state dict (e.g. timm's vit_base_patch16_224.augreg_in21k);
  JAX .npz   the original checkpoints of google-research/vision_transformer (imagenet21k/ViT-B_16.npz) or big_vision:
             a timm VisionTransformer of the size its arrays hold is built and filled by timm's own .npz reader.
What a tower takes from the ViT's timm state dict (`vit_to_tower`), as scenic's `initialise_from_train_state`:
patch embedding (the audio tower's one-channel kernel is the sum of the RGB kernels, as AST; a tubelet embedding's
kernel sees the central frame of its tubelet alone, scenic's `central_frame_initializer`), blocks, CLS token and
final norm; the position embedding's patch grid resized to the tower's (`resize_pos_grid`: 14x14 → 50x8 for the
audio tower; for tubelets resized to one time step's grid and repeated over time, scenic's 'resize_tile'); the video
tower's temporal embedding at zero (every frame sees the image ViT). With a video ViT,
the bottleneck tokens start from its position grid resized to num_bottlenecks tokens (scenic's `init_posemb`).
"""

from __future__ import annotations

import math
import pickle
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from einops import rearrange
from timm.models.vision_transformer import VisionTransformer, _load_weights

from mbt.config import INT_LIMITS
from mbt.embed import central_frame_kernel
from mbt.model import MBT, Tower
from mbt.model_size import unstored_problems
from shards.bounded import ContainerError, npz_arrays, safetensors_header, zip_members

# A ViT file: ViT-g/14's float32 weights are 4 GB, 12 GB with the AdamW moments of a training checkpoint.
MAX_VIT_FILE_BYTES = 16 << 30
MAX_VIT_PARAMS = 2_000_000_000  # the blocks' weights of the ViT an .npz describes, before it is built
MAX_VIT_DEPTH = INT_LIMITS["model.depth"][1]  # a deeper ViT initialises no tower
NPZ_PREFIXES = ("", "opt/target/", "params/", "params/img/")  # where the layouts timm's reader knows keep the ViT
# A block's attention and MLP names: vision_transformer's (False) and big_vision's (True).
NPZ_SUBLAYERS = {
    False: ("MultiHeadDotProductAttention_1", "MlpBlock_3"),
    True: ("MultiHeadDotProductAttention_0", "MlpBlock_0"),
}


class CheckpointError(ValueError):
    """A ViT checkpoint that cannot initialise the model; the message names the file and what is wrong."""


def _summary(err: BaseException) -> str:
    """The first sentence of a library's error on one line, or its type."""
    return " ".join(str(err).split()).split(". ")[0][:300] or type(err).__name__


def load_state_file(path: str | Path) -> dict[str, torch.Tensor]:
    """The timm state dict of a local ViT checkpoint: `.safetensors`, a `.pth`/`.pt`/`.bin` state dict (possibly
    under 'model' or 'state_dict', loaded with weights_only=True: no code in the file runs), or a JAX `.npz`
    (`load_npz_vit`), each read only once what its header states fits the file and MAX_VIT_FILE_BYTES
    (`shards.bounded`). CheckpointError naming the file when it is missing, unreadable, not a ViT's, or not
    finite."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"{path}: no such checkpoint file (give a local ViT checkpoint; nothing is downloaded)")
    state = load_npz_vit(path) if path.suffix == ".npz" else _load_torch_file(path)
    bad = [k for k, v in state.items() if v.is_floating_point() and not bool(torch.isfinite(v).all())]
    if bad:
        raise CheckpointError(f"{path}: its weights hold NaN or infinite values ({', '.join(bad[:5])})")
    return state


def _load_torch_file(path: Path) -> dict[str, torch.Tensor]:
    try:
        if path.suffix == ".safetensors":
            from safetensors.torch import load_file

            safetensors_header(path, MAX_VIT_FILE_BYTES)
            state = load_file(str(path))
        else:
            zip_members(path, MAX_VIT_FILE_BYTES)
            state = torch.load(path, map_location="cpu", weights_only=True)
    except ContainerError as err:
        raise CheckpointError(f"{path}: not a readable ViT checkpoint ({err.problem})") from None
    except pickle.UnpicklingError:  # torch's advice (weights_only=False) would run the file's code: not given
        raise CheckpointError(f"{path}: not a ViT checkpoint of tensors (it holds other objects, not loaded)") from None
    except Exception as err:  # torch's and safetensors' errors for a file that is no checkpoint at all
        raise CheckpointError(f"{path}: not a readable ViT checkpoint ({_summary(err)})") from None
    for key in ("model", "state_dict"):
        if isinstance(state, dict) and isinstance(state.get(key), dict):
            state = state[key]
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise CheckpointError(f"{path}: not a state dict of tensors")
    if problems := unstored_problems(state):
        raise CheckpointError(f"{path}: its weights are not the tensors it stores: {problems[0]}")
    return state


def load_npz_vit(path: Path) -> dict[str, torch.Tensor]:
    """The timm state dict of the ViT in a JAX `.npz` of the vision_transformer or big_vision layout: a timm
    VisionTransformer of the width, depth, heads, MLP size, patch size and grid its arrays hold, filled by timm's
    reader (`_load_weights`), built only once its size is within MAX_VIT_DEPTH and MAX_VIT_PARAMS (`npz_vit_args`)
    and its parameters, counted on the meta device, are no more than the archive's arrays hold. CheckpointError
    naming the file when it is not such an archive."""
    shapes = npz_shapes(path)
    args = npz_vit_args(shapes, path)
    try:
        with torch.device("meta"):
            params = sum(p.numel() for p in VisionTransformer(**args).parameters())
    except (AssertionError, ValueError, RuntimeError, TypeError) as err:  # sizes no ViT has (heads not dividing)
        raise CheckpointError(f"{path}: its arrays do not describe a ViT ({_summary(err)})") from None
    if params > (stored := sum(math.prod(shape) for shape in shapes.values())):
        raise CheckpointError(f"{path}: describes a ViT of {params} parameters, more than its arrays hold ({stored})")
    vit = VisionTransformer(**args)
    try:
        _load_weights(vit, str(path))
    except Exception as err:  # a missing or misshapen array, or a damaged member: the same to the user
        raise CheckpointError(
            f"{path}: not a ViT in the vision_transformer / big_vision .npz layout ({_summary(err)})"
        ) from None
    return vit.state_dict()


def npz_shapes(path: Path) -> dict[str, tuple[int, ...]]:
    """The shape of each array of an `.npz`, read from the headers alone (`shards.bounded.npz_arrays`: each header's
    shape x dtype is its member's bytes, the members within the file and MAX_VIT_FILE_BYTES); CheckpointError
    naming the file when it is no readable archive of arrays."""
    try:
        arrays = npz_arrays(path, MAX_VIT_FILE_BYTES)
    except ContainerError as err:
        raise CheckpointError(f"{path}: not a readable .npz archive of arrays ({err.problem})") from None
    return {name: shape for name, (shape, _) in arrays.items()}


def npz_vit_args(shapes: dict[str, tuple[int, ...]], path: Path) -> dict[str, Any]:
    """timm VisionTransformer arguments for the ViT whose `.npz` arrays have `shapes` (the layouts timm's reader
    knows: vision_transformer's encoderblock_N and big_vision's, scanned or not); CheckpointError naming `path`."""
    prefix = next((p for p in NPZ_PREFIXES if f"{p}embedding/kernel" in shapes), None)
    kernel = shapes.get(f"{prefix}embedding/kernel", ())
    if prefix is None or len(kernel) != 4:
        raise CheckpointError(f"{path}: no patch embedding 'embedding/kernel' of 4 axes: not a ViT .npz")
    patch_h, patch_w, in_chans, width = kernel
    encoder = f"{prefix}Transformer/encoderblock"
    scanned = shapes.get(f"{encoder}/LayerNorm_0/scale")  # big_vision's scanned blocks: (depth, width) arrays
    big_vision = prefix.startswith("params/") or f"{prefix}pos_embedding" in shapes or scanned is not None  # timm's
    if scanned is not None:
        block, depth = f"{encoder}/", scanned[0] if len(scanned) == 2 else 0
    else:
        block, depth = f"{encoder}_0/", 0
        while f"{encoder}_{depth}/LayerNorm_0/scale" in shapes:
            depth += 1
    attention, mlp = NPZ_SUBLAYERS[big_vision]
    query = shapes.get(f"{block}{attention}/query/kernel", ())  # (width, heads, head width), scanned: depth first
    hidden = shapes.get(f"{block}{mlp}/Dense_0/kernel", ())  # (width, MLP width)
    pos = shapes.get(f"{prefix}pos_embedding" if big_vision else f"{prefix}Transformer/posembed_input/pos_embedding")
    if width < 1 or depth < 1 or len(query) < 3 or len(hidden) < 2 or pos is None or len(pos) != 3:
        raise CheckpointError(
            f"{path}: a patch embedding without a ViT's encoder blocks and position embedding: not a ViT .npz"
        )
    class_token = f"{prefix}cls" in shapes
    grid_tokens = pos[1] - (1 if class_token and not big_vision else 0)  # big_vision adds no position to its CLS
    side = math.isqrt(max(grid_tokens, 0))
    if side < 1 or side * side != grid_tokens:
        raise CheckpointError(f"{path}: its position embedding of {pos[1]} tokens is not a square grid of patches")
    if depth > MAX_VIT_DEPTH or depth * (4 * width * width + 2 * width * hidden[-1]) > MAX_VIT_PARAMS:
        raise CheckpointError(
            f"{path}: describes a ViT of {depth} blocks of width {width}, more than {MAX_VIT_DEPTH} blocks or "
            f"{MAX_VIT_PARAMS} parameters; not read"
        )
    return {
        "img_size": (side * patch_h, side * patch_w), "patch_size": (patch_h, patch_w), "in_chans": in_chans,
        "embed_dim": width, "depth": depth, "num_heads": query[-2], "mlp_ratio": hidden[-1] / width,
        "qkv_bias": True, "class_token": class_token, "no_embed_class": big_vision and class_token,
        "global_pool": "token" if class_token else "avg", "fc_norm": False, "num_classes": 0,
    }  # fmt: skip


def resize_pos_grid(grid: torch.Tensor, old: tuple[int, int], new: tuple[int, int]) -> torch.Tensor:
    """Position embeddings (1, h*w, D) of an `old` = (h, w) grid resized to the `new` grid, (1, H*W, D): bilinear
    with the corners aligned, i.e. scipy.ndimage.zoom(order=1), as scenic resizes them."""
    if tuple(old) == tuple(new):
        return grid
    image = rearrange(grid.float(), "1 (h w) d -> 1 d h w", h=old[0], w=old[1])
    image = F.interpolate(image, size=tuple(new), mode="bilinear", align_corners=True)
    return rearrange(image, "1 d h w -> 1 (h w) d").to(grid.dtype)


def split_pos_embed(vit: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor, int]:
    """(the CLS token's position (1, 1, D), zero where the ViT adds none; the patch grid's (1, side², D); side) of a
    timm ViT state dict; CheckpointError unless its patch grid is square (as every ImageNet ViT's is)."""
    pos = vit["pos_embed"]
    if pos.ndim != 3 or pos.shape[0] != 1:
        raise CheckpointError(f"its pos_embed of shape {tuple(pos.shape)} is not (1, tokens, width)")
    tokens = pos.shape[1]
    prefix = 1 if "cls_token" in vit and math.isqrt(tokens - 1) ** 2 == tokens - 1 else 0
    side = math.isqrt(tokens - prefix)
    if side < 1 or side * side != tokens - prefix:
        raise CheckpointError(f"its position embedding of {tokens} tokens is not a square grid of patches (and a CLS)")
    cls_pos = pos[:, :1] if prefix else pos.new_zeros(1, 1, pos.shape[2])
    return cls_pos, pos[:, prefix:], side


def tower_pos_embed(vit: dict[str, torch.Tensor], tower: Tower) -> torch.Tensor:
    """The tower's position embedding from the ViT's: as it is where it has the tower's layout already, else its
    square patch grid resized to the tower's grid (`resize_pos_grid`; a tubelet grid's (rows, columns), the same
    for each time step), after its CLS position with `pool="cls"`."""
    pos, has_cls = vit["pos_embed"], tower.num_prefix_tokens == 1
    same_width = pos.ndim == 3 and pos.shape[2] == tower.pos_embed.shape[2]  # else not resized: the check names it
    if not same_width or (pos.shape == tower.pos_embed.shape and ("cls_token" in vit) == has_cls):
        return pos
    cls_pos, grid, side = split_pos_embed(vit)
    *time, rows, cols = tower.grid_size
    grid = resize_pos_grid(grid, (side, side), (rows, cols)).repeat(1, math.prod(time), 1)
    return torch.cat([cls_pos, grid], dim=1) if has_cls else grid


def vit_to_tower(vit: dict[str, torch.Tensor], tower: Tower) -> dict[str, torch.Tensor]:
    """The tower's state from a timm ViT state dict (pure: `vit` is not modified); what is taken and how is in the
    module's docstring. CheckpointError listing the keys missing or of another shape."""
    target = tower.state_dict()
    out: dict[str, torch.Tensor] = {}
    for key, value in vit.items():
        if key not in target or key in ("pos_embed", "temporal_embed"):  # the ViT's head, fc_norm: not the tower's
            continue
        if key == "patch_embed.proj.weight" and value.ndim == 4 and value.shape[1] != target[key].shape[1]:
            value = value.sum(dim=1, keepdim=True)
        kernel = target[key].shape
        if key == "patch_embed.proj.weight" and len(kernel) == 5 and value.shape == kernel[:2] + kernel[3:]:
            value = central_frame_kernel(value, kernel[2])  # 2D patches → tubelets (of another size: not made)
        out[key] = value
    if "pos_embed" in vit:
        out["pos_embed"] = tower_pos_embed(vit, tower)
    if "temporal_embed" in target:
        out["temporal_embed"] = torch.zeros_like(target["temporal_embed"])
    missing = sorted(set(target) - set(out))
    mismatched = sorted(f"{k}: checkpoint {tuple(out[k].shape)} vs model {tuple(target[k].shape)}"
                        for k in out if out[k].shape != target[k].shape)  # fmt: skip
    if missing or mismatched:
        raise CheckpointError(
            f"the checkpoint does not fit the {tower.modality} tower (is it a ViT of the same width and depth?): "
            f"{len(missing)} keys missing {missing[:12]}{' ...' if len(missing) > 12 else ''}; "
            f"{len(mismatched)} of another shape {mismatched[:12]}{' ...' if len(mismatched) > 12 else ''}"
        )
    return out


def bottleneck_grid(num_bottlenecks: int) -> tuple[int, int] | None:
    """scenic's grid for n bottleneck tokens: gh = int(sqrt(n)), gw = n // gh; None when gh x gw is not n."""
    rows = math.isqrt(num_bottlenecks)
    cols = num_bottlenecks // rows
    return (rows, cols) if rows * cols == num_bottlenecks else None


def init_bottleneck(model: MBT, vit: dict[str, torch.Tensor], path: str | Path) -> str:
    """Set the bottleneck tokens to the ViT's patch position grid resized to `bottleneck_grid` (scenic's
    `init_posemb`); what was done, in words (the random init is kept where n tokens make no such grid)."""
    n = model.cfg.bottleneck_tokens
    grid = bottleneck_grid(n)
    if grid is None:
        return f"bottleneck tokens: kept random ({n} tokens make no int(sqrt(n)) x n // int(sqrt(n)) grid)"
    _, positions, side = split_pos_embed(vit)
    with torch.no_grad():
        model.bottleneck.copy_(resize_pos_grid(positions, (side, side), grid))
    return f"bottleneck tokens <- {path} (its {side}x{side} position grid resized to {grid[0]}x{grid[1]})"


def init_from_vit(model: MBT, video: str | Path | None = None, audio: str | Path | None = None) -> list[str]:
    """Initialise the video and/or audio tower (and, from the video ViT, the bottleneck tokens) from local ViT
    checkpoints (`load_state_file`); returns what was loaded, one line each."""
    loaded = []
    for modality, path in (("video", video), ("audio", audio)):
        if path is None or modality not in model.towers:
            continue
        tower = model.towers[modality]
        try:
            vit = load_state_file(path)
            tower.load_state_dict(vit_to_tower(vit, tower))
            loaded.append(f"{modality} tower <- {path}")
            if modality == "video" and model.bottleneck is not None:
                loaded.append(init_bottleneck(model, vit, path))
        except CheckpointError as err:
            raise CheckpointError(err if str(err).startswith(str(path)) else f"{path}: {err}") from None
    return loaded
