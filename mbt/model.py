"""The Multimodal Bottleneck Transformer (Nagrani et al., "Attention Bottlenecks for Multimodal Fusion", 2021).

Two ViT towers built from timm's parts, one per modality, with their own weights:
  video  ViT over F frames: per-frame 16x16 patches (8 x 14 x 14 = 1568 tokens), spatial position embedding
         shared by the frames plus a learned temporal embedding, a CLS token (with `pool="cls"`); or, with
         `video_embed="tubelet"`, scenic's 16x16 x `tubelet_frames` tubelets (`mbt.embed.TubeletEmbed`) with one
         position embedding over (time, row, column);
  audio  AST-style ViT over the log-mel crop (B, 1, T, 128): 16x16 patches (800 x 128 → 50 x 8 = 400 tokens; the
         stride is configurable for AST's overlapping patches), position embedding, a CLS token (with `pool="cls"`).
Layers below `fusion_layer` run per modality. From `fusion_layer` on, by `fusion`:
  bottleneck  each tower's block attends over [its tokens, the B shared bottleneck tokens]; the two updated
              bottleneck sets are averaged. Patch tokens of one modality never attend to the other's directly;
  cross       vanilla cross-attention: each tower's block attends over both modalities' tokens;
  late        no fusion: the towers stay apart to the end;
  video, audio  one tower only.
  With `pool="cls"` the bottleneck holds one token more than `num_bottlenecks` (`cls_bottleneck`, scenic's
  n_bottlenecks + 1 with its 'token' classifier). At evaluation, `test_with_bottlenecks=False` runs the fused layers
  without the bottleneck tokens, each tower alone (scenic's `test_with_bottlenecks`).
Head (`pool`, scenic's `classifier`): one linear layer, initialised to zero (scenic's output projection), over
  cls  each tower's CLS token (scenic's 'token'; the default): the head is shared by the towers; their logits are
       averaged at evaluation, and in training each tower's logits get their own loss (`per_tower=True`);
  gap, gmp, gsp  no CLS tokens: the mean, maximum or sum of all the towers' tokens together, per channel (so a tower
       weighs by its token count; bottleneck tokens left out), one logits for the model (scenic's 'gap', 'gmp',
       'gsp').
The blocks' GELU is the exact (erf) one of timm, or flax's tanh approximation that scenic's blocks use (`gelu="tanh"`).
Stochastic depth drops residual branches as scenic's blocks do, a kept branch unscaled (`mbt.blocks`).
Initialisation from ImageNet ViT checkpoints is `mbt.pretrained`; scenic's trained MBT checkpoints convert with
`mbt.scenic`.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass

import torch
from einops import rearrange
from timm.layers import PatchEmbed, trunc_normal_
from timm.models.vision_transformer import init_weights_vit_timm
from torch import nn
from torch.utils.checkpoint import checkpoint

from mbt.blocks import GELUS, encoder_blocks
from mbt.embed import TubeletEmbed

FUSIONS = ("bottleneck", "cross", "late", "video", "audio")
POOLS = ("cls", "gap", "gmp", "gsp")  # scenic's 'token', 'gap', 'gmp' and 'gsp' classifiers
TOKEN_POOLS = {"gap": torch.mean, "gmp": torch.amax, "gsp": torch.sum}  # scenic's jnp.mean, jnp.max, jnp.sum
VIDEO_EMBEDS = ("frame", "tubelet")  # per-frame patches + temporal embedding; scenic's 3d_conv tubelets


@dataclass(frozen=True)
class MBTConfig:
    """Sizes and variant; the defaults are MBT-B/16 of the paper (ViT-B towers, B=4 bottlenecks, Lf=8)."""

    num_classes: int = 527
    fusion: str = "bottleneck"
    fusion_layer: int = 8
    num_bottlenecks: int = 4
    cls_bottleneck: bool = True  # pool="cls": one bottleneck token more (scenic); False: num_bottlenecks in all
    test_with_bottlenecks: bool = True  # False: evaluation runs the fused layers without the bottleneck (scenic's)
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
    video_embed: str = "frame"
    tubelet_frames: int = 2  # frames per tubelet with video_embed="tubelet" (scenic's MBT-B/16x2)
    gelu: str = "exact"
    drop_rate: float = 0.0
    attn_drop_rate: float = 0.0
    drop_path_rate: float = 0.0  # MBT recipe: 0.3
    drop_path_scale: bool = False  # kept branches x 1/(1-p) as timm's DropPath; scenic's EncoderBlock: not
    grad_checkpointing: bool = False

    def __post_init__(self) -> None:
        if self.fusion not in FUSIONS:
            raise ValueError(f"fusion must be one of {', '.join(FUSIONS)}, got {self.fusion!r}")
        if self.pool not in POOLS:
            raise ValueError(f"pool must be one of {', '.join(POOLS)}, got {self.pool!r}")
        if not 0 <= self.fusion_layer <= self.depth:
            raise ValueError(f"fusion_layer must be in 0..depth={self.depth}, got {self.fusion_layer}")
        if self.fusion == "bottleneck" and self.bottleneck_tokens < 1:
            raise ValueError(f"bottleneck fusion needs a bottleneck token, got num_bottlenecks {self.num_bottlenecks}")
        if self.num_heads < 1 or self.embed_dim % self.num_heads:
            raise ValueError(f"embed_dim {self.embed_dim} is not divisible by num_heads {self.num_heads}")
        if self.video_embed not in VIDEO_EMBEDS:
            raise ValueError(f"video_embed must be one of {', '.join(VIDEO_EMBEDS)}, got {self.video_embed!r}")
        if self.gelu not in GELUS:
            raise ValueError(f"gelu must be one of {', '.join(GELUS)}, got {self.gelu!r}")
        if self.video_embed == "tubelet" and (self.tubelet_frames < 1 or self.num_frames % self.tubelet_frames):
            raise ValueError(
                f"num_frames {self.num_frames} is not a whole number of tubelets of {self.tubelet_frames} frames"
            )

    @property
    def modalities(self) -> tuple[str, ...]:
        return (self.fusion,) if self.fusion in ("video", "audio") else ("video", "audio")

    @property
    def bottleneck_tokens(self) -> int:
        """The bottleneck's tokens: num_bottlenecks, and one more with pool="cls" and cls_bottleneck (scenic's MBT
        makes n_bottlenecks + 1 with its 'token' classifier: model.py, `MBT.__call__`)."""
        return self.num_bottlenecks + (self.pool == "cls" and self.cls_bottleneck)

    @property
    def audio_grid(self) -> tuple[int, int]:
        """(time, frequency) patches of the audio tower."""
        stride, size = self.audio_patch_stride, self.patch_size
        return (self.audio_frames - size) // stride + 1, (self.num_mel_bins - size) // stride + 1

    def replace(self, **changes: object) -> MBTConfig:
        return dataclasses.replace(self, **changes)


class Tower(nn.Module):
    """One modality's embedding, blocks and final norm (timm ViT parts). `tokens()` gives [CLS, patches], or the
    patches alone with `pool="gap"` (no CLS token). `grid_size`: the patches' (time, row, column) grid for video
    tubelets, else one frame's or the log-mel's (rows, columns)."""

    def __init__(self, cfg: MBTConfig, modality: str) -> None:
        super().__init__()
        self.modality = modality
        self.num_prefix_tokens = 1 if cfg.pool == "cls" else 0
        dim = cfg.embed_dim
        self.temporal_embed = None
        if modality == "video" and cfg.video_embed == "tubelet":
            self.patch_embed = TubeletEmbed(cfg.img_size, cfg.patch_size, cfg.num_frames, cfg.tubelet_frames, dim)
            grid = self.patch_embed.grid_size
        elif modality == "video":
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
        self.cls_token = nn.Parameter(torch.zeros(1, 1, dim)) if self.num_prefix_tokens else None
        # [CLS] + one frame's patches (all the tubelets)
        self.pos_embed = nn.Parameter(torch.zeros(1, self.num_prefix_tokens + math.prod(grid), dim))
        self.pos_drop = nn.Dropout(cfg.drop_rate)
        self.blocks = encoder_blocks(cfg)  # stochastic depth as scenic's (`mbt.blocks`)
        self.norm = nn.LayerNorm(dim, eps=1e-6)
        trunc_normal_(self.pos_embed, std=0.02)
        if self.cls_token is not None:
            nn.init.normal_(self.cls_token, std=1e-6)
        self.apply(init_weights_vit_timm)

    def tokens(self, x: torch.Tensor) -> torch.Tensor:
        """(B, [1 +] N, D) embedded tokens of video (B, F, 3, H, W) or audio (B, 1, T, mel)."""
        pos = self.pos_embed[:, self.num_prefix_tokens :]
        if self.temporal_embed is not None:
            batch, frames = x.shape[:2]
            patches = self.patch_embed(rearrange(x, "b f c h w -> (b f) c h w"))  # each frame's patches
            patches = rearrange(patches, "(b f) p d -> b f p d", b=batch)
            patches = patches + pos.unsqueeze(1) + self.temporal_embed[:, :frames]  # space, then time
            patches = rearrange(patches, "b f p d -> b (f p) d")
        else:
            patches = self.patch_embed(x) + pos
        if self.cls_token is None:
            return self.pos_drop(patches)
        cls = (self.cls_token + self.pos_embed[:, :1]).expand(patches.shape[0], -1, -1)
        return self.pos_drop(torch.cat([cls, patches], dim=1))


class MBT(nn.Module):
    """MBT over batches of the loaders' contract: `forward(video, audio)` → logits (B, num_classes); with
    `per_tower=True` (training) the logits of each head output (H, B, num_classes) instead."""

    def __init__(self, cfg: MBTConfig) -> None:
        super().__init__()
        self.cfg = cfg
        self.towers = nn.ModuleDict({m: Tower(cfg, m) for m in cfg.modalities})
        self.bottleneck = None
        if cfg.fusion == "bottleneck":
            self.bottleneck = nn.Parameter(torch.zeros(1, cfg.bottleneck_tokens, cfg.embed_dim))
            nn.init.normal_(self.bottleneck, std=0.02)  # as MBT's scenic code
        self.head_drop = nn.Dropout(cfg.drop_rate)
        self.head = nn.Linear(cfg.embed_dim, cfg.num_classes)
        nn.init.zeros_(self.head.weight)  # scenic's output projection: zero kernel and bias
        nn.init.zeros_(self.head.bias)

    def _block(self, modality: str, layer: int, x: torch.Tensor) -> torch.Tensor:
        block = self.towers[modality].blocks[layer]
        if self.cfg.grad_checkpointing and self.training and torch.is_grad_enabled():
            return checkpoint(block, x, use_reentrant=False)
        return block(x)

    def bottleneck_in_use(self) -> bool:
        """Whether the fused layers run with the bottleneck tokens now: with bottleneck fusion from a layer below
        depth, in training always, at evaluation with test_with_bottlenecks (scenic's Encoder: `use_bottlenecks =
        train or self.test_with_bottlenecks`; without, every layer runs each tower alone)."""
        fused = self.bottleneck is not None and self.cfg.fusion_layer < self.cfg.depth
        return fused and (self.training or self.cfg.test_with_bottlenecks)

    def forward_features(self, video: torch.Tensor | None, audio: torch.Tensor | None) -> dict[str, torch.Tensor]:
        """Each tower's final normalized tokens {modality: (B, [1 +] N, D)} (bottleneck tokens removed)."""
        inputs = {"video": video, "audio": audio}
        x = {m: self.towers[m].tokens(inputs[m]) for m in self.cfg.modalities}
        with_bottleneck = self.bottleneck_in_use()
        fused_from = self.cfg.fusion_layer if self.cfg.fusion == "cross" or with_bottleneck else self.cfg.depth
        fsn = self.bottleneck.expand(next(iter(x.values())).shape[0], -1, -1) if with_bottleneck else None
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

    def forward_head(self, features: dict[str, torch.Tensor], per_tower: bool = False) -> torch.Tensor:
        """Logits (B, num_classes): the shared head on each tower's CLS, averaged over the towers; or on the mean,
        maximum or sum of all the towers' tokens (`pool` gap, gmp, gsp). `per_tower`: the head's outputs before the
        average, (H, B, num_classes), one per tower with CLS tokens, one for the model otherwise."""
        if self.cfg.pool == "cls":
            pooled = [pool_tokens(t, "cls") for t in features.values()]
        else:
            pooled = [pool_tokens(torch.cat(list(features.values()), dim=1), self.cfg.pool)]
        logits = torch.stack([self.head(self.head_drop(p)) for p in pooled])
        return logits if per_tower else logits.mean(0)

    def forward(
        self, video: torch.Tensor | None = None, audio: torch.Tensor | None = None, per_tower: bool = False
    ) -> torch.Tensor:
        """video (B, F, 3, H, W) and audio (B, 1, T, mel) → logits (B, num_classes), or (H, B, num_classes) with
        `per_tower` (`forward_head`); a single-tower variant needs only its own input."""
        for m in self.cfg.modalities:
            if {"video": video, "audio": audio}[m] is None:
                raise ValueError(f"MBT with fusion={self.cfg.fusion!r} needs {m} input")
        return self.forward_head(self.forward_features(video, audio), per_tower)


def pool_tokens(tokens: torch.Tensor, pool: str) -> torch.Tensor:
    """(B, D) features of tokens (B, N, D) by `pool`: the CLS token (row 0) for "cls", else the mean, maximum or sum
    over the N tokens, per channel (scenic's 'gap', 'gmp', 'gsp')."""
    if pool == "cls":
        return tokens[:, 0]
    return TOKEN_POOLS[pool](tokens, dim=1)
