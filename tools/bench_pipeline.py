"""Benchmark the loaders against the JPEG decode bound and a naive on-the-fly ffmpeg loader, in one run.

On the same shards and the same number of cores (--cores, default all), in training mode at --batch-size:
  bound      decoding the same JPEG frames with torchvision.io.decode_jpeg and nothing else (bytes preloaded),
             one process per core: no loader can beat it on CPU;
  torch      the PyTorch loader (pipelines.torch_loader), --cores workers, after its first batch: float32
             normalized video as the contract says, on the CPU (median of --rounds runs, alternating with stream);
  torch_u8   its workers alone: uint8 video, before the normalization a GPU consumer does on the GPU;
  stream     the PyTorch loader over the same shards as `pipe:cat` URLs (streamed front to back through a
             shuffle buffer, no index), --cores workers: what streaming from object storage costs on top;
  torch_gpu  the PyTorch loader delivering to the GPU (uint8 copied from pinned memory, normalized there);
  dali_cpu   the DALI loader on CPU (--cores threads), when nvidia-dali is installed;
  dali_gpu   the DALI loader on the GPU, when one is present;
  naive      what on-the-fly video datasets do: every clip's mp4 decoded by ffmpeg when it is loaded
             (same frames, log-mel, augmentation), --cores workers;
  torch_plain / perfile  the PyTorch loader without colour augmentation against the per-file baseline
             (`bench.perfile`: CAV-MAE's and AST's way: per-file JPEG frames through PIL and torchvision's
             transforms, a wav with kaldi fbank per sample), the same frames and output tensors, --cores workers each,
             alternating over --rounds (median): torch_vs_perfile = clips/s ratio (goal >= 3);
  first_batch_s  seconds from building the torch loader to its first batch.
Each loader's CPU ms per clip (its process and workers, `bench.loader`) is printed beside its clips/s.
Without --shards it makes its own: clips of natural content (a window panning over scikit-learn's sample
photographs, 10 s, 480x360 25 fps, H.264 + AAC) sharded by the offline stage, kept in --data between runs.
Goals on CPU: torch_vs_bound >= 0.8, torch_vs_naive >= 10, torch_vs_perfile >= 3, first_batch_s <= 3. The last line
is name=value pairs. The measurements are `bench.pipeline`'s.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
from pathlib import Path

import numpy as np

from bench.pipeline import compare_loaders, make_shards, ratios
from pipelines.sources import SplitIndex

# the last line's format of each figure (default .3f)
FORMATS = {"torch_vs_naive": ".1f", "torch_vs_perfile": ".2f", "torch_vs_perfile_cpu": ".2f", "first_batch_s": ".2f",
           "stream_first_batch_s": ".2f", "torch_clips_per_s": ".1f"}  # fmt: skip


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--shards", type=Path, help="a split folder to read (default: make one in --data)")
    parser.add_argument("--videos", type=Path, help="the videos of --shards, for the naive loader")
    parser.add_argument("--data", type=Path, default=Path(tempfile.gettempdir(), "mbt-bench-pipeline"))
    parser.add_argument("--clips", type=int, default=64, help="clips to generate (default %(default)s)")
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--cores", type=int, default=len(os.sched_getaffinity(0)))
    parser.add_argument("--epochs", type=int, default=10, help="epochs of each loader (default %(default)s)")
    parser.add_argument(
        "--rounds", type=int, default=3, help="alternating runs of torch, stream, torch_plain and perfile (median)"
    )
    parser.add_argument("--no-dali", action="store_true", help="leave the DALI loaders out")
    args = parser.parse_args(argv)

    shards, videos = (args.shards, args.videos) if args.shards else make_shards(args.data, args.clips)
    index = SplitIndex(shards)
    results, cpu_ms = compare_loaders(
        index, shards, videos, args.data / "perfile", args.batch_size, args.cores, args.epochs, args.rounds,
        dali=not args.no_dali,
    )  # fmt: skip

    print(f"clips={len(index)} batch={args.batch_size} cores={args.cores} epochs={args.epochs} shards={shards}")
    for name in ("bound", "torch", "torch_u8", "stream", "torch_gpu", "dali_cpu", "dali_gpu", "naive", "torch_plain",
                 "perfile"):  # fmt: skip
        if name in results:
            cpu = f"  {np.median(cpu_ms[name]):7.2f} CPU ms/clip" if name in cpu_ms else ""
            print(f"{name:>11}: {results[name]:8.1f} clips/s{cpu}")
    print(f"first batch (torch): {results['first_batch_s']:.2f} s, (stream): {results['stream_first_batch_s']:.2f} s")
    print(" ".join(f"{name}={value:{FORMATS.get(name, '.3f')}}" for name, value in ratios(results, cpu_ms).items()))
    return 0


if __name__ == "__main__":
    sys.exit(main())
