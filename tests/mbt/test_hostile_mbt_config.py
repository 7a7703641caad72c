"""Hostile configs: absurd values, files that are not YAML mappings, tags that would construct objects, keys given
twice, and training and evaluation splits of different classes; each refused before any work with a message that
names the key or file."""

from __future__ import annotations

import dataclasses
import math
from pathlib import Path

import pytest
import yaml
from placeholder_split import write_placeholder_split
from test_config import BASE

import mbt.config
import mbt.config_io
from mbt.config import ConfigError, TrainConfig, load_config
from mbt.train import main
from mbt.validate import validate
from shards.schema import MAX_FRAMES, FeatureParams


def write_split(folder: Path, names: list[str], multi_label: bool = True) -> Path:
    """A split of classes `names` that opens, of placeholder samples, shaped like the demo preset's shards."""
    classes = [{"index": i, "id": f"/m/{name}", "name": name} for i, name in enumerate(names)]
    return write_placeholder_split(folder, FeatureParams(), classes, multi_label)


CLASSES = [f"class {i}" for i in range(8)]


@pytest.fixture
def cfg(tmp_path: Path) -> TrainConfig:
    train, test = write_split(tmp_path / "train", CLASSES), write_split(tmp_path / "eval", CLASSES)
    return BASE.replace(train_shards=str(train), eval_shards=str(test), out_dir=str(tmp_path / "run"))


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("lr: .inf\n", r"lr: expected float \(a finite number\), got inf"),
        ("lr: .nan\n", r"lr: expected float \(a finite number\), got nan"),
        ("lr: -.inf\n", r"lr: expected float \(a finite number\)"),
        (f"lr: {'9' * 400}\n", r"lr: expected float \(a finite number\)"),
        ("momentum: .nan\n", r"momentum: expected float \(a finite number\)"),
        ("warmup_epochs: .nan\n", r"warmup_epochs: expected float \(a finite number\), got nan"),
        ("augment:\n  resize_scale: [0.1, .inf]\n", r"augment.resize_scale\[1\]: expected float \(a finite"),
        ("batch_size: 1.0e+20\n", "batch_size: expected int, got 1e[+]20"),
        ("batch_size: 1e20\n", "batch_size: expected int, got '1e20'"),
        (
            f"batch_size: {10**20}\n",
            rf"--batch_size must be in 1\.\.65536 \(samples per optimizer step .*\), got {10**20}",
        ),
        (f"eval_batch_size: {10**9}\n", r"--eval_batch_size must be in 1\.\.4096"),
        ("epochs: 100000000\n", r"--epochs must be in 1\.\.10000"),
        (f"max_steps: {10**12}\n", r"--max_steps must be in 1\.\.100000000"),
        ("num_workers: -3\n", r"--num_workers must be in 0\.\.128 \(loader processes per rank\), got -3"),
        ("num_workers: 100000\n", r"--num_workers must be in 0\.\.128"),
        (f"shuffle_buffer: {10**9}\n", r"--shuffle_buffer must be in 1\.\.65536"),
        ("grad_accum: 100000\n", r"--grad_accum must be in 1\.\.1024"),
        ("seed: -1\n", r"--seed must be in 0\.\.2147483647"),
        ("augment:\n  num_test_clips: 100000\n", r"--augment.num_test_clips must be in 1\.\.64"),
        ("augment:\n  num_time_masks: 100000000\n", r"--augment.num_time_masks must be in 0\.\.64"),
        ("model:\n  audio_frames: 10000000\n", r"--model.audio_frames must be in 1\.\.10000"),
        ("model:\n  embed_dim: 1000000\n", r"--model.embed_dim must be in 1\.\.8192"),
        ("model:\n  num_classes: 100000000\n", r"--model.num_classes must be in 0\.\.100000"),
        ("model:\n  num_heads: 0\n", r"--model.num_heads must be in 1\.\.256"),
        ("model:\n  depth: 100000\n", r"--model.depth must be in 1\.\.128"),
        (
            "model:\n  embed_dim: 8192\n  depth: 128\n  num_heads: 64\n  mlp_ratio: 16\n",
            r"the model would have [\d,]+ parameters, more than 2,500,000,000 \(four MBT-Ls",
        ),
        ('out_dir: "runs/a\\0b"\n', r"--out_dir holds a NUL character: 'runs/a\\x00b'"),
        ('train_shards: "\\0"\n', "--train_shards holds a NUL character"),
    ],
)
def test_absurd_yaml_values_are_refused_naming_file_and_key(tmp_path: Path, text: str, message: str) -> None:
    path = tmp_path / "run.yaml"
    path.write_text(text)
    with pytest.raises(ConfigError, match=message) as err:
        load_config(["--config", str(path)])
    assert str(err.value).startswith(f"--config {path}: ")


@pytest.mark.parametrize(
    ("flags", "message"),
    [
        (["--lr", "inf"], r"lr: expected float \(a finite number\), got 'inf'"),
        (["--lr", "nan"], r"lr: expected float \(a finite number\), got 'nan'"),
        (["--lr", "1e400"], r"lr: expected float \(a finite number\), got '1e400'"),
        (["--batch_size", str(10**20)], r"--batch_size must be in 1\.\.65536"),
        (["--batch_size", "1" * 5000], "batch_size: expected int, got '1111"),
        (["--num_workers", "-1"], r"--num_workers must be in 0\.\.128"),
        (["--model.num_heads", "0"], r"--model.num_heads must be in 1\.\.256"),
    ],
)
def test_absurd_flag_values_are_refused(flags: list[str], message: str) -> None:
    with pytest.raises(ConfigError, match=message) as err:
        load_config(flags)
    assert len(str(err.value)) < 500


@pytest.mark.slow
@pytest.mark.parametrize(
    ("content", "message"),
    [
        (b"lr: \xff\xfe0.1\n", r"not UTF-8 text \(byte 4\); save it as UTF-8"),
        (b"- lr\n- 0.1\n", "expected a mapping of config keys, got a list"),
        (b"3\n", "expected a mapping of config keys, got a int"),
        (b"just a sentence\n", "expected a mapping of config keys, got a str"),
        (b"lr: 0.1\nepochs: 3\nlr: 0.2\n", r"not valid YAML \(key 'lr' is given twice: keep one"),
        (b"model:\n  depth: 2\n  depth: 3\n", r"key 'depth' is given twice"),
        (b"[" * 100_000 + b"]" * 100_000, "nested too deeply to be a config"),
        (b"# padding\n" * 200_000, r"larger than 1048576 bytes"),
    ],
    ids=["not-utf8", "list", "int", "str", "key-twice", "nested-key-twice", "deep", "huge"],
)
def test_files_that_are_not_config_mappings_are_refused(tmp_path: Path, content: bytes, message: str) -> None:
    path = tmp_path / "run.yaml"
    path.write_bytes(content)
    with pytest.raises(ConfigError, match=message) as err:
        load_config(["--config", str(path)])
    assert str(err.value).startswith(f"--config {path}: ")


def test_a_folder_given_as_config_is_refused(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=rf"--config {tmp_path}: a folder, not a file; give its YAML file"):
        load_config(["--config", str(tmp_path)])


@pytest.mark.parametrize(
    "tag",
    [
        "!!python/object/apply:os.mkdir [{path}]",
        "!!python/object/new:pathlib.Path [{path}]",
        "!!python/name:os.system",
        "!!python/object:argparse.Namespace {{x: {path}}}",
    ],
)
def test_python_tags_construct_nothing(tmp_path: Path, tag: str) -> None:
    target = tmp_path / "made-by-yaml"
    path = tmp_path / "run.yaml"
    path.write_text(f"lr: 0.1\nout_dir: {tag.format(path=target)}\n")
    with pytest.raises(ConfigError, match=r"not valid YAML \(could not determine a constructor for the tag"):
        load_config(["--config", str(path)])
    assert not target.exists()
    assert issubclass(mbt.config_io._ConfigLoader, yaml.SafeLoader)  # the safe loader, one check added


def test_merge_keys_may_still_be_overridden(tmp_path: Path) -> None:
    path = tmp_path / "run.yaml"
    path.write_text("model: &m\n  depth: 4\n  fusion_layer: 2\naugment:\n  crop_px: 96\n")
    assert load_config(["--config", str(path)]).model.depth == 4


def test_an_alias_bomb_is_refused_with_a_short_message(tmp_path: Path) -> None:
    levels = ["a0: &a0 [1, 1, 1, 1, 1, 1, 1, 1, 1]"]
    levels += [f"a{i}: &a{i} [{', '.join([f'*a{i - 1}'] * 9)}]" for i in range(1, 9)]
    path = tmp_path / "run.yaml"
    path.write_text("augment:\n  resize_scale: [" + ", ".join(levels) + "]\n")
    with pytest.raises(ConfigError, match="expected comma list float,float") as err:
        load_config(["--config", str(path)])
    assert len(str(err.value)) < 1000


@pytest.mark.parametrize(
    ("changes", "message"),
    [
        ({"lr": math.inf}, "--lr must be a finite number, got inf"),
        ({"warmup_epochs": math.nan}, "--warmup_epochs must be a finite number, got nan"),
        ({"batch_size": 10**20}, r"--batch_size must be in 1\.\.65536"),
        ({"num_workers": 10**6}, r"--num_workers must be in 0\.\.128"),
        ({"seed": 2**64}, r"--seed must be in 0\.\.2147483647"),
        ({"out_dir": ""}, "--out_dir is empty: name the run's folder"),
        ({"init_video": "/nowhere/vit.pth"}, "--init_video /nowhere/vit.pth: no such file"),
    ],
)
def test_validate_bounds_configs_made_in_code(cfg: TrainConfig, changes: dict[str, object], message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        validate(cfg.replace(**changes))


@pytest.mark.parametrize(
    ("model", "augment", "message"),
    [
        ({"drop_rate": 1.5}, {}, r"--model.drop_rate must be in \[0, 1\), got 1.5"),
        ({"drop_path_rate": -0.1}, {}, r"--model.drop_path_rate must be in \[0, 1\)"),
        ({"mlp_ratio": 1000.0}, {}, r"--model.mlp_ratio must be in \(0, 16\]"),
        ({"mlp_ratio": math.nan}, {}, "--model.mlp_ratio must be a finite number"),
        ({"patch_size": 128}, {}, "--model.patch_size 128 is larger than --model.img_size 96"),
        (
            {"patch_size": 2, "img_size": 512},
            {"crop_px": 512, "eval_short_side_px": 512},
            "the video tower would have 524288 tokens, more than 16384",
        ),
        ({}, {"flip_prob": 2.0}, r"--augment.flip_prob must be in \[0, 1\]"),
        ({}, {"resize_scale": (0.9, 0.1)}, "--augment.resize_scale must be two area fractions"),
        ({}, {"resize_ratio": (0.0, 1.0)}, "--augment.resize_ratio must be two aspect ratios"),
    ],
)
def test_model_and_augment_values_that_cannot_build(
    cfg: TrainConfig, model: dict[str, object], augment: dict[str, object], message: str
) -> None:
    changed = cfg.replace(model=cfg.model.replace(**model), augment=cfg.augment.replace(**augment))
    with pytest.raises(ConfigError, match=message):
        validate(changed)


def test_train_and_eval_splits_of_other_classes_are_refused(cfg: TrainConfig, tmp_path: Path) -> None:
    renamed = write_split(tmp_path / "renamed", [*CLASSES[:3], "dog", *CLASSES[4:]])
    with pytest.raises(ConfigError) as err:
        validate(cfg.replace(eval_shards=str(renamed)))
    assert "the training and evaluation splits have different classes: class 3 is 'class 3' (/m/class 3) in " in str(
        err.value
    )
    assert f"but 'dog' (/m/dog) in --eval_shards {renamed}" in str(err.value)
    assert validate(cfg.replace(eval_shards=str(renamed)), train=False)  # evaluation alone has nothing to compare
    single = write_split(tmp_path / "single", CLASSES, multi_label=False)
    with pytest.raises(ConfigError, match=r"--train_shards .* is multi-label, --eval_shards .* single-label"):
        validate(cfg.replace(eval_shards=str(single)))


def test_a_manifest_whose_classes_are_not_records_is_refused(cfg: TrainConfig, tmp_path: Path) -> None:
    broken = write_split(tmp_path / "broken", CLASSES)
    manifest = (broken / "manifest.json").read_text().replace('"id": "/m/class 2"', '"id": 2')
    (broken / "manifest.json").write_text(manifest)
    with pytest.raises(ConfigError, match=rf"--eval_shards {broken}: class 2 is not a mapping of index 2, a string id"):
        validate(cfg.replace(eval_shards=str(broken)))


@pytest.mark.parametrize(
    "text",
    ["lr: .nan\n", f"batch_size: {10**20}\n", "lr: 1\nlr: 2\n", "!!python/object/apply:os.getcwd []\n", "- 1\n"],
)
def test_main_refuses_before_any_work(
    cfg: TrainConfig, tmp_path: Path, text: str, capsys: pytest.CaptureFixture
) -> None:
    path = tmp_path / "run.yaml"
    path.write_text(text)
    args = ["--train_shards", cfg.train_shards, "--eval_shards", cfg.eval_shards, "--out_dir", cfg.out_dir]
    assert main([*args, "--config", str(path)]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"error: --config {path}: ") and "Traceback" not in err
    assert not Path(cfg.out_dir).exists()


def test_frames_settings_are_bounded_by_the_shard_schema() -> None:
    for key in ("model.num_frames", "model.tubelet_frames", "augment.frames_used"):
        assert mbt.config.INT_LIMITS[key][:2] == (1, MAX_FRAMES)
    with pytest.raises(ConfigError, match=rf"--model.num_frames must be in 1\.\.{MAX_FRAMES} .*got {MAX_FRAMES + 1}"):
        load_config(["--model.num_frames", str(MAX_FRAMES + 1)])


def test_every_limit_names_a_field() -> None:
    fields = {f"{prefix}{f.name}" for prefix, cls in (("", TrainConfig), ("model.", type(TrainConfig().model)),
              ("augment.", type(TrainConfig().augment))) for f in dataclasses.fields(cls)}  # fmt: skip
    assert set(mbt.config.INT_LIMITS) <= fields
