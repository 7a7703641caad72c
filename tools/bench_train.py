"""Benchmark training fed by the real loader against training fed by synthetic tensors already in memory, in one run.

Both feeds drive the same model with the training step `mbt.train` runs (`mbt.step.TrainStep`) at the same batch
size: mixup, label-smoothed targets, forward (under bf16 autocast on CUDA) to each tower's logits, scenic's sigmoid
(multi-label shards) or softmax cross-entropy per tower, averaged, backward accumulated over --grad-accum
micro-batches, gradient clipping, the optimizer and schedule steps and the loss read back, with the MBT recipe's
values (`mbt.config.TrainConfig`: SGD with momentum).
  synthetic  one batch of the loaders' contract (shapes and dtypes of `pipelines.config`) made once on the device
             and reused at every micro-batch: the model's own speed;
  real       `pipelines.build_loader` over --shards in training mode (--loader, --workers, augmentation at the
             model's crop, frames and log-mel length), iterated across epochs; its workers are started and its
             first batch is taken before any timing.
After --warmup untimed steps of each feed, --blocks rounds each time --steps steps of the synthetic feed, then of the
real one, so that drift of the machine hits both (`bench.train.loader_vs_synthetic` over `bench.timing.time_rounds`);
each feed's rate is its total clips over its total time (each step timed until its work on the device is done, so
that a step's time holds its wait for its batches). loader_vs_synthetic = real clips/s / synthetic clips/s; goal
>= 0.95 (the loader never starves the model).

Model: --size from `mbt.flops.SIZES` (widths, depth, heads, fusion layer) over a real run's input from the shards:
their classes, all their stored frames (or --frames), crops of 224 px (or --crop) and 800 log-mel frames (or
--audio-frames, cut to what the shards store), checked against the shards as training checks them (`mbt.fits`).
CPU default: ViT-S/16 towers (size small: D=384, 12 layers, Lf=8) over 8 frames of 224² and 800 log-mel frames,
batch 2. A real run is bound by its model: the GPU takes clips as fast as it computes while the loader's workers
have the CPU cores to themselves. Here the model and the loader share 2 cores; this model takes about 4.5 s a step
on the idle machine (more under other processes' load), far above the 0.5 s under which timer noise and epoch
boundaries would weigh on the ratio, while the loader needs about 15 ms of one core per clip: the model is the
bottleneck, as in a real run, and the ratio shows what the loader still costs it (the main process's share of each
batch and the workers' share of the cores). A tiny model on the same input (0.26 s a step at batch 4) measures
mostly two processes fighting over 2 cores, which a GPU run does not have. Batch 2, not 4: the loader's work per
clip relative to the model's does not depend on the batch, and twice the steps in the same time interleave the
feeds twice as finely against the bursts of other processes' load (about 4 minutes in all). --size tiny is for
tests. CUDA default: MBT-B/16 (size base) at batch 32, with MFU: training FLOPs per clip from
`mbt.flops.count_flops` over the device's dense bf16 peak (`bench.timing`: known by name, else --peak-tflops).
The last line is name=value pairs; loader_vs_synthetic_median is the same ratio from each feed's median step, a
check against bursts of load from other processes on a shared machine.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

import torch

from bench.timing import device_name, resolve_device_args
from bench.train import (
    FEEDS,
    add_mfu,
    loader_vs_synthetic,
    model_config,
    recipe_augment,
    recipe_train_step,
    start_feeds,
    synthetic_batch,
)
from mbt.fits import fits
from mbt.flops import SIZES, count_flops, describe
from pipelines import build_loader, open_split, resolve_loader
from shards.layout import split_dir

REPO = Path(__file__).resolve().parents[1]
DEFAULT_SHARDS = REPO / split_dir("demo", "train")
CPU_DEFAULTS = {"size": "small", "batch": 2, "steps": 1, "warmup": 1, "blocks": 24}  # about 4 minutes on 2 cores
CUDA_DEFAULTS = {"size": "base", "batch": 32, "steps": 10, "warmup": 5, "blocks": 3}


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--shards", type=Path, help=f"a training split (default: {DEFAULT_SHARDS.relative_to(REPO)})")
    parser.add_argument("--size", choices=list(SIZES), help="model size (default: small on CPU, base on CUDA)")
    parser.add_argument("--frames", type=int, help="video frames per clip (default: all the shards store)")
    parser.add_argument("--crop", type=int, help="crop in pixels (default: 224)")
    parser.add_argument("--audio-frames", type=int, help="log-mel frames (default: 800, or all the shards store)")
    parser.add_argument("--batch", type=int, help="clips per micro-batch (default: 2 on CPU, 32 on CUDA)")
    parser.add_argument("--grad-accum", type=int, default=1, help="micro-batches per optimizer step (default: 1)")
    parser.add_argument("--steps", type=int, help="timed steps per feed per block (default: 1 on CPU, 10 on CUDA)")
    parser.add_argument("--warmup", type=int, help="untimed steps per feed first (default: 1 on CPU, 5 on CUDA)")
    parser.add_argument("--blocks", type=int, help="rounds of both feeds (default: 24 on CPU, 3 on CUDA)")
    parser.add_argument("--loader", choices=("auto", "dali", "torch"), default="auto", help="(default: auto)")
    parser.add_argument("--workers", type=int, help="loader workers or DALI threads (default: cores - 1, >= 1)")
    parser.add_argument("--device", choices=("cpu", "cuda"), default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--peak-tflops", type=float, help="dense bf16 peak of the GPU (needed if not known by name)")
    args = parser.parse_args(argv)
    resolve_device_args(parser, args, CPU_DEFAULTS, CUDA_DEFAULTS)
    if args.shards is None:
        if not (DEFAULT_SHARDS / "manifest.json").is_file():
            parser.error(f"no shards in {DEFAULT_SHARDS}: run `make demo-shards` first, or give --shards")
        args.shards = DEFAULT_SHARDS
    if args.workers is None:
        args.workers = max(len(os.sched_getaffinity(0)) - 1, 1)
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    device = torch.device(args.device)
    split = open_split(args.shards)
    manifest = split.manifest
    model_cfg = model_config(args.size, manifest, args.frames, args.crop, args.audio_frames)
    augment = recipe_augment(model_cfg)
    if problems := fits(model_cfg, augment, manifest, f"the shards in {args.shards}"):
        print(
            "error: the model does not fit the shards (--frames, --audio-frames): " + "; ".join(problems),
            file=sys.stderr,
        )
        return 2
    loader = build_loader(
        split, train=True, batch_size=args.batch, loader=args.loader, num_workers=args.workers, augment=augment,
        device=device,
    )  # fmt: skip
    train_step = recipe_train_step(
        model_cfg, augment, args.batch, manifest.multi_label, len(loader), device, grad_accum=args.grad_accum
    )
    feeds = start_feeds(loader, synthetic_batch(model_cfg, args.batch, manifest.multi_label, device))
    print(
        f"MBT size={args.size}: {describe(model_cfg)}; batch={args.batch}x{args.grad_accum} warmup={args.warmup} "
        f"steps={args.steps} blocks={args.blocks} on {device_name(device)}"
    )
    print(
        f"real feed: {resolve_loader(args.loader)} loader, {args.workers} workers, {manifest.num_samples} clips "
        f"({len(loader)} batches per epoch) from {args.shards}"
    )
    result = loader_vs_synthetic(train_step, feeds, args.steps, args.warmup, args.blocks, device)

    train_gflops = count_flops(model_cfg)["train_gflops"]
    if args.peak_tflops:
        add_mfu(result, train_gflops, args.peak_tflops)
    for feed in FEEDS:
        clips_s = result[f"{feed}_clips_s"]
        line = f"{feed:<9} {clips_s:8.2f} clips/s  median step {result[f'{feed}_step_s']:.3f} s  "
        line += f"{clips_s * train_gflops / 1e3:.3g} TFLOP/s"
        if args.peak_tflops:
            line += f"  MFU {result[f'{feed}_mfu']:.1%} of {args.peak_tflops:g} dense bf16"
        print(line)
    verdict = "met" if result["loader_vs_synthetic"] >= 0.95 else "NOT met"
    print(f"real / synthetic = {result['loader_vs_synthetic']:.3f} (goal >= 0.95: {verdict})")
    order = ["loader_vs_synthetic", "loader_vs_synthetic_median", "real_clips_s", "synthetic_clips_s"]
    order += ["real_step_s", "synthetic_step_s"]
    order += [f"{feed}_mfu" for feed in FEEDS if f"{feed}_mfu" in result]
    print(" ".join(f"{key}={result[key]:.4g}" for key in order))
    return 0


if __name__ == "__main__":
    sys.exit(main())
