"""The model alone (`tools/model_report.py`, `tools/bench_model.py`, `tools/gpu_check.py`): FLOPs of each fusion
variant, and a training step of MBT timed against its two encoders. Imports only torch and mbt's model and FLOP
counter (not `pipelines`), so that `tools/bench_model.py` runs where nothing else is installed."""

from __future__ import annotations

import statistics
from contextlib import nullcontext
from functools import partial
from typing import Any

import torch
import torch._inductor.config as inductor_config
from torch import nn

from bench.timing import time_rounds
from mbt.flops import count_flops, example_inputs
from mbt.model import FUSIONS, MBT, MBTConfig

MODELS = ("mbt", "video", "audio")


def variant_flops(base: MBTConfig) -> list[dict[str, Any]]:
    """`count_flops` of `base` under each fusion of `mbt.model.FUSIONS`, in that order."""
    return [count_flops(base.replace(fusion=fusion)) for fusion in FUSIONS]


def fusion_comparisons(rows: list[dict[str, Any]]) -> dict[str, float]:
    """Bottleneck fusion's forward FLOPs relative to vanilla cross-attention and to late fusion (where present)."""
    gflops = {row["fusion"]: row["forward_gflops"] for row in rows}
    out = {}
    if "bottleneck" in gflops and "cross" in gflops:
        out["bottleneck_vs_cross"] = gflops["bottleneck"] / gflops["cross"]
    if "bottleneck" in gflops and "late" in gflops:
        out["bottleneck_vs_late"] = gflops["bottleneck"] / gflops["late"]
    return out


def avoid_inductor_tiling_crash() -> None:
    """Turn off inductor's coalescing analysis before MBT is compiled: in torch 2.11 it asserts in solve_for_tiling
    on this model (cf. pytorch/pytorch#191603)."""
    inductor_config.triton.coalesce_tiling_analysis = False


def multi_hot_labels(batch: int, num_classes: int, device: torch.device) -> torch.Tensor:
    """Random multi-hot targets, float32 (batch, num_classes), about 5% of the classes on."""
    return (torch.rand(batch, num_classes, device=device) < 0.05).float()


def build_models(cfg: MBTConfig, device: torch.device, compile_models: bool = False) -> dict[str, nn.Module]:
    """{mbt, video, audio}: MBT with bottleneck fusion and its two single-tower variants, in training mode (each
    wrapped by torch.compile with `compile_models`)."""
    if compile_models:
        avoid_inductor_tiling_crash()
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


def mbt_vs_encoders(
    cfg: MBTConfig,
    batch: int,
    steps: int,
    warmup: int,
    device: torch.device,
    bf16: bool = False,
    compile_models: bool = False,
) -> dict[str, float]:
    """Median milliseconds of a training step of each of `MODELS` ({name}_ms) at `batch` clips, over `steps`
    interleaved rounds in rotating order after `warmup` untimed ones; with mbt_vs_encoders = mbt / (video + audio)."""
    models = build_models(cfg, device, compile_models)
    inputs = example_inputs(cfg, batch, device)
    labels = multi_hot_labels(batch, cfg.num_classes, device)
    model_inputs = {"mbt": inputs, "video": {"video": inputs["video"]}, "audio": {"audio": inputs["audio"]}}
    calls = {name: partial(train_step, models[name], model_inputs[name], labels, bf16) for name in MODELS}
    times = time_rounds(calls, steps, warmup, rotate=True, device=device)
    result = {f"{name}_ms": statistics.median(times[name]) * 1e3 for name in MODELS}
    result["mbt_vs_encoders"] = result["mbt_ms"] / (result["video_ms"] + result["audio_ms"])
    return result
