"""What the benchmarks share: the timing loop, the device's name and dense bf16 peak, and device-dependent defaults
of their command lines. Imports only torch, so that `tools/bench_model.py` runs where nothing else is installed.
"""

from __future__ import annotations

import argparse
import time
from collections.abc import Callable, Mapping
from typing import Any

import torch

# Dense bf16 peak TFLOP/s by device name, the first match wins (PCIe H100 is slower than SXM).
PEAK_BF16_TFLOPS = (("H100 PCIe", 756.0), ("H100", 989.0), ("H200", 989.0), ("A100", 312.0))


def time_rounds(
    calls: Mapping[str, Callable[[], object]],
    rounds: int,
    warmup: int,
    repeats: int = 1,
    rotate: bool = False,
    device: torch.device | None = None,
) -> dict[str, list[float]]:
    """Seconds of each timed call of each of `calls` (name → a function that runs one step).

    After `warmup` untimed rounds, `rounds` rounds each run every call `repeats` times in turn, so that drift of the
    machine hits all of them alike; with `rotate` the order shifts by one each round. On a CUDA `device` its work
    is waited for before and after each call, so that a call's time holds its kernels.
    """
    names = list(calls)

    def timed(name: str) -> float:
        if device is not None and device.type == "cuda":
            torch.cuda.synchronize(device)
        start = time.perf_counter()
        calls[name]()
        if device is not None and device.type == "cuda":
            torch.cuda.synchronize(device)
        return time.perf_counter() - start

    for _ in range(warmup):
        for name in names:
            timed(name)
    times: dict[str, list[float]] = {name: [] for name in names}
    for round_ in range(rounds):
        shift = round_ % len(names) if rotate else 0
        for name in names[shift:] + names[:shift]:
            times[name] += [timed(name) for _ in range(repeats)]
    return times


def peak_tflops(device_name: str) -> float | None:
    """The dense bf16 peak of a CUDA device known by `device_name`, else None."""
    return next((peak for key, peak in PEAK_BF16_TFLOPS if key in device_name), None)


def device_name(device: torch.device) -> str:
    """The CUDA device's name, or the CPU with its torch threads."""
    return torch.cuda.get_device_name(device) if device.type == "cuda" else f"cpu ({torch.get_num_threads()} threads)"


def resolve_device_args(
    parser: argparse.ArgumentParser, args: argparse.Namespace, cpu: dict[str, Any], cuda: dict[str, Any]
) -> argparse.Namespace:
    """`args` with --device checked, the options left unset given the device's defaults (`cpu` or `cuda`), and on
    CUDA --peak-tflops: as given, else the device's known peak; a usage error when neither."""
    on_cuda = args.device == "cuda"
    if on_cuda and not torch.cuda.is_available():
        parser.error("--device cuda: no CUDA device")
    for key, value in (cuda if on_cuda else cpu).items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    if on_cuda and args.peak_tflops is None:
        args.peak_tflops = peak_tflops(torch.cuda.get_device_name())
        if args.peak_tflops is None:
            parser.error(f"unknown peak of {torch.cuda.get_device_name()!r}: give --peak-tflops")
    return args
