"""What a training says before its first step (rank 0, plain lines): the model (parameters per tower, forward
GFLOPs per clip), device and world size, the batch per rank and over all ranks, steps per epoch and in all, the
clips of each split, the weights it starts from, the log-mel normalization, the memory it needs and has, and where
its files go; a batch larger than the training split is named with the flag to change.
"""

from __future__ import annotations

import math
from collections import Counter
from pathlib import Path

from mbt.checkpoint import BEST_NAME, CHECKPOINT_DIR
from mbt.config import TrainConfig
from mbt.dist import DistInfo
from mbt.flops import count_flops
from mbt.memory import MemoryVerdict
from mbt.model_size import param_shapes
from pipelines import Split


def parameter_counts(cfg: TrainConfig) -> Counter[str]:
    """Parameters of the model of `cfg` by part: each tower ("video", "audio") and "shared" (bottleneck tokens and
    the head), counted from its shapes on the meta device."""
    counts: Counter[str] = Counter({modality: 0 for modality in cfg.model.modalities})
    for name, shape in param_shapes(cfg.model).items():
        parts = name.split(".")
        counts[parts[1] if parts[0] == "towers" else "shared"] += math.prod(shape)
    return counts


def _millions(n: int) -> str:
    return f"{n / 1e6:.3g}M"


def startup_summary(
    cfg: TrainConfig,
    dist: DistInfo,
    splits: tuple[Split, Split | None],
    steps: tuple[int, int],
    memory: MemoryVerdict,
    init: list[str],
) -> list[str]:
    """The lines rank 0 prints before the first step of the training of `cfg` over the (training, evaluation)
    `splits`, of (steps per epoch, steps in all), with the `memory` verdict and the towers' `init` lines."""
    train, evaluation = splits
    steps_per_epoch, total_steps = steps
    counts = parameter_counts(cfg)
    towers = ", ".join(f"{part} {_millions(n)}" for part, n in counts.items())
    micro = cfg.batch_size // (dist.world_size * cfg.grad_accum)
    backend = ("nccl" if dist.device.type == "cuda" else "gloo") if dist.world_size > 1 else "one process"
    model = cfg.model
    lines = [
        f"model: MBT {model.fusion} fusion, {_millions(sum(counts.values()))} parameters ({towers}), "
        f"{count_flops(model)['forward_gflops']:.4g} GFLOPs forward per clip",
        f"device: {dist.device} ({backend}), world size {dist.world_size}",
        f"batch: {cfg.batch_size} clips per step = {micro} per rank x {dist.world_size} rank(s) x {cfg.grad_accum} "
        "accumulated micro-batch(es)",
        f"steps: {steps_per_epoch} per epoch, {total_steps} in all ({total_steps / steps_per_epoch:.3g} epochs)",
        f"data: training {train.manifest.num_samples} clips ({cfg.train_shards}); "
        + (
            f"evaluation {evaluation.manifest.num_samples} clips ({cfg.eval_shards})" if evaluation else "no evaluation"
        ),
        *(f"init: {line}" for line in init or ["none (random weights)"]),
        f"log-mel normalization: mean {cfg.augment.logmel_mean:.4g}, std {cfg.augment.logmel_std:.4g} "
        + ("(the training split's statistics)" if _from_split(cfg, train) else "(as configured)"),
        f"memory: {memory.describe()}",
        f"outputs: {cfg.out_dir} (config.yaml, metrics.jsonl, tensorboard/, curves.png); checkpoints "
        f"{Path(cfg.out_dir) / CHECKPOINT_DIR} (every {cfg.checkpoint_every_steps} steps and the last, the last "
        f"{cfg.keep_checkpoints} kept, and {BEST_NAME}: the best evaluation's)"
        + (f"; evaluation {Path(cfg.out_dir) / 'eval'}" if evaluation else ""),
    ]
    if cfg.batch_size > train.manifest.num_samples:
        lines.append(
            f"warning: the batch of {cfg.batch_size} clips is larger than the training split of "
            f"{train.manifest.num_samples}: each step repeats clips; lower --batch_size to at most "
            f"{train.manifest.num_samples}"
        )
    if memory.warning:
        lines.append(f"warning: {memory.warning}")
    return lines


def _from_split(cfg: TrainConfig, split: Split) -> bool:
    stats = split.manifest.logmel
    return (cfg.augment.logmel_mean, cfg.augment.logmel_std) == (stats.mean, stats.std)
