"""Configuration of `mbt.train` and `mbt.evaluate`: one dataclass, three presets, YAML and command-line overrides.

Resolution order (later wins): `--preset NAME` (default demo), then each `--config FILE.yaml` (a mapping of the same
fields, with nested `model:` and `augment:` mappings), then `--key value` flags (`--lr 0.1`, `--model.depth 6`,
`--augment.resize_scale 0.5,1.0`). Config files are read as YAML without tags that construct objects (a
`!!python/...` tag is an error) and with each key at most once. Values are bounded as they are read (`INT_LIMITS`,
finite floats), and `validate` rejects values that cannot work before any work starts, with a message that says
what to change. `config_to_dict` / `config_from_dict` round-trip exactly (checkpoints and `out_dir/config.yaml`
store the resolved config).
"""

from __future__ import annotations

import contextlib
import dataclasses
import difflib
import math
import reprlib
import sys
import types
import typing
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from mbt.classes import ClassListError, class_record, record_difference
from mbt.model import MBTConfig
from pipelines import LOADERS
from pipelines.config import SHUFFLE_BUFFER_SAMPLES, AugmentConfig
from pipelines.split import LoaderError
from pipelines.stream import is_plain_path, split_manifest
from shards.atomic import write_bytes_atomic
from shards.schema import MANIFEST_NAME

PRESETS = ("audioset", "vggsound", "demo")
OPTIMIZERS = ("sgd", "adamw")
DEVICES = ("auto", "cpu", "cuda")
_TRUE = ("true", "1", "yes", "on")
_FALSE = ("false", "0", "no", "off")
_NONE = ("none", "null")
MAX_CONFIG_BYTES = 1 << 20
# Bounds of the int settings that size an allocation or a loop: (least, most, what the value counts). The most is
# far above any real run and far below what would exhaust a machine: a value beyond it is a typo or a hostile file.
INT_LIMITS: dict[str, tuple[int, int, str]] = {
    "shuffle_buffer": (1, 65_536, "samples buffered per rank"),
    "num_workers": (0, 128, "loader processes per rank"),
    "batch_size": (1, 65_536, "samples per optimizer step over all ranks"),
    "eval_batch_size": (1, 4_096, "samples per rank and evaluation batch"),
    "grad_accum": (1, 1_024, "micro-batches per step"),
    "epochs": (1, 10_000, "passes over the training split"),
    "max_steps": (1, 100_000_000, "optimizer steps"),
    "seed": (0, 2**31 - 1, "torch and numpy take non-negative seeds"),
    "eval_every_epochs": (1, 10_000, "epochs"),
    "checkpoint_every_steps": (1, 100_000_000, "steps"),
    "keep_checkpoints": (1, 10_000, "checkpoint files"),
    "log_every_steps": (1, 100_000_000, "steps"),
    "model.num_classes": (1, 100_000, "classes"),
    "model.num_bottlenecks": (0, 1_024, "bottleneck tokens"),
    "model.embed_dim": (1, 8_192, "channels"),
    "model.depth": (1, 128, "blocks per tower"),
    "model.num_heads": (1, 256, "attention heads"),
    "model.num_frames": (1, 99, "frames per clip, the shard schema's most"),
    "model.img_size": (1, 1_024, "pixels"),
    "model.patch_size": (1, 256, "pixels"),
    "model.audio_frames": (1, 10_000, "log-mel frames"),
    "model.num_mel_bins": (1, 1_024, "mel bins"),
    "model.audio_patch_stride": (1, 256, "log-mel frames and bins"),
    "augment.crop_px": (1, 1_024, "pixels"),
    "augment.frames_used": (1, 99, "frames per clip"),
    "augment.eval_short_side_px": (1, 4_096, "pixels"),
    "augment.audio_frames": (1, 10_000, "log-mel frames"),
    "augment.freq_mask_px": (0, 1_024, "mel bins"),
    "augment.time_mask_px": (0, 10_000, "log-mel frames"),
    "augment.num_freq_masks": (0, 64, "masks per clip"),
    "augment.num_time_masks": (0, 64, "masks per clip"),
    "augment.num_test_clips": (1, 64, "clips per sample"),
}
MAX_TOKENS = 16_384  # per tower: attention's memory grows with its square (MBT-B/16: 1568 video, 400 audio tokens)


class ConfigError(ValueError):
    """A configuration key or value is wrong; the message names it and says what to change."""


@dataclass(frozen=True)
class TrainConfig:
    """Everything a training or evaluation run reads. The defaults are the MBT recipe (scenic's AudioSet config:
    SGD momentum 0.9, lr 0.5 with cosine decay after 2.5 warm-up epochs, global batch 64, 50 epochs, label smoothing
    0.3, mixup 0.5, stochastic depth 0.3, no weight decay, gradient norm clipped at 1) on MBT-B/16; the presets add
    the data."""

    model: MBTConfig = field(default_factory=lambda: MBTConfig(drop_path_rate=0.3))
    augment: AugmentConfig = field(default_factory=lambda: AugmentConfig(mixup_alpha=0.5))
    # data
    # The training split: its folder (manifest.json and the tar shards), a brace pattern of folders or shards, or
    # pipe: URLs of its shards or manifest.json (streamed, e.g. 'pipe:aws s3 cp s3://b/as/train/manifest.json -').
    train_shards: str = ""
    eval_shards: str = ""  # ... of the evaluation split; "" for no evaluation during training
    shuffle_buffer: int = SHUFFLE_BUFFER_SAMPLES  # training, per rank: the DALI reader's and streamed splits'
    loader: str = "auto"  # auto: DALI on CUDA when it imports, else the PyTorch WebDataset loader
    num_workers: int = 2
    batch_size: int = 64  # global: over all ranks and gradient accumulation steps
    eval_batch_size: int = 8  # samples per rank per evaluation batch (each with num_test_clips clips)
    grad_accum: int = 1
    skip_bad_samples: bool = False
    # initialisation from local ViT checkpoints
    init_video: str | None = None
    init_audio: str | None = None
    # optimisation
    optimizer: str = "sgd"
    lr: float = 0.5  # peak learning rate, reached after warm-up, then cosine decay to 0
    momentum: float = 0.9  # SGD only
    weight_decay: float = 0.0
    epochs: int = 50
    warmup_epochs: float = 2.5
    label_smoothing: float = 0.3
    clip_grad_norm: float | None = 1.0  # None or 0: no clipping
    max_steps: int | None = None  # stop after this many optimizer steps (tests, benchmarks)
    # run
    out_dir: str = "runs/mbt"
    seed: int = 0
    eval_every_epochs: int = 1
    checkpoint_every_steps: int = 500
    keep_checkpoints: int = 3
    log_every_steps: int = 10
    bf16: bool = True  # autocast on CUDA only
    compile: bool = False
    device: str = "auto"

    def replace(self, **changes: object) -> TrainConfig:
        return dataclasses.replace(self, **changes)


def preset(name: str) -> TrainConfig:
    """The named preset: 'audioset' and 'vggsound' (the MBT recipe on their shards) or 'demo' (a tiny MBT for the
    2-core CPU demo on shards/demo)."""
    if name == "audioset":
        return TrainConfig(
            model=MBTConfig(num_classes=527, drop_path_rate=0.3),
            train_shards="shards/audioset/balanced_train",
            eval_shards="shards/audioset/eval",
            out_dir="runs/audioset",
        )
    if name == "vggsound":
        return TrainConfig(
            model=MBTConfig(num_classes=309, drop_path_rate=0.3),
            train_shards="shards/vggsound/train",
            eval_shards="shards/vggsound/test",
            out_dir="runs/vggsound",
        )
    if name == "demo":
        # 8 frames at 256 px and 1000 log-mel frames per 10 s clip, 8 classes; evaluation resizes 256 → 110, crops 96.
        # lr 3e-3 and SpecAugment masks of 16 bins / 64 frames were measured (AST's 48 / 192 masks hide the demo's
        # single tone in many crops: the audio tower never learnt pitch; bottleneck mAP 0.89 → 0.92).
        model = MBTConfig(
            num_classes=8, embed_dim=64, depth=4, num_heads=2, fusion_layer=2, num_bottlenecks=4,
            img_size=96, patch_size=16, audio_frames=800, drop_path_rate=0.0,
        )  # fmt: skip
        return TrainConfig(
            model=model,
            augment=AugmentConfig(
                crop_px=96, eval_short_side_px=110, audio_frames=800, mixup_alpha=0.0, freq_mask_px=16, time_mask_px=64
            ),
            train_shards="shards/demo/train",
            eval_shards="shards/demo/eval",
            num_workers=2,
            batch_size=8,
            optimizer="adamw",
            lr=3e-3,
            weight_decay=0.05,
            epochs=30,
            warmup_epochs=1.0,
            label_smoothing=0.0,
            checkpoint_every_steps=50,
            out_dir="runs/demo",
        )
    raise ConfigError(f"unknown preset {name!r}: choose one of {', '.join(PRESETS)}")


def config_to_dict(cfg: TrainConfig) -> dict[str, Any]:
    """`cfg` as nested plain values (dicts for model/augment, lists for tuples): YAML- and `weights_only`-safe."""
    return _plain(cfg)


def config_from_dict(data: Mapping[str, Any]) -> TrainConfig:
    """The config `data` describes (as `config_to_dict` writes it; missing keys take TrainConfig's defaults).
    ConfigError on an unknown key or a value of the wrong type."""
    return _build(TrainConfig, _merge(config_to_dict(TrainConfig()), data, "config"))


def save_config(cfg: TrainConfig, path: str | Path) -> Path:
    """Write the resolved `cfg` as YAML to `path` (atomically; parent folders made); `--config path` reloads it."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    return write_bytes_atomic(path, yaml.safe_dump(config_to_dict(cfg), sort_keys=False).encode())


def load_config(argv: Sequence[str] | None = None) -> TrainConfig:
    """The config from `--preset`, then `--config FILE.yaml` (repeatable), then `--key value` / `--key=value` flags
    (`argv` defaults to sys.argv[1:]; '-' in keys reads as '_'). `--help` prints the keys and exits.
    Not validated against the shards or the world size: call `validate` for that."""
    args = list(sys.argv[1:] if argv is None else argv)
    preset_name, files, flags = "demo", [], {}
    i = 0
    while i < len(args):
        token = args[i]
        if token in ("-h", "--help"):
            print(config_help())
            raise SystemExit(0)
        if not token.startswith("--") or token == "--":
            raise ConfigError(f"unexpected argument {token!r}: settings are given as --key value")
        name, has_value, value = token[2:].partition("=")
        if not has_value:
            if i + 1 == len(args):
                raise ConfigError(f"{token} needs a value")
            i += 1
            value = args[i]
        i += 1
        key = name.replace("-", "_")
        if key == "preset":
            preset_name = value
        elif key == "config":
            files.append(Path(value))
        else:
            _set_dotted(flags, key, value)
    plain = config_to_dict(preset(preset_name))
    for path in files:
        plain = _merge(plain, _read_yaml(path), str(path))
        try:  # built after each file, so that a wrong value is blamed on the file that brought it
            _build(TrainConfig, plain)
        except ConfigError as err:
            raise ConfigError(f"--config {path}: {err}") from None
    return _build(TrainConfig, _merge(plain, flags, "command line"))


def config_help() -> str:
    """Usage and every key with its type and the demo preset's value."""
    demo = config_to_dict(preset("demo"))
    lines = [
        "usage: [--preset audioset|vggsound|demo] [--config FILE.yaml] [--KEY VALUE ...]",
        "values: numbers, true/false, none, comma lists for tuples; keys and their demo values:",
    ]
    for key, hint in _leaf_fields(TrainConfig):
        value = demo
        for part in key.split("."):
            value = value[part]
        shown = ",".join(map(str, value)) if isinstance(value, list) else value
        lines.append(f"  --{key} ({_type_name(hint)}) {shown}")
    return "\n".join(lines)


def per_rank_batch(cfg: TrainConfig, world_size: int) -> int:
    """Samples each rank feeds per forward/backward: the global batch over ranks and accumulation steps."""
    problem = _batch_problem(cfg, world_size)
    if problem:
        raise ConfigError(problem)
    return cfg.batch_size // (world_size * cfg.grad_accum)


def validate(cfg: TrainConfig, world_size: int = 1, *, train: bool = True) -> TrainConfig:
    """`cfg` if it can run on `world_size` processes, else ConfigError listing every problem and what to change.

    Checks the values (`INT_LIMITS`, finite floats, ranges), that model and augmentation agree (crop = img_size,
    audio frames), and, for each shard folder given, that its manifest exists and matches the model (frames,
    log-mel frames, mel bins, classes), and that the training and evaluation splits have the same classes.
    `train=False` (evaluation) leaves train_shards, out_dir and the --init_* files unchecked.
    """
    aug, model = cfg.augment, cfg.model
    checks = [
        (world_size >= 1, f"world size must be at least 1, got {world_size}"),
        (cfg.optimizer in OPTIMIZERS, f"--optimizer {cfg.optimizer!r} is not one of {', '.join(OPTIMIZERS)}"),
        (cfg.loader in LOADERS, f"--loader {cfg.loader!r} is not one of {', '.join(LOADERS)}"),
        (cfg.device in DEVICES, f"--device {cfg.device!r} is not one of {', '.join(DEVICES)}"),
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
            aug.crop_px == model.img_size,
            f"--augment.crop_px {aug.crop_px} differs from --model.img_size {model.img_size}: set both to one size",
        ),
        (
            aug.eval_short_side_px >= aug.crop_px,
            f"--augment.eval_short_side_px {aug.eval_short_side_px} is below --augment.crop_px {aug.crop_px}: "
            "evaluation could not centre-crop; raise it",
        ),
        (
            aug.audio_frames == model.audio_frames,
            f"--augment.audio_frames {aug.audio_frames} differs from --model.audio_frames {model.audio_frames}: "
            "set both to one length",
        ),
    ]
    problems = [problem for key, value in _leaf_values(cfg) if (problem := _leaf_problem(key, value))]
    problems += [message for ok, message in checks if not ok]
    problems += _token_problems(model)
    if world_size >= 1 and cfg.batch_size >= 1 and cfg.grad_accum >= 1 and (batch := _batch_problem(cfg, world_size)):
        problems.append(batch)
    if train:
        problems += _run_problems(cfg)
    splits = [("eval_shards", cfg.eval_shards)]
    if train:
        splits.insert(0, ("train_shards", cfg.train_shards))
    records = {}
    for key, folder in splits:
        if folder:
            found, records[key] = _shard_problems(cfg, key, folder)
            problems += found
    if records.get("train_shards") and records.get("eval_shards"):
        names = f"--train_shards {cfg.train_shards}", f"--eval_shards {cfg.eval_shards}"
        if difference := record_difference(records["train_shards"], records["eval_shards"], *names):
            problems.append(
                f"the training and evaluation splits have different classes: {difference}; evaluate on a split "
                "sharded with the training split's class list"
            )
    if problems:
        raise ConfigError("\n".join(problems))
    return cfg


def _run_problems(cfg: TrainConfig) -> list[str]:
    """What keeps `cfg` from starting a training: no training split, no run folder, a missing --init_* file."""
    problems = []
    if not cfg.train_shards:
        problems.append("--train_shards is empty: set it to a folder of training shards")
    if not cfg.out_dir:
        problems.append("--out_dir is empty: name the run's folder")
    for key, path in (("init_video", cfg.init_video), ("init_audio", cfg.init_audio)):
        if path is not None and not Path(path).is_file():
            problems.append(f"--{key} {path}: no such file; give a local timm ViT checkpoint or none")
    return problems


def _token_problems(model: MBTConfig) -> list[str]:
    """Patches that do not fit their input, or towers of more than MAX_TOKENS tokens."""
    if model.patch_size < 1 or model.audio_patch_stride < 1:  # reported by INT_LIMITS
        return []
    if model.patch_size > min(model.img_size, model.audio_frames, model.num_mel_bins):
        return [
            f"--model.patch_size {model.patch_size} is larger than --model.img_size {model.img_size}, "
            f"--model.audio_frames {model.audio_frames} or --model.num_mel_bins {model.num_mel_bins}: lower it"
        ]
    tokens = {
        "video": model.num_frames * (model.img_size // model.patch_size) ** 2,
        "audio": model.audio_grid[0] * model.audio_grid[1],
    }
    return [
        f"the {modality} tower would have {tokens[modality]} tokens, more than {MAX_TOKENS}: raise "
        "--model.patch_size (or --model.audio_patch_stride) or lower the input size"
        for modality in model.modalities
        if tokens[modality] > MAX_TOKENS
    ]


def _batch_problem(cfg: TrainConfig, world_size: int) -> str | None:
    divisor = world_size * cfg.grad_accum
    if divisor < 1 or cfg.batch_size % divisor:
        return (
            f"global batch {cfg.batch_size} is not divisible by world size {world_size} × grad_accum "
            f"{cfg.grad_accum} = {divisor}: change --batch_size or --grad_accum"
        )
    return None


def _shard_problems(cfg: TrainConfig, key: str, folder: str) -> tuple[list[str], dict[str, Any] | None]:
    """What keeps `cfg` from reading the split in `folder` (given as --key), and the split's class record (None
    when it cannot be read)."""
    if is_plain_path(folder) and not (Path(folder) / MANIFEST_NAME).is_file():
        return [
            f"--{key} {folder}: no {MANIFEST_NAME} there; shard the split first (tools/shard_audioset.py or "
            f"tools/shard_vggsound.py; `make demo-shards` makes the demo's) or point --{key} at a sharded split"
        ], None
    try:
        manifest = split_manifest(folder)
        record = class_record(manifest, f"--{key} {folder}")
    except LoaderError as err:
        return [f"--{key}: {err}"], None
    except ClassListError as err:
        return [str(err)], None
    model, aug, features = cfg.model, cfg.augment, manifest.features
    stored, where = features.num_frames, f"the shards in {folder}"
    problems = []
    if model.num_frames > stored:
        problems.append(
            f"--model.num_frames {model.num_frames}, but {where} hold {stored} frames per clip: "
            f"lower --model.num_frames to at most {stored}"
        )
    if aug.frames_used is not None and aug.frames_used > stored:
        problems.append(
            f"--augment.frames_used {aug.frames_used}, but {where} hold {stored} frames per clip: "
            f"lower it to at most {stored}"
        )
    elif model.num_frames <= stored and (aug.frames_used or stored) != model.num_frames:
        problems.append(
            f"the loader feeds {aug.frames_used or stored} frames per clip from {where} but --model.num_frames is "
            f"{model.num_frames}: set --augment.frames_used {model.num_frames}"
        )
    if aug.audio_frames > features.fbank_frames:
        problems.append(
            f"--augment.audio_frames {aug.audio_frames}, but {where} hold {features.fbank_frames} log-mel frames per "
            f"clip: lower --model.audio_frames and --augment.audio_frames to at most {features.fbank_frames}"
        )
    if model.num_mel_bins != features.num_mel_bins:
        problems.append(
            f"--model.num_mel_bins {model.num_mel_bins}, but {where} hold {features.num_mel_bins} mel bins: "
            f"set --model.num_mel_bins {features.num_mel_bins}"
        )
    if model.num_classes != manifest.num_classes:
        problems.append(
            f"--model.num_classes {model.num_classes}, but {where} have {manifest.num_classes} classes: "
            f"set --model.num_classes {manifest.num_classes}"
        )
    return problems, record


def _plain(value: Any) -> Any:
    if dataclasses.is_dataclass(value):
        return {f.name: _plain(getattr(value, f.name)) for f in dataclasses.fields(value)}
    if isinstance(value, tuple):
        return [_plain(v) for v in value]
    return value


def _leaf_fields(cls: type, prefix: str = "") -> list[tuple[str, Any]]:
    """(dotted key, type hint) of every non-dataclass field of `cls`, nested sections flattened."""
    hints = typing.get_type_hints(cls)
    leaves = []
    for f in dataclasses.fields(cls):
        hint = hints[f.name]
        if dataclasses.is_dataclass(hint):
            leaves += _leaf_fields(hint, f"{prefix}{f.name}.")
        else:
            leaves.append((prefix + f.name, hint))
    return leaves


def _leaf_values(cfg: TrainConfig) -> list[tuple[str, Any]]:
    """(dotted key, value) of every leaf of `cfg`."""
    values = []
    for key, _ in _leaf_fields(TrainConfig):
        value: Any = cfg
        for part in key.split("."):
            value = getattr(value, part)
        values.append((key, value))
    return values


def _leaf_problem(key: str, value: Any) -> str | None:
    """What is wrong with `value` as `key` on its own: an int outside INT_LIMITS, a float that is not finite, a
    string with a NUL."""
    if key in INT_LIMITS and isinstance(value, int):
        least, most, what = INT_LIMITS[key]
        if not least <= value <= most:
            return f"--{key} must be in {least}..{most} ({what}), got {value}"
    items = value if isinstance(value, tuple) else (value,)
    if any(isinstance(item, float) and not math.isfinite(item) for item in items):
        return f"--{key} must be a finite number, got {value}"
    if isinstance(value, str) and "\0" in value:  # no path or URL holds one; os calls would raise on it
        return f"--{key} holds a NUL character: {_short(value)}"
    return None


def _set_dotted(tree: dict[str, Any], key: str, value: str) -> None:
    """tree['model']['depth'] = value for key 'model.depth'."""
    *sections, leaf = key.split(".")
    node = tree
    for section in sections:
        child = node.get(section)
        if not isinstance(child, dict):
            child = node[section] = {}
        node = child
    node[leaf] = value


class _ConfigLoader(yaml.SafeLoader):
    """PyYAML's safe loader (plain values only: a `!!python/...` tag is an error), refusing a key given twice."""

    def construct_mapping(self, node: yaml.MappingNode, deep: bool = False) -> dict[Any, Any]:
        seen = set()
        for key_node, _ in node.value:
            if key_node.tag == "tag:yaml.org,2002:merge":  # `<<: *base` may be overridden, as YAML intends
                continue
            key = self.construct_object(key_node, deep=deep)
            with contextlib.suppress(TypeError):  # an unhashable key: the safe loader's own error names it
                if key in seen:
                    raise yaml.constructor.ConstructorError(
                        None, None, f"key {key!r} is given twice: keep one", key_node.start_mark
                    )
                seen.add(key)
        return super().construct_mapping(node, deep=deep)


def _read_yaml(path: Path) -> Mapping[str, Any]:
    """The mapping of a config file; ConfigError naming it if it is not a UTF-8 YAML mapping of at most
    MAX_CONFIG_BYTES."""
    if path.is_dir():
        raise ConfigError(f"--config {path}: a folder, not a file; give its YAML file (a run's is config.yaml)")
    try:
        with path.open("rb") as f:
            raw = f.read(MAX_CONFIG_BYTES + 1)
    except FileNotFoundError:
        raise ConfigError(f"--config {path}: no such file") from None
    except OSError as err:
        raise ConfigError(f"--config {path}: cannot be read ({err.strerror})") from None
    if len(raw) > MAX_CONFIG_BYTES:
        raise ConfigError(f"--config {path}: larger than {MAX_CONFIG_BYTES} bytes; a config is a short YAML mapping")
    try:
        text = raw.decode("utf-8-sig")
    except UnicodeDecodeError as err:
        raise ConfigError(f"--config {path}: not UTF-8 text (byte {err.start}); save it as UTF-8") from None
    try:
        data = yaml.load(text, Loader=_ConfigLoader)  # a SafeLoader: constructs plain values only
    except yaml.YAMLError as err:
        raise ConfigError(f"--config {path}: not valid YAML ({' '.join(str(err).split())})") from None
    except RecursionError:
        raise ConfigError(f"--config {path}: nested too deeply to be a config") from None
    if data is None:
        return {}
    if not isinstance(data, Mapping):
        raise ConfigError(f"--config {path}: expected a mapping of config keys, got a {type(data).__name__}")
    return data


def _merge(base: dict[str, Any], overrides: Mapping[str, Any], source: str, prefix: str = "") -> dict[str, Any]:
    """`base` (a full config_to_dict tree) with `overrides` applied; ConfigError naming `source` on unknown keys."""
    merged = dict(base)
    for key, value in overrides.items():
        dotted = f"{prefix}{key}"
        if key not in base:
            raise _unknown_key(dotted, source)
        if isinstance(base[key], dict):
            if not isinstance(value, Mapping):
                raise ConfigError(
                    f"{source}: {dotted!r} is a section: give a mapping of its keys in YAML, or --{dotted}.KEY value"
                )
            merged[key] = _merge(base[key], value, source, f"{dotted}.")
        else:
            merged[key] = value
    return merged


def _unknown_key(dotted: str, source: str) -> ConfigError:
    keys = [key for key, _ in _leaf_fields(TrainConfig)]
    close = difflib.get_close_matches(dotted, keys, n=3, cutoff=0.6)
    hint = f"did you mean {', '.join(close)}?" if close else "run with --help for the list of keys"
    return ConfigError(f"{source}: unknown key {dotted!r}; {hint}")


def _build(cls: type, plain: Mapping[str, Any], prefix: str = "") -> Any:
    """An instance of dataclass `cls` from a full plain tree, each value read as its field's type."""
    hints = typing.get_type_hints(cls)
    values = {}
    for f in dataclasses.fields(cls):
        hint, value = hints[f.name], plain[f.name]
        key = prefix + f.name
        if dataclasses.is_dataclass(hint):
            values[f.name] = _build(hint, value, f"{key}.")
            continue
        values[f.name] = _coerce(key, value, hint)
        if problem := _leaf_problem(key, values[f.name]):  # before the dataclass: MBTConfig divides by num_heads
            raise ConfigError(problem)
    try:
        return cls(**values)
    except ValueError as err:
        section = prefix.rstrip(".")
        raise ConfigError(f"invalid {section} settings: {err}; change them with --{section}.KEY") from err


def _coerce(key: str, value: Any, hint: Any) -> Any:
    """`value` (from YAML, a flag's string or a stored dict) as type `hint`; ConfigError naming `key` if it is not."""
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if origin in (typing.Union, types.UnionType):
        if value is None or (isinstance(value, str) and value.lower() in _NONE):
            return None
        (inner,) = (a for a in args if a is not type(None))
        return _coerce(key, value, inner)
    if origin is tuple:
        items = value.split(",") if isinstance(value, str) else value
        if isinstance(items, list | tuple):
            item_types = args[:1] * len(items) if args[-1:] == (...,) else args
            if len(items) == len(item_types):
                return tuple(
                    _coerce(f"{key}[{i}]", v, t) for i, (v, t) in enumerate(zip(items, item_types, strict=True))
                )
    elif hint is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.lower() in _TRUE + _FALSE:
            return value.lower() in _TRUE
        if isinstance(value, int) and value in (0, 1):
            return bool(value)
    elif hint in (int, float) and not isinstance(value, bool):
        number = None
        with contextlib.suppress(ValueError, OverflowError):  # not a number: the error below says what was expected
            if isinstance(value, int) or (hint is float and isinstance(value, float)):
                number = hint(value)
            elif isinstance(value, str):
                number = hint(value.strip())
        if number is not None and (hint is int or math.isfinite(number)):
            return number
    elif hint is str and isinstance(value, str):
        return value
    finite = " (a finite number)" if hint is float else ""
    raise ConfigError(f"{key}: expected {_type_name(hint)}{finite}, got {_short(value)}")


def _short(value: Any) -> str:
    """repr of `value`, cut short: a YAML alias bomb must not be printed in full."""
    short = reprlib.Repr()
    short.maxlevel, short.maxstring, short.maxother = 3, 80, 80
    return short.repr(value)


def _type_name(hint: Any) -> str:
    if typing.get_origin(hint) in (typing.Union, types.UnionType):
        return " or ".join(_type_name(a) for a in typing.get_args(hint))
    if typing.get_origin(hint) is tuple:
        return "comma list " + ",".join("..." if a is ... else a.__name__ for a in typing.get_args(hint))
    return "none" if hint is type(None) else hint.__name__
