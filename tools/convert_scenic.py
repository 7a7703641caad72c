"""Convert a scenic MBT checkpoint (google-research/scenic `projects/mbt`, flax msgpack) into this project's model
checkpoint, which `python -m mbt.evaluate --checkpoint OUT` reads: the same logits as scenic's model, or an error
naming the scenic config field it cannot convert exactly.

    python tools/convert_scenic.py mbtb32_as-mini_rgb-spec runs/scenic/as-mini.pt --fusion-layer 8

The sizes come from the arrays; the flags give what they do not record (scenic's config fields, see
`mbt.scenic_map.ScenicOptions`), and the checkpoint records them. Exits 0 on success, 1 when the file cannot be
converted (the message names the file and the key or field), 2 on a usage error.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from mbt.model import MBTConfig
from mbt.scenic import ScenicCheckpointError, ScenicOptions, convert, scenic_settings, write_checkpoint
from mbt.scenic_map import SCENIC_IMG_SIZE, SCENIC_MEL_BINS


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("checkpoint", type=Path, help="scenic checkpoint file (flax msgpack: params or train state)")
    parser.add_argument("out", type=Path, help="where to write this project's checkpoint (.pt)")
    parser.add_argument("--fusion-layer", type=int, help="scenic's model.fusion_layer (two towers; released: 8)")
    parser.add_argument(
        "--classifier", choices=("token", "0", "gap", "gmp", "gsp"),
        help="scenic's model.classifier: needed when the file holds no CLS tokens ('token' is read from the arrays)",
    )  # fmt: skip
    parser.add_argument(
        "--test-with-bottlenecks", choices=("true", "false"), default="true",
        help="scenic's model.test_with_bottlenecks (default true, scenic's): false evaluates without the bottleneck",
    )  # fmt: skip
    parser.add_argument("--img-size", type=int, help=f"frame size in pixels (default {SCENIC_IMG_SIZE}, scenic's crop)")
    parser.add_argument("--num-frames", type=int, help="frames per clip (default: from the tubelet grid at img-size)")
    parser.add_argument("--num-mel-bins", type=int, default=SCENIC_MEL_BINS, help="mel bins of the spectrogram")
    parser.add_argument("--logmel-mean", type=float, help="the model's log-mel normalization (scenic AudioSet: 1.102)")
    parser.add_argument("--logmel-std", type=float, help="... and its std (scenic AudioSet: 2.762)")
    args = parser.parse_args(argv)
    options = ScenicOptions(
        fusion_layer=args.fusion_layer, classifier=args.classifier,
        test_with_bottlenecks=args.test_with_bottlenecks == "true", img_size=args.img_size,
        num_frames=args.num_frames, num_mel_bins=args.num_mel_bins, logmel_mean=args.logmel_mean,
        logmel_std=args.logmel_std,
    )  # fmt: skip
    try:
        checkpoint = convert(args.checkpoint, options)
        out = write_checkpoint(checkpoint, args.out)
    except (ScenicCheckpointError, OSError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 1
    model = checkpoint["config"]["model"]
    print(f"{args.checkpoint} -> {out}: {', '.join(f'{k}={v}' for k, v in model.items())}")
    source = checkpoint["converted_from_scenic"]
    if source["told"]:
        print(f"not in the file, as told (recorded): {scenic_settings(MBTConfig(**model), source['told'])}")
    if source["unused"]:
        print(f"left out, never used by scenic's model: {', '.join(source['unused'])}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
