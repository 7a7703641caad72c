"""Train MBT: `torchrun [--nnodes N --node-rank I --rdzv-endpoint HOST:PORT] --nproc-per-node G -m mbt.train
--preset audioset [--config run.yaml] [--field value ...]` (or `python -m mbt.train ...` for one process).

The loop reads top to bottom: config → process group → shards → model (DDP) → optimizer and schedule → resume
→ for each step: batches (mixup), forward under autocast, loss, backward (accumulated), clip, step → log,
checkpoint, evaluate. Rank 0 alone logs and saves. A run directory holds `config.yaml`, `checkpoints/`,
`metrics.jsonl`, TensorBoard events and, at the end, `curves.png`; run the same command again and it resumes from
the last checkpoint, with the losses an uninterrupted run would have had.
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

from mbt.checkpoint import latest_checkpoint, load_checkpoint, rng_state, save_checkpoint, set_rng_state
from mbt.config import ConfigError, TrainConfig, config_to_dict, load_config, per_rank_batch, save_config, validate
from mbt.dist import DistInfo, all_gather_objects, barrier, cleanup, init_distributed
from mbt.evaluate import evaluate
from mbt.model import MBT, init_from_vit
from pipelines import build_loader
from pipelines.mixup import mixup
from pipelines.stream import open_split


class TrainingError(RuntimeError):
    """The run cannot go on (a non-finite loss); the message names the step and what to try."""


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


class RunLog:
    """Rank 0's logs: metrics.jsonl, TensorBoard, the final PNG of the curves (no-ops on other ranks)."""

    def __init__(self, run_dir: Path, enabled: bool) -> None:
        self.enabled = enabled
        self.path = run_dir / "metrics.jsonl"
        self.writer = None
        if enabled:
            from torch.utils.tensorboard import SummaryWriter

            self.writer = SummaryWriter(str(run_dir / "tensorboard"))

    def write(self, row: dict[str, Any]) -> None:
        if not self.enabled:
            return
        with open(self.path, "a") as f:
            f.write(json.dumps(row) + "\n")
        for name, value in row.items():
            if name != "step" and isinstance(value, int | float):
                self.writer.add_scalar(name, value, row["step"])

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()


def plot_curves(jsonl: Path, png: Path) -> None:
    """Loss and validation metric against step, from metrics.jsonl."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = [json.loads(line) for line in jsonl.read_text().splitlines() if line.strip()]
    train = [r for r in rows if "loss" in r]
    evals = [r for r in rows if "eval_metric" in r]
    fig, (ax_loss, ax_eval) = plt.subplots(1, 2, figsize=(10, 4))
    ax_loss.plot([r["step"] for r in train], [r["loss"] for r in train])
    ax_loss.set(xlabel="step", ylabel="training loss", title="loss")
    if evals:
        name = evals[0]["eval_metric_name"]
        ax_eval.plot([r["step"] for r in evals], [r["eval_metric"] for r in evals], marker="o")
        ax_eval.set(xlabel="step", ylabel=name, title=f"validation {name}")
    fig.tight_layout()
    fig.savefig(png, dpi=100)
    plt.close(fig)


def run_evaluation(cfg: TrainConfig, model: torch.nn.Module, dist: DistInfo, out_dir: Path | None) -> dict | None:
    """Sharded evaluation of `model` on cfg.eval_shards (every sample once across ranks); metrics on rank 0."""
    split = open_split(cfg.eval_shards)
    manifest = split.manifest
    loader = build_loader(
        split, train=False, batch_size=cfg.eval_batch_size, loader=cfg.loader, num_workers=cfg.num_workers,
        rank=dist.rank, world_size=dist.world_size, augment=cfg.augment, device=dist.device,
    )  # fmt: skip
    bf16 = cfg.bf16 and dist.device.type == "cuda"
    return evaluate(model, loader, dist, manifest.multi_label, manifest.num_classes, out_dir, amp_bf16=bf16)


def train(cfg: TrainConfig, dist: DistInfo) -> dict[str, Any]:
    """Run (or resume) the training of `cfg` on this process; returns the last evaluation's metrics on rank 0."""
    run_dir = Path(cfg.out_dir)
    if dist.is_main:
        run_dir.mkdir(parents=True, exist_ok=True)
        save_config(cfg, run_dir / "config.yaml")
    split = open_split(cfg.train_shards)
    multi_label, num_classes = split.manifest.multi_label, split.manifest.num_classes
    device = dist.device

    torch.manual_seed(cfg.seed)  # the same initial weights on every rank
    model = MBT(cfg.model)
    for line in init_from_vit(model, cfg.init_video, cfg.init_audio):
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
    resume = latest_checkpoint(run_dir)
    if resume is not None:
        state = load_checkpoint(resume)
        model.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
        schedule.load_state_dict(state["schedule"])
        loader.load_state_dict(state["loader"][min(dist.rank, len(state["loader"]) - 1)])
        set_rng_state(state["rng"][min(dist.rank, len(state["rng"]) - 1)])
        step = int(state["step"])
        if dist.is_main:
            print(f"resumed from {resume} at step {step}")

    log = RunLog(run_dir, dist.is_main)
    autocast = torch.autocast("cuda", dtype=torch.bfloat16) if cfg.bf16 and device.type == "cuda" else nullcontext()
    bar = tqdm(total=total_steps, initial=step, disable=not dist.is_main, unit="step", dynamic_ncols=True)
    metrics: dict[str, Any] | None = None
    clips_seen, t_last = 0, time.perf_counter()

    def save(at_step: int) -> None:
        # Every rank's RNG and stream position (the DALI loader's pipeline checkpoint differs per rank).
        states, positions = all_gather_objects(rng_state()), all_gather_objects(loader.state_dict())
        if dist.is_main:
            save_checkpoint(run_dir, at_step, {
                "model": model.state_dict(), "optimizer": optimizer.state_dict(), "schedule": schedule.state_dict(),
                "step": at_step, "epoch": at_step // steps_per_epoch, "loader": positions,
                "rng": states, "config": config_to_dict(cfg),
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
    if dist.is_main and log.path.is_file():
        plot_curves(log.path, run_dir / "curves.png")
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
    except (ConfigError, TrainingError) as err:
        if dist.is_main:
            print(f"error: {err}", file=sys.stderr)
        return 2 if isinstance(err, ConfigError) else 1
    finally:
        cleanup()


if __name__ == "__main__":
    sys.exit(main())
