"""Run under torchrun by tests/mbt/test_step.py: one `TrainStep` on two gloo ranks, each with its own batch, for each
`clip_grad_scope`; rank 0 saves the update each parameter took (SGD at lr 1 without momentum: the gradient used).

Also the model, batches and config that the test computes the expected gradients from in one process.
"""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

import torch
from torch.nn.parallel import DistributedDataParallel

import mbt.dist
from mbt.config import CLIP_GRAD_SCOPES, TrainConfig
from mbt.dist import cleanup, init_distributed
from mbt.model import MBT, MBTConfig
from mbt.step import TrainStep
from pipelines.config import AugmentConfig

MODEL = MBTConfig(
    num_classes=5, embed_dim=32, depth=2, num_heads=2, fusion_layer=1, num_bottlenecks=2,
    num_frames=2, img_size=32, audio_frames=64, num_mel_bins=32,
)  # fmt: skip
MAX_NORM = 0.05  # far below either rank's gradient norm: both scopes clip


def initial_model() -> MBT:
    """The seeded model every rank starts from, with a random head (at its zero init no gradient reaches the
    towers)."""
    torch.manual_seed(0)
    model = MBT(MODEL)
    torch.nn.init.normal_(model.head.weight, std=0.5)
    return model


def rank_batch(rank: int) -> dict[str, Any]:
    """Rank `rank`'s batch of 2 clips: its own random inputs and multi-hot labels."""
    gen = torch.Generator().manual_seed(100 + rank)
    return {
        "video": torch.randn(2, MODEL.num_frames, 3, MODEL.img_size, MODEL.img_size, generator=gen),
        "audio": torch.randn(2, 1, MODEL.audio_frames, MODEL.num_mel_bins, generator=gen),
        "labels": (torch.rand(2, MODEL.num_classes, generator=gen) < 0.5).float(),
        "key": [f"r{rank}a", f"r{rank}b"],
    }


def train_config(scope: str) -> TrainConfig:
    """SGD at lr 1 from the first step (no warm-up), no momentum, mixup or smoothing: the update is the gradient."""
    return TrainConfig(
        model=MODEL, augment=AugmentConfig(mixup_alpha=0.0), batch_size=4, lr=1.0, momentum=0.0, warmup_epochs=0.0,
        label_smoothing=0.0, clip_grad_norm=MAX_NORM, clip_grad_scope=scope, bf16=False,
    )  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("out", type=Path)
    args = parser.parse_args()
    info = init_distributed("cpu")
    mbt.dist.BUCKET_BYTES = 4096  # several buckets of packed small tensors, and larger tensors alone
    updates = {}
    for scope in CLIP_GRAD_SCOPES:
        model = initial_model()
        before = {name: p.detach().clone() for name, p in model.named_parameters()}
        step = TrainStep(DistributedDataParallel(model), train_config(scope), True, 1, info.device, info.rank)
        step(iter([rank_batch(info.rank)]), 0)
        updates[scope] = {name: before[name] - p.detach() for name, p in model.named_parameters()}
    if info.is_main:
        torch.save(updates, args.out / "updates.pt")
    cleanup()


if __name__ == "__main__":
    main()
