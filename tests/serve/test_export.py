"""Export and load (tools/export_model.py, serve.export, serve.load): an exported model predicts the checkpoint's
logits, its config.json holds what using it elsewhere needs, and a damaged export is refused with an error naming
the file; checkpoints and exports are refused with the words evaluation and the manifest parser use; a full disk is
one error line naming the file being written."""

from __future__ import annotations

import json
import math
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from conftest import load_tool
from full_disk import PAGE, FullDisk
from hostile_files import stated_tensor_safetensors
from safetensors.torch import load_file, save_file
from tiny_run import TINY, TINY_AUG, eval_videos, make_run

import serve
from experiments.demo_data import DemoDataset
from mbt.checkpoint import CheckpointFileError, latest_checkpoint
from mbt.flops import example_inputs
from mbt.model import MBT
from serve.load import CONFIG_FILE, WEIGHTS_FILE, ExportError, from_checkpoint, load_pretrained
from serve.predict import Predictor
from serve.segments import Segment
from shards.atomic import RERUN
from shards.manifest import load_manifest, parse_manifest
from shards.schema import SCHEMA_VERSION, SchemaError


@pytest.fixture(scope="module")
def run(train_shards: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_run(train_shards, tmp_path_factory.mktemp("export") / "run")


@pytest.fixture(scope="module")
def exported(run: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("export") / "model"
    assert load_tool("export_model").main([str(run), str(out)]) == 0
    return out


def test_export_round_trip_gives_the_checkpoint_logits(
    run: Path, exported: Path, train_shards: Path, demo: DemoDataset
) -> None:
    video = next(iter(eval_videos(demo).values()))
    from_run = Predictor(*from_checkpoint(run)).predict(Segment(video, "v"), embeddings=True)
    model, prep = serve.load_pretrained(exported)
    assert not model.training
    loaded = Predictor(model, prep).predict(Segment(video, "v"), embeddings=True)
    np.testing.assert_allclose(loaded.logits, from_run.logits, atol=1e-6, rtol=0)
    np.testing.assert_allclose(loaded.embeddings[0]["bottleneck"], from_run.embeddings[0]["bottleneck"], atol=1e-6)
    config = json.loads((exported / CONFIG_FILE).read_text())
    manifest = load_manifest(train_shards)
    assert config["classes"] == manifest.classes and config["multi_label"] == manifest.multi_label
    assert config["features"] == manifest.features.to_dict() and config["schema_version"] == SCHEMA_VERSION
    norm = config["normalization"]
    assert (norm["logmel_mean"], norm["logmel_std"]) == (TINY_AUG.logmel_mean, TINY_AUG.logmel_std)
    assert config["model"]["num_classes"] == manifest.num_classes and config["augment"]["num_test_clips"] == 4
    modes = {name: (exported / name).stat().st_mode & 0o777 for name in (WEIGHTS_FILE, CONFIG_FILE)}
    assert modes[WEIGHTS_FILE] == modes[CONFIG_FILE] and modes[WEIGHTS_FILE] & 0o044 == 0o044  # others may read


def test_the_checkpoint_carries_the_feature_parameters_and_older_ones_read_the_training_split(
    train_shards: Path, tmp_path: Path
) -> None:
    manifest = load_manifest(train_shards)
    new = make_run(train_shards, tmp_path / "new")
    (new / "config.yaml").unlink()  # nothing but the checkpoint: it holds the features
    _, prep = from_checkpoint(new)
    assert prep.features == manifest.features and prep.schema_version == manifest.schema_version
    old = make_run(train_shards, tmp_path / "old", features=False)
    _, prep = from_checkpoint(old)  # from the training split its config.yaml names
    assert prep.features == manifest.features
    (old / "config.yaml").unlink()
    with pytest.raises(CheckpointFileError, match="pass --features-from"):
        from_checkpoint(old)
    checkpoint = latest_checkpoint(new)
    state = torch.load(checkpoint, weights_only=True)
    state["features"]["params"]["sample_rate_hz"] = -1
    torch.save(state, checkpoint)
    with pytest.raises(CheckpointFileError, match=f"{checkpoint}: .*sample_rate_hz"):
        from_checkpoint(new)


def test_the_export_records_the_fusion_settings_and_loading_builds_them(train_shards: Path, tmp_path: Path) -> None:
    """config.json's model holds fusion_layer, test_with_bottlenecks and cls_bottleneck, and the loaded model runs
    by them: without test-time bottlenecks its logits are late fusion's of the same weights; another fusion layer
    gives that layer's logits; an export written before cls_bottleneck existed loads its num_bottlenecks tokens."""
    run = make_run(train_shards, tmp_path / "run", model=TINY.replace(depth=3, test_with_bottlenecks=False))
    out = tmp_path / "model"
    assert load_tool("export_model").main([str(run), str(out)]) == 0
    config = json.loads((out / CONFIG_FILE).read_text())
    assert {k: config["model"][k] for k in ("fusion_layer", "test_with_bottlenecks", "cls_bottleneck")} == {
        "fusion_layer": 1, "test_with_bottlenecks": False, "cls_bottleneck": True,
    }  # fmt: skip
    model, _ = load_pretrained(out)
    assert model.cfg == from_checkpoint(run)[0].cfg and model.bottleneck.shape[1] == TINY.num_bottlenecks + 1
    late = MBT(model.cfg.replace(fusion="late")).eval()
    late.load_state_dict({k: v for k, v in model.state_dict().items() if k != "bottleneck"})
    x = example_inputs(model.cfg, batch=2)
    with torch.no_grad():
        assert torch.equal(model(**x), late(**x))
        for layer in (1, 2):  # with the bottleneck at evaluation, from each fusion layer: that layer's logits
            config["model"] |= {"fusion_layer": layer, "test_with_bottlenecks": True}
            (out / CONFIG_FILE).write_text(json.dumps(config))
            loaded, _ = load_pretrained(out)
            reference = MBT(model.cfg.replace(fusion_layer=layer, test_with_bottlenecks=True)).eval()
            reference.load_state_dict(model.state_dict())
            assert torch.equal(loaded(**x), reference(**x)) and not torch.allclose(loaded(**x), late(**x), atol=1e-4)
    old = make_run(train_shards, tmp_path / "old", model=TINY.replace(cls_bottleneck=False))
    assert load_tool("export_model").main([str(old), str(out)]) == 0
    config = json.loads((out / CONFIG_FILE).read_text())
    del config["model"]["cls_bottleneck"]  # as written before the key existed
    (out / CONFIG_FILE).write_text(json.dumps(config))
    loaded, _ = load_pretrained(out)
    assert not loaded.cfg.cls_bottleneck and loaded.bottleneck.shape[1] == TINY.num_bottlenecks


def test_weights_of_another_model_are_refused_naming_the_checkpoint(run: Path, tmp_path: Path) -> None:
    """As `mbt.evaluate` refuses them (`mbt.checkpoint.build_model`)."""
    checkpoint = tmp_path / "step-00000001.pt"
    state = torch.load(latest_checkpoint(run), weights_only=True)
    state["model"] = {k: v for k, v in state["model"].items() if k != "head.bias"}
    torch.save(state, checkpoint)
    with pytest.raises(CheckpointFileError) as err:
        from_checkpoint(checkpoint)
    assert str(err.value).startswith(f"{checkpoint}: the weights do not fit its model config: ")
    assert str(err.value).endswith("missing head.bias")  # one line, before a model is built


def _drop(name: str) -> Callable[[Path], None]:
    return lambda folder: (folder / name).unlink()


def _bad_json(folder: Path) -> None:
    (folder / CONFIG_FILE).write_text('{"format": "mbt-export", ')


def _model(**sizes: Any) -> Callable[[Path], None]:
    def edit(folder: Path) -> None:
        config = json.loads((folder / CONFIG_FILE).read_text())
        config["model"].update(sizes)
        (folder / CONFIG_FILE).write_text(json.dumps(config))

    return edit


def _escaped_class_name(folder: Path) -> None:
    config = json.loads((folder / CONFIG_FILE).read_text())
    config["classes"][0]["name"] = "dog\x1b]0;pwned\x07"
    (folder / CONFIG_FILE).write_text(json.dumps(config))


def _edit_weights(change: Callable[[dict[str, torch.Tensor]], None]) -> Callable[[Path], None]:
    def edit(folder: Path) -> None:
        state = load_file(str(folder / WEIGHTS_FILE))
        change(state)
        save_file(state, str(folder / WEIGHTS_FILE))

    return edit


def _reshape(state: dict[str, torch.Tensor]) -> None:
    state["head.weight"] = state["head.weight"][:, :16].contiguous()


def _nan(state: dict[str, torch.Tensor]) -> None:
    state["head.bias"][0] = float("nan")


@pytest.mark.parametrize(
    ("damage", "file", "message"),
    [
        (_drop(CONFIG_FILE), CONFIG_FILE, "no such file"),
        (_drop(WEIGHTS_FILE), WEIGHTS_FILE, "no such file"),
        (_bad_json, CONFIG_FILE, "not valid JSON"),
        (_model(depth=3), WEIGHTS_FILE, "missing towers.video.blocks.2"),
        (_model(embed_dim=8192, depth=128, num_heads=64, mlp_ratio=16.0), CONFIG_FILE, "more than 2,500,000,000"),
        (lambda folder: (folder / WEIGHTS_FILE).write_bytes(stated_tensor_safetensors()), WEIGHTS_FILE, "states bytes"),
        (_escaped_class_name, CONFIG_FILE, "class 0's name 'dog\\x1b]0;pwned\\x07' holds the control character"),
        (_edit_weights(_reshape), WEIGHTS_FILE, "head.weight has shape ("),
        (_edit_weights(_nan), WEIGHTS_FILE, "NaN or infinite weights in head.bias"),
        (lambda folder: (folder / WEIGHTS_FILE).write_bytes(b"\0" * 7), WEIGHTS_FILE, "not a readable safetensors"),
    ],
)
def test_a_damaged_export_is_refused_naming_the_file(
    damage: Callable[[Path], None], file: str, message: str, exported: Path, tmp_path: Path
) -> None:
    folder = tmp_path / "copy"
    folder.mkdir()
    for name in (CONFIG_FILE, WEIGHTS_FILE):
        (folder / name).write_bytes((exported / name).read_bytes())
    damage(folder)
    with pytest.raises(ExportError) as err:
        load_pretrained(folder)
    assert str(err.value).startswith(str(folder / file)) and message in str(err.value), err.value


def test_export_of_a_folder_without_checkpoints_is_one_error_line(
    tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    assert load_tool("export_model").main([str(tmp_path), str(tmp_path / "out")]) == 1
    error = capsys.readouterr().err
    assert error == (
        f"error: {tmp_path}: a folder with neither checkpoints/step-*.pt (a training run) nor config.json (an export)\n"
    )


def test_a_schema_version_this_code_cannot_read_is_refused_alike_everywhere(
    run: Path, exported: Path, train_shards: Path, tmp_path: Path
) -> None:
    """A manifest, a checkpoint and an export record the shards' schema version; one check reads all three."""
    words = "schema version 3, this code reads versions 1, 2"
    manifest = json.loads((train_shards / "manifest.json").read_text())
    with pytest.raises(SchemaError, match=words):
        parse_manifest(json.dumps({**manifest, "schema_version": 3}), "manifest.json")
    checkpoint = tmp_path / "step-00000001.pt"
    state = torch.load(latest_checkpoint(run), weights_only=True)
    state["features"]["schema_version"] = 3
    torch.save(state, checkpoint)
    with pytest.raises(CheckpointFileError, match=f"{checkpoint}: .*the shards it was trained on: {words}"):
        from_checkpoint(checkpoint)
    folder = tmp_path / "export"
    folder.mkdir()
    config = json.loads((exported / CONFIG_FILE).read_text())
    (folder / CONFIG_FILE).write_text(json.dumps({**config, "schema_version": 3}))
    with pytest.raises(ExportError, match=f"{folder / CONFIG_FILE}: .*the shards it was trained on: {words}"):
        load_pretrained(folder)


def test_the_old_home_of_load_pretrained_names_the_new_one() -> None:
    import mbt

    with pytest.raises(AttributeError, match="from serve import load_pretrained"):
        mbt.load_pretrained  # noqa: B018


@pytest.mark.parametrize("named", [WEIGHTS_FILE, CONFIG_FILE])
def test_a_full_disk_is_one_error_line_naming_the_file_and_nothing_partial_is_left(
    run: Path, exported: Path, full_disk: FullDisk, capsys: pytest.CaptureFixture, named: str
) -> None:
    out = full_disk.folder / "model"
    out.mkdir()
    room = 0 if named == WEIGHTS_FILE else math.ceil((exported / WEIGHTS_FILE).stat().st_size / PAGE) * PAGE
    full_disk.fill(leave_bytes=room)
    capsys.readouterr()
    assert load_tool("export_model").main([str(run), str(out)]) == 1
    assert capsys.readouterr().err == f"error: cannot write {out / named}: No space left on device; {RERUN}\n"
    assert [p.name for p in out.iterdir()] == ([] if named == WEIGHTS_FILE else [WEIGHTS_FILE])
    full_disk.free()
    assert load_tool("export_model").main([str(run), str(out)]) == 0
    assert (out / WEIGHTS_FILE).read_bytes() == (exported / WEIGHTS_FILE).read_bytes()
