"""Convert a scenic MBT checkpoint (google-research/scenic `projects/mbt`, flax msgpack) into this project's model
checkpoint, which `python -m mbt.evaluate --checkpoint OUT` reads: the same logits as scenic's model.

    python tools/convert_scenic.py mbtb32_as-mini_rgb-spec runs/scenic/as-mini.pt --fusion-layer 8

The sizes come from the arrays; the flags give what they do not record (see `mbt.scenic.ScenicOptions`). Exits 0 on
success, 1 when the file cannot be converted (the message names the file and the key), 2 on a usage error.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from mbt.scenic import ScenicCheckpointError, ScenicOptions, convert, write_checkpoint


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("checkpoint", type=Path, help="scenic checkpoint file (flax msgpack: params or train state)")
    parser.add_argument("out", type=Path, help="where to write this project's checkpoint (.pt)")
    parser.add_argument("--fusion-layer", type=int, help="scenic's model.fusion_layer (two towers; released: 8)")
    parser.add_argument("--img-size", type=int, help="frame size in pixels (default: 224, scenic's crop_size)")
    parser.add_argument("--num-frames", type=int, help="frames per clip (default: from the tubelet grid at img-size)")
    parser.add_argument("--num-mel-bins", type=int, default=128, help="mel bins of the spectrogram (default 128)")
    parser.add_argument("--logmel-mean", type=float, help="the model's log-mel normalization (scenic AudioSet: 1.102)")
    parser.add_argument("--logmel-std", type=float, help="... and its std (scenic AudioSet: 2.762)")
    args = parser.parse_args(argv)
    options = ScenicOptions(
        fusion_layer=args.fusion_layer, img_size=args.img_size, num_frames=args.num_frames,
        num_mel_bins=args.num_mel_bins, logmel_mean=args.logmel_mean, logmel_std=args.logmel_std,
    )  # fmt: skip
    try:
        checkpoint = convert(args.checkpoint, options)
        out = write_checkpoint(checkpoint, args.out)
    except (ScenicCheckpointError, OSError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 1
    model = checkpoint["config"]["model"]
    print(f"{args.checkpoint} -> {out}: {', '.join(f'{k}={v}' for k, v in model.items())}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
