"""Train MBT: `torchrun [--nnodes N --node-rank I --rdzv-endpoint HOST:PORT] --nproc-per-node G -m mbt.train
--preset audioset [--config run.yaml] [--field value ...]` (or `python -m mbt.train ...` for one process).

The loop reads top to bottom: config → process group → shards → model (DDP) → optimizer and schedule → resume
→ for each step: batches (mixup), forward under autocast, loss, backward (accumulated), clip, step → log,
checkpoint, evaluate. Rank 0 alone logs and saves. A run directory holds `config.yaml`, `checkpoints/`,
`metrics.jsonl`, TensorBoard events and, at the end, `curves.png`; run the same command again and it resumes from
the last checkpoint, with the losses an uninterrupted run would have had. One training writes a run directory at a
time, and it resumes only with the settings and classes of its checkpoints (`mbt.run_dir`); what cannot run is
printed as one `error: ...` line.
"""

from __future__ import annotations

import json
import math
import sys
import time
from contextlib import nullcontext
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch.nn.parallel import DistributedDataParallel
from tqdm import tqdm

from mbt.checkpoint import (
    RESUME_ADVICE,
    CheckpointFileError,
    latest_checkpoint,
    load_checkpoint,
    non_finite_tensors,
    rng_state,
    save_checkpoint,
)
from mbt.classes import ClassListError, class_record
from mbt.config import ConfigError, TrainConfig, config_to_dict, load_config, per_rank_batch, save_config, validate
from mbt.dist import DistInfo, all_gather_objects, barrier, cleanup, init_distributed
from mbt.evaluate import EvaluationError, evaluate
from mbt.model import MBT, CheckpointError, init_from_vit
from mbt.run_dir import RunDirError, check_resume, locked_run_dir, restore
from mbt.run_log import RunLog, plot_curves
from pipelines import build_loader
from pipelines.mixup import mixup
from pipelines.split import LoaderError
from pipelines.stream import open_split


class TrainingError(RuntimeError):
    """The run cannot go on (a non-finite loss or weights); the message names the step and what to try."""


# What main() prints as one `error: ...` line (exit status 1): bad data, files or run folders, not bugs.
EXPECTED_ERRORS = (
    TrainingError, CheckpointFileError, CheckpointError, ClassListError, EvaluationError, LoaderError, RunDirError,
    OSError,
)  # fmt: skip


def soft_targets(labels: torch.Tensor, num_classes: int, label_smoothing: float) -> torch.Tensor:
    """Float (B, C) targets: multi-hot or one-hot labels (or mixup's mixed ones) smoothed as scenic does,
    y (1 - ε) + ε / C."""
    targets = labels if labels.is_floating_point() else F.one_hot(labels.long(), num_classes).float()
    return targets * (1.0 - label_smoothing) + label_smoothing / num_classes


def loss_fn(logits: torch.Tensor, targets: torch.Tensor, multi_label: bool) -> torch.Tensor:
    """BCE-with-logits over classes (multi-label, AudioSet) or softmax cross-entropy (single-label, VGGSound)."""
    logits = logits.float()
    if multi_label:
        return F.binary_cross_entropy_with_logits(logits, targets)
    return torch.sum(-targets * F.log_softmax(logits, dim=-1), dim=-1).mean()


def param_groups(model: torch.nn.Module, weight_decay: float) -> list[dict[str, Any]]:
    """No weight decay on biases, norms, tokens and embeddings (the 1-D or token parameters), as timm does."""
    decay, no_decay = [], []
    for name, param in model.named_parameters():
        skip = param.ndim <= 1 or name.endswith(("cls_token", "pos_embed", "temporal_embed", "bottleneck"))
        (no_decay if skip else decay).append(param)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


def lr_lambda(total_steps: int, warmup_steps: int) -> Any:
    """Linear warmup from 0 to 1, then cosine to 0 at `total_steps`."""

    def factor(step: int) -> float:
        if step < warmup_steps:
            return (step + 1) / warmup_steps
        progress = (step - warmup_steps) / max(total_steps - warmup_steps, 1)
        return 0.5 * (1.0 + math.cos(math.pi * min(progress, 1.0)))

    return factor


def run_evaluation(cfg: TrainConfig, model: torch.nn.Module, dist: DistInfo, out_dir: Path | None) -> dict | None:
    """Sharded evaluation of `model` on cfg.eval_shards (every sample once across ranks); metrics on rank 0."""
    split = open_split(cfg.eval_shards)
    manifest = split.manifest
    loader = build_loader(
        split, train=False, batch_size=cfg.eval_batch_size, loader=cfg.loader, num_workers=cfg.num_workers,
        rank=dist.rank, world_size=dist.world_size, augment=cfg.augment, device=dist.device,
    )  # fmt: skip
    bf16 = cfg.bf16 and dist.device.type == "cuda"
    names = [c["name"] for c in class_record(manifest, f"--eval_shards {cfg.eval_shards}")["classes"]]
    return evaluate(
        model, loader, dist, manifest.multi_label, manifest.num_classes, out_dir, amp_bf16=bf16, class_names=names
    )


def init_towers(model: MBT, cfg: TrainConfig) -> list[str]:
    """Initialise the towers from cfg.init_video / cfg.init_audio; CheckpointError naming the flag and file when one
    cannot be read, does not fit, or holds non-finite weights (`mbt.model.load_state_file`)."""
    loaded = []
    for key, path, modality in (("init_video", cfg.init_video, "video"), ("init_audio", cfg.init_audio, "audio")):
        try:
            loaded += init_from_vit(model, **{modality: path})
        except CheckpointError as err:
            raise CheckpointError(f"--{key}: {err}") from None
    return loaded


def train(cfg: TrainConfig, dist: DistInfo) -> dict[str, Any]:
    """Run (or resume) the training of `cfg` on this process; returns the last evaluation's metrics on rank 0.

    Before anything is written to the run directory it is locked, and its latest checkpoint, if any, must be a whole
    training checkpoint of the same settings and classes (`mbt.run_dir.check_resume`) whose every part loads into
    this run's model, optimizer, schedule and loader; then config.yaml is written.
    """
    run_dir = Path(cfg.out_dir)
    split = open_split(cfg.train_shards)
    record = class_record(split.manifest, f"--train_shards {cfg.train_shards}")
    with locked_run_dir(run_dir, dist):
        resume, state = latest_checkpoint(run_dir), None
        if resume is not None:
            try:
                state = load_checkpoint(resume)
            except CheckpointFileError as err:
                raise CheckpointFileError(f"{err}; {RESUME_ADVICE}") from None
            for warning in check_resume(state, resume, cfg, record, dist.world_size):
                if dist.is_main:
                    print(f"warning: {warning}", file=sys.stderr)
        return _train(cfg, dist, split, record, state, resume)


def _train(
    cfg: TrainConfig,
    dist: DistInfo,
    split: Any,
    record: dict[str, Any],
    state: dict[str, Any] | None,
    resume: Path | None,
) -> dict[str, Any]:
    """The training loop of `train`, in the locked run directory, from `state` (the checked checkpoint read from
    `resume`) when there is one."""
    run_dir = Path(cfg.out_dir)
    multi_label, num_classes = record["multi_label"], len(record["classes"])
    device = dist.device

    torch.manual_seed(cfg.seed)  # the same initial weights on every rank
    model = MBT(cfg.model)
    for line in init_towers(model, cfg):
        if dist.is_main:
            print(f"init: {line}")
    model.to(device)
    ddp = DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None) if (
        dist.world_size > 1) else model  # fmt: skip
    forward = torch.compile(ddp) if cfg.compile else ddp
    torch.manual_seed(cfg.seed + 1000 * dist.rank)  # dropout and stochastic depth differ between ranks

    batch = per_rank_batch(cfg, dist.world_size)
    loader = build_loader(
        split, train=True, batch_size=batch, loader=cfg.loader, num_workers=cfg.num_workers,
        rank=dist.rank, world_size=dist.world_size, seed=cfg.seed, augment=cfg.augment,
        skip_bad_samples=cfg.skip_bad_samples, device=device, shuffle_buffer=cfg.shuffle_buffer,
    )  # fmt: skip
    steps_per_epoch = max(len(loader) // cfg.grad_accum, 1)
    total_steps = cfg.epochs * steps_per_epoch if cfg.max_steps is None else cfg.max_steps
    groups = param_groups(model, cfg.weight_decay)
    if cfg.optimizer == "sgd":
        optimizer = torch.optim.SGD(groups, lr=cfg.lr, momentum=cfg.momentum)
    else:
        optimizer = torch.optim.AdamW(groups, lr=cfg.lr)
    warmup = round(cfg.warmup_epochs * steps_per_epoch)
    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_lambda(total_steps, warmup))

    step = 0
    if state is not None:
        parts = {"model": model, "optimizer": optimizer, "schedule": schedule, "loader": loader}
        step = restore(state, resume, parts, dist.rank, len(loader))
        if dist.is_main:
            print(f"resumed from {resume} at step {step}")
    if dist.is_main:
        save_config(cfg, run_dir / "config.yaml")

    log = RunLog(run_dir, dist.is_main)
    autocast = torch.autocast("cuda", dtype=torch.bfloat16) if cfg.bf16 and device.type == "cuda" else nullcontext()
    bar = tqdm(total=total_steps, initial=step, disable=not dist.is_main, unit="step", dynamic_ncols=True)
    metrics: dict[str, Any] | None = None
    clips_seen, t_last = 0, time.perf_counter()

    def save(at_step: int) -> None:
        if bad := non_finite_tensors(model.state_dict()):  # the same weights on every rank: all raise together
            raise TrainingError(
                f"the weights became NaN or infinite by step {at_step} ({', '.join(bad[:5])}); not saved: lower "
                "--lr or set --clip_grad_norm, and resume from the last checkpoint"
            )
        # Every rank's RNG and stream position (the DALI loader's pipeline checkpoint differs per rank).
        states, positions = all_gather_objects(rng_state()), all_gather_objects(loader.state_dict())
        if dist.is_main:
            save_checkpoint(run_dir, at_step, {
                "model": model.state_dict(), "optimizer": optimizer.state_dict(), "schedule": schedule.state_dict(),
                "step": at_step, "epoch": at_step // steps_per_epoch, "loader": positions,
                "rng": states, "config": config_to_dict(cfg), "data": record,
            }, keep=cfg.keep_checkpoints)  # fmt: skip
        barrier()

    finished_before = step >= total_steps  # resumed a finished run: only its final evaluation is run again
    while step < total_steps:
        epoch = step // steps_per_epoch
        loader.set_epoch(epoch)
        batches = iter(loader)
        for _ in range(steps_per_epoch - step % steps_per_epoch):  # the rest of this epoch (all of it, unless resumed)
            ddp.train()
            losses = []
            for micro in range(cfg.grad_accum):
                with torch.random.fork_rng(devices=[]):  # loaders draw seeds from torch: keep dropout's stream
                    data = next(batches)  # apart, so that a resumed run draws the same masks
                rng = np.random.default_rng([cfg.seed, step, dist.rank, micro])
                data = mixup(data, cfg.augment.mixup_alpha, num_classes, rng)
                targets = soft_targets(data["labels"], num_classes, cfg.label_smoothing)
                sync = nullcontext() if micro == cfg.grad_accum - 1 or dist.world_size == 1 else ddp.no_sync()
                with sync, autocast:
                    loss = loss_fn(forward(data["video"], data["audio"]), targets, multi_label)
                    (loss / cfg.grad_accum).backward()
                losses.append(loss.detach())
                clips_seen += len(data["key"]) * dist.world_size
            loss_value = torch.stack(losses).mean().item()
            if not math.isfinite(loss_value):
                raise TrainingError(
                    f"non-finite loss {loss_value} at step {step + 1} (epoch {epoch}): lower --lr, check the shards "
                    "with tools/verify_shards.py, or resume from the last checkpoint with other settings"
                )
            if cfg.clip_grad_norm:
                torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.clip_grad_norm)
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            schedule.step()
            step += 1
            bar.update(1)
            if step % cfg.log_every_steps == 0 or step == total_steps:
                now = time.perf_counter()
                rate = clips_seen / (now - t_last)
                clips_seen, t_last = 0, now
                lr = schedule.get_last_lr()[0]
                bar.set_postfix(loss=f"{loss_value:.4f}", lr=f"{lr:.2e}", clips_s=f"{rate:.1f}", epoch=epoch)
                log.write({"step": step, "epoch": epoch, "loss": loss_value, "lr": lr, "clips_per_s": rate})
            if step % cfg.checkpoint_every_steps == 0 or step == total_steps:
                save(step)
            if step >= total_steps:
                break
        final = step >= total_steps
        if cfg.eval_shards and (final or (step // steps_per_epoch) % cfg.eval_every_epochs == 0):  # '': no eval
            with torch.random.fork_rng(devices=[]):  # nor may evaluation's loader move it
                metrics = run_evaluation(cfg, model, dist, run_dir / "eval" if final else None)
            if dist.is_main and metrics is not None:
                name = "mAP" if multi_label else "top1"
                log.write({"step": step, "epoch": epoch, "eval_metric": metrics[name], "eval_metric_name": name,
                           **{f"eval_{k}": v for k, v in metrics.items()}})  # fmt: skip
                bar.write(f"step {step} epoch {epoch}: " + " ".join(f"{k}={v:.4g}" for k, v in metrics.items()))
    if finished_before and cfg.eval_shards:  # the same on every rank (metrics is None on all but rank 0)
        metrics = run_evaluation(cfg, model, dist, run_dir / "eval")
    bar.close()
    log.close()
    if dist.is_main and log.path.is_file() and (skipped := plot_curves(log.path, run_dir / "curves.png")):
        print(f"warning: {log.path}: {skipped} line(s) are not metrics rows and were left out of the curves")
    return metrics or {}


def main(argv: list[str] | None = None) -> int:
    try:
        cfg = load_config(argv)
    except ConfigError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    try:
        dist = init_distributed(cfg.device)
    except RuntimeError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    try:
        cfg = validate(cfg, dist.world_size)
        metrics = train(cfg, dist)
        if dist.is_main:
            print(json.dumps({"out_dir": cfg.out_dir, **metrics}))
        return 0
    except (ConfigError, *EXPECTED_ERRORS) as err:
        if dist.is_main:
            print(f"error: {err}", file=sys.stderr)
        return 2 if isinstance(err, ConfigError) else 1
    finally:
        cleanup()


if __name__ == "__main__":
    sys.exit(main())
