"""Reading a local ViT checkpoint file into a timm state dict, offline: never a download.

Two kinds of file are read:
  timm       `.safetensors`, or a `.pth`/`.pt`/`.bin` state dict (e.g. timm's vit_base_patch16_224.augreg_in21k);
  JAX .npz   the original checkpoints of google-research/vision_transformer (imagenet21k/ViT-B_16.npz) or big_vision:
             a timm VisionTransformer of the size its arrays hold is built and filled by timm's own .npz reader.
Each is read only once what its header states fits the file and the limits below; `mbt.pretrained` adapts the
state dict to MBT's towers.
"""

from __future__ import annotations

import math
import pickle
from pathlib import Path
from typing import Any

import torch
from timm.models.vision_transformer import VisionTransformer, _load_weights

from mbt.config import INT_LIMITS
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
