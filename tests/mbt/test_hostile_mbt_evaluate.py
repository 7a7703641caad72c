"""Hostile inputs to evaluation: logits that are NaN or infinite, labels outside the classes, a split of other
classes than the checkpoint's, checkpoints that are corrupt, hold non-finite weights or an absurd model config;
each an EvaluationError (or `mbt.evaluate: error: ...` line) naming the keys or file, with nothing written; and a
full disk, one error line naming the file being written, with nothing partial left."""

from __future__ import annotations

import dataclasses
import json
import logging
import math
import os
import random
import re
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from dist_evaluate_main import NUM_CLASSES, ToyModel, toy_batches
from full_disk import PAGE, FullDisk
from hostile_files import repeated_tensor, with_deflated_record
from test_evaluate import AUG, SINGLE, TINY, cli_args

from experiments.demo import group_ap
from mbt.evaluate import main
from mbt.metrics import compute_metrics, topk_accuracy
from mbt.model import MBT, MBTConfig
from mbt.sharded_eval import EvaluationError, evaluate
from shards.atomic import RERUN


def poison(batches: list[dict[str, Any]], key: str, value: float) -> None:
    """Set one clip's logits of sample `key` to `value`."""
    for batch in batches:
        for row, name in enumerate(batch["key"]):
            if name == key:
                batch["video"][row, 0] = value
                return


@pytest.mark.parametrize("multi_label", [True, False])
def test_non_finite_logits_name_the_keys_and_write_nothing(tmp_path: Path, multi_label: bool) -> None:
    batches = toy_batches(list(range(8)), 3, multi_label)
    poison(batches, "s03", math.nan)
    poison(batches, "s06", math.inf)
    with pytest.raises(EvaluationError, match=r"NaN or infinite logits for 2 of 8 samples \(s03, s06\)"):
        evaluate(ToyModel(), batches, SINGLE, multi_label, NUM_CLASSES, out_dir=tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_many_non_finite_samples_show_the_first_five() -> None:
    batches = toy_batches(list(range(8)), 4, True)
    for i in range(8):
        poison(batches, f"s{i:02d}", math.nan)
    with pytest.raises(EvaluationError, match=r"for 8 of 8 samples \(s00, s01, s02, s03, s04, \.\.\.\)"):
        evaluate(ToyModel(), batches, SINGLE, True, NUM_CLASSES)


def test_single_label_labels_out_of_range_name_the_keys(tmp_path: Path) -> None:
    batches = toy_batches(list(range(6)), 2, multi_label=False)
    for batch in batches:
        for row, key in enumerate(batch["key"]):
            batch["labels"][row] = {"s02": NUM_CLASSES, "s04": -1}.get(key, batch["labels"][row])
    with pytest.raises(EvaluationError, match=r"2 samples have labels outside the split's 6 classes \(s02, s04\)"):
        evaluate(ToyModel(), batches, SINGLE, False, NUM_CLASSES, out_dir=tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_multi_label_labels_that_are_not_0_or_1_name_the_keys() -> None:
    batches = toy_batches(list(range(4)), 2, multi_label=True)
    for batch in batches:
        for row, key in enumerate(batch["key"]):
            if key == "s01":
                batch["labels"][row, 2] = 0.5
    with pytest.raises(EvaluationError, match=r"1 samples have labels outside .* \(s01\)"):
        evaluate(ToyModel(), batches, SINGLE, True, NUM_CLASSES)


def test_metrics_refuse_non_finite_scores_and_soft_targets() -> None:
    scores = np.array([[0.1, 0.9], [np.nan, 0.2], [0.3, np.inf]])
    with pytest.raises(ValueError, match="scores must be finite; rows 1, 2 hold NaN or infinity"):
        compute_metrics(scores, np.array([[1, 0], [0, 1], [1, 1]]), multi_label=True)
    with pytest.raises(ValueError, match="scores must be finite; rows 1, 2"):
        topk_accuracy(scores, np.array([0, 1, 1]))
    with pytest.raises(ValueError, match=r"targets must be multi-hot \(0 or 1\); rows 2 are not"):
        compute_metrics(np.zeros((3, 2)), np.array([[1, 0], [0, 1], [0.5, 1]]), multi_label=True)


def save_checkpoint(path: Path, shards: Path, cfg: MBTConfig = TINY, **changes: Any) -> Path:
    """A checkpoint as training writes it, with the class record of `shards`' manifest; `changes` replace parts."""
    torch.manual_seed(0)
    config = json.loads(json.dumps({"model": dataclasses.asdict(cfg), "augment": dataclasses.asdict(AUG)}))
    manifest = json.loads((shards / "manifest.json").read_text())
    data = {"classes": [dict(c) for c in manifest["classes"]], "multi_label": manifest["multi_label"]}
    torch.save({"model": MBT(cfg).state_dict(), "config": config, "step": 0, "data": data, **changes}, path)
    return path


def error_line(args: list[str], capsys: pytest.CaptureFixture) -> str:
    capsys.readouterr()
    assert main(args) == 1
    lines = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("mbt.evaluate: error: "), lines
    return lines[0]


def test_a_split_of_other_classes_is_refused(eval_shards: Path, tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    checkpoint = save_checkpoint(tmp_path / "ckpt.pt", eval_shards)
    state = torch.load(checkpoint, weights_only=True)
    original = state["data"]["classes"][2]["name"]
    state["data"]["classes"][2]["name"] = "cat"
    torch.save(state, checkpoint)
    line = error_line(cli_args(checkpoint, eval_shards, tmp_path / "out"), capsys)
    assert "the split's classes are not the model's: class 2 is 'cat'" in line
    assert f"in the checkpoint {checkpoint} but {original!r}" in line and str(eval_shards) in line
    assert not (tmp_path / "out").exists()


def test_a_checkpoint_without_class_record_evaluates_with_a_warning(
    eval_shards: Path, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    checkpoint = save_checkpoint(tmp_path / "ckpt.pt", eval_shards)
    state = torch.load(checkpoint, weights_only=True)
    del state["data"]
    torch.save(state, checkpoint)
    with caplog.at_level(logging.WARNING, logger="mbt.evaluate"):
        assert main(cli_args(checkpoint, eval_shards, tmp_path / "out")) == 0
    assert f"{checkpoint} records no class list (an older checkpoint)" in caplog.text
    names = [row.split(",")[1] for row in (tmp_path / "out" / "per_class_ap.csv").read_text().splitlines()[1:]]
    assert names == [c["name"] for c in json.loads((eval_shards / "manifest.json").read_text())["classes"]]


class _Trap:
    def __init__(self, path: Path) -> None:
        self.path = path

    def __reduce__(self) -> tuple[Any, ...]:
        return (os.mkdir, (str(self.path),))


@pytest.mark.parametrize(
    ("write", "message"),
    [
        (lambda p, good: p.write_bytes(good.read_bytes()[:1000]), "not a readable checkpoint (not a zip archive: "),
        (
            lambda p, good: p.write_bytes(random.Random(1000).randbytes(1000)),
            "not a readable checkpoint (not a zip archive: ",
        ),
        (lambda p, good: torch.save({"x": _Trap(p.with_name("trapped"))}, p), "not a checkpoint of tensors"),
        (lambda p, good: torch.save([1, 2], p), "holds a list, not a checkpoint dict"),
        (lambda p, good: p.mkdir(), "a folder with neither checkpoints/step-*.pt (a training run) nor config.json"),
        (lambda p, good: with_deflated_record(good, p), "is compressed (method 8)"),
    ],
    ids=["truncated", "random-bytes", "class-pickle", "list", "folder", "deflated-2GiB"],
)
def test_unreadable_checkpoints_are_one_error_line(
    eval_shards: Path, tmp_path: Path, capsys: pytest.CaptureFixture, write: Any, message: str
) -> None:
    good = save_checkpoint(tmp_path / "good.pt", eval_shards)
    bad = tmp_path / "bad.pt"
    write(bad, good)
    line = error_line(cli_args(bad, eval_shards, tmp_path / "out"), capsys)
    assert line.startswith(f"mbt.evaluate: error: {bad}: ") and message in line
    assert "resume" not in line
    assert not (tmp_path / "trapped").exists() and not (tmp_path / "out").exists()


@pytest.mark.parametrize(
    ("change", "message"),
    [
        (lambda s: s["model"]["head.weight"].fill_(math.nan), "its weights hold NaN or infinite values (head.weight)"),
        (lambda s: s["model"].update(extra=[1]), "its 'model' is not a mapping of parameter names to tensors"),
        (lambda s: s["config"]["model"].update(embed_dim=10**6), r"--model.embed_dim must be in 1..8192"),
        (lambda s: s["config"]["model"].update(num_heads=0), r"--model.num_heads must be in 1..256"),
        (
            lambda s: s["config"]["model"].update(patch_size=1, img_size=1024),
            "the video tower would have 8388608 tokens, more than 16384",
        ),
        (lambda s: s["config"]["augment"].update(num_test_clips=10**6), r"--augment.num_test_clips must be in 1..64"),
        (lambda s: s["data"]["classes"].pop(0), "class 0 is not a mapping of index 0"),
        (lambda s: s.update(data=[]), "its class record is not a mapping of 'classes' and 'multi_label'"),
        (lambda s: s["model"].update({"head.weight": repeated_tensor()}), "its weights are not the tensors it stores"),
        (
            lambda s: s["config"]["model"].update(embed_dim=8192, depth=128, num_heads=64, mlp_ratio=16.0),
            "parameters, more than 2,500,000,000",
        ),
    ],
    ids=[
        "nan-weight", "not-tensors", "embed-dim", "zero-heads", "tokens", "test-clips", "class-index", "record",
        "repeated-tensor", "model-too-large",
    ],
)  # fmt: skip
def test_checkpoints_of_bad_contents_are_refused_before_building_the_model(
    eval_shards: Path, tmp_path: Path, capsys: pytest.CaptureFixture, change: Any, message: str
) -> None:
    checkpoint = save_checkpoint(tmp_path / "ckpt.pt", eval_shards)
    state = torch.load(checkpoint, weights_only=True)
    change(state)
    torch.save(state, checkpoint)
    line = error_line(cli_args(checkpoint, eval_shards, tmp_path / "out"), capsys)
    assert str(checkpoint) in line and message in line, line
    assert not (tmp_path / "out").exists()


def test_weights_of_another_model_are_one_error_line(
    eval_shards: Path, tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    """The model is rebuilt from a checkpoint by `mbt.checkpoint.build_model`, here as in serve: the same words."""
    checkpoint = save_checkpoint(tmp_path / "ckpt.pt", eval_shards, model=MBT(TINY.replace(depth=1)).state_dict())
    line = error_line(cli_args(checkpoint, eval_shards, tmp_path / "out"), capsys)
    assert line.startswith(f"mbt.evaluate: error: {checkpoint}: the weights do not fit its model config: ")
    assert "towers.video.blocks.1" in line and not (tmp_path / "out").exists()


@pytest.mark.parametrize(("flag", "value"), [("--batch-size", str(10**9)), ("--num-workers", "100000")])
def test_cli_bounds_batch_size_and_workers(
    eval_shards: Path, tmp_path: Path, capsys: pytest.CaptureFixture, flag: str, value: str
) -> None:
    checkpoint = save_checkpoint(tmp_path / "ckpt.pt", eval_shards)
    with pytest.raises(SystemExit) as exit_info:
        main([*cli_args(checkpoint, eval_shards, tmp_path / "out"), flag, value])
    assert exit_info.value.code == 2
    assert f"{flag} must be in " in capsys.readouterr().err


def test_an_out_that_is_a_file_is_one_error_line(
    eval_shards: Path, tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    checkpoint = save_checkpoint(tmp_path / "ckpt.pt", eval_shards)
    out = tmp_path / "out"
    out.write_text("results")
    assert "File exists" in error_line(cli_args(checkpoint, eval_shards, out), capsys)
    assert out.read_text() == "results"


@pytest.mark.parametrize(
    ("table", "message"),
    [
        ("class_index,class_name,ap\n0,a,x\n", "not a per-class AP table (ValueError"),
        ("index,ap\n0,0.5\n", "not a per-class AP table (KeyError('class_index')"),
        ("class_index,class_name,ap\n0,a,0.5\n", "no AP of classes [1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11]"),
    ],
)
def test_demo_refuses_a_per_class_table_it_cannot_read(tmp_path: Path, table: str, message: str) -> None:
    path = tmp_path / "per_class_ap.csv"
    path.write_text(table)
    with pytest.raises(EvaluationError, match=re.escape(f"{path}: {message}")):
        group_ap(path)


WRITTEN = ["metrics.json", "predictions.npz", "per_class_ap.csv", "per_class_ap.png", "emb.npz"]  # in this order


@pytest.mark.slow
@pytest.mark.parametrize("named", WRITTEN)
def test_a_full_disk_is_one_error_line_naming_the_file_and_nothing_partial_is_left(
    eval_shards: Path, tmp_path: Path, full_disk: FullDisk, capsys: pytest.CaptureFixture, named: str
) -> None:
    checkpoint = save_checkpoint(tmp_path / "ckpt.pt", eval_shards)
    out = full_disk.folder / "eval"
    args = [*cli_args(checkpoint, eval_shards, out), "--embeddings", str(out / "emb.npz")]
    assert main(args) == 0
    before = WRITTEN[: WRITTEN.index(named)]  # the files written before `named`, in whole pages on a tmpfs
    room = sum(math.ceil((out / name).stat().st_size / PAGE) * PAGE for name in before)
    shutil.rmtree(out)
    out.mkdir()
    full_disk.fill(leave_bytes=room)
    expected = f"mbt.evaluate: error: cannot write {out / named}: No space left on device; {RERUN}"
    assert error_line(args, capsys) == expected
    assert sorted(p.name for p in out.iterdir()) == sorted(before)
    full_disk.free()
    assert main(args) == 0
