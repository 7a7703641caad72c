"""Streaming pipelines (DALI and PyTorch) over the shards written by `preprocess`; one batch contract
(`pipelines.config`) for both."""

from __future__ import annotations

import importlib.util
from pathlib import Path
from typing import Any

import torch

from pipelines.split import LoaderError, SplitIndex
from pipelines.stream import StreamSplit, open_split

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


def build_loader(
    folder: str | Path | SplitIndex | StreamSplit, train: bool, batch_size: int, loader: str = "auto", **kwargs: Any
) -> Any:
    """The loader of `folder` (a split of shards, see `pipelines.stream.open_split`) for this rank: a TorchLoader or
    a DaliLoader, same interface. Streamed splits (`pipe:` URLs) are read by the PyTorch loader.

    `kwargs` go to the loader (num_workers, rank, world_size, seed, augment, skip_bad_samples, device, ...);
    DALI's `device` is 'gpu' (default when CUDA is available) or 'cpu', and it takes `num_threads`.
    """
    kind = resolve_loader(loader)
    split = open_split(folder)
    if loader == "auto" and isinstance(split, StreamSplit):
        kind = "torch"
    if kind == "dali":
        from pipelines.dali_loader import DaliLoader

        kwargs.setdefault("device", "gpu" if torch.cuda.is_available() else "cpu")
        return DaliLoader(split, train=train, batch_size=batch_size, **kwargs)
    from pipelines.torch_loader import TorchLoader

    kwargs.pop("num_threads", None)
    if kwargs.get("device") == "gpu":  # DALI's name for it
        kwargs["device"] = "cuda"
    return TorchLoader(split, train=train, batch_size=batch_size, **kwargs)
