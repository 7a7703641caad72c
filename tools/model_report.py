"""Parameters and FLOPs of the MBT variants (bottleneck, cross, late, video, audio) at one size, MBT-B by default.

FLOPs are counted by `mbt.flops.count_flops` for each variant (`bench.model.variant_flops`):
`torch.utils.flop_counter.FlopCounterMode` on the `meta` device (a multiply-add counts as 2 FLOPs; shapes only, so
MBT-B costs no real compute), attention matmuls included, training FLOPs counted on a real backward pass, not
assumed to be 3x forward. Sizes are `mbt.flops.SIZES`.
The last line is name=value pairs.
"""

from __future__ import annotations

import argparse
import sys
from typing import Any

from bench.model import fusion_comparisons, variant_flops
from mbt.flops import SIZES, describe, size_config

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
    pairs |= {name: f"{value:.4f}" for name, value in fusion_comparisons(rows).items()}
    main = by_fusion.get("bottleneck", rows[0])
    pairs |= {"train_gflops": f"{main['train_gflops']:.5g}", "params_m": f"{main['params_m']:.2f}"}
    return " ".join(f"{k}={v}" for k, v in pairs.items())


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--size", choices=list(SIZES), default="base", help="model size (default: base = MBT-B/16)")
    parser.add_argument("--num-classes", type=int, default=527, help="classes (default: 527, AudioSet)")
    parser.add_argument("--fusion-layer", type=int, help="first fused layer Lf (default: the size's, 8 for base)")
    parser.add_argument(
        "--num-bottlenecks", type=int, default=4, help="num_bottlenecks B (default: 4; the CLS pool adds scenic's one)"
    )
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
    rows = variant_flops(base)
    print(
        f"MBT size={args.size}: {describe(base)}; FLOPs per clip, FlopCounterMode on meta (MAC = 2 FLOPs), "
        "training = forward + backward, both counted"
    )
    print(format_table(rows, markdown=args.markdown))
    by_fusion = {row["fusion"]: row["forward_gflops"] for row in rows}
    ratios = fusion_comparisons(rows)
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
