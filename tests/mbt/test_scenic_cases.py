"""tools/convert_scenic.py against scenic's own MBT on tiny configs beyond `scenic_mbt_tiny`: each case of
`tests/data/scenic_mbt_cases` (written by its make_cases.py with scenic's code; its README lists them) converts to
scenic's logits, at evaluation and per tower in training, or is refused naming the scenic config field; scenic's
training-state layouts convert alike; the settings the file does not record are recorded, exported, loaded back
and said when the checkpoint is evaluated."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import load_tool
from safetensors.torch import save_file

from mbt import evaluate
from mbt.checkpoint import build_model, load_trained
from mbt.model import MBT
from mbt.scenic import ScenicCheckpointError, ScenicOptions, conversion_note, convert
from serve.export import export_config
from serve.load import CONFIG_FILE, WEIGHTS_FILE, Preprocessing, load_pretrained
from shards.schema import SCHEMA_VERSION, FeatureParams

CASES_DIR = Path(__file__).parents[1] / "data" / "scenic_mbt_cases"
CASES = json.loads((CASES_DIR / "cases.json").read_text())
ATOL = 1e-5  # a faithful float32 port; the issue asks for 1e-4
TOWERS = {"rgb": "video", "spectrogram": "audio"}
# The cases scenic ran that this project's MBT does not compute: what the refusal names.
REFUSED = {
    "representation_size": "model.representation_size is set",
    "non_square_frames": "no square frame makes; this project's model takes square frames (model.img_size)",
}
LAYOUTS = {
    "layout_bare": "the top level", "layout_optimizer_target": "optimizer/target", "layout_train_state": "params",
}  # fmt: skip

convert_scenic = load_tool("convert_scenic")


def flags(config: dict) -> list[str]:
    """The flags a user who knows the case's scenic config gives: frames and mel bins of the inputs, and the
    fusion layer, classifier and test-time bottlenecks the file does not record."""
    args = ["--num-frames", str(config["inputs"]["rgb"][0]), "--num-mel-bins", str(config["inputs"]["spectrogram"][1])]
    if len(config["modality_fusion"]) == 2:
        args += ["--fusion-layer", str(config["fusion_layer"])]
    if config["classifier"] != "token":
        args += ["--classifier", config["classifier"]]
    if not config["test_with_bottlenecks"]:
        args += ["--test-with-bottlenecks", "false"]
    return args


def inputs(case: str, config: dict) -> dict[str, torch.Tensor]:
    """The case's inputs in this project's layout, for its modalities: video (B, F, 3, H, W), audio (B, 1, T, mel)."""
    io = np.load(CASES_DIR / f"{case}.npz")
    arrays = {"video": io["rgb"].transpose(0, 1, 4, 2, 3), "audio": io["spectrogram"][:, None]}
    return {TOWERS[m]: torch.from_numpy(arrays[TOWERS[m]].copy()) for m in config["modality_fusion"]}


def converted(case: str, tmp_path: Path, source: str | None = None) -> MBT:
    out = tmp_path / f"{case}.pt"
    source_file = CASES_DIR / f"{source or case}.msgpack"
    assert convert_scenic.main([str(source_file), str(out), *flags(CASES[case]["config"])]) == 0
    return build_model(load_trained(out), out).eval()  # what mbt.evaluate reads


RUNS = [case for case, entry in CASES.items() if entry["scenic"] == "ok" and case not in REFUSED]


def test_every_case_scenic_ran_is_converted_or_refused():
    assert set(RUNS) | set(REFUSED) == {c for c, e in CASES.items() if e["scenic"] == "ok"} and len(RUNS) == 18


@pytest.mark.parametrize("case", RUNS)
def test_case_gives_scenics_logits(case, tmp_path):
    """Evaluation logits, and the training logits (per tower with CLS tokens, bottlenecks always in use): scenic's."""
    config = CASES[case]["config"]
    model, x = converted(case, tmp_path), inputs(case, config)
    io = np.load(CASES_DIR / f"{case}.npz")
    with torch.no_grad():
        np.testing.assert_allclose(model(**x).numpy(), io["logits"], rtol=0, atol=ATOL)
        trained = model.train()(**x, per_tower=True).numpy()
    if config["classifier"] == "token":
        for tower, logits in zip(model.cfg.modalities, trained, strict=True):
            scenic = {v: k for k, v in TOWERS.items()}[tower]
            np.testing.assert_allclose(logits, io[f"train_logits_{scenic}"], rtol=0, atol=ATOL, err_msg=tower)
    else:
        np.testing.assert_allclose(trained[0], io["train_logits"], rtol=0, atol=ATOL)


def test_what_the_cases_map_to(tmp_path):
    """The structure each scenic setting becomes: bottleneck tokens (n_bottlenecks + 1 with 'token'), the pool,
    the fusion, tubelets; a bottleneck that one modality never uses is left out and said."""
    cfg = {case: converted(case, tmp_path).cfg for case in ("token_bottleneck", "gsp", "late", "tubelet_8x8x4")}
    assert (cfg["token_bottleneck"].num_bottlenecks, cfg["token_bottleneck"].bottleneck_tokens) == (2, 3)
    assert (cfg["gsp"].pool, cfg["gsp"].fusion, cfg["late"].fusion) == ("gsp", "cross", "late")
    assert (cfg["tubelet_8x8x4"].tubelet_frames, cfg["tubelet_8x8x4"].patch_size) == (4, 8)
    out = tmp_path / "rgb.pt"
    assert convert_scenic.main([str(CASES_DIR / "rgb_only.msgpack"), str(out), "--num-frames", "4"]) == 0
    checkpoint = torch.load(out, weights_only=True)
    assert checkpoint["converted_from_scenic"]["unused"] == ["bottleneck"] and "bottleneck" not in checkpoint["model"]
    sampled = converted("temporal_sampling", tmp_path).cfg
    assert (sampled.tubelet_frames, sampled.num_frames) == (1, 2)  # the frames scenic's model samples


@pytest.mark.parametrize("layout", list(LAYOUTS))
def test_training_state_layouts(layout, tmp_path):
    """scenic's checkpoints as its trainers wrote them (a bare tree, flax.optim's optimizer/target beside its
    momentum tree, today's TrainState params beside optax's state) give the case's logits."""
    model = converted("token_bottleneck", tmp_path, source=layout)
    with torch.no_grad():
        logits = model(**inputs("token_bottleneck", CASES["token_bottleneck"]["config"]))
    np.testing.assert_allclose(logits.numpy(), np.load(CASES_DIR / "token_bottleneck.npz")["logits"], atol=ATOL)
    record = torch.load(tmp_path / "token_bottleneck.pt", weights_only=True)["converted_from_scenic"]
    assert record["params_at"] == LAYOUTS[layout]


@pytest.mark.parametrize("case", list(REFUSED))
def test_refused_cases_name_the_field(case, tmp_path, capsys):
    out = tmp_path / "out.pt"
    assert convert_scenic.main([str(CASES_DIR / f"{case}.msgpack"), str(out), *flags(CASES[case]["config"])]) == 1
    assert REFUSED[case] in " ".join(capsys.readouterr().err.split()) and not out.exists()


def test_what_scenic_cannot_run_is_refused():
    """scenic's MBT raises for classifier '0' (a KeyError) and for bottlenecks without the 'token' classifier (an
    UnboundLocalError): the converter refuses '0', and a bottleneck without CLS tokens."""
    assert CASES["classifier_0"]["scenic"].startswith("KeyError")
    assert CASES["gap_with_bottleneck"]["scenic"].startswith("UnboundLocalError")
    with pytest.raises(ScenicCheckpointError, match=r"model.classifier='0' is a classifier scenic's MBT cannot run"):
        convert(CASES_DIR / "gap.msgpack", ScenicOptions(fusion_layer=1, classifier="0", num_mel_bins=16))


def test_what_the_arrays_do_not_say_is_asked_for_and_checked():
    options = {"num_frames": 4, "num_mel_bins": 16}
    with pytest.raises(ScenicCheckpointError, match=r"does not record scenic's model.fusion_layer .* --fusion-layer"):
        convert(CASES_DIR / "token_bottleneck.msgpack", ScenicOptions(**options))
    with pytest.raises(ScenicCheckpointError, match=r"'gap', 'gmp' or 'gsp' .* give --classifier"):
        convert(CASES_DIR / "gmp.msgpack", ScenicOptions(fusion_layer=1, **options))
    with pytest.raises(ScenicCheckpointError, match=r"model.classifier='gap' given, but the file holds CLS tokens"):
        convert(CASES_DIR / "cross.msgpack", ScenicOptions(fusion_layer=1, classifier="gap", **options))
    with pytest.raises(ScenicCheckpointError, match=r"--fusion-layer 3: scenic's model.fusion_layer is in 0..2"):
        convert(CASES_DIR / "cross.msgpack", ScenicOptions(fusion_layer=3, **options))
    with pytest.raises(ScenicCheckpointError, match=r"give one of --num-frames 4 \(frames of 16 px\)"):
        convert(CASES_DIR / "cross.msgpack", ScenicOptions(fusion_layer=1, num_mel_bins=16))  # 224 px: no


def test_the_told_settings_are_recorded_exported_and_said(tmp_path, caplog):
    """test_without_bottlenecks: the fusion layer and test-time setting, recorded in the checkpoint's config, in an
    export's config.json (loaded back: scenic's logits) and in the note mbt.evaluate logs."""
    model = converted("test_without_bottlenecks", tmp_path)
    checkpoint = tmp_path / "test_without_bottlenecks.pt"
    trained = load_trained(checkpoint)
    assert (trained.model.fusion_layer, trained.model.test_with_bottlenecks) == (1, False)
    note = conversion_note(trained.converted_from, trained.model)
    assert note.startswith("converted from scenic's test_without_bottlenecks.msgpack, which does not record "
                           "model.fusion_layer=1, model.test_with_bottlenecks=False")  # fmt: skip
    classes = [{"index": i, "id": f"/m/{i}", "name": f"class {i}"} for i in range(3)]
    prep = Preprocessing(FeatureParams(), trained.augment.replace(logmel_mean=0.0, logmel_std=1.0), classes, True,
                         SCHEMA_VERSION, found=f"model: checkpoint {checkpoint}")  # fmt: skip
    export = tmp_path / "export"
    export.mkdir()
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(export / WEIGHTS_FILE))
    (export / CONFIG_FILE).write_text(json.dumps(export_config(model.cfg, prep)))
    assert json.loads((export / CONFIG_FILE).read_text())["model"]["test_with_bottlenecks"] is False
    loaded, _ = load_pretrained(export)
    assert loaded.cfg == model.cfg
    x = inputs("test_without_bottlenecks", CASES["test_without_bottlenecks"]["config"])
    with torch.no_grad():
        np.testing.assert_allclose(loaded(**x).numpy(), np.load(CASES_DIR / "test_without_bottlenecks.npz")["logits"],
                                   rtol=0, atol=ATOL)  # fmt: skip
    with caplog.at_level(logging.WARNING):
        evaluate.main(["--checkpoint", str(checkpoint), "--shards", str(tmp_path / "none"), "--out", str(tmp_path)])
    assert f"note: {checkpoint}: {note}" in caplog.text
