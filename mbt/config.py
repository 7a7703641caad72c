"""Configuration of `mbt.train` and `mbt.evaluate`: one dataclass, four presets, YAML and command-line overrides.

Resolution order (later wins): `--preset NAME` (default demo), then each `--config FILE.yaml` (a mapping of the same
fields, with nested `model:` and `augment:` mappings), then `--key value` flags (`--lr 0.1`, `--model.depth 6`,
`--augment.resize_scale 0.5,1.0`), read by `mbt.config_io` and bounded as they are read (`INT_LIMITS`, finite
floats). `mbt.validate.validate` rejects values that cannot work before any work starts, with a message that says
what to change. `config_to_dict` / `config_from_dict` round-trip exactly (checkpoints and `out_dir/config.yaml`
store the resolved config).
"""

from __future__ import annotations

import dataclasses
import sys
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from mbt.config_cli import CommandLine, read_config, split_command_line
from mbt.config_help import help_text
from mbt.config_io import ConfigError, build, merge, plain, write_yaml
from mbt.model import MBTConfig
from mbt.model_size import size_problems
from pipelines.config import SHUFFLE_BUFFER_SAMPLES, AugmentConfig
from shards.layout import split_dir
from shards.schema import MAX_FRAMES

PRESETS = ("audioset", "vggsound", "custom", "custom-cpu", "scenic_as", "demo")
# --init: the towers from the --init_video / --init_audio ViT files, as scenic's code restores them or every tensor
# of the ViT (`mbt.pretrained`); or "none", from scratch (random weights), which with init_required is the only way
# to train without the files
VIT_INITS = ("scenic", "vit")
INITS = (*VIT_INITS, "none")
CLIP_GRAD_SCOPES = ("per_rank", "global")  # each rank's gradient clipped before the mean (scenic), or the mean's
# One quantity, two settings (the model's input, the loaders' crop): a file or command line that sets one sets both.
TIED = (("model.audio_frames", "augment.audio_frames"), ("model.img_size", "augment.crop_px"))
OPTIMIZERS = ("sgd", "adamw")
DEVICES = ("auto", "cpu", "cuda")
# torch.nn.attention.SDPBackend of each --sdpa_backend; auto: PyTorch picks per call (tools/gpu_check.py measures them)
SDPA_BACKENDS = {
    "auto": None, "flash": "FLASH_ATTENTION", "cudnn": "CUDNN_ATTENTION", "efficient": "EFFICIENT_ATTENTION",
    "math": "MATH",
}  # fmt: skip
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
    "model.num_classes": (0, 100_000, "classes; 0: the training split's"),
    "model.num_bottlenecks": (0, 1_024, "bottleneck tokens"),
    "model.embed_dim": (1, 8_192, "channels"),
    "model.depth": (1, 128, "blocks per tower"),
    "model.num_heads": (1, 256, "attention heads"),
    "model.num_frames": (1, MAX_FRAMES, "frames per clip, the shard schema's most"),
    "model.tubelet_frames": (1, MAX_FRAMES, "frames per tubelet"),
    "model.img_size": (1, 1_024, "pixels"),
    "model.patch_size": (1, 256, "pixels"),
    "model.audio_frames": (1, 10_000, "log-mel frames"),
    "model.num_mel_bins": (1, 1_024, "mel bins"),
    "model.audio_patch_stride": (1, 256, "log-mel frames and bins"),
    "augment.crop_px": (1, 1_024, "pixels"),
    "augment.frames_used": (1, MAX_FRAMES, "frames per clip"),
    "augment.frame_stride": (1, MAX_FRAMES, "stored frames between a clip's frames"),
    "augment.eval_short_side_px": (1, 4_096, "pixels"),
    "augment.audio_frames": (1, 10_000, "log-mel frames"),
    "augment.freq_mask_px": (0, 1_024, "mel bins"),
    "augment.time_mask_px": (0, 10_000, "log-mel frames"),
    "augment.num_freq_masks": (0, 64, "masks per clip"),
    "augment.num_time_masks": (0, 64, "masks per clip"),
    "augment.num_test_clips": (1, 64, "clips per sample"),
}


@dataclass(frozen=True)
class TrainConfig:
    """Everything a training or evaluation run reads. The defaults are the MBT recipe (scenic's AudioSet config:
    SGD momentum 0.9, lr 0.5 with cosine decay after 2.5 warm-up epochs, global batch 64, 50 epochs, label smoothing
    0.3, mixup 0.5, stochastic depth 0.3, no weight decay, each rank's gradient norm clipped at 1 before the mean)
    on MBT-B/16 initialised from ImageNet ViT weights (--init_video / --init_audio, or --init none); the presets add
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
    # initialisation from local ViT checkpoints (`INITS`): the recipe's towers start from ImageNet-21k ViT-B/16
    init: str = "scenic"
    init_required: bool = True  # the towers' files must be given unless --init none (the custom and demo presets: not)
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
    clip_grad_scope: str = "per_rank"  # `CLIP_GRAD_SCOPES`: scenic clips each device's gradient, then averages
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
    sdpa_backend: str = "auto"  # training's attention kernel: PyTorch's choice, or one of SDPA_BACKENDS (GPU)
    device: str = "auto"

    def replace(self, **changes: object) -> TrainConfig:
        return dataclasses.replace(self, **changes)


# The presets of the MBT recipe (TrainConfig's defaults on MBT-B/16, stochastic depth 0.3): classes and the
# training and evaluation splits under data/shards/<name>/. custom: your own shards (tools/shard_csv.py), the head
# sized by the training split's manifest when training starts (num_classes 0, `mbt.splits.with_split_classes`).
RECIPE_DATA: dict[str, tuple[int, str, str]] = {
    "audioset": (527, "balanced_train", "eval"),
    "vggsound": (309, "train", "test"),
    "custom": (0, "train", "val"),
}


# Keys whose default now follows scenic's behaviour, and what runs saved before the key existed did: their
# checkpoints and config.yaml resume and evaluate with it, not with today's default.
BEFORE_KEYS: dict[str, Any] = {
    "init": "vit",
    "init_required": False,
    "clip_grad_scope": "global",
    # before `cls_bottleneck`, the bottleneck held num_bottlenecks tokens whatever the pool
    "model": {"drop_path_scale": True, "cls_bottleneck": False},
}


# scenic's released AudioSet models (configs/audioset/balanced_audioset_base.py) on the AudioSet recipe: MBT-B/16x2
# tubelets over 32 consecutive frames at stride 2 of 25 per second (2.56 s; shards of --fps 25), the CLS classifier,
# its spectrogram of 8 x 100 frames normalized by its fixed statistics, 4 test clips.
SCENIC_AS_DATASET = "audioset_25fps"
# A sample of 250 frames is 6.5 MB (docs/PERFORMANCE.md): 128 of them take the memory of the default buffer of 20-frame
# samples (0.8 GB per rank).
SCENIC_AS_SHUFFLE_BUFFER = 128
# The config's text says classifier 'gap', with which scenic's MBT cannot fuse (docs/model.md): its released fused
# files are 'token' models, the recipe's CLS pool with its n_bottlenecks + 1 tokens.
SCENIC_AS_MODEL = {"num_frames": 32, "video_embed": "tubelet", "tubelet_frames": 2, "gelu": "tanh"}
SCENIC_AS_AUGMENT = {
    "frames_used": 32, "frame_sampling": "consecutive", "frame_stride": 2, "audio_frames": 800, "num_test_clips": 4,
    "logmel_mean": 1.102, "logmel_std": 2.762,
}  # fmt: skip


def preset(name: str) -> TrainConfig:
    """The named preset: 'audioset' and 'vggsound' (the MBT recipe on their shards), 'custom' (the recipe on your
    own shards, the head sized by the training split), 'custom-cpu' (the demo's small MBT, augmentation and
    optimiser on the custom preset's shards and head: what a CPU trains in minutes), 'scenic_as' (the clips and
    features scenic's released AudioSet models were trained on, for converted checkpoints: `SCENIC_AS_MODEL`,
    `SCENIC_AS_AUGMENT`, on data/shards/audioset_25fps) or 'demo' (a tiny MBT for the 2-core CPU demo on
    data/shards/demo)."""
    if name == "custom-cpu":
        demo, custom = preset("demo"), preset("custom")
        return demo.replace(
            model=demo.model.replace(num_classes=0),
            train_shards=custom.train_shards,
            eval_shards=custom.eval_shards,
            eval_every_epochs=5,
            out_dir="runs/custom-cpu",
        )
    if name in RECIPE_DATA:
        classes, train_split, eval_split = RECIPE_DATA[name]
        recipe = TrainConfig(
            model=MBTConfig(num_classes=classes, drop_path_rate=0.3),
            train_shards=str(split_dir(name, train_split)),
            eval_shards=str(split_dir(name, eval_split)),
            init_required=name != "custom",  # your own data: from scratch without the ViT files, as before
            out_dir=f"runs/{name}",
        )
        # DMVR repeats a short clip's log-mel; AugmentConfig keeps zeros, what older checkpoints were trained with.
        return recipe.replace(augment=recipe.augment.replace(audio_pad="repeat"))
    if name == "scenic_as":
        audioset = preset("audioset")
        _, train_split, eval_split = RECIPE_DATA["audioset"]
        return audioset.replace(
            model=audioset.model.replace(**SCENIC_AS_MODEL),
            augment=audioset.augment.replace(**SCENIC_AS_AUGMENT),
            train_shards=str(split_dir(SCENIC_AS_DATASET, train_split)),
            eval_shards=str(split_dir(SCENIC_AS_DATASET, eval_split)),
            out_dir=f"runs/{name}",
            shuffle_buffer=SCENIC_AS_SHUFFLE_BUFFER,
        )
    if name == "demo":
        # 8 frames at 128 px and 400 log-mel frames per 4 s clip (the Makefile's shards), 12 classes; 2 frames in the
        # 1.6 s audio window; evaluation resizes 128 → 72, crops 64. On the Makefile's 512 clips (384 training) 50
        # epochs are 1,200 steps of 16, in which bottleneck fusion learns every class, the cross-modal ones included,
        # and `make demo` trains its five variants in under 6 minutes on 2 CPU cores, two at a time
        # (experiments.demo). No SpecAugment masks: a frequency mask can erase a demo clip's single tone, and the
        # labels it carries with it: with masks "box if and only if beeping" reached AP 0.92, 0.73 and 0.59 over three
        # seeds, without them 1.0 in each of four (docs/PERFORMANCE.md).
        model = MBTConfig(
            num_classes=12, embed_dim=64, depth=4, num_heads=2, fusion_layer=2, num_bottlenecks=4,
            cls_bottleneck=False, num_frames=2, img_size=64, patch_size=16, audio_frames=160, drop_path_rate=0.0,
            drop_path_scale=True,
        )  # fmt: skip
        return TrainConfig(
            model=model,
            # The demo's labels are colours and pitches: no colour augmentation (hue jitter and grey would change
            # the label), AST's Inception crop, no SpecAugment masks (above).
            augment=AugmentConfig(
                crop_px=64,
                frames_used=2,
                eval_short_side_px=72,
                audio_frames=160,
                mixup_alpha=0.0,
                num_freq_masks=0,
                num_time_masks=0,
                video_crop="inception",
                color_prob=0.0,
                color_drop_prob=0.0,
            ),
            train_shards=str(split_dir("demo", "train")),
            eval_shards=str(split_dir("demo", "eval")),
            init="vit",  # as the demo was tuned: every tensor of a ViT file, if one is given
            init_required=False,  # a tiny model: no ViT of its size exists
            num_workers=2,
            batch_size=16,
            optimizer="adamw",
            lr=3e-3,
            weight_decay=0.05,
            epochs=50,
            warmup_epochs=1.0,
            label_smoothing=0.0,
            clip_grad_scope="global",  # as the demo was tuned
            eval_every_epochs=50,  # one evaluation, at the end
            checkpoint_every_steps=1000,
            out_dir="runs/demo",
        )
    raise ConfigError(f"unknown preset {name!r}: choose one of {', '.join(PRESETS)}")


def config_to_dict(cfg: TrainConfig) -> dict[str, Any]:
    """`cfg` as nested plain values (dicts for model/augment, lists for tuples): YAML- and `weights_only`-safe."""
    return plain(cfg)


def config_from_dict(data: Mapping[str, Any]) -> TrainConfig:
    """The config `data` describes (as `config_to_dict` writes it; missing keys take TrainConfig's defaults, except
    those of BEFORE_KEYS, which take what a run saved before the key existed did). ConfigError on an unknown key or
    a value of the wrong type."""
    base = merge(config_to_dict(TrainConfig()), BEFORE_KEYS, "config", TrainConfig)
    return build(TrainConfig, merge(base, data, "config", TrainConfig), INT_LIMITS)


def save_config(cfg: TrainConfig, path: str | Path) -> Path:
    """Write the resolved `cfg` as YAML to `path` (atomically; parent folders made); `--config path` reloads it."""
    return write_yaml(config_to_dict(cfg), path)


def load_config(argv: Sequence[str] | None = None) -> TrainConfig:
    """The config from `--preset`, then `--config FILE.yaml` (repeatable), then `--key value` / `--key=value` flags
    (`argv` defaults to sys.argv[1:]; '-' in keys reads as '_'); of each pair in `TIED` a file or the command line
    that sets one alone sets both. `--help` prints the usage and every key with its description and its value as
    resolved from the rest of the command line, `--print-config` the resolved config as YAML; both then exit. A file
    that makes the model larger than `mbt.model_size.MAX_MODEL_PARAMS` is named. Not validated against the shards
    or the world size: call `mbt.validate.validate` for that."""
    line = split_command_line(list(sys.argv[1:] if argv is None else argv))
    base = config_to_dict(preset(line.preset or "demo"))
    if line.help and not (line.files or line.flags):  # the preset's values even when a file or flag is wrong
        _exit_with(config_help(base, line))
    cfg = read_config(TrainConfig, base, line.files, line.flags, INT_LIMITS, lambda c: size_problems(c.model), TIED)
    if line.help:
        _exit_with(config_help(config_to_dict(cfg), line))
    if line.print_config:
        _exit_with(yaml.safe_dump(config_to_dict(cfg), sort_keys=False).rstrip("\n"))
    return cfg


def _exit_with(text: str) -> None:
    print(text)
    raise SystemExit(0)


def config_help(values: dict[str, Any] | None = None, line: CommandLine | None = None) -> str:
    """The usage and every key with its type, description and value in the plain tree `values` (default: the demo
    preset's), which `line` (the command line before `--help`) resolved."""
    given = "the demo preset"
    if line is not None:
        given = f"the {line.preset or 'demo'} preset" + (
            " and the files and flags given" if line.files or line.flags else ""
        )
    return help_text(TrainConfig, values or config_to_dict(preset("demo")), PRESETS, given)
