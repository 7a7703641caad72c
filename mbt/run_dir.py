"""The run folder of a training: one training writes it at a time, and a run resumes only with the settings and
classes its checkpoints were trained with, from a checkpoint whose every part fits the run.

Rank 0 holds an exclusive `flock` on `out_dir/train.lock` for the whole training; a second training of the same
folder is refused at once. Settings in RESUMABLE (where and how data is read, evaluated, logged and saved, how long
to run) may change when a run resumes; any other (the model, the optimisation recipe, the training augmentation,
the seed, the batch) would give the checkpoint's weights, optimizer state, schedule or stream position another
meaning, and is refused before anything is written.
"""

from __future__ import annotations

import fcntl
import os
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch

from mbt.checkpoint import RESUME_ADVICE, CheckpointFileError, check_resume_state, error_summary, set_rng_state
from mbt.classes import ClassListError, checked_record, record_difference
from mbt.config import ConfigError, TrainConfig, config_from_dict, config_to_dict
from mbt.dist import DistInfo, broadcast_object
from pipelines.config import records_logmel_norm, with_logmel_norm
from shards.atomic import DISK_FULL_ERRNOS, disk_full
from shards.manifest import LogmelStats

LOCK_NAME = "train.lock"
RESUMABLE = frozenset(
    {
        "train_shards", "eval_shards", "loader", "num_workers", "shuffle_buffer", "eval_batch_size",
        "skip_bad_samples", "init", "init_required", "init_video", "init_audio", "max_steps", "out_dir",
        "eval_every_epochs", "checkpoint_every_steps", "keep_checkpoints", "log_every_steps", "bf16", "compile",
        "device",
        "model.grad_checkpointing", "augment.eval_short_side_px", "augment.num_test_clips",
    }
)  # fmt: skip


class RunDirError(RuntimeError):
    """The run folder is being written by another training, or cannot be made; the message names it."""


@contextmanager
def locked_run_dir(run_dir: Path, dist: DistInfo) -> Iterator[None]:
    """Make `run_dir` and hold its lock while the block runs (rank 0 takes it; every rank raises RunDirError when
    rank 0 could not, so that no rank goes on alone)."""
    fd, problem = None, None
    if dist.is_main:
        try:
            run_dir.mkdir(parents=True, exist_ok=True)
            # Held open for the whole block (closing it releases the lock); a symlink planted there is not followed.
            fd = os.open(run_dir / LOCK_NAME, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW, 0o644)
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            problem = (
                f"--out_dir {run_dir} is being written by another training (it holds {run_dir / LOCK_NAME}): "
                "wait for it to end, or pass another --out_dir"
            )
        except OSError as err:
            problem = f"--out_dir {run_dir}: cannot make or lock it ({err.strerror}); pass a writable folder"
            if err.errno in DISK_FULL_ERRNOS:
                problem = str(disk_full(run_dir / LOCK_NAME, err.errno))
    problem = broadcast_object(problem)
    try:
        if problem:
            raise RunDirError(problem)
        yield
    finally:
        if fd is not None:
            os.close(fd)


def config_changes(old: TrainConfig, new: TrainConfig) -> list[str]:
    """'key: old → new' for each setting outside RESUMABLE that differs between `old` and `new`."""
    before, after = _flat(config_to_dict(old)), _flat(config_to_dict(new))
    return [
        f"{key}: {before[key]!r} → {after[key]!r}"
        for key in after
        if key not in RESUMABLE and before[key] != after[key]
    ]


def check_resume(
    state: Mapping[str, Any],
    path: Path,
    cfg: TrainConfig,
    record: Mapping[str, Any],
    stats: LogmelStats,
    world_size: int,
) -> list[str]:
    """Raise unless the checkpoint `state` (read from `path`) can resume the training of `cfg` on the split whose
    class record is `record` and log-mel statistics `stats`: CheckpointFileError if it is not a whole training
    checkpoint, ConfigError listing the settings (old → new) or the classes that differ. Returns warnings: no class
    record or log-mel normalization (an older checkpoint, which normalized by `pipelines.config.logmel_norm` with the
    training split's statistics), another number of ranks."""
    check_resume_state(state, path)
    run_dir = path.parent.parent
    try:
        saved = config_from_dict(state["config"])
    except ConfigError as err:
        raise ConfigError(f"{path}: its config does not fit this version ({err}); pass a new --out_dir") from None
    warnings = []
    if not records_logmel_norm(saved.augment):
        augment = cfg.augment
        warnings.append(
            f"{path} records no log-mel normalization (an older checkpoint; it normalized with the training split's "
            f"statistics): this run records the training split's, mean {augment.logmel_mean} std {augment.logmel_std}"
        )
        saved = saved.replace(augment=with_logmel_norm(saved.augment, stats))
    problems = config_changes(saved, cfg)
    if "data" not in state:
        warnings.append(f"{path} records no class list (an older checkpoint): the training split's is not checked")
    else:
        try:
            difference = record_difference(
                checked_record(state["data"], str(path)), record, f"the checkpoint {path.name}", "--train_shards"
            )
        except ClassListError as err:
            raise ConfigError(f"{err}; pass a new --out_dir") from None
        if difference:
            problems.append(f"classes: {difference}")
    if problems:
        raise ConfigError(
            f"--out_dir {run_dir} holds checkpoints of a run with other settings ({path.name}): "
            + "; ".join(problems)
            + f". Pass a new --out_dir, or resume with the run's settings (--config {run_dir / 'config.yaml'}) "
            "and its training split"
        )
    saved_ranks = len(state["loader"])
    if saved_ranks != world_size:
        warnings.append(
            f"{path.name} was saved by {saved_ranks} rank(s), this run has {world_size}: rank r goes on from rank "
            f"min(r, {saved_ranks - 1})'s stream position and random state, so the rest of this epoch may see some "
            "samples twice and others not at all"
        )
    return warnings


def restore(state: dict[str, Any], path: Path, parts: dict[str, Any], rank: int, loader_batches: int) -> int:
    """Load a checked resume `state` (from `path`) into `parts` (model, optimizer, schedule, loader) and this rank's
    RNG; the step it was saved at. CheckpointFileError naming the file and the part that does not fit."""
    saved_rank = min(rank, len(state["loader"]) - 1)
    part = "state"
    try:
        problem = _restore_problem(state, parts, saved_rank, loader_batches)
        if problem is None:
            for part in ("model", "optimizer", "schedule"):
                parts[part].load_state_dict(state[part])
            part = "loader"
            parts["loader"].load_state_dict(state["loader"][saved_rank])
            part = "rng"
            set_rng_state(state["rng"][saved_rank])
    except (RuntimeError, ValueError, KeyError, TypeError, IndexError, AttributeError) as err:
        problem = f"its {part} does not fit this run ({error_summary(err)})"
    if problem:
        raise CheckpointFileError(f"{path}: {problem}; {RESUME_ADVICE}")
    return state["step"]


def _restore_problem(state: dict[str, Any], parts: dict[str, Any], saved_rank: int, loader_batches: int) -> str | None:
    """What in `state` would load without an error and still be wrong: a stream position past the epoch, schedule
    entries of another kind or step, optimizer settings or moment shapes other than the model's and config's."""
    batches = state["loader"][saved_rank]["batches"]
    if batches > loader_batches:
        return f"its loader position, batch {batches}, is past the {loader_batches} batches of an epoch"
    schedule, fresh_schedule = state["schedule"], parts["schedule"].state_dict()
    if not set(schedule) <= set(fresh_schedule) or schedule.get("last_epoch") != state["step"]:
        return f"its schedule is not the state of this run's schedule at step {state['step']}"
    optimizer, fresh = state["optimizer"], parts["optimizer"].state_dict()
    groups = optimizer.get("param_groups")
    if not isinstance(groups, list) or len(groups) != len(fresh["param_groups"]):
        return "its optimizer does not hold this run's parameter groups"
    for saved, now in zip(groups, fresh["param_groups"], strict=True):
        if not isinstance(saved, dict):
            return "its optimizer does not hold this run's parameter groups"
        settings = ("initial_lr", "momentum", "dampening", "nesterov", "weight_decay", "betas", "eps", "amsgrad")
        if differing := [name for name in settings if name in saved and name in now and saved[name] != now[name]]:
            return f"its optimizer's {', '.join(differing)} differ from its config"
    params = [p for group in parts["optimizer"].param_groups for p in group["params"]]  # state_dict's numbering
    moments = optimizer.get("state", {})
    if not isinstance(moments, Mapping) or not all(isinstance(m, Mapping) for m in moments.values()):
        return "its optimizer state is not a mapping of parameters' moments"
    for index, tensors in moments.items():
        shapes = {tuple(t.shape) for t in tensors.values() if isinstance(t, torch.Tensor) and t.ndim}
        if not (isinstance(index, int) and 0 <= index < len(params)) or shapes - {tuple(params[index].shape)}:
            return f"its optimizer state {index!r:.20} does not fit the model's parameters"
    return None


def _flat(tree: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    flat = {}
    for key, value in tree.items():
        if isinstance(value, Mapping):
            flat.update(_flat(value, f"{prefix}{key}."))
        else:
            flat[f"{prefix}{key}"] = value
    return flat
