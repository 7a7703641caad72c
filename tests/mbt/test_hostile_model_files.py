"""Every model file a user can be handed, when it states more than it holds or asks for more than any MBT, is
refused with an error naming it before anything it states is allocated: a checkpoint's config and weights
(`mbt.evaluate`, `serve.from_checkpoint` / `load_model`, tools/predict.py and tools/export_model.py), an export's
config.json and model.safetensors, a run's config.yaml, the ViT files of `--init_video` (.pth, .safetensors, .npz)
and scenic's msgpack (tools/convert_scenic.py). Each hostile file is made here, a few MB at most
(tests/support/hostile_files.py), each loaded in a process of its own (tests/support/load_model_file.py) whose peak
memory stays under twice that of loading a normal tiny file of its kind (each states about 2 GiB)."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np
import pytest
import torch
from conftest import REPO, load_tool
from hostile_files import (
    deep_vit_npz,
    deflated_npz,
    nested_msgpack_lists,
    repeated_tensor,
    stated_npz,
    stated_tensor_safetensors,
    with_deflated_record,
)
from placeholder_split import write_placeholder_split
from test_pretrained import tiny_vit
from tiny_run import TINY, TINY_AUG

from mbt.checkpoint import CheckpointFileError
from mbt.config import ConfigError, TrainConfig, config_to_dict, load_config, save_config
from mbt.model import MBT, MBTConfig
from mbt.model_size import MAX_MODEL_PARAMS, param_shapes
from serve.export import export_model
from serve.load import CONFIG_FILE, WEIGHTS_FILE, ExportError, load_model
from shards.schema import SCHEMA_VERSION, FeatureParams

MODEL = TINY.replace(num_classes=4)
# The largest config the bounds of each setting allow: 618 billion parameters, 2.5 TB of float32.
HUGE = MODEL.replace(embed_dim=8192, depth=128, num_heads=64, mlp_ratio=16.0)
MBT_L = MODEL.replace(embed_dim=1024, depth=24, num_heads=16)  # 604 million parameters: within the bound
CLASSES = [{"index": i, "id": f"/m/c{i}", "name": f"class {i}"} for i in range(MODEL.num_classes)]
SCENIC_TINY = REPO / "tests" / "data" / "scenic_mbt_tiny" / "params.msgpack"
PEAK_LIMIT = 2.0  # a hostile file's peak over the normal file's, both in processes of their own
# The hostile files the `hostile` fixture makes, by case.
CASES = (
    "checkpoint-config-too-large", "checkpoint-config-other-model", "checkpoint-deflated", "checkpoint-repeated-tensor",
    "export-config-too-large", "export-config-other-model", "export-stated-tensor", "vit-deflated-pth",
    "vit-repeated-tensor-pth", "vit-stated-tensor-safetensors", "vit-deep-npz", "vit-deflated-npz", "vit-stated-npz",
    "scenic-nested-lists", "run-config-too-large",
)  # fmt: skip


class Hostile(NamedTuple):
    kind: str  # which loader of tests/support/load_model_file.py reads it
    path: Path  # the file a user is handed (an export: its folder)
    message: str  # what the error says
    named: Path  # the file the error names (an export: the file inside)


def write_checkpoint(path: Path, config_model: MBTConfig = MODEL, **changes: Any) -> Path:
    """A checkpoint as training writes it (weights of `MODEL`, its config, class record and feature parameters),
    its config's model `config_model`; `changes` replace parts."""
    torch.manual_seed(0)
    config = config_to_dict(TrainConfig(model=config_model, augment=TINY_AUG))
    state = {
        "model": MBT(MODEL).state_dict(), "config": config,
        "step": 1, "data": {"classes": CLASSES, "multi_label": True},
        "features": {"params": FeatureParams().to_dict(), "schema_version": SCHEMA_VERSION},
    }  # fmt: skip
    torch.save(state | changes, path)
    return path


def export_with(normal: Path, folder: Path, *, model: MBTConfig | None = None, weights: bytes | None = None) -> Path:
    """A copy of the export `normal` whose config.json states `model` or whose model.safetensors is `weights`."""
    shutil.copytree(normal, folder)
    if model is not None:
        config = json.loads((folder / CONFIG_FILE).read_text())
        config["model"] = config_to_dict(TrainConfig(model=model))["model"]
        (folder / CONFIG_FILE).write_text(json.dumps(config))
    if weights is not None:
        (folder / WEIGHTS_FILE).write_bytes(weights)
    return folder


def huge_run_config(folder: Path) -> Path:
    """A run's config.yaml of a model over MAX_MODEL_PARAMS and a training split that opens."""
    split = write_placeholder_split(folder / "train", FeatureParams(), CLASSES)
    cfg = TrainConfig(
        model=HUGE, augment=TINY_AUG, train_shards=str(split), eval_shards="", out_dir=str(folder / "run")
    )
    return save_config(cfg, folder / "config.yaml")


@pytest.fixture(scope="module")
def normal(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """A normal tiny file of each kind: {kind: path}."""
    folder = tmp_path_factory.mktemp("normal")
    checkpoint = write_checkpoint(folder / "step-00000001.pt")
    vit = folder / "vit.pth"
    torch.save(tiny_vit(depth=MODEL.depth).state_dict(), vit)
    export_model(checkpoint, folder / "export")
    return {
        "checkpoint": checkpoint,
        "export": folder / "export",
        "vit": vit,
        "scenic": SCENIC_TINY,
    }


@pytest.fixture(scope="module")
def hostile(normal: dict[str, Path], tmp_path_factory: pytest.TempPathFactory) -> dict[str, Hostile]:
    """{case: Hostile}: each a file a user could be handed, made in a moment."""
    folder = tmp_path_factory.mktemp("hostile")
    too_large = f"parameters, more than {MAX_MODEL_PARAMS:,}"
    weights = dict(torch.load(normal["checkpoint"], weights_only=True)["model"])
    vit = dict(torch.load(normal["vit"], weights_only=True)) | {"pos_embed": repeated_tensor()}
    torch.save(vit, folder / "repeated.pth")
    (folder / "stated.safetensors").write_bytes(stated_tensor_safetensors())
    (folder / "lists.msgpack").write_bytes(nested_msgpack_lists())
    large, huge = export_with(normal["export"], folder / "large", model=MBT_L), folder / "huge"
    stated = export_with(normal["export"], folder / "stated", weights=stated_tensor_safetensors())
    cases = {
        "checkpoint-config-too-large": ("checkpoint", write_checkpoint(folder / "huge.pt", HUGE), too_large),
        "checkpoint-config-other-model": (
            "checkpoint", write_checkpoint(folder / "large.pt", MBT_L), "the weights do not fit its model config: "),
        "checkpoint-deflated": (
            "checkpoint", with_deflated_record(normal["checkpoint"], folder / "deflated.pt"), "is compressed"),
        "checkpoint-repeated-tensor": (
            "checkpoint",
            write_checkpoint(folder / "repeated.pt", model=weights | {"towers.video.pos_embed": repeated_tensor()}),
            "its weights are not the tensors it stores"),
        "export-config-too-large": (
            "export", export_with(normal["export"], huge, model=HUGE), too_large, huge / CONFIG_FILE),
        "export-config-other-model": ("export", large, "the tensors do not fit", large / WEIGHTS_FILE),
        "export-stated-tensor": ("export", stated, "not a readable safetensors file (", stated / WEIGHTS_FILE),
        "vit-deflated-pth": ("vit", with_deflated_record(normal["vit"], folder / "deflated.pth"), "is compressed"),
        "vit-repeated-tensor-pth": ("vit", folder / "repeated.pth", "its weights are not the tensors it stores"),
        "vit-stated-tensor-safetensors": ("vit", folder / "stated.safetensors", "states bytes 0..2147483648 of"),
        "vit-deep-npz": ("vit", deep_vit_npz(folder / "deep.npz"), "parameters, more than its arrays hold"),
        "vit-deflated-npz": ("vit", deflated_npz(folder / "deflated.npz"), "once read"),
        "vit-stated-npz": ("vit", stated_npz(folder / "stated.npz"), "states shape"),
        "scenic-nested-lists": ("scenic", folder / "lists.msgpack", "not a flax msgpack checkpoint"),
        "run-config-too-large": ("run-config", huge_run_config(folder / "config"), too_large),
    }  # fmt: skip
    assert tuple(cases) == CASES
    return {
        case: Hostile(kind, path, message, *named or [path]) for case, (kind, path, message, *named) in cases.items()
    }


def test_the_bound_is_four_mbt_ls_and_a_huge_config_costs_no_memory() -> None:
    mbt_l = sum(np.prod(shape) for shape in param_shapes(MBTConfig(embed_dim=1024, depth=24, num_heads=16)).values())
    assert 600e6 < mbt_l < 620e6 and 4 * mbt_l <= MAX_MODEL_PARAMS < 5 * mbt_l
    assert sum(np.prod(shape) for shape in param_shapes(HUGE).values()) > 600e9  # counted on the meta device


@pytest.mark.parametrize(
    "case",
    [case for case in CASES if case.startswith(("checkpoint-", "export-"))],
)
def test_serve_refuses_each_hostile_checkpoint_or_export_naming_it(hostile: dict[str, Hostile], case: str) -> None:
    """`serve.load_model` takes a checkpoint, a run folder or an export, as tools/predict.py does."""
    file = hostile[case]
    with pytest.raises((CheckpointFileError, ExportError)) as err:
        load_model(file.path)
    assert str(err.value).startswith(f"{file.named}: ") and file.message in str(err.value), err.value


def test_the_tools_refuse_a_hostile_file_in_one_line(
    hostile: dict[str, Hostile], tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    checkpoint, scenic = hostile["checkpoint-deflated"].path, hostile["scenic-nested-lists"].path
    for tool, args, named in [
        ("export_model", [str(checkpoint), str(tmp_path / "out")], checkpoint),
        ("predict", ["clip.mp4", "--model", str(checkpoint)], checkpoint),
        ("convert_scenic", [str(scenic), str(tmp_path / "out.pt"), "--fusion-layer", "1"], scenic),
    ]:
        capsys.readouterr()
        assert load_tool(tool).main(args) == 1, tool
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and err.startswith(f"error: {named}: "), err
    assert not (tmp_path / "out").exists() and not (tmp_path / "out.pt").exists()


def test_a_run_config_of_a_model_over_the_bound_is_named(hostile: dict[str, Hostile]) -> None:
    file = hostile["run-config-too-large"]
    with pytest.raises(ConfigError) as err:
        load_config(["--config", str(file.path)])
    assert str(err.value).startswith(f"--config {file.path}: the model would have ") and file.message in str(err.value)


@pytest.fixture(scope="module")
def peaks(normal: dict[str, Path], hostile: dict[str, Hostile]) -> dict[str, tuple[int, str]]:
    """{normal kind or hostile case: (peak KiB, output)}: each file loaded in a process of its own
    (tests/support/load_model_file.py: forks of one process that imported the loaders)."""
    jobs = {kind: (kind, path) for kind, path in normal.items()}
    jobs |= {case: (file.kind, file.path) for case, file in hostile.items()}
    script = REPO / "tests" / "support" / "load_model_file.py"
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO), str(script.parent)])}
    args = [str(part) for job in jobs.values() for part in job]
    out = subprocess.run([sys.executable, str(script), *args], capture_output=True, text=True, env=env, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    return {name: (peak, output) for name, (peak, output) in zip(jobs, json.loads(out.stdout), strict=True)}


@pytest.mark.slow
def test_normal_files_load(peaks: dict[str, tuple[int, str]]) -> None:
    for kind in ("checkpoint", "export", "vit", "scenic"):
        assert peaks[kind][1].strip() == "loaded", peaks[kind]


@pytest.mark.slow
@pytest.mark.parametrize(
    "case",
    CASES,
)
def test_a_hostile_file_is_refused_naming_it_at_the_memory_of_a_normal_one(
    peaks: dict[str, tuple[int, str]], hostile: dict[str, Hostile], case: str
) -> None:
    file = hostile[case]
    peak, output = peaks[case]
    assert f"{file.named}" in output and file.message in output, output
    assert "loaded" not in output.splitlines()
    normal_peak = peaks["checkpoint" if file.kind == "run-config" else file.kind][0]
    assert peak < PEAK_LIMIT * normal_peak, f"{case}: {peak} KiB at peak, a normal file {normal_peak} KiB"
