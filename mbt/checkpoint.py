"""Training checkpoints: one dict with everything needed to resume, written atomically, the last K kept.

`run_dir/checkpoints/step-00001234.pt` holds model, optimizer, schedule, step, epoch, the loader's stream position,
RNG states and the resolved config. Writes go to a temporary name, then a rename: a killed run leaves the
previous checkpoint whole. Loading uses `torch.load(weights_only=True)`: tensors and plain containers only.
"""

from __future__ import annotations

import os
import re
from pathlib import Path
from typing import Any

import torch

CHECKPOINT_DIR = "checkpoints"
_NAME = re.compile(r"^step-(\d{8})\.pt$")


def checkpoint_path(run_dir: Path, step: int) -> Path:
    return Path(run_dir) / CHECKPOINT_DIR / f"step-{step:08d}.pt"


def list_checkpoints(run_dir: Path) -> list[Path]:
    """The run's checkpoints, oldest first."""
    folder = Path(run_dir) / CHECKPOINT_DIR
    if not folder.is_dir():
        return []
    return sorted(p for p in folder.iterdir() if _NAME.match(p.name))


def latest_checkpoint(run_dir: Path) -> Path | None:
    found = list_checkpoints(run_dir)
    return found[-1] if found else None


def save_checkpoint(run_dir: Path, step: int, state: dict[str, Any], keep: int) -> Path:
    """Write `state` as the checkpoint of `step` (temporary file, fsync, rename), then keep only the last `keep`."""
    path = checkpoint_path(run_dir, step)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "wb") as f:
        torch.save(state, f)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    for old in list_checkpoints(run_dir)[: -max(keep, 1)]:
        old.unlink()
    return path


def load_checkpoint(path: Path) -> dict[str, Any]:
    """The checkpoint at `path` (weights_only: no code is run); a clear error when it is missing or unreadable."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no such checkpoint")
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # any unpickling failure means the same thing to the user
        message = f"{path}: not a readable checkpoint ({err}); delete it to resume from the previous one"
        raise RuntimeError(message) from err


def rng_state() -> dict[str, Any]:
    """Torch's CPU and CUDA generator states (dropout and stochastic depth draw from them)."""
    state: dict[str, Any] = {"torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])
