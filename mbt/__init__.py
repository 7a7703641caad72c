"""The Multimodal Bottleneck Transformer: the model, its configuration and presets, the training step and loop,
evaluation and metrics, checkpoints and distributed set-up. It imports `shards` and `pipelines` only; what comes
after training (loading an export, prediction on raw videos) is `serve`.
"""

from __future__ import annotations

from typing import Any


def __getattr__(name: str) -> Any:
    if name == "load_pretrained":  # its home until the re-cut that made `serve`
        raise AttributeError("mbt.load_pretrained moved to serve: use `from serve import load_pretrained`")
    raise AttributeError(f"module 'mbt' has no attribute {name!r}")
