"""Whether a config can run, before any work: the recipe's rules here (values and bounds, settings that must agree,
the towers' tokens, the batch over the ranks, the run's files) and the data's rules in `mbt.fits` (each split fits
the model, the training and evaluation splits agree). `validate` asks both and lists every problem, each with the
setting to change.
"""

from __future__ import annotations

from pathlib import Path

from mbt.config import CLIP_GRAD_SCOPES, DEVICES, INITS, INT_LIMITS, OPTIMIZERS, SDPA_BACKENDS, TrainConfig
from mbt.config_io import ConfigError, value_problems
from mbt.fits import data_problems
from mbt.model import MBTConfig
from mbt.model_size import size_problems
from mbt.splits import RunSplits, open_run_splits
from pipelines import LOADERS

MAX_TOKENS = 16_384  # per tower: attention's memory grows with its square (MBT-B/16: 1568 video, 400 audio tokens)


def validate(
    cfg: TrainConfig, world_size: int = 1, *, train: bool = True, splits: RunSplits | None = None
) -> TrainConfig:
    """`cfg` if it can run on `world_size` processes, else ConfigError listing every problem and what to change:
    the recipe's (`recipe_problems`), then the data's (`mbt.fits.data_problems`) over the splits `cfg` names, as
    `splits` holds them opened by `mbt.splits.open_run_splits` with the same `train` (None: opened here).
    `train=False` (evaluation) leaves train_shards, out_dir and the --init_* files unchecked.
    """
    if splits is None:
        splits = open_run_splits(cfg, train)
    problems = recipe_problems(cfg, world_size, train=train) + data_problems(cfg.model, cfg.augment, splits)
    if problems:
        raise ConfigError("\n".join(problems))
    return cfg


def recipe_problems(cfg: TrainConfig, world_size: int = 1, *, train: bool = True) -> list[str]:
    """What keeps `cfg` from running on `world_size` processes whatever the data: values out of their bounds
    (`INT_LIMITS`, finite floats, ranges), model and augmentation that disagree (crop = img_size, audio frames), the
    towers' tokens, the model's parameters (`mbt.model_size`, counted once everything else is within bounds), a
    batch that does not divide over the ranks and, for a training (`train`), the run's files."""
    aug, model = cfg.augment, cfg.model
    checks = [
        (world_size >= 1, f"world size must be at least 1, got {world_size}"),
        (cfg.optimizer in OPTIMIZERS, f"--optimizer {cfg.optimizer!r} is not one of {', '.join(OPTIMIZERS)}"),
        (cfg.loader in LOADERS, f"--loader {cfg.loader!r} is not one of {', '.join(LOADERS)}"),
        (cfg.device in DEVICES, f"--device {cfg.device!r} is not one of {', '.join(DEVICES)}"),
        (
            cfg.sdpa_backend in SDPA_BACKENDS,
            f"--sdpa_backend {cfg.sdpa_backend!r} is not one of {', '.join(SDPA_BACKENDS)}",
        ),
        (cfg.init in INITS, f"--init {cfg.init!r} is not one of {', '.join(INITS)}"),
        (
            cfg.clip_grad_scope in CLIP_GRAD_SCOPES,
            f"--clip_grad_scope {cfg.clip_grad_scope!r} is not one of {', '.join(CLIP_GRAD_SCOPES)}",
        ),
        (cfg.lr > 0, f"--lr must be positive, got {cfg.lr}"),
        (0 <= cfg.momentum < 1, f"--momentum must be in [0, 1), got {cfg.momentum}"),
        (cfg.weight_decay >= 0, f"--weight_decay must be 0 or more, got {cfg.weight_decay}"),
        (
            0 <= cfg.warmup_epochs <= cfg.epochs,
            f"--warmup_epochs must be in [0, epochs={cfg.epochs}], got {cfg.warmup_epochs}",
        ),
        (0 <= cfg.label_smoothing < 1, f"--label_smoothing must be in [0, 1), got {cfg.label_smoothing}"),
        (
            cfg.clip_grad_norm is None or cfg.clip_grad_norm >= 0,
            f"--clip_grad_norm must be none, 0 (off) or positive, got {cfg.clip_grad_norm}",
        ),
        (0 < model.mlp_ratio <= 16, f"--model.mlp_ratio must be in (0, 16], got {model.mlp_ratio}"),
        *(
            (0 <= getattr(model, name) < 1, f"--model.{name} must be in [0, 1), got {getattr(model, name)}")
            for name in ("drop_rate", "attn_drop_rate", "drop_path_rate")
        ),
        (0 <= aug.flip_prob <= 1, f"--augment.flip_prob must be in [0, 1], got {aug.flip_prob}"),
        (
            0 < aug.resize_scale[0] <= aug.resize_scale[1] <= 1,
            f"--augment.resize_scale must be two area fractions 0 < low <= high <= 1, got {aug.resize_scale}",
        ),
        (
            0 < aug.resize_ratio[0] <= aug.resize_ratio[1] <= 100,
            f"--augment.resize_ratio must be two aspect ratios 0 < low <= high <= 100, got {aug.resize_ratio}",
        ),
        (aug.mixup_alpha >= 0, f"--augment.mixup_alpha must be 0 (off) or positive, got {aug.mixup_alpha}"),
        (
            aug.logmel_std is None or aug.logmel_std > 0,
            f"--augment.logmel_std must be positive (log-mels are divided by it), got {aug.logmel_std}",
        ),
        (
            aug.crop_px == model.img_size,
            f"--augment.crop_px {aug.crop_px} differs from --model.img_size {model.img_size}: give one of them "
            "(the other follows) or both alike",
        ),
        (
            aug.eval_short_side_px >= aug.crop_px,
            f"--augment.eval_short_side_px {aug.eval_short_side_px} is below --augment.crop_px {aug.crop_px}: "
            "evaluation could not centre-crop; raise it",
        ),
        (
            aug.audio_frames == model.audio_frames,
            f"--augment.audio_frames {aug.audio_frames} differs from --model.audio_frames {model.audio_frames}: "
            "give one of them (the other follows) or both alike",
        ),
    ]
    problems = value_problems(cfg, INT_LIMITS)
    problems += [message for ok, message in checks if not ok]
    if model.num_classes == 0 and not (train and cfg.train_shards):
        problems.append("--model.num_classes is 0 (the training split's) but no training split is read: set it")
    problems += token_problems(model)
    if not problems:  # every size within its bounds: the model is built on the meta device and counted
        problems += size_problems(model)
    if world_size >= 1 and cfg.batch_size >= 1 and cfg.grad_accum >= 1 and (batch := _batch_problem(cfg, world_size)):
        problems.append(batch)
    if train:
        problems += _run_problems(cfg)
    return problems


def per_rank_batch(cfg: TrainConfig, world_size: int) -> int:
    """Samples each rank feeds per forward/backward: the global batch over ranks and accumulation steps."""
    problem = _batch_problem(cfg, world_size)
    if problem:
        raise ConfigError(problem)
    return cfg.batch_size // (world_size * cfg.grad_accum)


def token_problems(model: MBTConfig) -> list[str]:
    """Patches that do not fit their input, or towers of more than MAX_TOKENS tokens."""
    if model.patch_size < 1 or model.audio_patch_stride < 1:  # reported by the config's bounds
        return []
    if model.patch_size > min(model.img_size, model.audio_frames, model.num_mel_bins):
        return [
            f"--model.patch_size {model.patch_size} is larger than --model.img_size {model.img_size}, "
            f"--model.audio_frames {model.audio_frames} or --model.num_mel_bins {model.num_mel_bins}: lower it"
        ]
    tokens = {
        "video": model.num_frames
        // (model.tubelet_frames if model.video_embed == "tubelet" else 1)
        * (model.img_size // model.patch_size) ** 2,
        "audio": model.audio_grid[0] * model.audio_grid[1],
    }
    return [
        f"the {modality} tower would have {tokens[modality]} tokens, more than {MAX_TOKENS}: raise "
        "--model.patch_size (or --model.audio_patch_stride) or lower the input size"
        for modality in model.modalities
        if tokens[modality] > MAX_TOKENS
    ]


def _run_problems(cfg: TrainConfig) -> list[str]:
    """What keeps `cfg` from starting a training: no training split, no run folder, a missing --init_* file, and
    `init_problems`."""
    problems = []
    if not cfg.train_shards:
        problems.append("--train_shards is empty: set it to a folder of training shards")
    if not cfg.out_dir:
        problems.append("--out_dir is empty: name the run's folder")
    for key, path in (("init_video", cfg.init_video), ("init_audio", cfg.init_audio)):
        if path is not None and not Path(path).is_file():
            problems.append(f"--{key} {path}: no such file; give a local timm ViT checkpoint or none")
    return problems + init_problems(cfg)


def init_problems(cfg: TrainConfig) -> list[str]:
    """Initialisation that `cfg.init` does not allow: with cfg.init_required, a tower without its ViT file (the
    recipe starts every tower from ImageNet-21k ViT-B/16; a run from scratch says --init none); ViT files given with
    --init none."""
    if cfg.init == "none":
        given = [f"--{key} {path}" for key in ("init_video", "init_audio") if (path := getattr(cfg, key)) is not None]
        if given:
            return [f"--init none trains from scratch, but {' and '.join(given)} given: drop it, or --init scenic"]
        return []
    missing = [f"--init_{m}" for m in cfg.model.modalities if getattr(cfg, f"init_{m}") is None]
    if cfg.init not in INITS or not cfg.init_required or not missing:
        return []
    return [
        f"--init {cfg.init} starts the towers from ImageNet ViT weights, as the MBT recipe does (ImageNet-21k "
        f"ViT-B/16), but {' and '.join(missing)} {'is' if len(missing) == 1 else 'are'} not given: pass "
        f"{' '.join(f'{flag} ViT-B_16.npz' for flag in missing)} (docs/model.md, 'Pretrained weights', says where "
        "to get it), or --init none to train from scratch"
    ]


def _batch_problem(cfg: TrainConfig, world_size: int) -> str | None:
    divisor = world_size * cfg.grad_accum
    if divisor < 1 or cfg.batch_size % divisor:
        return (
            f"global batch {cfg.batch_size} is not divisible by world size {world_size} × grad_accum "
            f"{cfg.grad_accum} = {divisor}: change --batch_size or --grad_accum"
        )
    return None
