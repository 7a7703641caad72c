"""Training fed by a loader against training fed by synthetic tensors already in memory (`tools/bench_train.py`,
`tools/gpu_check.py`): the model of a real run over the shards' input, the recipe's training step
(`mbt.step.TrainStep`), a synthetic batch of the loaders' contract, and the two feeds timed in alternation."""

from __future__ import annotations

import itertools
import statistics
from collections.abc import Callable, Iterator
from typing import Any

import torch

from bench.loader import endless_batches
from bench.model import multi_hot_labels
from bench.timing import time_rounds
from mbt.config import TrainConfig
from mbt.flops import example_inputs, size_config
from mbt.model import MBT, MBTConfig
from mbt.step import TrainStep
from pipelines.config import AugmentConfig
from shards.manifest import Manifest

FEEDS = ("synthetic", "real")
RECIPE = TrainConfig()  # the MBT recipe: SGD, momentum, label smoothing, mixup, clipping, stochastic depth


def model_config(
    size: str, manifest: Manifest, frames: int | None = None, crop: int | None = None, audio_frames: int | None = None
) -> MBTConfig:
    """The MBTConfig of `size` (widths, depth, fusion layer) over a real run's input from the shards of `manifest`:
    their classes, `frames` (default: all they store), `crop` pixels (default: the recipe's 224), `audio_frames`
    (default: the recipe's 800, cut to theirs); with the recipe's stochastic depth."""
    features = manifest.features
    return size_config(
        size,
        num_classes=manifest.num_classes,
        num_frames=frames or features.num_frames,
        img_size=crop or RECIPE.augment.crop_px,
        audio_frames=audio_frames or min(RECIPE.augment.audio_frames, features.fbank_frames),
        drop_path_rate=RECIPE.model.drop_path_rate,
    )


def recipe_augment(model_cfg: MBTConfig) -> AugmentConfig:
    """The recipe's augmentation at the model's crop, frames and log-mel length."""
    return RECIPE.augment.replace(
        crop_px=model_cfg.img_size, frames_used=model_cfg.num_frames, audio_frames=model_cfg.audio_frames
    )


def recipe_train_step(
    model_cfg: MBTConfig,
    augment: AugmentConfig,
    batch: int,
    multi_label: bool,
    loader_batches: int,
    device: torch.device,
    grad_accum: int = 1,
    **recipe: Any,
) -> TrainStep:
    """The recipe's training step (with `recipe`'s TrainConfig fields changed) over a fresh MBT of `model_cfg` on
    `device`, seeded 0: `grad_accum` micro-batches of `batch` clips a step, an epoch of `loader_batches` batches."""
    cfg = RECIPE.replace(
        model=model_cfg, augment=augment, batch_size=batch * grad_accum, grad_accum=grad_accum, **recipe
    )
    torch.manual_seed(0)
    return TrainStep(MBT(model_cfg).to(device), cfg, multi_label, loader_batches, device)


def synthetic_batch(cfg: MBTConfig, batch: int, multi_label: bool, device: torch.device) -> dict[str, Any]:
    """A batch of the loaders' contract for `cfg` on `device`: video (B, F, 3, H, W) and audio (B, 1, T, mel)
    float32, labels multi-hot float32 (B, C) or int64 class indices (B,), keys."""
    if multi_label:
        labels = multi_hot_labels(batch, cfg.num_classes, device)
    else:
        labels = torch.randint(0, cfg.num_classes, (batch,), device=device)
    return {**example_inputs(cfg, batch, device), "labels": labels, "key": [f"synthetic{i}" for i in range(batch)]}


def check_contract(real: dict[str, Any], synthetic: dict[str, Any]) -> None:
    """Raise ValueError unless the loader's batch has the synthetic batch's shapes and dtypes."""
    for name in ("video", "audio", "labels"):
        got, want = real[name], synthetic[name]
        if got.shape != want.shape or got.dtype != want.dtype:
            raise ValueError(
                f"the loader's {name} is {tuple(got.shape)} {got.dtype}, the model expects {tuple(want.shape)} "
                f"{want.dtype}: the shards do not fit --frames / --crop / --batch"
            )


def start_feeds(loader: Any, synthetic: dict[str, Any]) -> dict[str, Iterator[dict[str, Any]]]:
    """{synthetic: `synthetic` again and again, real: `loader`'s training batches epoch after epoch}, the loader's
    workers started and its first batch taken (and checked against the contract) before any timing."""
    batches = endless_batches(loader)
    check_contract(next(batches), synthetic)
    return {"synthetic": itertools.repeat(synthetic), "real": batches}


def loader_vs_synthetic(
    train_step: TrainStep,
    feeds: dict[str, Iterator[dict[str, Any]]],
    steps: int,
    warmup: int,
    blocks: int,
    device: torch.device | None = None,
) -> dict[str, float]:
    """Each feed's (an iterator of batches) {feed}_clips_s (total clips / total time) and {feed}_step_s (median
    step) of `train_step`, after `warmup` untimed steps each, over `blocks` rounds of `steps` timed steps of each
    feed in turn; with loader_vs_synthetic (from the totals) and loader_vs_synthetic_median."""
    step_index = itertools.count()  # one count for both feeds: mixup draws anew at every step

    def step_on(batches: Iterator[dict[str, Any]]) -> Callable[[], float]:
        return lambda: train_step(batches, next(step_index))

    calls = {feed: step_on(batches) for feed, batches in feeds.items()}
    times = time_rounds(calls, blocks, warmup, repeats=steps, device=device)
    clips = train_step.clips  # per step, the same for both feeds: the loaders give whole training batches
    result = {f"{feed}_clips_s": clips * len(times[feed]) / sum(times[feed]) for feed in feeds}
    result |= {f"{feed}_step_s": statistics.median(times[feed]) for feed in feeds}
    result["loader_vs_synthetic"] = result["real_clips_s"] / result["synthetic_clips_s"]
    result["loader_vs_synthetic_median"] = result["synthetic_step_s"] / result["real_step_s"]
    return result


def add_mfu(result: dict[str, float], train_gflops: float, peak_tflops: float) -> dict[str, float]:
    """`result` with {feed}_mfu: each feed's clips/s x `train_gflops` per clip over `peak_tflops`."""
    for feed in FEEDS:
        result[f"{feed}_mfu"] = result[f"{feed}_clips_s"] * train_gflops / 1e3 / peak_tflops
    return result
