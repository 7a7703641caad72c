"""Initialisation of MBT from ImageNet ViT checkpoints, offline: local files (read by `mbt.vit_files`), never a
download.

MBT (the paper and scenic) starts both towers from an ImageNet-21k ViT-B/16. What a tower takes from the ViT's timm
state dict (`vit_to_tower`), as scenic's `initialise_from_train_state` (scenic/projects/mbt/model_utils.py):
patch embedding (the audio tower's one-channel kernel is the sum of the RGB kernels, as AST; a tubelet embedding's
kernel sees the central frame of its tubelet alone, scenic's `central_frame_initializer`), blocks, CLS token and
final norm; the position embedding's patch grid resized to the tower's (`resize_pos_grid`: 14x14 → 50x8 for the
audio tower; for tubelets resized to one time step's grid and repeated over time, scenic's 'resize_tile'); the video
tower's temporal embedding at zero (every frame sees the image ViT). With a video ViT, the bottleneck tokens start
from its position embedding (scenic's `init_posemb`, `init_bottleneck`).

Two modes (`mbt.config.VIT_INITS`, `--init`): "scenic", what scenic's code does: beside a video tower the audio
tower's CLS token is not restored but set to zero, scenic's init of it (scenic names it 'clsspectrogram', its
initialiser looks for 'cls_spectrogram'); with CLS tokens the first bottleneck token is the ViT's CLS position and
the others its patch grid resized. "vit": every tensor the ViT has (the audio CLS too), all bottleneck tokens from
the resized grid.
"""

from __future__ import annotations

import math
from pathlib import Path

import torch
import torch.nn.functional as F
from einops import rearrange

from mbt.config import VIT_INITS
from mbt.embed import central_frame_kernel
from mbt.model import MBT, Tower
from mbt.vit_files import CheckpointError, load_state_file


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


def bottleneck_grid(num_tokens: int) -> tuple[int, int] | None:
    """scenic's grid for n bottleneck tokens: gh = int(sqrt(n)), gw = n // gh; None when gh x gw is not n."""
    rows = math.isqrt(max(num_tokens, 0))
    if rows < 1 or rows * (num_tokens // rows) != num_tokens:
        return None
    return rows, num_tokens // rows


def init_bottleneck(model: MBT, vit: dict[str, torch.Tensor], path: str | Path, mode: str) -> str:
    """Set the bottleneck tokens from the ViT's position embedding (scenic's `init_posemb` of 'bottleneck'): in
    "scenic" mode with CLS tokens, the ViT's CLS position (zero where it has none) and then its patch grid resized to
    `bottleneck_grid` of the other n - 1 tokens; otherwise the grid resized to all n. What was done, in words (the
    random init is kept where the tokens make no such grid)."""
    n = model.bottleneck.shape[1]
    cls_row = int(mode == "scenic" and model.cfg.pool == "cls")
    grid = bottleneck_grid(n - cls_row)
    if grid is None:
        return f"bottleneck tokens: kept random ({n - cls_row} tokens make no int(sqrt(n)) x n // int(sqrt(n)) grid)"
    cls_pos, positions, side = split_pos_embed(vit)
    tokens = resize_pos_grid(positions, (side, side), grid)
    with torch.no_grad():
        model.bottleneck.copy_(torch.cat([cls_pos, tokens], dim=1) if cls_row else tokens)
    first = "its CLS position, then " if cls_row else ""
    return f"bottleneck tokens <- {path} ({first}its {side}x{side} position grid resized to {grid[0]}x{grid[1]})"


def init_from_vit(
    model: MBT, video: str | Path | None = None, audio: str | Path | None = None, mode: str = "scenic"
) -> list[str]:
    """Initialise the video and/or audio tower (and, from the video ViT, the bottleneck tokens) from local ViT
    checkpoints (`load_state_file`) as `mode` (one of VIT_INITS) says; returns what was loaded, one line each."""
    if mode not in VIT_INITS:
        raise ValueError(f"mode must be one of {', '.join(VIT_INITS)}, got {mode!r}")
    loaded = []
    for modality, path in (("video", video), ("audio", audio)):
        if path is None or modality not in model.towers:
            continue
        tower = model.towers[modality]
        try:
            vit = load_state_file(path)
            state = vit_to_tower(vit, tower)
            line = f"{modality} tower <- {path}"
            if mode == "scenic" and modality == "audio" and len(model.towers) > 1 and "cls_token" in state:
                state["cls_token"] = torch.zeros_like(state["cls_token"])
                line += " (its CLS token left at zero: scenic restores no 'clsspectrogram')"
            tower.load_state_dict(state)
            loaded.append(line)
            if modality == "video" and model.bottleneck is not None:
                loaded.append(init_bottleneck(model, vit, path, mode))
        except CheckpointError as err:
            raise CheckpointError(err if str(err).startswith(str(path)) else f"{path}: {err}") from None
    return loaded
