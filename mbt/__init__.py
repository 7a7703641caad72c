"""The Multimodal Bottleneck Transformer: model, training and evaluation.

`mbt.load_pretrained(folder)` gives an exported model (tools/export_model.py) in eval mode and its preprocessing; it is
imported on first use, so that `import mbt.model` stays free of the data packages.
"""

from __future__ import annotations

from typing import Any

__all__ = ["load_pretrained"]


def __getattr__(name: str) -> Any:
    if name == "load_pretrained":
        from mbt.export import load_pretrained

        return load_pretrained
    raise AttributeError(f"module 'mbt' has no attribute {name!r}")
