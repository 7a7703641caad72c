"""The Multimodal Bottleneck Transformer (Nagrani et al., "Attention Bottlenecks for Multimodal Fusion", 2021).

Two ViT towers built from timm's parts, one per modality, with their own weights:
  video  ViT over F frames: per-frame 16x16 patches (8 x 14 x 14 = 1568 tokens), spatial position embedding
         shared by the frames plus a learned temporal embedding, a CLS token;
  audio  AST-style ViT over the log-mel crop (B, 1, T, 128): 16x16 patches (800 x 128 → 50 x 8 = 400 tokens; the
         stride is configurable for AST's overlapping patches), position embedding, a CLS token.
Layers below `fusion_layer` run per modality. From `fusion_layer` on, by `fusion`:
  bottleneck  each tower's block attends over [its tokens, the B shared bottleneck tokens]; the two updated
              bottleneck sets are averaged. Patch tokens of one modality never attend to the other's directly;
  cross       vanilla cross-attention: each tower's block attends over both modalities' tokens;
  late        no fusion: the towers stay apart to the end;
  video, audio  one tower only.
Head: one linear layer shared by the towers, on each tower's CLS (or mean-pooled patch tokens with `pool="gap"`),
logits averaged over the towers.
"""

from __future__ import annotations

import dataclasses
import pickle
from dataclasses import dataclass
from functools import partial
from pathlib import Path

import torch
from einops import rearrange
from timm.layers import PatchEmbed, resample_abs_pos_embed, trunc_normal_
from timm.models.vision_transformer import Block, init_weights_vit_timm
from torch import nn
from torch.utils.checkpoint import checkpoint

FUSIONS = ("bottleneck", "cross", "late", "video", "audio")
POOLS = ("cls", "gap")


@dataclass(frozen=True)
class MBTConfig:
    """Sizes and variant; the defaults are MBT-B/16 of the paper (ViT-B towers, B=4 bottlenecks, Lf=8)."""

    num_classes: int = 527
    fusion: str = "bottleneck"
    fusion_layer: int = 8
    num_bottlenecks: int = 4
    pool: str = "cls"
    embed_dim: int = 768
    depth: int = 12
    num_heads: int = 12
    mlp_ratio: float = 4.0
    num_frames: int = 8
    img_size: int = 224
    patch_size: int = 16
    audio_frames: int = 800
    num_mel_bins: int = 128
    audio_patch_stride: int = 16  # AST overlaps its 16x16 patches with stride 10
    drop_rate: float = 0.0
    attn_drop_rate: float = 0.0
    drop_path_rate: float = 0.0  # MBT recipe: 0.3
    grad_checkpointing: bool = False

    def __post_init__(self) -> None:
        if self.fusion not in FUSIONS:
            raise ValueError(f"fusion must be one of {', '.join(FUSIONS)}, got {self.fusion!r}")
        if self.pool not in POOLS:
            raise ValueError(f"pool must be one of {', '.join(POOLS)}, got {self.pool!r}")
        if not 0 <= self.fusion_layer <= self.depth:
            raise ValueError(f"fusion_layer must be in 0..depth={self.depth}, got {self.fusion_layer}")
        if self.fusion == "bottleneck" and self.num_bottlenecks < 1:
            raise ValueError(f"bottleneck fusion needs num_bottlenecks >= 1, got {self.num_bottlenecks}")
        if self.num_heads < 1 or self.embed_dim % self.num_heads:
            raise ValueError(f"embed_dim {self.embed_dim} is not divisible by num_heads {self.num_heads}")

    @property
    def modalities(self) -> tuple[str, ...]:
        return (self.fusion,) if self.fusion in ("video", "audio") else ("video", "audio")

    @property
    def audio_grid(self) -> tuple[int, int]:
        """(time, frequency) patches of the audio tower."""
        stride, size = self.audio_patch_stride, self.patch_size
        return (self.audio_frames - size) // stride + 1, (self.num_mel_bins - size) // stride + 1

    def replace(self, **changes: object) -> MBTConfig:
        return dataclasses.replace(self, **changes)


class Tower(nn.Module):
    """One modality's embedding, blocks and final norm (timm ViT parts). `tokens()` gives [CLS, patches]."""

    def __init__(self, cfg: MBTConfig, modality: str) -> None:
        super().__init__()
        self.modality = modality
        dim = cfg.embed_dim
        if modality == "video":
            self.patch_embed = PatchEmbed(cfg.img_size, cfg.patch_size, in_chans=3, embed_dim=dim)
            self.temporal_embed = nn.Parameter(torch.zeros(1, cfg.num_frames, 1, dim))
            grid = self.patch_embed.grid_size
        else:
            self.patch_embed = PatchEmbed(
                (cfg.audio_frames, cfg.num_mel_bins), cfg.patch_size, in_chans=1, embed_dim=dim
            )
            if cfg.audio_patch_stride != cfg.patch_size:  # AST's overlapping patches: timm's PatchEmbed, strided
                self.patch_embed.proj = nn.Conv2d(1, dim, cfg.patch_size, stride=cfg.audio_patch_stride)
                self.patch_embed.grid_size = cfg.audio_grid
                self.patch_embed.num_patches = cfg.audio_grid[0] * cfg.audio_grid[1]
            grid = cfg.audio_grid
        self.grid_size = tuple(grid)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, dim))
        self.pos_embed = nn.Parameter(torch.zeros(1, 1 + grid[0] * grid[1], dim))  # CLS + one frame's patches
        self.pos_drop = nn.Dropout(cfg.drop_rate)
        norm = partial(nn.LayerNorm, eps=1e-6)
        rates = torch.linspace(0, cfg.drop_path_rate, cfg.depth).tolist()
        self.blocks = nn.ModuleList(
            Block(dim, cfg.num_heads, cfg.mlp_ratio, qkv_bias=True, proj_drop=cfg.drop_rate,
                  attn_drop=cfg.attn_drop_rate, drop_path=rate, norm_layer=norm)
            for rate in rates
        )  # fmt: skip
        self.norm = norm(dim)
        trunc_normal_(self.pos_embed, std=0.02)
        nn.init.normal_(self.cls_token, std=1e-6)
        self.apply(init_weights_vit_timm)

    def tokens(self, x: torch.Tensor) -> torch.Tensor:
        """(B, 1 + N, D) embedded tokens of video (B, F, 3, H, W) or audio (B, 1, T, mel)."""
        pos = self.pos_embed[:, 1:]
        if self.modality == "video":
            batch, frames = x.shape[:2]
            patches = self.patch_embed(rearrange(x, "b f c h w -> (b f) c h w"))  # each frame's patches
            patches = rearrange(patches, "(b f) p d -> b f p d", b=batch)
            patches = patches + pos.unsqueeze(1) + self.temporal_embed[:, :frames]  # space, then time
            patches = rearrange(patches, "b f p d -> b (f p) d")
        else:
            patches = self.patch_embed(x) + pos
        cls = (self.cls_token + self.pos_embed[:, :1]).expand(patches.shape[0], -1, -1)
        return self.pos_drop(torch.cat([cls, patches], dim=1))


class MBT(nn.Module):
    """MBT over batches of the loaders' contract: `forward(video, audio)` → logits (B, num_classes)."""

    def __init__(self, cfg: MBTConfig) -> None:
        super().__init__()
        self.cfg = cfg
        self.towers = nn.ModuleDict({m: Tower(cfg, m) for m in cfg.modalities})
        self.bottleneck = None
        if cfg.fusion == "bottleneck":
            self.bottleneck = nn.Parameter(torch.zeros(1, cfg.num_bottlenecks, cfg.embed_dim))
            nn.init.normal_(self.bottleneck, std=0.02)  # as MBT's scenic code
        self.head_drop = nn.Dropout(cfg.drop_rate)
        self.head = nn.Linear(cfg.embed_dim, cfg.num_classes)
        init_weights_vit_timm(self.head)

    def _block(self, modality: str, layer: int, x: torch.Tensor) -> torch.Tensor:
        block = self.towers[modality].blocks[layer]
        if self.cfg.grad_checkpointing and self.training and torch.is_grad_enabled():
            return checkpoint(block, x, use_reentrant=False)
        return block(x)

    def forward_features(self, video: torch.Tensor | None, audio: torch.Tensor | None) -> dict[str, torch.Tensor]:
        """Each tower's final normalized tokens {modality: (B, 1 + N, D)} (bottleneck tokens removed)."""
        inputs = {"video": video, "audio": audio}
        x = {m: self.towers[m].tokens(inputs[m]) for m in self.cfg.modalities}
        fused_from = self.cfg.fusion_layer if self.cfg.fusion in ("bottleneck", "cross") else self.cfg.depth
        fsn = None if self.bottleneck is None else self.bottleneck.expand(next(iter(x.values())).shape[0], -1, -1)
        for layer in range(self.cfg.depth):
            if layer < fused_from:
                x = {m: self._block(m, layer, t) for m, t in x.items()}
            elif fsn is not None:
                x, fsn = self._bottleneck_layer(layer, x, fsn)
            else:
                x = self._cross_layer(layer, x)
        return {m: self.towers[m].norm(t) for m, t in x.items()}

    def _bottleneck_layer(
        self, layer: int, x: dict[str, torch.Tensor], fsn: torch.Tensor
    ) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
        """Each tower's block over [its tokens, the bottleneck tokens]; the updated bottlenecks averaged."""
        out, updated = {}, []
        for m, tokens in x.items():
            n = tokens.shape[1]
            y = self._block(m, layer, torch.cat([tokens, fsn], dim=1))
            out[m] = y[:, :n]
            updated.append(y[:, n:])
        return out, torch.stack(updated).mean(0)

    def _cross_layer(self, layer: int, x: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        names = list(x)
        sizes = [x[m].shape[1] for m in names]
        joint = torch.cat([x[m] for m in names], dim=1)
        return {m: self._block(m, layer, joint).split(sizes, dim=1)[i] for i, m in enumerate(names)}

    def forward_head(self, features: dict[str, torch.Tensor]) -> torch.Tensor:
        """Logits (B, num_classes): the shared head on each tower's CLS (or patch mean), averaged."""
        pooled = [t[:, 0] if self.cfg.pool == "cls" else t[:, 1:].mean(1) for t in features.values()]
        return torch.stack([self.head(self.head_drop(p)) for p in pooled]).mean(0)

    def forward(self, video: torch.Tensor | None = None, audio: torch.Tensor | None = None) -> torch.Tensor:
        """video (B, F, 3, H, W) and audio (B, 1, T, mel) → logits (B, num_classes); a single-tower variant
        needs only its own input."""
        for m in self.cfg.modalities:
            if {"video": video, "audio": audio}[m] is None:
                raise ValueError(f"MBT with fusion={self.cfg.fusion!r} needs {m} input")
        return self.forward_head(self.forward_features(video, audio))


# Initialisation from an ImageNet ViT checkpoint (timm layout), offline: a local file, never a download.


class CheckpointError(ValueError):
    """A ViT checkpoint that cannot initialise the model; the message lists the offending keys."""


def load_state_file(path: str | Path) -> dict[str, torch.Tensor]:
    """The tensors of a local timm ViT checkpoint: `.safetensors`, or a `.pth`/`.pt`/`.bin` state dict (possibly
    under 'model' or 'state_dict'), loaded with weights_only=True (no code in the file runs). CheckpointError naming
    the file when it is missing, unreadable, or not a dict of finite tensors."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(
            f"{path}: no such checkpoint file (give a local timm ViT checkpoint; nothing is downloaded)"
        )
    try:
        if path.suffix == ".safetensors":
            from safetensors.torch import load_file

            state = load_file(str(path))
        else:
            state = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError:  # torch's advice (weights_only=False) would run the file's code: not given
        raise CheckpointError(f"{path}: not a ViT checkpoint of tensors (it holds other objects, not loaded)") from None
    except Exception as err:  # torch's and safetensors' errors for a file that is no checkpoint at all
        text = " ".join(str(err).split()).split(". ")[0][:300] or type(err).__name__
        raise CheckpointError(f"{path}: not a readable ViT checkpoint ({text})") from None
    for key in ("model", "state_dict"):
        if isinstance(state, dict) and isinstance(state.get(key), dict):
            state = state[key]
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise CheckpointError(f"{path}: not a state dict of tensors")
    bad = [k for k, v in state.items() if v.is_floating_point() and not bool(torch.isfinite(v).all())]
    if bad:
        raise CheckpointError(f"{path}: its weights hold NaN or infinite values ({', '.join(bad[:5])})")
    return state


def vit_to_tower(vit: dict[str, torch.Tensor], tower: Tower) -> dict[str, torch.Tensor]:
    """The tower's state from a timm ViT state dict (pure: `vit` is not modified).

    Patch embedding, blocks, CLS token and final norm are copied. The position embedding of the ViT's patch
    grid (e.g. 14x14) is resampled to the tower's grid (timm's `resample_abs_pos_embed`, bicubic): the video
    tower's 14x14 stays as it is; the audio tower's 50x8 (time x frequency) is interpolated from it on both axes
    (AST cuts the frequency axis and interpolates time; interpolating both keeps every position trained). The
    video tower's temporal embedding is zero, so at initialisation every frame sees the image ViT. The audio
    tower's one-channel patch kernel is the sum of the RGB kernels (AST).
    """
    target = tower.state_dict()
    out: dict[str, torch.Tensor] = {}
    for key, value in vit.items():
        if key.startswith(("head.", "fc_norm.")) or (key not in target and not key.startswith("pos_embed")):
            continue
        if key == "patch_embed.proj.weight" and value.shape[1] != target[key].shape[1]:
            value = value.sum(dim=1, keepdim=True)
        if key == "pos_embed" and value.shape != target[key].shape:
            old = value.shape[1] - 1
            side = round(old**0.5)
            value = resample_abs_pos_embed(value, list(tower.grid_size), old_size=[side, side], num_prefix_tokens=1)
        out[key] = value
    if "temporal_embed" in target:
        out["temporal_embed"] = torch.zeros_like(target["temporal_embed"])
    missing = sorted(set(target) - set(out))
    mismatched = sorted(f"{k}: checkpoint {tuple(out[k].shape)} vs model {tuple(target[k].shape)}"
                        for k in out if k in target and out[k].shape != target[k].shape)  # fmt: skip
    if missing or mismatched:
        raise CheckpointError(
            f"the checkpoint does not fit the {tower.modality} tower (is it a ViT of the same width and depth?): "
            f"{len(missing)} keys missing {missing[:12]}{' ...' if len(missing) > 12 else ''}; "
            f"{len(mismatched)} of another shape {mismatched[:12]}{' ...' if len(mismatched) > 12 else ''}"
        )
    return out


def init_from_vit(model: MBT, video: str | Path | None = None, audio: str | Path | None = None) -> list[str]:
    """Initialise the video and/or audio tower from local timm ViT checkpoints; returns what was loaded."""
    loaded = []
    for modality, path in (("video", video), ("audio", audio)):
        if path is None or modality not in model.towers:
            continue
        tower = model.towers[modality]
        try:
            tower.load_state_dict(vit_to_tower(load_state_file(path), tower))
        except CheckpointError as err:
            raise CheckpointError(err if str(err).startswith(str(path)) else f"{path}: {err}") from None
        loaded.append(f"{modality} tower <- {path}")
    return loaded
