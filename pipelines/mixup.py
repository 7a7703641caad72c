"""Mixup on the training side, for batches of either loader: one λ for both modalities (MBT)."""

from __future__ import annotations

from typing import Any

import numpy as np
import torch


def mixup(batch: dict[str, Any], alpha: float, num_classes: int, rng: np.random.Generator) -> dict[str, Any]:
    """The batch mixed with itself reversed: x = λ x + (1 - λ) x.flip(0) for video, audio and labels.

    λ ~ Beta(α, α), one draw per batch from `rng`, the same for both modalities. Labels become float (B, C):
    multi-hot ones are mixed as they are, class indices are one-hot encoded first. `mixup_lambda` holds λ.
    `alpha` <= 0 returns the batch unchanged.
    """
    if alpha <= 0:
        return batch
    lam = float(rng.beta(alpha, alpha))
    labels = batch["labels"]
    if not labels.is_floating_point():
        labels = torch.nn.functional.one_hot(labels.long(), num_classes).float()
    mixed = dict(batch)
    for name, value in (("video", batch["video"]), ("audio", batch["audio"]), ("labels", labels)):
        mixed[name] = lam * value + (1.0 - lam) * value.flip(0)
    mixed["mixup_lambda"] = lam
    return mixed
