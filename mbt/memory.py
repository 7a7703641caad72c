"""Peak memory per rank of a training, estimated before the model is allocated, and the refusal of a run that cannot
fit, with the flags that would.

The estimate adds what a rank holds at the peak of a training step (`estimate_memory`):
- runtime: what the process holds already (its resident memory when asked: Python, torch, the splits' manifests)
  and what its first step adds (thread pools, kernels' caches); on CUDA the context and the caching allocator's
  slack instead;
- parameters and gradients in float32, the optimizer's state (SGD's momentum, AdamW's two moments) and, on several
  ranks, DDP's gradient buckets (one more copy of the gradients);
- activations: what autograd saves for the backward pass of one micro-batch, counted by running the model's forward
  on the meta device (shapes only: no memory, no compute) with a hook on every tensor saved for backward, one count
  per storage; attention as the fused kernels save it (q, k, v, the output and its log-sum-exp, not the N² matrix;
  all of it with `--sdpa_backend math`), and under bf16 autocast (CUDA) as autocast casts (matmuls and convolutions
  in bf16, norms and losses in float32); and what the backward pass holds beside them (BACKWARD_FRACTION of them);
- the loader's buffers: the batches prefetched by its workers and the float copy of the batch in use;
- or, where it is larger, evaluation's: the parameters and optimizer state with one block's working set of an
  evaluation batch (all its test clips).
The available memory is the device's total on CUDA; on a CPU, MemAvailable (/proc/meminfo) or the cgroup's limit
less its usage, whichever is less, shared by the ranks of the node, plus what this process holds already.
"""

from __future__ import annotations

import math
import os
import warnings
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch.overrides import TorchFunctionMode

from mbt.config import ConfigError, TrainConfig
from mbt.dist import DistInfo, all_gather_objects
from mbt.flops import SIZES, example_inputs
from mbt.model import MBT, MBTConfig
from mbt.model_size import param_shapes
from mbt.validate import per_rank_batch

GIB = 1 << 30
# What a rank's first training step adds to what the process held before (autograd's engine and thread pools,
# oneDNN's kernels, the allocator's slack), measured on the 2-core CPU machine (docs/PERFORMANCE.md, "Memory").
CPU_STEP_RUNTIME_BYTES = 160 << 20
# CUDA: the context and cuBLAS/cuDNN workspaces outside torch's allocator, and the allocator's fragmentation.
CUDA_CONTEXT_BYTES = 600 << 20
CUDA_ALLOCATOR_SLACK = 0.10
# What the backward pass holds beside the saved activations (the gradients of the activations in flight, the
# attention's backward buffers), as a fraction of them: fitted to the measured peaks (docs/PERFORMANCE.md, "Memory").
BACKWARD_FRACTION = 0.4
PREFETCH_BATCHES = 4  # pipelines.torch_loader's prefetch_factor, per worker
# A run is refused when even 80% of its estimate exceeds what is available: the estimates were within -9%/+14% of
# the measured peaks, so a run refused could not have fitted; between 80% and 100% it is warned of.
REFUSE_FRACTION = 0.8
_LOWER_PRECISION = {F.linear, F.conv2d, F.conv3d, torch.matmul, torch.bmm, F.scaled_dot_product_attention}
_FLOAT32 = {F.layer_norm, F.softmax, F.log_softmax, F.binary_cross_entropy_with_logits}


@dataclass(frozen=True)
class MemoryEstimate:
    """Bytes a rank holds at its peak, by part (`parts`: runtime, parameters, gradients, optimizer, activations,
    loader; or the evaluation's, where larger), for `batch` clips per rank per micro-batch in `precision`."""

    parts: dict[str, int]
    batch: int
    precision: str

    @property
    def total(self) -> int:
        return sum(self.parts.values())

    def describe(self) -> str:
        """'12.3 GiB (runtime 612 MiB, parameters 653 MiB, ...)'."""
        shown = ", ".join(f"{name} {size(n)}" for name, n in self.parts.items() if n)
        return f"{size(self.total)} ({shown})"


def size(n: float) -> str:
    """`n` bytes in GiB (from 1 GiB) or MiB, 3 significant digits (whole MiB from 100)."""
    mib = n / (1 << 20)
    return f"{n / GIB:.3g} GiB" if n >= GIB else f"{mib:.0f} MiB" if mib >= 100 else f"{mib:.3g} MiB"


class _SavedAsFusedKernels(TorchFunctionMode):
    """On the meta device: attention as the fused kernels compute it (saving q, k, v, the output and its log-sum-exp
    instead of the N² attention matrix that the meta device's math path saves), and with `bf16`, CUDA autocast's
    casts (tested against the tensors CPU autocast saves)."""

    def __init__(self, bf16: bool, fused_attention: bool) -> None:
        super().__init__()
        self.bf16, self.fused = bf16, fused_attention

    def __torch_function__(self, func: Any, types: Any, args: tuple = (), kwargs: dict | None = None) -> Any:
        kwargs = kwargs or {}
        if self.bf16 and func in _LOWER_PRECISION | _FLOAT32:
            dtype = torch.bfloat16 if func in _LOWER_PRECISION else torch.float32
            args = tuple(a.to(dtype) if isinstance(a, torch.Tensor) and a.is_floating_point() else a for a in args)
        if self.fused and func is F.scaled_dot_product_attention:
            q, k, v = args[:3]
            flash = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu
            return flash(
                q, k, v, kwargs.get("dropout_p", 0.0), kwargs.get("is_causal", False), scale=kwargs.get("scale")
            )[0]
        return func(*args, **kwargs)


@lru_cache(maxsize=64)
def activation_bytes(model: MBTConfig, batch: int, bf16: bool = False, fused_attention: bool = True) -> int:
    """Bytes autograd saves for the backward pass of MBT(model)'s training forward over `batch` clips (the logits
    included), counted on the meta device; with `model.grad_checkpointing`, what the checkpoints keep plus the
    recomputation of one block of each tower."""
    with torch.device("meta"), warnings.catch_warnings():
        warnings.filterwarnings("ignore", "Initializing zero-element tensors")
        net = MBT(model.replace(num_classes=max(model.num_classes, 1)))
    net.train()
    weights = {p.untyped_storage()._cdata for p in net.parameters()}
    saved: dict[int, int] = {}

    def pack(tensor: torch.Tensor) -> torch.Tensor:
        storage = tensor.untyped_storage()
        saved.setdefault(storage._cdata, storage.nbytes())
        return tensor

    inputs = example_inputs(model, batch, "meta")
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t), _SavedAsFusedKernels(bf16, fused_attention):
        logits = net(inputs.get("video"), inputs.get("audio"), per_tower=True)
    total = sum(n for key, n in saved.items() if key not in weights) + logits.numel() * 4
    if model.grad_checkpointing:
        full = activation_bytes(model.replace(grad_checkpointing=False), batch, bf16, fused_attention)
        total += 2 * full // (model.depth * len(model.modalities))
    return total


def estimate_memory(
    cfg: TrainConfig, world_size: int, device: torch.device, batch: int | None = None
) -> MemoryEstimate:
    """The peak bytes per rank of a training of `cfg` on `world_size` ranks of `device`, at `batch` clips per rank
    per micro-batch (None: the config's)."""
    batch = per_rank_batch(cfg, world_size) if batch is None else batch
    cuda, model = device.type == "cuda", cfg.model
    bf16 = cuda and cfg.bf16
    fused = cfg.sdpa_backend != "math"
    weights = 4 * sum(math.prod(shape) for shape in param_shapes(model).values())
    moments = {"sgd": 1 if cfg.momentum else 0, "adamw": 2}.get(cfg.optimizer, 2)
    optimizer = moments * weights + (weights if cfg.optimizer == "adamw" else 0)  # AdamW's step: one temporary
    runtime = CUDA_CONTEXT_BYTES if cuda else resident_bytes() + CPU_STEP_RUNTIME_BYTES
    clip_floats = model.num_frames * 3 * model.img_size**2 + model.audio_frames * model.num_mel_bins
    workers = 0 if cuda else cfg.num_workers
    loader = ((workers * PREFETCH_BATCHES + 1) * batch * clip_floats) + 2 * batch * clip_floats * 4
    activations = activation_bytes(model, batch, bf16, fused)
    train = {
        "runtime": runtime,
        "parameters": weights,
        "gradients": weights + (weights if world_size > 1 else 0),  # DDP's buckets: a copy of the gradients
        "optimizer": optimizer,
        "activations": activations,
        "backward": round(BACKWARD_FRACTION * activations),
        "loader": loader,
    }
    parts = train
    if cfg.eval_shards:  # evaluation holds no gradients (freed after each step) but batches of every test clip
        rows = cfg.eval_batch_size * cfg.augment.num_test_clips
        block = activation_bytes(model.replace(grad_checkpointing=False), rows, bf16, fused) // model.depth
        batches = 2 * rows * clip_floats * 4
        evaluation = {**train, "gradients": 0, "activations": 0, "backward": 0, "evaluation": block + batches}
        parts = evaluation if sum(evaluation.values()) > sum(train.values()) else train
    if cuda:
        parts = {**parts, "allocator": round(CUDA_ALLOCATOR_SLACK * sum(parts.values()))}
    return MemoryEstimate(parts, batch, "bf16" if bf16 else "fp32")


def resident_bytes() -> int:
    """This process's resident memory now (/proc/self/statm), or 0 where it cannot be read."""
    try:
        pages = int(Path("/proc/self/statm").read_text().split()[1])
    except (OSError, ValueError, IndexError):
        return 0
    return pages * os.sysconf("SC_PAGE_SIZE")


def available_memory(device: torch.device, local_ranks: int = 1) -> tuple[int, str] | None:
    """(bytes a rank of `device` may use, where that number comes from), or None where it cannot be known: the
    device's total memory on CUDA; on a CPU what this process holds plus its share (of `local_ranks` on the node) of
    MemAvailable or of the cgroup's limit less its usage, whichever is less."""
    if device.type == "cuda":
        total = torch.cuda.get_device_properties(device).total_memory
        return total, f"{torch.cuda.get_device_name(device)}'s total memory"
    sources = [(n, name) for n, name in (_meminfo_available(), _cgroup_room()) if n is not None]
    if not sources:
        return None
    free, name = min(sources)
    return free // max(local_ranks, 1) + resident_bytes(), (
        name if local_ranks <= 1 else f"{name}, shared by {local_ranks} ranks on this machine"
    )


def _meminfo_available() -> tuple[int | None, str]:
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024, "MemAvailable in /proc/meminfo"
    except (OSError, ValueError, IndexError):
        pass
    return None, ""


def _cgroup_room() -> tuple[int | None, str]:
    """The cgroup's memory limit less its usage (v2, then v1), or None without a limit."""
    for limit_file, usage_file in (
        ("/sys/fs/cgroup/memory.max", "/sys/fs/cgroup/memory.current"),
        ("/sys/fs/cgroup/memory/memory.limit_in_bytes", "/sys/fs/cgroup/memory/memory.usage_in_bytes"),
    ):
        try:
            limit, usage = (Path(f).read_text().strip() for f in (limit_file, usage_file))
            if limit != "max" and int(limit) < 1 << 60:  # v1 writes a huge number for "no limit"
                return max(int(limit) - int(usage), 0), f"the cgroup's limit less its usage, {limit_file}"
        except (OSError, ValueError):
            continue
    return None, ""


# The augmentation setting that must equal each model size setting (`mbt.validate`, `mbt.fits`).
_COUPLED = {"num_frames": "frames_used", "img_size": "crop_px", "audio_frames": "audio_frames"}
SIZE_NOTES = {"small": "ViT-S/16 towers, 4 frames", "tiny": "width 64, 3 layers, 2 frames of 64 px"}


def size_flags(cfg: TrainConfig, size: str) -> tuple[TrainConfig, list[str]]:
    """`cfg` with the model of the named size (`mbt.flops.SIZES`: its classes, fusion and regularisation kept), and
    the flags that give it, the augmentation settings that must agree included."""
    changes = {k: v for k, v in SIZES[size].items() if getattr(cfg.model, k) != v}
    coupled = {_COUPLED[k]: v for k, v in changes.items() if k in _COUPLED}
    flags = [f"--model.{k} {v}" for k, v in changes.items()] + [f"--augment.{k} {v}" for k, v in coupled.items()]
    return cfg.replace(model=cfg.model.replace(**changes), augment=cfg.augment.replace(**coupled)), flags


@dataclass(frozen=True)
class MemoryVerdict:
    """A training's `estimate` per rank against the bytes `available` to a rank (None: unknown) and where that
    number comes from; `refusal` when it cannot fit, `warning` when it may not, each naming what would fit."""

    estimate: MemoryEstimate
    available: int | None
    source: str = ""
    refusal: str | None = None
    warning: str | None = None

    def describe(self) -> str:
        """'about 12.3 GiB per rank (...) for 8 clips per rank at fp32; 22 GiB available (...)'."""
        have = "" if self.available is None else f"; {size(self.available)} available ({self.source})"
        est = self.estimate
        return f"about {est.describe()} per rank for {est.batch} clips per rank at {est.precision}{have}"


def memory_verdict(cfg: TrainConfig, world_size: int, device: torch.device, local_ranks: int = 1) -> MemoryVerdict:
    """The verdict on a training of `cfg` on `world_size` ranks (`local_ranks` of them on this machine): refused
    when REFUSE_FRACTION of the estimate exceeds what is available, warned of when the estimate does, each with the
    flags that would fit (fewer clips per micro-batch with more gradient accumulation, the global batch kept; a
    smaller model size)."""
    estimate = estimate_memory(cfg, world_size, device)
    found = available_memory(device, local_ranks)
    if found is None or estimate.total <= found[0]:
        return MemoryVerdict(estimate, *(found or (None, "")))
    available, source = found
    need = (
        f"the run needs about {estimate.describe()} of memory per rank for {estimate.batch} clips per rank at "
        f"{estimate.precision}, and {size(available)} are available ({source})"
    )
    if estimate.total * REFUSE_FRACTION <= available:
        return MemoryVerdict(
            estimate, available, source, warning=f"{need}: it may not fit; {_fits(cfg, world_size, device, available)}"
        )
    return MemoryVerdict(
        estimate, available, source, refusal=f"{need}: it cannot fit; {_fits(cfg, world_size, device, available)}"
    )


def check_memory(cfg: TrainConfig, dist: DistInfo) -> MemoryVerdict:
    """This rank's verdict on the training of `cfg`, asked of every rank (each may see another machine); when any
    refuses, ConfigError with its message on every rank, so that all leave before the model is allocated."""
    local_ranks = int(os.environ.get("LOCAL_WORLD_SIZE", "1")) if dist.world_size > 1 else 1
    verdict = memory_verdict(cfg, dist.world_size, dist.device, local_ranks)
    if refusals := [r for r in all_gather_objects(verdict.refusal) if r]:
        raise ConfigError(refusals[0])
    return verdict


def _fits(cfg: TrainConfig, world_size: int, device: torch.device, available: int) -> str:
    """What would fit in `available` bytes per rank: fewer clips per micro-batch, or a smaller model size."""
    options = []
    if smaller := _smaller_batch(cfg, world_size, device, available):
        options.append(smaller)
    current = sum(math.prod(s) for s in param_shapes(cfg.model).values())
    for name in ("small", "tiny"):
        sized, flags = size_flags(cfg, name)
        if sum(math.prod(s) for s in param_shapes(sized.model).values()) >= current:
            continue
        estimate = estimate_memory(sized, world_size, device)
        fit = f"about {size(estimate.total)}" if estimate.total <= available else None
        fit = fit or _smaller_batch(sized, world_size, device, available)
        if fit:
            options.append(f"a smaller model, {SIZE_NOTES[name]} ({' '.join(flags)}; {fit})")
            break
    if not options:
        return "no smaller batch per rank or model size fits: use a machine with more memory (or GPUs)"
    return "it would fit with " + ", or ".join(options)


def _smaller_batch(cfg: TrainConfig, world_size: int, device: torch.device, available: int) -> str | None:
    """'--grad_accum N (B clips per rank per micro-batch, ...)' for the largest micro-batch that fits, or None."""
    per_step = cfg.batch_size // world_size  # clips per rank per optimizer step
    current = per_rank_batch(cfg, world_size)
    for batch in sorted((b for b in range(1, current) if per_step % b == 0), reverse=True):
        estimate = estimate_memory(cfg, world_size, device, batch)
        if estimate.total <= available:
            return (
                f"--grad_accum {per_step // batch} ({batch} clips per rank per micro-batch, the global batch stays "
                f"{cfg.batch_size}: about {size(estimate.total)})"
            )
    return None
