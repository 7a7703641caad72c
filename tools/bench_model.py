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
device's dense bf16 peak (`bench.timing`: known by name, else --peak-tflops). Imports only torch, timm, einops and
mbt/, so it runs on a machine that has nothing else (with PYTHONPATH=.). The last line is name=value pairs.
"""

from __future__ import annotations

import argparse
import statistics
import sys
from contextlib import nullcontext
from functools import partial

import torch
import torch._inductor.config as inductor_config
from torch import nn

from bench.timing import device_name, resolve_device_args, time_rounds
from mbt.flops import SIZES, count_flops, describe, example_inputs, size_config
from mbt.model import MBT, MBTConfig

MODELS = ("mbt", "video", "audio")
CPU_DEFAULTS = {"size": "small", "batch": 2, "steps": 7, "warmup": 1}  # a few seconds a round on 2 cores
CUDA_DEFAULTS = {"size": "base", "batch": 32, "steps": 20, "warmup": 5}


def build_models(cfg: MBTConfig, device: torch.device, compile_models: bool = False) -> dict[str, nn.Module]:
    """{mbt, video, audio}: MBT with bottleneck fusion and its two single-tower variants, in training mode (each
    wrapped by torch.compile with `compile_models`)."""
    if compile_models:
        # inductor 2.11's coalescing analysis asserts in solve_for_tiling on MBT (cf. pytorch/pytorch#191603)
        inductor_config.triton.coalesce_tiling_analysis = False
    fusions = {"mbt": "bottleneck", "video": "video", "audio": "audio"}
    models = {}
    for name, fusion in fusions.items():
        model = MBT(cfg.replace(fusion=fusion)).to(device).train()
        models[name] = torch.compile(model) if compile_models else model
    return models


def train_step(model: nn.Module, inputs: dict[str, torch.Tensor], labels: torch.Tensor, bf16: bool) -> None:
    """Forward, BCE-with-logits loss against `labels` (B, num_classes), backward; gradients freed first."""
    model.zero_grad(set_to_none=True)
    device_type = labels.device.type
    with torch.autocast(device_type, dtype=torch.bfloat16) if bf16 else nullcontext():
        logits = model(**inputs)
    nn.functional.binary_cross_entropy_with_logits(logits.float(), labels).backward()


def bench(
    cfg: MBTConfig,
    batch: int,
    steps: int,
    warmup: int,
    device: torch.device,
    bf16: bool = False,
    compile_models: bool = False,
) -> dict[str, float]:
    """Median milliseconds of a training step of each of `MODELS` at `batch` clips, over `steps` interleaved
    rounds after `warmup` untimed ones; with mbt_vs_encoders = mbt / (video + audio)."""
    models = build_models(cfg, device, compile_models)
    inputs = example_inputs(cfg, batch, device)
    labels = (torch.rand(batch, cfg.num_classes, device=device) < 0.05).float()
    model_inputs = {"mbt": inputs, "video": {"video": inputs["video"]}, "audio": {"audio": inputs["audio"]}}
    calls = {name: partial(train_step, models[name], model_inputs[name], labels, bf16) for name in MODELS}
    times = time_rounds(calls, steps, warmup, rotate=True, device=device)
    result = {f"{name}_ms": statistics.median(times[name]) * 1e3 for name in MODELS}
    result["mbt_vs_encoders"] = result["mbt_ms"] / (result["video_ms"] + result["audio_ms"])
    return result


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
    result = bench(cfg, args.batch, args.steps, args.warmup, device, args.bf16, args.compile)
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
