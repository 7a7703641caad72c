"""mbt.config: presets, YAML and flag overrides, type parsing, unknown keys, round trips, validation messages."""

from __future__ import annotations

import io
import json
from pathlib import Path

import pytest
import torch
import yaml
from placeholder_split import write_placeholder_split

from mbt.config import (
    PRESETS,
    ConfigError,
    TrainConfig,
    config_from_dict,
    config_to_dict,
    load_config,
    preset,
    save_config,
)
from mbt.config_help import FLAG_HELP
from mbt.config_io import leaf_fields
from mbt.model import MBTConfig
from mbt.splits import open_run_splits, with_split_classes
from mbt.train import prepare_run
from mbt.validate import init_problems, per_rank_batch, validate
from pipelines.config import AugmentConfig
from shards.manifest import load_manifest
from shards.schema import MAX_FRAMES, FeatureParams


def write_manifest(
    folder: Path,
    num_frames: int = 8,
    segment_s: float = 10.0,
    num_classes: int = 8,
    num_mel_bins: int = 128,
    shards: int = 1,
) -> Path:
    """A split of these features and classes that opens, of placeholder samples: what validate reads."""
    features = FeatureParams(num_frames=num_frames, segment_s=segment_s, num_mel_bins=num_mel_bins)
    classes = [{"index": i, "id": f"/m/{i}", "name": f"class {i}"} for i in range(num_classes)]
    return write_placeholder_split(folder, features, classes, shards=shards)


# A small CPU config of fixed sizes (the demo preset of an earlier version): the validation tests do not move when
# the demo preset is re-tuned. 96 px crops, 8 frames, 800 of 1000 log-mel frames (10 s), 8 classes, batch 8.
BASE = preset("demo").replace(
    model=preset("demo").model.replace(num_classes=8, num_frames=8, img_size=96, audio_frames=800),
    augment=preset("demo").augment.replace(
        crop_px=96, frames_used=8, eval_short_side_px=110, audio_frames=800, time_mask_px=64
    ),
    batch_size=8, epochs=30, eval_every_epochs=1, checkpoint_every_steps=50,
)  # fmt: skip


@pytest.fixture
def demo_cfg(tmp_path: Path) -> TrainConfig:
    """BASE pointed at hand-written manifests shaped like its shards (8 frames, 10 s, 8 classes)."""
    train = write_manifest(tmp_path / "train")
    test = write_manifest(tmp_path / "eval")
    return BASE.replace(train_shards=str(train), eval_shards=str(test))


def write_yaml(path: Path, data: object) -> Path:
    path.write_text(yaml.safe_dump(data))
    return path


# presets


def test_audioset_preset_is_the_mbt_recipe() -> None:
    cfg = preset("audioset")
    assert (cfg.optimizer, cfg.momentum, cfg.lr, cfg.warmup_epochs, cfg.epochs) == ("sgd", 0.9, 0.5, 2.5, 50)
    assert (cfg.batch_size, cfg.label_smoothing, cfg.augment.mixup_alpha, cfg.model.drop_path_rate) == (
        64,
        0.3,
        0.5,
        0.3,
    )
    assert cfg.augment.num_test_clips == 4
    # the loaders' defaults, the reference's augmentation, and DMVR's repeated short audio
    assert cfg.augment == AugmentConfig(mixup_alpha=0.5, audio_pad="repeat")
    assert (cfg.augment.logmel_mean, cfg.augment.logmel_std) == (None, None)  # training sets its split's
    assert cfg.model == MBTConfig(num_classes=527, drop_path_rate=0.3)
    assert (cfg.train_shards, cfg.eval_shards, cfg.out_dir) == (
        "data/shards/audioset/balanced_train",
        "data/shards/audioset/eval",
        "runs/audioset",
    )


def test_vggsound_preset_differs_from_audioset_only_in_data() -> None:
    cfg = preset("vggsound")
    assert cfg.model.num_classes == 309
    assert (cfg.train_shards, cfg.eval_shards, cfg.out_dir) == (
        "data/shards/vggsound/train",
        "data/shards/vggsound/test",
        "runs/vggsound",
    )
    same = preset("audioset").replace(
        model=cfg.model, train_shards=cfg.train_shards, eval_shards=cfg.eval_shards, out_dir=cfg.out_dir
    )
    assert same == cfg


def test_demo_preset_is_a_tiny_cpu_model() -> None:
    cfg = preset("demo")
    m, a = cfg.model, cfg.augment
    assert (m.embed_dim, m.depth, m.num_heads, m.fusion_layer, m.num_bottlenecks) == (64, 4, 2, 2, 4)
    assert (m.img_size, m.num_frames, m.audio_frames, m.num_classes, m.drop_path_rate) == (64, 2, 160, 12, 0.0)
    assert (a.crop_px, a.frames_used, a.audio_frames, a.mixup_alpha) == (64, 2, 160, 0.0)
    assert (a.video_crop, a.color_prob) == ("inception", 0.0)  # the demo's labels are colours
    assert (cfg.optimizer, cfg.lr, cfg.weight_decay, cfg.label_smoothing) == ("adamw", 3e-3, 0.05, 0.0)
    assert validate(cfg.replace(train_shards="", eval_shards=""), train=False)
    splits = ("data/shards/demo/train", "data/shards/demo/eval")
    assert (cfg.train_shards, cfg.eval_shards, cfg.out_dir) == (*splits, "runs/demo")


def test_every_preset_validates_against_matching_manifests(tmp_path: Path) -> None:
    for name in PRESETS:
        cfg = preset(name)
        classes = cfg.model.num_classes or 5  # custom: 0, the training split's
        frames = 250 if name == "scenic_as" else 8  # scenic's clips: 32 at stride 2 of 25 per second
        train = write_manifest(tmp_path / name / "train", num_frames=frames, num_classes=classes)
        test = write_manifest(tmp_path / name / "eval", num_frames=frames, num_classes=classes)
        cfg = cfg.replace(train_shards=str(train), eval_shards=str(test), init="none")  # no ViT file here
        cfg, _ = prepare_run(cfg, world_size=1)
        assert cfg.model.num_classes == classes
        assert validate(cfg) is cfg


def test_the_custom_preset_takes_the_number_of_classes_of_the_training_split(tmp_path: Path) -> None:
    cfg = load_config(["--preset", "custom", "--train_shards", str(write_manifest(tmp_path / "t", num_classes=7))])
    assert cfg.model.num_classes == 0 and cfg.model.embed_dim == 768 and cfg.lr == 0.5  # MBT-B and its recipe
    splits = open_run_splits(cfg)
    assert with_split_classes(cfg, splits).model.num_classes == 7
    given = cfg.replace(model=cfg.model.replace(num_classes=3))
    assert with_split_classes(given, splits).model.num_classes == 3
    unread = cfg.replace(train_shards=str(tmp_path / "missing"))
    unopened = open_run_splits(unread)
    assert with_split_classes(unread, unopened) is unread  # validate names the missing split
    assert "no manifest.json there" in unopened.problems["train_shards"]
    with pytest.raises(ConfigError, match="no training split is read"):
        validate(cfg.replace(model=cfg.model.replace(num_classes=0), train_shards=""), train=False)


@pytest.mark.parametrize("streamed", [False, True], ids=["brace-pattern", "streamed"])
def test_the_custom_preset_takes_the_classes_of_a_patterned_or_streamed_training_split(
    tmp_path: Path, streamed: bool
) -> None:
    """The training split is opened once, however it is given, and its classes size the head before validation."""
    folder = write_manifest(tmp_path / "t", num_frames=20, num_classes=7, shards=2)
    source = f"pipe:cat {folder}/manifest.json" if streamed else f"{folder}/shard-{{000000..000001}}.tar"
    cfg = load_config(["--preset", "custom", "--train_shards", source, "--eval_shards", ""])
    resolved, splits = prepare_run(cfg, world_size=1)
    assert resolved.model.num_classes == 7 and len(splits.train) == 2 and splits.eval is None
    assert resolved == cfg.replace(model=cfg.model.replace(num_classes=7))


def test_the_recipe_presets_refuse_to_train_from_scratch_unless_told(tmp_path: Path) -> None:
    """scenic's recipe starts both towers from ImageNet-21k ViT-B/16: the audioset and vggsound presets without
    --init_video and --init_audio are refused with the flags to give and where the weights are; `--init none` trains
    from scratch and is kept in config.yaml. The custom and demo presets train from scratch without the files, as
    before (the demo, tuned with it, maps a ViT file's every tensor: "vit")."""
    train, test = write_manifest(tmp_path / "train", num_classes=5), write_manifest(tmp_path / "eval", num_classes=5)
    vit = tmp_path / "ViT-B_16.npz"
    vit.write_bytes(b"")  # validation checks the file exists; reading it is mbt.pretrained's (tested there)
    for name in ("audioset", "vggsound", "custom"):
        cfg = preset(name).replace(train_shards=str(train), eval_shards=str(test))
        assert cfg.init == "scenic" and cfg.init_required == (name != "custom")
        if name == "custom":
            assert prepare_run(cfg, world_size=1)[0].init == "scenic"
            continue
        cfg = cfg.replace(model=cfg.model.replace(num_classes=5))
        with pytest.raises(ConfigError) as refused:
            prepare_run(cfg, world_size=1)
        message = str(refused.value)
        assert "\n" not in message  # the one problem
        assert "--init_video and --init_audio are not given: pass --init_video ViT-B_16.npz --init_audio " in message
        assert "docs/model.md, 'Pretrained weights'" in message and "or --init none to train from scratch" in message
        assert prepare_run(cfg.replace(init="none"), world_size=1)[0].init == "none"
        assert prepare_run(cfg.replace(init_video=str(vit), init_audio=str(vit)), world_size=1)
    video_only = preset("audioset").replace(train_shards=str(train), eval_shards=str(test))
    video_only = video_only.replace(model=video_only.model.replace(fusion="video", num_classes=5))
    with pytest.raises(ConfigError, match=r"but --init_video is not given: pass --init_video ViT-B_16\.npz \("):
        validate(video_only)
    with pytest.raises(ConfigError, match=r"--init none trains from scratch, but --init_audio \S+ given: drop it"):
        validate(video_only.replace(init="none", init_audio=str(vit)))
    with pytest.raises(ConfigError, match="--init 'imagenet' is not one of scenic, vit, none"):
        validate(video_only.replace(init="imagenet"), train=False)
    assert validate(video_only, train=False)  # evaluation reads no ViT file
    demo = preset("demo")
    assert (demo.init, demo.init_required) == ("vit", False) and init_problems(demo) == []
    saved = save_config(preset("audioset").replace(init="none"), tmp_path / "config.yaml")
    assert yaml.safe_load(saved.read_text())["init"] == "none" and load_config(["--config", str(saved)]).init == "none"


def test_unknown_preset_lists_the_names() -> None:
    names = "audioset, vggsound, custom, custom-cpu, scenic_as, demo"
    with pytest.raises(ConfigError, match=f"unknown preset 'kinetics': choose one of {names}"):
        preset("kinetics")
    with pytest.raises(ConfigError, match="unknown preset 'kinetics'"):
        load_config(["--preset", "kinetics"])


# loading: preset, YAML, flags


def test_default_is_the_demo_preset() -> None:
    assert load_config([]) == preset("demo")


def test_yaml_overrides_preset_and_flags_override_both(tmp_path: Path) -> None:
    path = write_yaml(
        tmp_path / "run.yaml",
        {"lr": 0.1, "epochs": 7, "model": {"depth": 6, "fusion_layer": 4}, "augment": {"resize_scale": [0.5, 1.0]}},
    )
    cfg = load_config(["--lr", "0.2", "--config", str(path), "--preset", "vggsound", "--model.depth", "8"])
    assert cfg.lr == 0.2  # the flag wins over the YAML, wherever it stands
    assert cfg.epochs == 7  # the YAML wins over the preset
    assert (cfg.model.depth, cfg.model.fusion_layer, cfg.model.num_classes) == (8, 4, 309)
    assert cfg.augment.resize_scale == (0.5, 1.0)
    assert cfg.augment.crop_px == 224  # untouched keys keep the preset's value
    assert cfg.train_shards == "data/shards/vggsound/train"


def test_later_yaml_files_win(tmp_path: Path) -> None:
    first = write_yaml(tmp_path / "a.yaml", {"seed": 1, "epochs": 3})
    second = write_yaml(tmp_path / "b.yaml", {"seed": 2})
    cfg = load_config(["--config", str(first), "--config", str(second)])
    assert (cfg.seed, cfg.epochs) == (2, 3)


def test_yaml_values_are_read_as_the_field_types(tmp_path: Path) -> None:
    # PyYAML reads 1e-4 (no dot) as a string and `1` as an int: both become the field's float.
    path = write_yaml(tmp_path / "run.yaml", {"lr": "1e-4", "weight_decay": 1, "bf16": 0, "clip_grad_norm": None})
    cfg = load_config(["--config", str(path)])
    assert (cfg.lr, cfg.weight_decay, cfg.bf16, cfg.clip_grad_norm) == (1e-4, 1.0, False, None)
    assert isinstance(cfg.weight_decay, float)


@pytest.mark.parametrize(
    ("flags", "attr", "expected"),
    [
        (["--batch_size", "32"], "batch_size", 32),
        (["--lr", "1e-3"], "lr", 1e-3),
        (["--lr=0.25"], "lr", 0.25),
        (["--warmup_epochs", "2"], "warmup_epochs", 2.0),
        (["--bf16", "false"], "bf16", False),
        (["--bf16", "0"], "bf16", False),
        (["--compile", "true"], "compile", True),
        (["--compile", "1"], "compile", True),
        (["--optimizer", "sgd"], "optimizer", "sgd"),
        (["--init_video", "vit.pth"], "init_video", "vit.pth"),
        (["--init_video", "none"], "init_video", None),
        (["--clip_grad_norm", "None"], "clip_grad_norm", None),
        (["--max_steps", "5"], "max_steps", 5),
        (["--batch-size", "16"], "batch_size", 16),
        (["--model.fusion", "late"], "model.fusion", "late"),
        (["--model.mlp_ratio", "2"], "model.mlp_ratio", 2.0),
        (["--model.grad_checkpointing", "true"], "model.grad_checkpointing", True),
        (["--model.fusion-layer", "3"], "model.fusion_layer", 3),
        (["--augment.frames_used", "4"], "augment.frames_used", 4),
        (["--augment.frames_used", "none"], "augment.frames_used", None),
        (["--augment.resize_scale", "0.5,1"], "augment.resize_scale", (0.5, 1.0)),
        (["--augment.resize_ratio=0.5, 2.0"], "augment.resize_ratio", (0.5, 2.0)),
        (["--batch_size", "16", "--batch_size", "24"], "batch_size", 24),
    ],
)
def test_flags_parse_by_field_type(flags: list[str], attr: str, expected: object) -> None:
    value: object = load_config(flags)
    for part in attr.split("."):
        value = getattr(value, part)
    assert value == expected
    assert type(value) is type(expected)


@pytest.mark.parametrize(
    ("flags", "message"),
    [
        (["--batch_size", "abc"], "batch_size: expected int, got 'abc'"),
        (["--batch_size", "8.5"], "batch_size: expected int"),
        (["--lr", "fast"], "lr: expected float"),
        (["--bf16", "maybe"], "bf16: expected bool"),
        (["--batch_size", "none"], "batch_size: expected int, got 'none'"),
        (["--augment.resize_scale", "0.5"], r"augment.resize_scale: expected comma list float,float"),
        (["--augment.resize_scale", "0.5,x"], r"augment.resize_scale\[1\]: expected float"),
        (["--lr"], "--lr needs a value"),
        (["demo"], "unexpected argument 'demo'"),
        (["--model", "x"], "'model' is a section"),
    ],
)
def test_bad_flags_are_rejected(flags: list[str], message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        load_config(flags)


def test_unknown_flag_names_the_key_and_suggests_close_ones() -> None:
    with pytest.raises(
        ConfigError, match=r"command line: unknown key 'model.fusion_layr'; did you mean model.fusion_la"
    ):
        load_config(["--model.fusion_layr", "3"])
    with pytest.raises(ConfigError, match=r"unknown key 'fusion_layer'; did you mean model.fusion_layer"):
        load_config(["--fusion_layer", "3"])
    with pytest.raises(ConfigError, match="unknown key 'learning_rate'"):
        load_config(["--learning_rate", "0.1"])
    with pytest.raises(ConfigError, match="unknown key 'zzz'; run with --help"):
        load_config(["--zzz", "1"])


def test_unknown_yaml_key_names_the_file_and_suggests(tmp_path: Path) -> None:
    path = write_yaml(tmp_path / "run.yaml", {"augment": {"mixup": 0.2}})
    with pytest.raises(ConfigError, match=rf"{path}: unknown key 'augment.mixup'; did you mean augment.mixup_alpha"):
        load_config(["--config", str(path)])


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("model: 3\n", "'model' is a section"),
        ("- lr\n", "expected a mapping of config keys, got a list"),
        ("lr: [\n", "not valid YAML"),
        ("model:\n  depth: six\n", "model.depth: expected int, got 'six'"),
    ],
)
def test_bad_yaml_is_rejected(tmp_path: Path, text: str, message: str) -> None:
    path = tmp_path / "run.yaml"
    path.write_text(text)
    with pytest.raises(ConfigError, match=message):
        load_config(["--config", str(path)])


def test_missing_yaml_file_is_rejected(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="no such file"):
        load_config(["--config", str(tmp_path / "absent.yaml")])


def test_empty_yaml_changes_nothing(tmp_path: Path) -> None:
    path = tmp_path / "empty.yaml"
    path.write_text("")
    assert load_config(["--config", str(path)]) == preset("demo")


def test_invalid_model_values_are_rejected_with_the_key() -> None:
    with pytest.raises(ConfigError, match=r"invalid model settings: fusion_layer must be in 0..depth=4, got 9"):
        load_config(["--model.fusion_layer", "9"])
    with pytest.raises(ConfigError, match="fusion must be one of"):
        load_config(["--model.fusion", "early"])


def printed(argv: list[str], capsys: pytest.CaptureFixture[str]) -> str:
    """What load_config(argv) prints before it exits with status 0."""
    with pytest.raises(SystemExit) as exit_info:
        load_config(argv)
    assert exit_info.value.code == 0
    return capsys.readouterr().out


def test_help_names_the_program_and_describes_every_key(capsys: pytest.CaptureFixture[str]) -> None:
    out = printed(["--help"], capsys)
    assert out.startswith("usage: python -m mbt.train [--preset NAME]") and "--print-config" in out
    assert "--model.fusion_layer (int) 2\n      Lf: the first layer where the towers fuse" in out
    assert "--augment.resize_scale (comma list float,float) 0.08,1.0" in out
    assert "--clip_grad_norm (float or none)" in out
    assert set(FLAG_HELP) == {key for key, _ in leaf_fields(TrainConfig)} and all(FLAG_HELP.values())


def test_help_after_a_preset_shows_its_resolved_values(capsys: pytest.CaptureFixture[str]) -> None:
    out = printed(["--preset", "audioset", "--lr", "0.1", "--help"], capsys)
    assert "resolved from the audioset preset and the files and flags given" in out
    assert "--model.num_classes (int) 527" in out and "--model.depth (int) 12" in out and "--lr (float) 0.1\n" in out
    assert "--model.depth (int) 4" in printed(["--help"], capsys)  # the demo's


def test_print_config_prints_the_resolved_yaml_and_starts_nothing(capsys: pytest.CaptureFixture[str]) -> None:
    out = printed(["--preset", "vggsound", "--model.depth", "10", "--print-config"], capsys)
    resolved = config_from_dict(yaml.safe_load(out))
    base = preset("vggsound")
    assert resolved == base.replace(model=base.model.replace(depth=10))


def test_one_quantity_given_once_sets_both_of_its_settings(tmp_path: Path) -> None:
    cfg = load_config(["--model.img_size", "32", "--augment.eval_short_side_px", "36"])
    assert cfg.model.img_size == cfg.augment.crop_px == 32
    cfg = load_config(["--augment.audio_frames", "320"])
    assert cfg.model.audio_frames == cfg.augment.audio_frames == 320
    path = tmp_path / "run.yaml"
    path.write_text("model:\n  audio_frames: 480\n")
    assert load_config(["--config", str(path)]).augment.audio_frames == 480
    cfg = load_config(["--model.img_size", "32", "--augment.crop_px", "48", "--augment.eval_short_side_px", "64"])
    with pytest.raises(ConfigError) as err:
        validate(cfg.replace(train_shards="", eval_shards=""), train=False)
    assert "--augment.crop_px 48 differs from --model.img_size 32: give one of them (the other follows)" in str(
        err.value
    )
    assert "\n" not in str(err.value)


# round trips


def custom_config() -> TrainConfig:
    base = preset("audioset")
    return base.replace(
        model=base.model.replace(fusion="cross", fusion_layer=10, audio_patch_stride=10),
        augment=base.augment.replace(frames_used=4, resize_ratio=(0.7, 1.4)),
        init_video="ckpt/vit.pth",
        clip_grad_norm=None,
        max_steps=3,
        lr=1 / 3,
    )


@pytest.mark.parametrize("cfg", [*(preset(n) for n in PRESETS), custom_config()], ids=[*PRESETS, "custom"])
def test_dict_round_trip_is_exact(cfg: TrainConfig) -> None:
    data = config_to_dict(cfg)
    assert json.loads(json.dumps(data)) == data  # plain values only
    assert config_from_dict(data) == cfg


def test_dict_survives_a_weights_only_checkpoint() -> None:
    cfg = custom_config()
    buffer = io.BytesIO()
    torch.save({"config": config_to_dict(cfg)}, buffer)
    buffer.seek(0)
    assert config_from_dict(torch.load(buffer, weights_only=True)["config"]) == cfg


def test_yaml_round_trip_is_exact(tmp_path: Path) -> None:
    cfg = custom_config()
    path = save_config(cfg, tmp_path / "run" / "config.yaml")
    assert path == tmp_path / "run" / "config.yaml"
    assert config_from_dict(yaml.safe_load(path.read_text())) == cfg
    assert load_config(["--config", str(path)]) == cfg  # the saved file is complete: the default preset is overridden


def test_from_dict_fills_missing_keys_and_rejects_unknown_ones() -> None:
    """A missing key takes its default, or, for a key added since (BEFORE_KEYS), what runs before it did: global
    gradient clipping, timm's stochastic depth and num_bottlenecks tokens, with which such a checkpoint resumes."""
    cfg = config_from_dict({"lr": 0.1, "model": {"depth": 10}})
    older = {"init": "vit", "init_required": False, "clip_grad_scope": "global"}
    model = TrainConfig().model.replace(depth=10, drop_path_scale=True, cls_bottleneck=False)
    assert cfg == TrainConfig(lr=0.1, model=model, **older)
    current = config_to_dict(TrainConfig())
    assert config_from_dict(current) == TrainConfig() and TrainConfig().clip_grad_scope == "per_rank"
    with pytest.raises(ConfigError, match=r"config: unknown key 'model.dept'; did you mean model.depth"):
        config_from_dict({"model": {"dept": 6}})


# validation


def test_a_config_stored_before_cls_bottleneck_keeps_its_bottleneck_tokens() -> None:
    """A checkpoint's or export's config written before `model.cls_bottleneck` existed built num_bottlenecks tokens
    with the CLS pool: read back, it still does; a config that states the key keeps what it states."""
    stored = config_to_dict(TrainConfig())
    del stored["model"]["cls_bottleneck"]
    old = config_from_dict(stored).model
    assert (old.cls_bottleneck, old.bottleneck_tokens, TrainConfig().model.bottleneck_tokens) == (False, 4, 5)
    assert config_from_dict(config_to_dict(TrainConfig())) == TrainConfig()


def test_valid_config_is_returned(demo_cfg: TrainConfig) -> None:
    assert validate(demo_cfg, world_size=2) is demo_cfg


def test_batch_not_divisible_by_world_size_times_accumulation(demo_cfg: TrainConfig) -> None:
    cfg = demo_cfg.replace(batch_size=64)
    message = "global batch 64 is not divisible by world size 3 × grad_accum 1 = 3: change --batch_size or --grad_accum"
    with pytest.raises(ConfigError, match=message):
        validate(cfg, world_size=3)
    with pytest.raises(ConfigError, match="world size 2 × grad_accum 3 = 6"):
        validate(cfg.replace(grad_accum=3), world_size=2)
    assert validate(cfg.replace(grad_accum=4), world_size=2)


def test_per_rank_batch() -> None:
    cfg = preset("audioset")
    assert per_rank_batch(cfg, 1) == 64
    assert per_rank_batch(cfg, 8) == 8
    assert per_rank_batch(cfg.replace(grad_accum=4), 2) == 8
    with pytest.raises(ConfigError, match="not divisible by world size 3"):
        per_rank_batch(cfg, 3)


@pytest.mark.parametrize(
    ("changes", "message"),
    [
        ({"optimizer": "adam"}, "--optimizer 'adam' is not one of sgd, adamw"),
        ({"loader": "ffcv"}, "--loader 'ffcv' is not one of auto, dali, torch"),
        ({"device": "tpu"}, "--device 'tpu' is not one of auto, cpu, cuda"),
        ({"lr": 0.0}, "--lr must be positive, got 0.0"),
        ({"lr": float("nan")}, "--lr must be positive"),
        (
            {"epochs": 0, "warmup_epochs": 0.0},
            r"--epochs must be in 1\.\.10000 \(passes over the training split\), got 0",
        ),
        ({"warmup_epochs": 31.0}, r"--warmup_epochs must be in \[0, epochs=30\]"),
        ({"batch_size": 0}, r"--batch_size must be in 1\.\.65536"),
        ({"grad_accum": 0}, r"--grad_accum must be in 1\.\.1024"),
        ({"eval_batch_size": 0}, r"--eval_batch_size must be in 1\.\.4096"),
        ({"num_workers": -1}, r"--num_workers must be in 0\.\.128 \(loader processes per rank\), got -1"),
        ({"momentum": 1.0}, r"--momentum must be in \[0, 1\)"),
        ({"weight_decay": -0.1}, "--weight_decay must be 0 or more"),
        ({"label_smoothing": 1.0}, r"--label_smoothing must be in \[0, 1\)"),
        ({"clip_grad_norm": -1.0}, "--clip_grad_norm must be none, 0 .off. or positive"),
        ({"max_steps": 0}, r"--max_steps must be in 1\.\.100000000"),
        ({"eval_every_epochs": 0}, r"--eval_every_epochs must be in 1\.\."),
        ({"checkpoint_every_steps": 0}, r"--checkpoint_every_steps must be in 1\.\."),
        ({"keep_checkpoints": 0}, r"--keep_checkpoints must be in 1\.\."),
        ({"log_every_steps": 0}, r"--log_every_steps must be in 1\.\."),
    ],
)
def test_bad_values_are_rejected(demo_cfg: TrainConfig, changes: dict[str, object], message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        validate(demo_cfg.replace(**changes))


@pytest.mark.parametrize(
    ("model", "augment", "message"),
    [
        ({}, {"crop_px": 112}, "--augment.crop_px 112 differs from --model.img_size 96: give one of them"),
        ({}, {"eval_short_side_px": 90}, "--augment.eval_short_side_px 90 is below --augment.crop_px 96"),
        ({}, {"audio_frames": 400}, "--augment.audio_frames 400 differs from --model.audio_frames 800"),
        ({}, {"mixup_alpha": -1.0}, "--augment.mixup_alpha must be 0 .off. or positive"),
        ({}, {"num_test_clips": 0}, r"--augment.num_test_clips must be in 1\.\.64"),
        ({}, {"frames_used": 0}, rf"--augment.frames_used must be in 1\.\.{MAX_FRAMES}"),
        ({}, {"logmel_std": 0.0}, r"--augment.logmel_std must be positive \(log-mels are divided by it\), got 0.0"),
        ({}, {"logmel_mean": float("inf")}, "--augment.logmel_mean must be a finite number, got inf"),
    ],
)
def test_model_and_augment_must_agree(
    demo_cfg: TrainConfig, model: dict[str, object], augment: dict[str, object], message: str
) -> None:
    cfg = demo_cfg.replace(model=demo_cfg.model.replace(**model), augment=demo_cfg.augment.replace(**augment))
    with pytest.raises(ConfigError, match=message):
        validate(cfg)


def test_missing_shards_say_how_to_make_them(demo_cfg: TrainConfig, tmp_path: Path) -> None:
    absent = tmp_path / "absent"
    with pytest.raises(ConfigError) as err:
        validate(demo_cfg.replace(train_shards=str(absent), eval_shards=str(absent)))
    lines = str(err.value).splitlines()
    assert len(lines) == 2
    assert lines[0].startswith(f"--train_shards {absent}: no manifest.json there; shard the split first")
    assert "tools/shard_audioset.py" in lines[0] and "make demo-shards" in lines[0]
    assert lines[1].startswith(f"--eval_shards {absent}: no manifest.json there")


def test_empty_train_shards_is_rejected_for_training_only(demo_cfg: TrainConfig) -> None:
    with pytest.raises(ConfigError, match="--train_shards is empty"):
        validate(demo_cfg.replace(train_shards=""))
    assert validate(demo_cfg.replace(train_shards="", eval_shards=""), train=False)
    assert validate(demo_cfg.replace(eval_shards=""))  # no evaluation during training


def test_evaluation_ignores_train_shards_but_checks_eval_shards(demo_cfg: TrainConfig, tmp_path: Path) -> None:
    assert validate(demo_cfg.replace(train_shards=str(tmp_path / "absent")), train=False)
    with pytest.raises(ConfigError, match=r"--eval_shards .*: no manifest.json"):
        validate(demo_cfg.replace(eval_shards=str(tmp_path / "absent")), train=False)


def test_invalid_manifest_is_reported(demo_cfg: TrainConfig, tmp_path: Path) -> None:
    (tmp_path / "broken").mkdir()
    (tmp_path / "broken" / "manifest.json").write_text("{")
    with pytest.raises(ConfigError, match=r"--train_shards: .*not valid JSON"):
        validate(demo_cfg.replace(train_shards=str(tmp_path / "broken")))


@pytest.mark.parametrize(
    ("manifest", "model", "augment", "message"),
    [
        ({"num_frames": 4}, {}, {}, "--model.num_frames 8, but the shards in .* hold 4 frames per clip: lower"),
        (
            {},
            {"num_frames": 4},
            {},
            "the loader feeds 8 frames .* --model.num_frames is 4: set --augment.frames_used 4",
        ),
        ({}, {}, {"frames_used": 12}, "--augment.frames_used 12, but the shards in .* hold 8 frames"),
        (
            {"segment_s": 2.0},
            {},
            {},
            "hold 200 log-mel frames per clip: lower --model.audio_frames and --augment.audio",
        ),
        (
            {"num_classes": 10},
            {},
            {},
            "--model.num_classes 8, but the shards in .* have 10 classes: set --model.num_cl",
        ),
        ({"num_mel_bins": 64}, {}, {}, "--model.num_mel_bins 128, but the shards in .* hold 64 mel bins"),
    ],
)
def test_shards_must_match_the_model(
    demo_cfg: TrainConfig,
    tmp_path: Path,
    manifest: dict[str, object],
    model: dict[str, object],
    augment: dict[str, object],
    message: str,
) -> None:
    train = write_manifest(tmp_path / "other", **manifest)
    cfg = demo_cfg.replace(
        train_shards=str(train),
        model=demo_cfg.model.replace(**model),
        augment=demo_cfg.augment.replace(**augment),
    )
    with pytest.raises(ConfigError, match=message):
        validate(cfg)


def test_fewer_frames_than_stored_via_frames_used(demo_cfg: TrainConfig) -> None:
    cfg = demo_cfg.replace(model=demo_cfg.model.replace(num_frames=4), augment=demo_cfg.augment.replace(frames_used=4))
    assert validate(cfg) is cfg


def test_every_problem_is_listed(demo_cfg: TrainConfig) -> None:
    with pytest.raises(ConfigError) as err:
        validate(demo_cfg.replace(lr=-1.0, optimizer="adam", batch_size=10), world_size=4)
    message = str(err.value)
    assert "--lr must be positive" in message
    assert "--optimizer 'adam'" in message
    assert "global batch 10 is not divisible by world size 4" in message


def test_real_demo_shards(train_shards: Path) -> None:
    """The session's real shards of 2 s clips (T=200): the demo model must crop at most 200 log-mel frames."""
    classes = load_manifest(train_shards).num_classes
    cfg = BASE.replace(train_shards=str(train_shards), eval_shards="", model=BASE.model.replace(num_classes=classes))
    with pytest.raises(ConfigError, match="hold 200 log-mel frames per clip"):
        validate(cfg)
    short = cfg.replace(model=cfg.model.replace(audio_frames=192), augment=cfg.augment.replace(audio_frames=192))
    assert validate(short) is short


def test_streamed_and_patterned_splits_are_checked_against_the_model(demo_cfg: TrainConfig, tmp_path: Path) -> None:
    other = write_manifest(tmp_path / "other", num_classes=10, shards=2)
    for source in (f"pipe:cat {other}/manifest.json", f"{other}/shard-{{000000..000001}}.tar"):
        with pytest.raises(ConfigError, match=r"--model.num_classes 8, but the shards in .* have 10 classes"):
            validate(demo_cfg.replace(train_shards=source))
    with pytest.raises(ConfigError, match=r"--eval_shards: pipe:cat /nowhere/manifest.json: the command exited"):
        validate(demo_cfg.replace(eval_shards="pipe:cat /nowhere/manifest.json"))
    with pytest.raises(ConfigError, match=r"--shuffle_buffer must be in 1\.\.65536"):
        validate(demo_cfg.replace(shuffle_buffer=0))
