"""Helpers for loader tests: the augmentation sizes that fit 2 s demo clips, and reading a loader out."""

from __future__ import annotations

from typing import Any

import torch

from pipelines.config import AugmentConfig

# 2 s clips: 200 log-mel frames, so 160-frame windows (4 test clips start at 0, 13, 27, 40) and smaller masks.
SMALL_AUG = AugmentConfig(audio_frames=160, time_mask_px=40, freq_mask_px=24)


def rows_by_key(loader: Any) -> dict[tuple[str, int], dict[str, torch.Tensor]]:
    """{(key, clip_index): row} over one pass of an evaluation loader; fails on a (key, clip) seen twice."""
    rows: dict[tuple[str, int], dict[str, torch.Tensor]] = {}
    for batch in loader:
        for i, key in enumerate(batch["key"]):
            ident = (key, int(batch["clip_index"][i]))
            assert ident not in rows, f"{ident} seen twice"
            rows[ident] = {name: batch[name][i] for name in ("video", "audio", "labels")}
    return rows
