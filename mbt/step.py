"""The training step of `mbt.train`, and its parts: soft targets, the loss, parameter groups, the optimizer and the
learning-rate schedule. `tools/bench_train.py` times this same step.

One step (`TrainStep`) takes `grad_accum` micro-batches: for each, mixup, label-smoothed targets, forward under bf16
autocast (CUDA) and the attention kernel of cfg.sdpa_backend to each tower's logits (`MBT.forward(per_tower=True)`),
the towers' losses averaged (scenic's MBT trainer; the logits are averaged only at evaluation), backward of
loss / grad_accum, DDP's gradient all-reduce on the last micro-batch only; then the mean loss is read back (a
NonFiniteLoss before any update), the gradient norm clipped, and the optimizer and schedule stepped. With
cfg.clip_grad_scope "per_rank" (scenic's trainer: `clip_grads` on each device's gradient, then `pmean`) DDP does not
all-reduce: each rank clips its own gradient, then the clipped gradients are averaged (`mean_over_ranks_`); with
"global" the averaged gradient is clipped.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager, nullcontext
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.parallel import DistributedDataParallel

from mbt.config import SDPA_BACKENDS, TrainConfig
from mbt.dist import mean_over_ranks_
from pipelines.mixup import mixup


class NonFiniteLoss(FloatingPointError):
    """A step's loss is NaN or infinite; no update was made."""

    def __init__(self, loss: float) -> None:
        super().__init__(f"non-finite loss {loss}")
        self.loss = loss


def soft_targets(labels: torch.Tensor, num_classes: int, label_smoothing: float) -> torch.Tensor:
    """Float (B, C) targets: multi-hot or one-hot labels (or mixup's mixed ones) smoothed as scenic does,
    y (1 - ε) + ε / C."""
    targets = labels if labels.is_floating_point() else F.one_hot(labels.long(), num_classes).float()
    return targets * (1.0 - label_smoothing) + label_smoothing / num_classes


def loss_fn(logits: torch.Tensor, targets: torch.Tensor, multi_label: bool) -> torch.Tensor:
    """Scenic's losses of logits (B, C), or of each head output (H, B, C) against the same targets (B, C) and then
    averaged over the heads: sigmoid cross-entropy (multi-label, AudioSet; `weighted_sigmoid_cross_entropy`) or
    softmax cross-entropy (single-label, VGGSound), each summed over the classes and averaged over the examples."""
    logits = logits.float()
    if multi_label:
        per_class = F.binary_cross_entropy_with_logits(logits, targets.expand_as(logits), reduction="none")
    else:
        per_class = -targets * F.log_softmax(logits, dim=-1)
    return per_class.sum(dim=-1).mean()


def param_groups(model: nn.Module, weight_decay: float) -> list[dict[str, Any]]:
    """No weight decay on biases, norms, tokens and embeddings (the 1-D or token parameters), as timm does."""
    decay, no_decay = [], []
    for name, param in model.named_parameters():
        skip = param.ndim <= 1 or name.endswith(("cls_token", "pos_embed", "temporal_embed", "bottleneck"))
        (no_decay if skip else decay).append(param)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


def lr_lambda(total_steps: int, warmup_steps: int) -> Callable[[int], float]:
    """Linear warmup from 0 to 1, then cosine to 0 at `total_steps`."""

    def factor(step: int) -> float:
        if step < warmup_steps:
            return (step + 1) / warmup_steps
        progress = (step - warmup_steps) / max(total_steps - warmup_steps, 1)
        return 0.5 * (1.0 + math.cos(math.pi * min(progress, 1.0)))

    return factor


def sdpa_context(backend: str | None) -> AbstractContextManager:
    """Scaled-dot-product attention restricted to `backend` (a key of SDPA_BACKENDS) for the calls made inside;
    None or "auto": PyTorch's own choice per call. A new context each time (sdpa_kernel's cannot be re-entered)."""
    name = SDPA_BACKENDS.get(backend or "auto")
    if name is None:
        return nullcontext()
    from torch.nn.attention import SDPBackend, sdpa_kernel

    return sdpa_kernel(getattr(SDPBackend, name))


def bf16_autocast(device: torch.device, bf16: bool) -> AbstractContextManager:
    """bf16 autocast on a CUDA `device` when `bf16`, else nothing (float32)."""
    return torch.autocast("cuda", dtype=torch.bfloat16) if bf16 and device.type == "cuda" else nullcontext()


class TrainStep:
    """The optimizer step of `cfg` for `module` (the model, or its DDP wrapper on several ranks; torch.compile'd
    with cfg.compile) over a loader of `loader_batches` micro-batches an epoch: SGD (momentum) or AdamW on
    `param_groups`, linear warm-up then cosine schedule over `total_steps`.

    Calling it with an iterator of batches and the step's index (which seeds mixup with the rank and micro-batch,
    so that a resumed run mixes as the uninterrupted one did) runs one step and returns its mean loss; `clips` is
    then the number of clips it took on this rank.
    """

    def __init__(
        self,
        module: nn.Module,
        cfg: TrainConfig,
        multi_label: bool,
        loader_batches: int,
        device: torch.device,
        rank: int = 0,
    ) -> None:
        self.module, self.cfg, self.multi_label, self.rank = module, cfg, multi_label, rank
        self.model = module.module if isinstance(module, DistributedDataParallel) else module
        self.forward = torch.compile(module) if cfg.compile else module
        self.autocast = bf16_autocast(device, cfg.bf16)
        self.steps_per_epoch = max(loader_batches // cfg.grad_accum, 1)
        self.total_steps = cfg.epochs * self.steps_per_epoch if cfg.max_steps is None else cfg.max_steps
        groups = param_groups(self.model, cfg.weight_decay)
        if cfg.optimizer == "sgd":
            self.optimizer: torch.optim.Optimizer = torch.optim.SGD(groups, lr=cfg.lr, momentum=cfg.momentum)
        else:
            self.optimizer = torch.optim.AdamW(groups, lr=cfg.lr)
        warmup = round(cfg.warmup_epochs * self.steps_per_epoch)
        self.schedule = torch.optim.lr_scheduler.LambdaLR(self.optimizer, lr_lambda(self.total_steps, warmup))
        self.clips = 0

    def __call__(self, batches: Iterator[dict[str, Any]], step: int) -> float:
        """One optimizer step over the next cfg.grad_accum batches of `batches`; its mean loss, read back."""
        cfg, num_classes = self.cfg, self.model.cfg.num_classes
        self.module.train()
        losses, self.clips = [], 0
        ddp = isinstance(self.module, DistributedDataParallel)
        per_rank = bool(cfg.clip_grad_norm) and cfg.clip_grad_scope == "per_rank"
        for micro in range(cfg.grad_accum):
            with torch.random.fork_rng(devices=[]):  # loaders draw seeds from torch: keep dropout's stream
                data = next(batches)  # apart, so that a resumed run draws the same masks
            rng = np.random.default_rng([cfg.seed, step, self.rank, micro])
            data = mixup(data, cfg.augment.mixup_alpha, num_classes, rng)
            targets = soft_targets(data["labels"], num_classes, cfg.label_smoothing)
            accumulating = micro < cfg.grad_accum - 1 or per_rank  # per_rank: averaged once clipped, below
            sync = self.module.no_sync() if ddp and accumulating else nullcontext()  # all-reduce on the last one
            with sync, self.autocast, sdpa_context(cfg.sdpa_backend):
                logits = self.forward(data["video"], data["audio"], per_tower=True)  # scenic: a loss per tower
                loss = loss_fn(logits, targets, self.multi_label)
                (loss / cfg.grad_accum).backward()
            losses.append(loss.detach())
            self.clips += len(data["key"])
        if per_rank:
            self.clip_and_average()
        loss_value = torch.stack(losses).mean().item()
        if not math.isfinite(loss_value):
            raise NonFiniteLoss(loss_value)
        if cfg.clip_grad_norm and not per_rank:
            torch.nn.utils.clip_grad_norm_(self.model.parameters(), cfg.clip_grad_norm)
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        self.schedule.step()
        return loss_value

    def clip_and_average(self) -> None:
        """This rank's gradient clipped to norm cfg.clip_grad_norm, then every rank's averaged (a parameter without
        a gradient takes zeros, so that each rank reduces the same tensors)."""
        params = [p for p in self.model.parameters() if p.requires_grad]
        torch.nn.utils.clip_grad_norm_(params, self.cfg.clip_grad_norm)
        for param in params:
            if param.grad is None:
                param.grad = torch.zeros_like(param)
        mean_over_ranks_([param.grad for param in params])
