"""Named MBT sizes, random inputs of the loaders' contract, and parameters and FLOPs per clip, for the model tools
(`tools/model_report.py`, `tools/bench_model.py`, `tools/bench_train.py`).

FLOPs are counted by `torch.utils.flop_counter.FlopCounterMode` (a multiply-add counts as 2 FLOPs) on the `meta`
device: shapes only, so MBT-B costs no real compute. On meta, `scaled_dot_product_attention` runs its math path
and the attention matmuls (QK^T, AV) are counted as `bmm`; on CPU the counter has no formula for SDPA's fused CPU
kernel and leaves them out (about 97 of MBT-B's 434 forward GFLOPs). Training FLOPs are counted on a real backward
pass on meta (forward + backward of a summed-logits loss), not assumed to be 3x forward. Imports only torch, timm
and `mbt.model`.
"""

from __future__ import annotations

from typing import Any

import torch
from torch.utils.flop_counter import FlopCounterMode

from mbt.model import MBT, MBTConfig

# fusion_layer sits at 2/3 of the depth as in MBT-B (8 of 12).
SIZES: dict[str, dict[str, Any]] = {
    "tiny": dict(embed_dim=64, depth=3, num_heads=2, fusion_layer=2, num_frames=2, img_size=64, audio_frames=128),
    "small": dict(embed_dim=384, depth=12, num_heads=6, fusion_layer=8, num_frames=4),
    "base": {},  # MBTConfig's defaults: MBT-B/16
}


def size_config(size: str, **overrides: Any) -> MBTConfig:
    """The MBTConfig of a named size (`SIZES`), with `overrides` (those that are None are ignored) applied."""
    if size not in SIZES:
        raise ValueError(f"size must be one of {', '.join(SIZES)}, got {size!r}")
    changes = {**SIZES[size], **{k: v for k, v in overrides.items() if v is not None}}
    return MBTConfig(**changes)


def describe(cfg: MBTConfig) -> str:
    """The sizes of `cfg` in one line; B is num_bottlenecks, "+1" when the model holds scenic's one more token."""
    extra = "+1" * (cfg.bottleneck_tokens - cfg.num_bottlenecks)
    return (
        f"D={cfg.embed_dim} depth={cfg.depth} heads={cfg.num_heads} frames={cfg.num_frames} of {cfg.img_size}² "
        f"audio {cfg.audio_frames}x{cfg.num_mel_bins} Lf={cfg.fusion_layer} B={cfg.num_bottlenecks}{extra} "
        f"classes={cfg.num_classes}"
    )


def example_inputs(cfg: MBTConfig, batch: int, device: str | torch.device = "cpu") -> dict[str, torch.Tensor]:
    """Random inputs of the loaders' contract for the towers of `cfg`: video (B, F, 3, H, W), audio (B, 1, T, mel)."""
    shapes = {
        "video": (batch, cfg.num_frames, 3, cfg.img_size, cfg.img_size),
        "audio": (batch, 1, cfg.audio_frames, cfg.num_mel_bins),
    }
    return {m: torch.randn(shapes[m], device=device) for m in cfg.modalities}


def count_flops(cfg: MBTConfig, batch: int = 1) -> dict[str, Any]:
    """Parameters and FLOPs per clip of MBT(cfg), counted on the meta device at `batch` clips.

    Returns {fusion, params_m, forward_gflops, attention_gflops (the forward's QK^T and AV matmuls),
    train_gflops (forward + backward, both counted), backward_ratio (train / forward)}.
    """
    with torch.device("meta"):  # no memory, whatever the sizes
        model = MBT(cfg)
    inputs = example_inputs(cfg, batch, "meta")
    model.eval()
    forward = FlopCounterMode(display=False)
    with torch.no_grad(), forward:
        model(**inputs)
    model.train()
    train = FlopCounterMode(display=False)
    with train:
        model(**inputs).sum().backward()
    ops = {str(op): flops for op, flops in forward.get_flop_counts()["Global"].items()}
    forward_gflops = forward.get_total_flops() / batch / 1e9
    train_gflops = train.get_total_flops() / batch / 1e9
    return {
        "fusion": cfg.fusion,
        "params_m": sum(p.numel() for p in model.parameters()) / 1e6,
        "forward_gflops": forward_gflops,
        "attention_gflops": ops.get("aten.bmm", 0) / batch / 1e9,
        "train_gflops": train_gflops,
        "backward_ratio": train_gflops / forward_gflops,
    }
