"""Streaming pipelines (DALI and PyTorch) over the shards written by `preprocess`; one batch contract
(`pipelines.config`) for both. Cut by stage: where a split is (`sources`), every sample order (`order`), reading
sample bytes (`reading`, `pipe`), decode and augmentation (`transforms`), and the two loaders over a `Split` and
`LoaderOptions` (`torch_loader`, `dali_loader` with its graph in `dali_graph`).

    split = open_split("data/shards/audioset/balanced_train")      # once per run
    loader = build_loader(split, train=True, batch_size=8, loader="auto", num_workers=8, seed=0)
"""

from __future__ import annotations

import importlib.util
from typing import Any

import torch

from pipelines.config import LoaderError, LoaderOptions
from pipelines.sources import Split, StreamSplit, open_split

__all__ = ["LOADERS", "LoaderError", "LoaderOptions", "Split", "build_loader", "open_split", "resolve_loader"]

LOADERS = ("auto", "dali", "torch")


def dali_available() -> bool:
    """Whether nvidia-dali is installed (it imports lazily: this does not load it)."""
    return importlib.util.find_spec("nvidia") is not None and importlib.util.find_spec("nvidia.dali") is not None


def resolve_loader(loader: str) -> str:
    """'dali' or 'torch' for a --loader value: auto is DALI when it is installed and CUDA is available."""
    if loader not in LOADERS:
        raise LoaderError(f"--loader must be one of {', '.join(LOADERS)}, got {loader!r}")
    if loader == "auto":
        return "dali" if dali_available() and torch.cuda.is_available() else "torch"
    return loader


def build_loader(split: Split, train: bool, batch_size: int, loader: str = "auto", **options: Any) -> Any:
    """The loader of `split` (from `open_split`) for this rank: a TorchLoader or a DaliLoader, same interface.
    Streamed splits (`pipe:` URLs) are read by the PyTorch loader.

    `options` are `LoaderOptions` fields (num_workers, rank, world_size, seed, augment, skip_bad_samples, device,
    shuffle_buffer, num_threads); DALI's `device` is 'gpu' (default when CUDA is available) or 'cpu'.
    """
    kind = resolve_loader(loader)
    if loader == "auto" and isinstance(split, StreamSplit):
        kind = "torch"
    if kind == "dali":
        from pipelines.dali_loader import DaliLoader

        options.setdefault("device", "gpu" if torch.cuda.is_available() else "cpu")
        return DaliLoader(split, train=train, batch_size=batch_size, **options)
    from pipelines.torch_loader import TorchLoader

    return TorchLoader(split, train=train, batch_size=batch_size, **options)
