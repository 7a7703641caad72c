"""Train MBT: `torchrun [--nnodes N --node-rank I --rdzv-endpoint HOST:PORT] --nproc-per-node G -m mbt.train
--preset audioset [--config run.yaml] [--field value ...]` (or `python -m mbt.train ...` for one process).

The loop reads top to bottom: config → process group → splits (opened once) → model (DDP) → the training step with
its optimizer and schedule (`mbt.step.TrainStep`) → resume → for each step: the step (mixup, forward under
autocast, loss, backward accumulated over micro-batches, clip, update) → log, checkpoint, evaluate. Rank 0 alone
logs and saves, and every rank raises what fails there (`mbt.dist.on_main_rank`): a full disk is one line naming the
file, and all ranks leave together. A run directory holds `config.yaml`, `checkpoints/`, `metrics.jsonl`,
TensorBoard events and, at the end, `curves.png`; run the same command again and it resumes from the last
checkpoint, with the losses an uninterrupted run would have had. One training writes a run directory at a time, and
it resumes only with the settings and classes of its checkpoints (`mbt.run_dir`); what cannot run is printed as one
`error: ...` line.
"""

from __future__ import annotations

import json
import signal
import sys
import time
from functools import partial
from pathlib import Path
from typing import Any

import torch
from torch.nn.parallel import DistributedDataParallel

from mbt.checkpoint import (
    BEST_NAME,
    CHECKPOINT_DIR,
    RESUME_ADVICE,
    CheckpointFileError,
    latest_checkpoint,
    load_checkpoint,
    non_finite_tensors,
    read_best,
    rng_state,
    save_best,
    save_checkpoint,
)
from mbt.classes import ClassListError, class_record
from mbt.config import ConfigError, TrainConfig, config_to_dict, load_config, save_config
from mbt.dist import DistInfo, all_gather_objects, cleanup, env_main_rank, init_distributed, on_main_rank
from mbt.interrupt import Interrupted, SignalStop, StopSignals, raising_signals, stop_line
from mbt.memory import MemoryVerdict, check_memory
from mbt.model import MBT
from mbt.pretrained import CheckpointError, init_from_vit
from mbt.run_dir import RunDirError, check_resume, locked_run_dir, restore
from mbt.run_log import RunLog, plot_curves
from mbt.run_summary import startup_summary
from mbt.sharded_eval import EvaluationError, evaluate_split
from mbt.splits import RunSplits, open_run_splits, with_split_classes
from mbt.step import NonFiniteLoss, TrainStep
from mbt.validate import per_rank_batch, validate
from pipelines import LoaderError, Split, build_loader
from pipelines.config import with_logmel_norm
from shards.atomic import remove_stale_tmp
from shards.progress import Progress


class TrainingError(RuntimeError):
    """The run cannot go on (a non-finite loss or weights); the message names the step and what to try."""


# What main() prints as one `error: ...` line (exit status 1): bad data, files or run folders, not bugs.
EXPECTED_ERRORS = (
    TrainingError, CheckpointFileError, CheckpointError, ClassListError, EvaluationError, LoaderError, RunDirError,
    OSError,
)  # fmt: skip


def init_towers(model: MBT, cfg: TrainConfig) -> list[str]:
    """Initialise the towers from cfg.init_video / cfg.init_audio as cfg.init says (none: left random);
    CheckpointError naming the flag and file when one cannot be read, does not fit, or holds non-finite weights
    (`mbt.vit_files.load_state_file`)."""
    if cfg.init == "none":
        return []
    loaded = []
    for key, path, modality in (("init_video", cfg.init_video, "video"), ("init_audio", cfg.init_audio, "audio")):
        try:
            loaded += init_from_vit(model, **{modality: path}, mode=cfg.init)
        except CheckpointError as err:
            raise CheckpointError(f"--{key}: {err}") from None
    return loaded


def prepare_run(cfg: TrainConfig, world_size: int) -> tuple[TrainConfig, RunSplits]:
    """The config a training of `cfg` on `world_size` processes runs, and its splits, each opened once
    (`mbt.splits.open_run_splits`): the head sized by the training split where `cfg` leaves it to the data
    (`with_split_classes`), then validated against the splits; ConfigError listing every problem."""
    splits = open_run_splits(cfg)
    return validate(with_split_classes(cfg, splits), world_size, splits=splits), splits


def train(cfg: TrainConfig, dist: DistInfo, splits: RunSplits) -> dict[str, Any]:
    """Run (or resume) the training of `cfg` on this process over its `splits` (as `prepare_run` opened and
    validated them); returns the last evaluation's metrics on rank 0.

    Before anything is allocated the memory it needs per rank is estimated, and a run that cannot fit is refused
    with the flags that would (`mbt.memory.check_memory`). Before anything is written to the run directory it is
    locked, and its latest checkpoint, if any, must be a whole training checkpoint of the same settings and classes
    (`mbt.run_dir.check_resume`) whose every part loads into this run's model, optimizer, schedule and loader; then
    config.yaml is written. The log-mel normalization left unset is the training split's
    (`pipelines.config.with_logmel_norm`) for every loader of the run, evaluation included. Ctrl-C or SIGTERM
    stops every rank after the same step (`mbt.interrupt`): Interrupted.
    """
    run_dir, split, eval_split = Path(cfg.out_dir), splits.train, splits.eval
    if split is None:  # prepare_run's validation refuses such a run; a caller that skipped it is told why
        raise ConfigError("\n".join(splits.problems.values()) or "--train_shards is empty: set it")
    cfg = cfg.replace(augment=with_logmel_norm(cfg.augment, split.manifest.logmel))
    record = class_record(split.manifest, f"--train_shards {cfg.train_shards}")
    memory = check_memory(cfg, dist)
    with locked_run_dir(run_dir, dist):
        resume, state = latest_checkpoint(run_dir), None
        if resume is not None:
            try:
                state = load_checkpoint(resume)
            except CheckpointFileError as err:
                raise CheckpointFileError(f"{err}; {RESUME_ADVICE}") from None
            for warning in check_resume(state, resume, cfg, record, split.manifest.logmel, dist.world_size):
                if dist.is_main:
                    print(f"warning: {warning}", file=sys.stderr)
        with StopSignals() as stop:
            return _train(cfg, dist, (split, eval_split), record, (state, resume), memory, stop)


def _train(
    cfg: TrainConfig,
    dist: DistInfo,
    splits: tuple[Split, Split | None],
    record: dict[str, Any],
    resume_from: tuple[dict[str, Any] | None, Path | None],
    memory: MemoryVerdict,
    stop: StopSignals,
) -> dict[str, Any]:
    """The training loop of `train` over the (training, evaluation) `splits`, in the locked run directory, from
    the checked checkpoint `state` read from `resume` (`resume_from`) when there is one."""
    run_dir, (split, eval_split), (state, resume) = Path(cfg.out_dir), splits, resume_from
    device = dist.device

    torch.manual_seed(cfg.seed)  # the same initial weights on every rank
    model = MBT(cfg.model)
    init = init_towers(model, cfg)
    model.to(device)
    ddp = DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None) if (
        dist.world_size > 1) else model  # fmt: skip
    torch.manual_seed(cfg.seed + 1000 * dist.rank)  # dropout and stochastic depth differ between ranks

    loader = build_loader(
        split, train=True, batch_size=per_rank_batch(cfg, dist.world_size), loader=cfg.loader,
        num_workers=cfg.num_workers, rank=dist.rank, world_size=dist.world_size, seed=cfg.seed, augment=cfg.augment,
        skip_bad_samples=cfg.skip_bad_samples, device=device, shuffle_buffer=cfg.shuffle_buffer,
    )  # fmt: skip
    train_step = TrainStep(ddp, cfg, record["multi_label"], len(loader), device, dist.rank)
    optimizer, schedule = train_step.optimizer, train_step.schedule
    steps_per_epoch, total_steps = train_step.steps_per_epoch, train_step.total_steps

    step, saved = 0, None
    if state is not None:
        parts = {"model": model, "optimizer": optimizer, "schedule": schedule, "loader": loader}
        step = saved = restore(state, resume, parts, dist.rank, len(loader))
    on_main_rank(lambda: remove_stale_tmp(run_dir / CHECKPOINT_DIR))  # a killed save's partial file
    on_main_rank(lambda: save_config(cfg, run_dir / "config.yaml"))
    if dist.is_main:
        lines = startup_summary(cfg, dist, splits, (steps_per_epoch, total_steps), memory, init)
        lines += [f"resumed from {resume} at step {step}"] if state is not None else []
        print("\n".join(lines), flush=True)  # before the first step, also in a file

    log = RunLog(run_dir)
    progress = Progress(total_steps, "step", initial=step, enabled=dist.is_main)
    metrics: dict[str, Any] | None = None
    best = read_best(run_dir) if dist.is_main else None
    clips_seen, t_last = 0, time.perf_counter()

    # What the shards were made with (frame rate, log-mel settings, schema): predict and export decode new videos so.
    features = {"params": split.manifest.features.to_dict(), "schema_version": split.manifest.schema_version}

    def save(at_step: int) -> None:
        nonlocal saved
        if bad := non_finite_tensors(model.state_dict()):  # the same weights on every rank: all raise together
            raise TrainingError(
                f"the weights became NaN or infinite by step {at_step} ({', '.join(bad[:5])}); not saved: lower "
                "--lr or set --clip_grad_norm, and resume from the last checkpoint"
            )
        # Every rank's RNG and stream position (the DALI loader's pipeline checkpoint differs per rank).
        states, positions = all_gather_objects(rng_state()), all_gather_objects(loader.state_dict())
        # Rank 0 writes; a full disk there is raised on every rank, so that none waits at the next collective.
        on_main_rank(lambda: save_checkpoint(run_dir, at_step, {
            "model": model.state_dict(), "optimizer": optimizer.state_dict(), "schedule": schedule.state_dict(),
            "step": at_step, "epoch": at_step // steps_per_epoch, "loader": positions,
            "rng": states, "config": config_to_dict(cfg), "data": record, "features": features,
        }, keep=cfg.keep_checkpoints))  # fmt: skip
        saved = at_step

    def evaluate_on_split(out_dir: Path | None) -> dict[str, Any] | None:  # every rank; metrics on rank 0
        return evaluate_split(
            model, eval_split, dist, cfg.augment, f"--eval_shards {cfg.eval_shards}", out_dir, cfg.bf16, True,
            batch_size=cfg.eval_batch_size, loader=cfg.loader, num_workers=cfg.num_workers, device=device,
        )  # fmt: skip

    def log_evaluation(at_step: int, epoch: int, metrics: dict[str, Any] | None) -> None:  # rank 0: the metrics
        nonlocal best
        if metrics is None:
            return
        name = "mAP" if record["multi_label"] else "top1"
        if best is None or metrics[name] > best["value"]:  # kept beside the last K: the best evaluation's weights
            best = {"step": at_step, "metric": name, "value": float(metrics[name])}
            save_best(run_dir, {"model": model.state_dict(), "step": at_step, "epoch": epoch,
                                "config": config_to_dict(cfg), "data": record, "features": features}, best)  # fmt: skip
        log.write({"step": at_step, "epoch": epoch, "eval_metric": metrics[name], "eval_metric_name": name,
                   **{f"eval_{k}": v for k, v in metrics.items()}, "best_step": best["step"],
                   "best_eval_metric": best["value"]})  # fmt: skip
        progress.write(
            f"step {at_step} epoch {epoch}: "
            + " ".join(f"{k}={v:.4g}" for k, v in metrics.items())
            + f" (best {name} {best['value']:.4g} at step {best['step']}: {run_dir / CHECKPOINT_DIR / BEST_NAME})"
        )

    def finish_log() -> None:  # rank 0
        if log.path.is_file() and (skipped := plot_curves(log.path, run_dir / "curves.png")):
            print(f"warning: {log.path}: {skipped} line(s) are not metrics rows and were left out of the curves")

    def stop_if_asked(at_step: int) -> None:  # every rank, at the same step
        if signum := stop.agreed():
            if signum != signal.SIGINT and saved != at_step:  # preempted: the ranks save together, then leave
                save(at_step)
            raise Interrupted(signum, at_step, saved)

    finished_before = step >= total_steps  # resumed a finished run: only its final evaluation is run again
    stop_if_asked(step)
    while step < total_steps:
        epoch = step // steps_per_epoch
        loader.set_epoch(epoch)
        batches = iter(loader)
        for _ in range(steps_per_epoch - step % steps_per_epoch):  # the rest of this epoch (all of it, unless resumed)
            try:
                loss_value = train_step(batches, step)
            except NonFiniteLoss as err:
                raise TrainingError(
                    f"non-finite loss {err.loss} at step {step + 1} (epoch {epoch}): lower --lr, check the shards "
                    "with tools/verify_shards.py, or resume from the last checkpoint with other settings"
                ) from None
            clips_seen += train_step.clips * dist.world_size
            step += 1
            progress.update()
            if step % cfg.log_every_steps == 0 or step == total_steps:
                now = time.perf_counter()
                rate = clips_seen / (now - t_last)
                clips_seen, t_last = 0, now
                lr = schedule.get_last_lr()[0]
                progress.report({"epoch": str(epoch), "loss": f"{loss_value:.4g}", "lr": f"{lr:.2e}",
                                 "clips/s": f"{rate:.3g}"})  # fmt: skip
                on_main_rank(partial(log.write, {"step": step, "epoch": epoch, "loss": loss_value, "lr": lr,
                                                 "clips_per_s": rate}))  # fmt: skip
            if step % cfg.checkpoint_every_steps == 0 or step == total_steps:
                save(step)
            stop_if_asked(step)
            if step >= total_steps:
                break
        final = step >= total_steps
        if eval_split is not None and (final or (step // steps_per_epoch) % cfg.eval_every_epochs == 0):
            with torch.random.fork_rng(devices=[]):  # nor may evaluation's loader move it
                metrics = evaluate_on_split(run_dir / "eval" if final else None)
            on_main_rank(partial(log_evaluation, step, epoch, metrics))
    if finished_before and eval_split is not None:  # the same on every rank (metrics is None on all but rank 0)
        metrics = evaluate_on_split(run_dir / "eval")
    progress.close()
    on_main_rank(finish_log)
    return metrics or {}


def main(argv: list[str] | None = None) -> int:
    """The command: load the config, start the process group, prepare and train; one line and the shell's status
    for what stops it (a config error: 2; a data or file error: 1; a signal: 128 + it, at start-up too)."""
    try:
        with raising_signals():
            return _main(argv)
    except SignalStop as stopped:  # before the loop or after it: nothing to agree on, nothing half-written
        if env_main_rank():
            print(stop_line(stopped.signum, "before training started", "rerun the same command"), file=sys.stderr)
        return stopped.exit_status


def _main(argv: list[str] | None) -> int:
    try:
        cfg = load_config(argv)
    except ConfigError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    try:
        dist = init_distributed(cfg.device)
    except RuntimeError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    try:
        cfg, splits = prepare_run(cfg, dist.world_size)
        metrics = train(cfg, dist, splits)
        if dist.is_main:
            print(json.dumps({"out_dir": cfg.out_dir, **metrics}))
        return 0
    except Interrupted as stopped:  # one line, on rank 0; the shell's status for the signal
        if dist.is_main:
            print(stopped, file=sys.stderr)
        return stopped.exit_status
    except (ConfigError, *EXPECTED_ERRORS) as err:
        if dist.is_main:
            print(f"error: {err}", file=sys.stderr)
        return 2 if isinstance(err, ConfigError) else 1
    finally:
        cleanup()


if __name__ == "__main__":
    sys.exit(main())
