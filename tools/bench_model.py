"""Benchmark a training step of MBT (bottleneck fusion) against its two encoders alone, in one run.

On the same inputs, a step is forward + BCE-with-logits loss + backward (the optimizer's update is left out: it
costs the same for MBT as for the two encoders, whose parameters MBT holds). Three models of one size:
  mbt    MBT with bottleneck fusion over video and audio;
  video  the video tower alone (fusion="video");
  audio  the audio tower alone (fusion="audio").
Each round times one step of each model, in an order that rotates from round to round, so that machine drift
hits all three alike; the median step of each model is kept. mbt_vs_encoders = mbt / (video + audio); goal <= 1.05.
Sizes (`mbt.flops.SIZES`): tiny (tests), small (ViT-S towers, 4 frames; the CPU default), base (MBT-B/16; the CUDA
default). Achieved TFLOP/s use the training FLOPs per clip of `mbt.flops.count_flops`; on CUDA MFU is that over the
device's dense bf16 peak (`bench.timing`: known by name, else --peak-tflops). The models and the step are
`bench.model`'s. Imports only torch, timm, einops, mbt/ and bench/, so it runs on a machine that has nothing else
(with PYTHONPATH=.). The last line is name=value pairs.
"""

from __future__ import annotations

import argparse
import sys

import torch

from bench.model import MODELS, mbt_vs_encoders
from bench.timing import device_name, resolve_device_args
from mbt.flops import SIZES, count_flops, describe, size_config

CPU_DEFAULTS = {"size": "small", "batch": 2, "steps": 7, "warmup": 1}  # a few seconds a round on 2 cores
CUDA_DEFAULTS = {"size": "base", "batch": 32, "steps": 20, "warmup": 5}


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--size", choices=list(SIZES), help="model size (default: small on CPU, base on CUDA)")
    parser.add_argument("--batch", type=int, help="clips per step (default: 2 on CPU, 32 on CUDA)")
    parser.add_argument("--steps", type=int, help="timed rounds, one step of each model each (default: 7 CPU, 20 CUDA)")
    parser.add_argument("--warmup", type=int, help="untimed rounds first (default: 1 on CPU, 5 on CUDA)")
    parser.add_argument("--device", choices=("cpu", "cuda"), default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--bf16", action="store_true", help="autocast to bfloat16")
    parser.add_argument("--compile", action="store_true", help="torch.compile each model")
    parser.add_argument("--peak-tflops", type=float, help="dense bf16 peak of the GPU (needed if not known by name)")
    args = parser.parse_args(argv)
    return resolve_device_args(parser, args, CPU_DEFAULTS, CUDA_DEFAULTS)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    device = torch.device(args.device)
    cfg = size_config(args.size)
    print(
        f"MBT size={args.size}: {describe(cfg)}; batch={args.batch} steps={args.steps} warmup={args.warmup} "
        f"bf16={args.bf16} compile={args.compile} on {device_name(device)}"
    )
    result = mbt_vs_encoders(cfg, args.batch, args.steps, args.warmup, device, args.bf16, args.compile)
    for model in MODELS:
        ms = result[f"{model}_ms"]
        print(f"{model:<6} {ms:10.1f} ms/step  {args.batch * 1e3 / ms:8.2f} clips/s")
    verdict = "met" if result["mbt_vs_encoders"] <= 1.05 else "NOT met"
    print(f"mbt / (video + audio) = {result['mbt_vs_encoders']:.3f} (goal <= 1.05: {verdict})")
    clips_s = args.batch * 1e3 / result["mbt_ms"]
    tflops = count_flops(cfg)["train_gflops"] * clips_s / 1e3
    pairs = {**result, "clips_s": clips_s, "tflops": tflops}
    line = f"MBT step {result['mbt_ms']:.1f} ms, {clips_s:.2f} clips/s, {tflops:.3g} TFLOP/s achieved"
    if args.peak_tflops:
        pairs["mfu"] = tflops / args.peak_tflops
        line += f", MFU {pairs['mfu']:.1%} of {args.peak_tflops:g} TFLOP/s dense bf16"
    print(line)
    print(" ".join(f"{k}={v:.4g}" for k, v in {"mbt_vs_encoders": pairs.pop("mbt_vs_encoders"), **pairs}.items()))
    return 0


if __name__ == "__main__":
    sys.exit(main())
