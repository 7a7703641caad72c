"""Generate the synthetic demo dataset (AudioSet layout) with ffmpeg: `tools/make_demo_data.py --out DIR`."""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

from experiments.demo_data import make_demo_dataset


def _size(text: str) -> tuple[int, int]:
    """Parse ``WIDTHxHEIGHT``."""
    try:
        width, height = (int(part) for part in text.lower().split("x"))
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected WIDTHxHEIGHT such as 160x120, got {text!r}") from None
    return width, height


def main(argv: list[str] | None = None) -> int:
    """Run the generator; returns the exit status (0 on success, 1 with a message on stderr on error)."""
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--out", type=Path, required=True, help="output folder (created; reused if it exists)")
    parser.add_argument("--clips", type=int, default=64, help="number of clips, train + eval (default 64)")
    parser.add_argument("--seconds", type=float, default=10.0, help="length of each clip (default 10)")
    parser.add_argument("--eval-fraction", type=float, default=0.25, help="share of eval clips (default 0.25)")
    parser.add_argument("--seed", type=int, default=0, help="seed of YTIDs and labels (default 0)")
    parser.add_argument("--size", type=_size, default=(160, 120), help="frame size WIDTHxHEIGHT (default 160x120)")
    parser.add_argument("--workers", type=int, default=None, help="parallel ffmpeg processes (default: all cores)")
    args = parser.parse_args(argv)

    start = time.perf_counter()
    try:
        dataset = make_demo_dataset(
            args.out,
            clips=args.clips,
            seconds=args.seconds,
            eval_fraction=args.eval_fraction,
            seed=args.seed,
            size=args.size,
            workers=args.workers,
        )
    except (ValueError, RuntimeError, OSError) as error:  # OSError: a full disk (shards.atomic.DiskFullError)
        print(f"{parser.prog}: error: {error}", file=sys.stderr)
        return 1
    print(
        f"{len(dataset.clips)} clips in {dataset.videos_dir} ({dataset.num_generated} rendered now) "
        f"in {time.perf_counter() - start:.1f} s; CSVs: {dataset.class_labels_csv.name}, "
        f"{dataset.train_csv.name}, {dataset.eval_csv.name}"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
