"""The towers' transformer blocks: timm's ViT `Block`, with scenic's stochastic depth.

scenic's EncoderBlock (scenic/projects/mbt/model.py, `get_drop_pattern` and its two uses) drops each residual branch
of each example with probability p, independently for the attention and the MLP branch, and leaves a kept branch
as it is: x + (1 - b) f(x), b ~ Bernoulli(p). timm's DropPath divides a kept branch by 1 - p, so that the expected
output in training is inference's x + f(x); scenic's is x + (1 - p) f(x). `drop_path_scale` chooses (False: scenic's).
Layer l of L drops with p = l / max(L - 1, 1) · drop_path_rate (scenic's Encoder), in either mode.
"""

from __future__ import annotations

from functools import partial
from typing import TYPE_CHECKING

from timm.layers import DropPath
from timm.models.vision_transformer import Block
from torch import nn

if TYPE_CHECKING:
    from mbt.model import MBTConfig

GELUS = {"exact": "none", "tanh": "tanh"}  # timm's nn.GELU(); flax's nn.gelu (approximate=True), scenic's


def drop_path_rates(rate: float, depth: int) -> list[float]:
    """Each layer's probability of dropping a residual branch: l / max(depth - 1, 1) · rate for l = 0..depth-1."""
    return [layer / max(depth - 1, 1) * rate for layer in range(depth)]


def encoder_blocks(cfg: MBTConfig) -> nn.ModuleList:
    """One tower's `cfg.depth` timm Blocks of width `cfg.embed_dim` (pre-norm, LayerNorm eps 1e-6, qkv bias, the GELU
    of `cfg.gelu`), each layer's residual branches dropped at its `drop_path_rates` rate, kept branches scaled by
    1 / (1 - p) only with `cfg.drop_path_scale`."""
    norm = partial(nn.LayerNorm, eps=1e-6)
    act = partial(nn.GELU, approximate=GELUS[cfg.gelu])
    blocks = nn.ModuleList()
    for rate in drop_path_rates(cfg.drop_path_rate, cfg.depth):
        block = Block(cfg.embed_dim, cfg.num_heads, cfg.mlp_ratio, qkv_bias=True, proj_drop=cfg.drop_rate,
                      attn_drop=cfg.attn_drop_rate, norm_layer=norm, act_layer=act)  # fmt: skip
        if rate > 0:
            block.drop_path1 = DropPath(rate, scale_by_keep=cfg.drop_path_scale)
            block.drop_path2 = DropPath(rate, scale_by_keep=cfg.drop_path_scale)
        blocks.append(block)
    return blocks
