"""Run under torchrun by tests/mbt/test_evaluate.py: the collectives of `mbt.dist`, and `mbt.sharded_eval.evaluate`
with a toy model where rank 0 holds every sample and the other ranks none; rank 0 writes what it got as JSON.

Also the toy model and batches that the in-process tests of `evaluate` use.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from mbt.dist import all_gather_objects, barrier, broadcast_object, cleanup, init_distributed
from mbt.sharded_eval import evaluate

NUM_CLASSES = 6
NUM_CLIPS = 3


class ToyModel(nn.Module):
    """Logits = video (R, C) * scale: a batch's `video` holds the logits each row should get."""

    def __init__(self) -> None:
        super().__init__()
        self.scale = nn.Parameter(torch.ones(()))

    def forward(self, video: torch.Tensor, audio: torch.Tensor) -> torch.Tensor:
        assert not self.training and not torch.is_grad_enabled()
        return video * self.scale


def toy_logits(num_samples: int) -> np.ndarray:
    """Row logits (N, NUM_CLIPS, C) float32 of samples s00, s01, ..., seeded."""
    return np.random.default_rng(0).normal(size=(num_samples, NUM_CLIPS, NUM_CLASSES)).astype(np.float32)


def toy_labels(num_samples: int, multi_label: bool) -> np.ndarray:
    """Multi-hot (N, C) float32 with every class positive and negative somewhere, or class indices (N,) int64."""
    if multi_label:
        return np.array([[(i + c) % 3 == 0 for c in range(NUM_CLASSES)] for i in range(num_samples)], np.float32)
    return np.arange(num_samples, dtype=np.int64) % NUM_CLASSES


def toy_batches(samples: list[int], batch_size: int, multi_label: bool) -> list[dict[str, Any]]:
    """Evaluation batches of `samples` (rows = samples x clips, the clips of a sample in reverse order), as the
    loaders give them; the keys s00, s01, ... are listed in the reverse of their sorted order."""
    samples = sorted(samples, reverse=True)
    logits = toy_logits(max(samples, default=-1) + 1)
    labels = torch.from_numpy(toy_labels(len(logits), multi_label))
    batches = []
    for start in range(0, len(samples), batch_size):
        rows = [(i, c) for i in samples[start : start + batch_size] for c in reversed(range(NUM_CLIPS))]
        batches.append({
            "video": torch.from_numpy(np.stack([logits[i, c] for i, c in rows])),
            "audio": torch.zeros(len(rows), 1, 4, 4),
            "labels": labels[[i for i, _ in rows]],
            "key": [f"s{i:02d}" for i, _ in rows],
            "clip_index": torch.tensor([c for _, c in rows]),
        })  # fmt: skip
    return batches


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("out", type=Path)
    parser.add_argument("--num-samples", type=int, default=5)
    args = parser.parse_args()
    info = init_distributed()
    gathered = all_gather_objects({"rank": info.rank, "world_size": info.world_size})
    from_last = broadcast_object(f"rank {info.rank}", src=info.world_size - 1)
    barrier()
    samples = list(range(args.num_samples)) if info.is_main else []
    batches = toy_batches(samples, batch_size=2, multi_label=True)
    metrics = evaluate(ToyModel(), batches, info, True, NUM_CLASSES, out_dir=args.out)
    if info.is_main:
        result = {"gathered": gathered, "broadcast": from_last, "metrics": metrics}
        (args.out / "dist.json").write_text(json.dumps(result))
    cleanup()


if __name__ == "__main__":
    main()
