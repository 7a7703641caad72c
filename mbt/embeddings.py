"""Per-clip embeddings of MBT for retrieval and linear probes: each tower's pooled features and the fused bottleneck
tokens, taken from the model's own `forward_features` and `forward_head` (the logits are the model's), written as one
`.npz` by `serve.predict` and `mbt.evaluate --embeddings`.

The bottleneck tokens are not among forward_features' outputs: they are read by forward hooks on each tower's last
block, whose output ends with that tower's update of the B bottleneck tokens; their mean over the towers is the
model's final bottleneck (as `MBT._bottleneck_layer` averages them).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np
import torch

from mbt.model import MBT, pool_tokens
from shards.atomic import atomic_write

Embedding = dict[str, np.ndarray]  # name → float32 array of one clip: "video" (D,), "audio" (D,), "bottleneck" (B, D)


def forward_with_embeddings(
    model: MBT, video: torch.Tensor | None, audio: torch.Tensor | None
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """(logits (R, C) as `model(video, audio)` gives them, embeddings {name: (R, ...)}): each tower's pooled
    features (`mbt.model.pool_tokens`: its CLS token, or the mean, maximum or sum of its tokens), (R, D), and while
    the fused layers run with bottleneck tokens (`MBT.bottleneck_in_use`), "bottleneck", the final ones (R, B, D)."""
    captured: list[torch.Tensor] = []
    hooks = []
    if model.bottleneck_in_use():
        count = model.cfg.bottleneck_tokens
        for tower in model.towers.values():
            hooks.append(tower.blocks[-1].register_forward_hook(lambda _m, _i, out: captured.append(out[:, -count:])))
    try:
        features = model.forward_features(video, audio)
    finally:
        for hook in hooks:
            hook.remove()
    logits = model.forward_head(features)
    pooled = {m: pool_tokens(t, model.cfg.pool) for m, t in features.items()}
    if captured:
        pooled["bottleneck"] = torch.stack(captured).mean(0)
    return logits, pooled


def rows_as_numpy(embeddings: Mapping[str, torch.Tensor]) -> list[Embedding]:
    """One Embedding per row of a batch's embeddings (float32 on the CPU)."""
    arrays = {name: t.float().cpu().numpy() for name, t in embeddings.items()}
    count = len(next(iter(arrays.values()))) if arrays else 0
    return [{name: a[i] for name, a in arrays.items()} for i in range(count)]


def mean_embedding(clips: Sequence[Embedding]) -> Embedding:
    """The mean of a sample's test clips' embeddings, in the order given."""
    return {name: np.stack([c[name] for c in clips]).mean(axis=0) for name in clips[0]}


def write_embeddings(path: Path, keys: Sequence[str], embeddings: Sequence[Embedding]) -> Path:
    """`path` (.npz, written atomically; a full disk is DiskFullError naming it): `keys` (N,) and one array per name,
    (N, D) per tower and (N, B, D) for the bottleneck."""
    path.parent.mkdir(parents=True, exist_ok=True)
    names = list(embeddings[0]) if embeddings else []
    arrays = {name: np.stack([e[name] for e in embeddings]) for name in names}
    with atomic_write(path) as f:
        np.savez(f, keys=np.asarray(list(keys), dtype=str), **arrays)
    return path
