"""Distributed set-up from torchrun's environment, and the few collectives that training and evaluation use.

Under torchrun (RANK, WORLD_SIZE, LOCAL_RANK set) `init_distributed` joins the process group through `env://`:
NCCL with one GPU per process when CUDA is available, gloo on CPU. Run as a plain process it creates no group and
is rank 0 of 1; the helpers below then act on this process alone, so callers need no branch for it.
"""

from __future__ import annotations

import os
import pickle
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, TypeVar

import torch
import torch.distributed as torch_dist

T = TypeVar("T")


@dataclass(frozen=True)
class DistInfo:
    """Where this process stands: its global and node-local rank, the world size and the device it computes on."""

    rank: int
    local_rank: int
    world_size: int
    device: torch.device

    @property
    def is_main(self) -> bool:
        """Rank 0: the process that logs, writes files and computes gathered metrics."""
        return self.rank == 0


def launched_by_torchrun() -> bool:
    """Whether torchrun's environment variables are set."""
    return all(name in os.environ for name in ("RANK", "WORLD_SIZE", "LOCAL_RANK"))


def env_main_rank() -> bool:
    """Whether torchrun's environment makes this process rank 0 (or it runs alone): what a command that stops before
    or without the process group asks, to print its one line once."""
    return int(os.environ.get("RANK", "0")) == 0


def init_distributed(device: str = "auto") -> DistInfo:
    """Join torchrun's process group (NCCL on CUDA, gloo on CPU), or describe a single process without one.

    `device`: "auto" (CUDA when available), "cuda" (an error without it) or "cpu" (even where CUDA is present).
    """
    if device == "cuda" and not torch.cuda.is_available():
        raise RuntimeError("--device cuda, but torch sees no CUDA device; use --device cpu or auto")
    cuda = device == "cuda" or (device == "auto" and torch.cuda.is_available())
    if not launched_by_torchrun():
        return DistInfo(0, 0, 1, torch.device("cuda" if cuda else "cpu"))
    rank, world_size, local_rank = (int(os.environ[n]) for n in ("RANK", "WORLD_SIZE", "LOCAL_RANK"))
    if cuda:
        torch.cuda.set_device(local_rank)  # before the group exists, so NCCL binds this process to its own GPU
        dev, backend = torch.device("cuda", local_rank), "nccl"
    else:
        dev, backend = torch.device("cpu"), "gloo"
    if not torch_dist.is_initialized():
        torch_dist.init_process_group(backend, init_method="env://", rank=rank, world_size=world_size)
    return DistInfo(rank, local_rank, world_size, dev)


def is_distributed() -> bool:
    """Whether a process group is up."""
    return torch_dist.is_available() and torch_dist.is_initialized()


def cleanup() -> None:
    """Leave the process group, if one is up."""
    if is_distributed():
        torch_dist.destroy_process_group()


def barrier() -> None:
    """Wait for every rank (a no-op in a single process)."""
    if not is_distributed():
        return
    if torch_dist.get_backend() == "nccl":
        torch_dist.barrier(device_ids=[torch.cuda.current_device()])
    else:
        torch_dist.barrier()


BUCKET_BYTES = 64 << 20  # one all-reduce per 64 MiB of gradient, as DDP's buckets: not one per tensor


def mean_over_ranks_(tensors: list[torch.Tensor]) -> None:
    """Replace each tensor in place by its mean over the ranks, as DDP's gradient all-reduce does (unchanged in a
    single process); every rank must pass tensors of the same shapes, dtypes and order. Tensors of one dtype and
    device are packed into buckets of at most BUCKET_BYTES (a larger tensor alone), one all-reduce each."""
    world_size = torch_dist.get_world_size() if is_distributed() else 1
    if world_size == 1 or not tensors:
        return
    groups: dict[tuple[torch.dtype, torch.device], list[torch.Tensor]] = {}
    for tensor in tensors:
        groups.setdefault((tensor.dtype, tensor.device), []).append(tensor)
    buckets: list[list[torch.Tensor]] = []
    for group in groups.values():
        bucket: list[torch.Tensor] = []
        size = 0
        for tensor in group:
            nbytes = tensor.numel() * tensor.element_size()
            if bucket and size + nbytes > BUCKET_BYTES:
                buckets.append(bucket)
                bucket, size = [], 0
            bucket.append(tensor)
            size += nbytes
        buckets.append(bucket)
    flats = [torch.cat([t.reshape(-1) for t in bucket]) for bucket in buckets]
    works = [torch_dist.all_reduce(flat, async_op=True) for flat in flats]  # SUM: gloo has no AVG
    for bucket, flat, work in zip(buckets, flats, works, strict=True):
        work.wait()
        flat.div_(world_size)
        chunks = flat.split([t.numel() for t in bucket])
        torch._foreach_copy_(bucket, [chunk.view_as(t) for chunk, t in zip(chunks, bucket, strict=True)])


def all_gather_objects(obj: Any) -> list[Any]:
    """Every rank's picklable `obj`, in rank order, on every rank (`[obj]` in a single process)."""
    if not is_distributed():
        return [obj]
    gathered: list[Any] = [None] * torch_dist.get_world_size()
    torch_dist.all_gather_object(gathered, obj)
    return gathered


def broadcast_object(obj: Any, src: int = 0) -> Any:
    """Rank `src`'s picklable `obj` on every rank (the other ranks' `obj` is ignored); `obj` in a single process."""
    if not is_distributed():
        return obj
    box = [obj]
    torch_dist.broadcast_object_list(box, src=src)
    return box[0]


def all_max(value: int) -> int:
    """The largest of every rank's int `value`, on every rank (`value` in a single process)."""
    if not is_distributed():
        return value
    nccl = torch_dist.get_backend() == "nccl"  # NCCL reduces CUDA tensors only
    tensor = torch.tensor([value], dtype=torch.int64, device=torch.cuda.current_device() if nccl else "cpu")
    torch_dist.all_reduce(tensor, op=torch_dist.ReduceOp.MAX)
    return int(tensor.item())


def on_main_rank(fn: Callable[[], T]) -> T | None:
    """`fn()` run by rank 0 alone (a file it writes): its result there, None on the other ranks. When it raises,
    every rank raises (the others a copy of rank 0's error), so that no rank waits at a collective another has left:
    the outcome is broadcast, and every rank must call this. In a single process it is `fn()`."""
    if not is_distributed():
        return fn()
    result, error = None, None
    if torch_dist.get_rank() == 0:
        try:
            result = fn()
        except Exception as err:
            error = err
    shared = broadcast_object(None if error is None else _portable(error))
    if error is not None:
        raise error
    if shared is not None:
        raise shared
    return result


def _portable(err: Exception) -> Exception:
    """`err` if it survives pickling (a broadcast), else a RuntimeError with its type and message."""
    try:
        pickle.loads(pickle.dumps(err))
    except Exception:
        return RuntimeError(f"rank 0: {type(err).__name__}: {err}")
    return err
