"""Parameters and FLOPs of the MBT variants (bottleneck, cross, late, video, audio) at one size, MBT-B by default.

FLOPs are counted by `torch.utils.flop_counter.FlopCounterMode` (a multiply-add counts as 2 FLOPs) on the `meta`
device: shapes only, so MBT-B costs no real compute. On meta, `scaled_dot_product_attention` runs its math path
and the attention matmuls (QK^T, AV) are counted as `bmm`; on CPU the counter has no formula for SDPA's fused CPU
kernel and leaves them out (about 97 of MBT-B's 434 forward GFLOPs). Training FLOPs are counted on a real backward
pass on meta (forward + backward of a summed-logits loss), not assumed to be 3x forward.
The last line is name=value pairs.
"""

from __future__ import annotations

import argparse
import sys
from typing import Any

import torch
from torch.utils.flop_counter import FlopCounterMode

from mbt.model import FUSIONS, MBT, MBTConfig

# Sizes shared with tools/bench_model.py; fusion_layer sits at 2/3 of the depth as in MBT-B (8 of 12).
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
    """The sizes of `cfg` in one line."""
    return (
        f"D={cfg.embed_dim} depth={cfg.depth} heads={cfg.num_heads} frames={cfg.num_frames} of {cfg.img_size}² "
        f"audio {cfg.audio_frames}x{cfg.num_mel_bins} Lf={cfg.fusion_layer} B={cfg.num_bottlenecks} "
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
    model = MBT(cfg).to("meta")  # built on CPU: the towers' init reads a tensor, which meta cannot
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


def report(cfgs: list[MBTConfig]) -> list[dict[str, Any]]:
    """`count_flops` of each config, in order."""
    return [count_flops(cfg) for cfg in cfgs]


def comparisons(rows: list[dict[str, Any]]) -> dict[str, float]:
    """Bottleneck fusion's forward FLOPs relative to vanilla cross-attention and to late fusion (where present)."""
    gflops = {row["fusion"]: row["forward_gflops"] for row in rows}
    out = {}
    if "bottleneck" in gflops and "cross" in gflops:
        out["bottleneck_vs_cross"] = gflops["bottleneck"] / gflops["cross"]
    if "bottleneck" in gflops and "late" in gflops:
        out["bottleneck_vs_late"] = gflops["bottleneck"] / gflops["late"]
    return out


COLUMNS = (
    ("variant", "fusion", "{}"),
    ("params (M)", "params_m", "{:.2f}"),
    ("fwd GFLOP/clip", "forward_gflops", "{:.5g}"),
    ("of which attention", "attention_gflops", "{:.5g}"),
    ("train GFLOP/clip", "train_gflops", "{:.5g}"),
    ("train/fwd", "backward_ratio", "{:.3f}"),
)


def format_table(rows: list[dict[str, Any]], markdown: bool = False) -> str:
    """The rows as an aligned text table, or as a markdown table."""
    header = [title for title, _, _ in COLUMNS]
    cells = [[fmt.format(row[key]) for _, key, fmt in COLUMNS] for row in rows]
    if markdown:
        lines = ["| " + " | ".join(header) + " |", "|" + "|".join(["---"] + ["---:"] * (len(header) - 1)) + "|"]
        return "\n".join(lines + ["| " + " | ".join(r) + " |" for r in cells])
    widths = [max(len(c) for c in column) for column in zip(header, *cells, strict=True)]
    lines = []
    for r in [header, *cells]:
        lines.append(
            "  ".join(c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(r, widths, strict=True)))
        )
    return "\n".join(lines)


def summary_line(rows: list[dict[str, Any]]) -> str:
    """The name=value line: each variant's forward GFLOPs, the comparisons, and MBT's parameters and training FLOPs."""
    by_fusion = {row["fusion"]: row for row in rows}
    pairs = {f"{row['fusion']}_gflops": f"{row['forward_gflops']:.5g}" for row in rows}
    pairs |= {name: f"{value:.4f}" for name, value in comparisons(rows).items()}
    main = by_fusion.get("bottleneck", rows[0])
    pairs |= {"train_gflops": f"{main['train_gflops']:.5g}", "params_m": f"{main['params_m']:.2f}"}
    return " ".join(f"{k}={v}" for k, v in pairs.items())


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--size", choices=list(SIZES), default="base", help="model size (default: base = MBT-B/16)")
    parser.add_argument("--num-classes", type=int, default=527, help="classes (default: 527, AudioSet)")
    parser.add_argument("--fusion-layer", type=int, help="first fused layer Lf (default: the size's, 8 for base)")
    parser.add_argument("--num-bottlenecks", type=int, default=4, help="bottleneck tokens B (default: 4)")
    parser.add_argument("--frames", type=int, help="video frames per clip (default: the size's, 8 for base)")
    parser.add_argument("--markdown", action="store_true", help="print the table in markdown")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    base = size_config(
        args.size,
        num_classes=args.num_classes,
        fusion_layer=args.fusion_layer,
        num_bottlenecks=args.num_bottlenecks,
        num_frames=args.frames,
    )
    rows = report([base.replace(fusion=fusion) for fusion in FUSIONS])
    print(
        f"MBT size={args.size}: {describe(base)}; FLOPs per clip, FlopCounterMode on meta (MAC = 2 FLOPs), "
        "training = forward + backward, both counted"
    )
    print(format_table(rows, markdown=args.markdown))
    by_fusion = {row["fusion"]: row["forward_gflops"] for row in rows}
    ratios = comparisons(rows)
    print(
        f"bottleneck vs cross fusion: {by_fusion['bottleneck']:.5g} vs {by_fusion['cross']:.5g} GFLOP "
        f"= {ratios['bottleneck_vs_cross']:.3f}x ({1 - ratios['bottleneck_vs_cross']:.1%} less)"
    )
    print(
        f"bottleneck vs late fusion: {by_fusion['bottleneck']:.5g} vs {by_fusion['late']:.5g} GFLOP "
        f"= {ratios['bottleneck_vs_late']:.4f}x (+{by_fusion['bottleneck'] - by_fusion['late']:.3g} GFLOP); "
        f"late = video + audio: {by_fusion['late']:.5g} vs {by_fusion['video'] + by_fusion['audio']:.5g}"
    )
    print(summary_line(rows))
    return 0


if __name__ == "__main__":
    sys.exit(main())
