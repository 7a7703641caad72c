"""Hostile run folders for `mbt.train`: a resume with another model config or class list, a second training of the
same folder, checkpoints that are corrupt, not checkpoints or tampered with, `--init_video` files that are no ViT,
and a metrics log cut mid-line. Each is refused with one `error: ...` line naming the file, before anything in the
run folder is changed (config.yaml, checkpoints, metrics)."""

from __future__ import annotations

import fcntl
import json
import os
import pickle
import random
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch
import yaml
from full_disk import FullDisk
from hostile_files import (
    deep_vit_npz,
    deflated_npz,
    repeated_tensor,
    stated_npz,
    stated_tensor_safetensors,
    with_deflated_record,
)
from tensorboard.backend.event_processing.event_file_loader import EventFileLoader
from test_evaluate import split_with_other_statistics
from test_train import train_args

from mbt.checkpoint import checkpoint_path, latest_checkpoint
from mbt.run_dir import LOCK_NAME
from mbt.run_log import RunLog, plot_curves
from mbt.train import main
from shards.atomic import RERUN, DiskFullError
from shards.manifest import load_manifest

# 9 clips, batch 2: steps 1 and 2 checkpointed, then evaluated on the 3 evaluation clips.
BASE = ["--max_steps", "2", "--checkpoint_every_steps", "1", "--keep_checkpoints", "10"]
Mutation = Callable[[dict[str, Any]], None]


@pytest.fixture(scope="module")
def base_run(train_shards: Path, eval_shards: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("hostile") / "base"
    assert main(train_args(train_shards, eval_shards, out, *BASE)) == 0
    return out


@pytest.fixture
def run(base_run: Path, tmp_path: Path) -> Path:
    """A copy of the base run (its lock file left behind, as a finished run leaves it)."""
    return shutil.copytree(base_run, tmp_path / "run")


def snapshot(run_dir: Path) -> dict[str, bytes]:
    """Every file of the run folder but the lock, by relative path."""
    return {
        str(p.relative_to(run_dir)): p.read_bytes() for p in run_dir.rglob("*") if p.is_file() and p.name != LOCK_NAME
    }


def refused(args: list[str], capsys: pytest.CaptureFixture, status: int = 1) -> str:
    """The one error line `main(args)` prints as it exits with `status`."""
    capsys.readouterr()
    assert main(args) == status
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: "), err
    return lines[0]


def mutate(path: Path, change: Mutation) -> None:
    state = torch.load(path, map_location="cpu", weights_only=True)
    change(state)
    torch.save(state, path)


def test_checkpoint_records_the_training_classes(base_run: Path, train_shards: Path) -> None:
    manifest = json.loads((train_shards / "manifest.json").read_text())
    state = torch.load(latest_checkpoint(base_run), map_location="cpu", weights_only=True)
    classes = [{"index": c["index"], "id": c["id"], "name": c["name"]} for c in manifest["classes"]]
    assert state["data"] == {"classes": classes, "multi_label": True}


def test_training_writes_class_names_into_per_class_ap(base_run: Path, eval_shards: Path) -> None:
    manifest = json.loads((eval_shards / "manifest.json").read_text())
    rows = (base_run / "eval" / "per_class_ap.csv").read_text().splitlines()
    assert rows[0] == "class_index,class_name,ap"
    assert [row.split(",")[1] for row in rows[1:]] == [c["name"] for c in manifest["classes"]]


def test_another_model_config_is_refused_before_anything_is_written(
    run: Path, train_shards: Path, eval_shards: Path, capsys: pytest.CaptureFixture
) -> None:
    before = snapshot(run)
    args = train_args(train_shards, eval_shards, run, *BASE, "--model.depth", "3", "--lr", "0.01", "--seed", "5")
    line = refused(args, capsys, status=2)
    assert f"--out_dir {run} holds checkpoints of a run with other settings (step-00000002.pt)" in line
    assert "model.depth: 2 → 3" in line and "lr: 0.003 → 0.01" in line and "seed: 0 → 5" in line
    assert f"Pass a new --out_dir, or resume with the run's settings (--config {run / 'config.yaml'})" in line
    assert snapshot(run) == before


def test_run_settings_may_change_on_resume(
    run: Path, train_shards: Path, eval_shards: Path, capsys: pytest.CaptureFixture
) -> None:
    changed = ["--max_steps", "3", "--num_workers", "1", "--log_every_steps", "2", "--eval_batch_size", "1"]
    capsys.readouterr()
    assert main(train_args(train_shards, eval_shards, run, *BASE, *changed)) == 0
    assert "resumed from" in capsys.readouterr().out
    saved = yaml.safe_load((run / "config.yaml").read_text())
    assert (saved["max_steps"], saved["num_workers"], saved["eval_batch_size"]) == (3, 1, 1)
    assert latest_checkpoint(run) == checkpoint_path(run, 3)


def test_another_training_class_list_is_refused(
    run: Path, train_shards: Path, eval_shards: Path, tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    renamed = shutil.copytree(train_shards, tmp_path / "renamed")
    manifest = json.loads((renamed / "manifest.json").read_text())
    old_name = manifest["classes"][3]["name"]
    manifest["classes"][3]["name"] = "dog"
    (renamed / "manifest.json").write_text(json.dumps(manifest))
    before = snapshot(run)
    # Evaluated on a split of the new list too, so that only the checkpoint's record differs.
    eval_renamed = shutil.copytree(eval_shards, tmp_path / "eval-renamed")
    eval_manifest = json.loads((eval_renamed / "manifest.json").read_text())
    eval_manifest["classes"] = manifest["classes"]
    (eval_renamed / "manifest.json").write_text(json.dumps(eval_manifest))
    line = refused(train_args(renamed, eval_renamed, run, *BASE), capsys, status=2)
    assert f"classes: class 3 is {old_name!r}" in line and "in the checkpoint step-00000002.pt but 'dog'" in line
    assert snapshot(run) == before


def test_train_and_eval_splits_of_other_classes_are_refused_before_any_work(
    train_shards: Path, eval_shards: Path, tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    renamed = shutil.copytree(eval_shards, tmp_path / "renamed")
    manifest = json.loads((renamed / "manifest.json").read_text())
    manifest["classes"][5]["name"] = "cat"
    (renamed / "manifest.json").write_text(json.dumps(manifest))
    out = tmp_path / "new-run"
    line = refused(train_args(train_shards, renamed, out, *BASE), capsys, status=2)
    assert "the training and evaluation splits have different classes: class 5 is" in line and "'cat'" in line
    assert not out.exists()


def test_checkpoint_without_class_record_resumes_with_a_warning(
    run: Path, train_shards: Path, eval_shards: Path, capsys: pytest.CaptureFixture
) -> None:
    mutate(latest_checkpoint(run), lambda state: state.pop("data"))
    capsys.readouterr()
    assert main(train_args(train_shards, eval_shards, run, *BASE, "--max_steps", "3")) == 0
    assert "warning: " in (err := capsys.readouterr().err) and "records no class list (an older checkpoint)" in err


def test_checkpoint_without_logmel_normalization_resumes_with_a_warning(
    run: Path, train_shards: Path, eval_shards: Path, capsys: pytest.CaptureFixture
) -> None:
    """An older run normalized with its training split's statistics without recording them: it resumes, recording
    them from now on."""

    def older(state: dict[str, Any]) -> None:
        state["config"]["augment"].pop("logmel_mean")
        state["config"]["augment"].pop("logmel_std")

    mutate(latest_checkpoint(run), older)
    capsys.readouterr()
    assert main(train_args(train_shards, eval_shards, run, *BASE, "--max_steps", "3")) == 0
    err = capsys.readouterr().err
    assert "step-00000002.pt records no log-mel normalization (an older checkpoint" in err
    stats = load_manifest(train_shards).logmel
    saved = yaml.safe_load((run / "config.yaml").read_text())["augment"]
    assert (saved["logmel_mean"], saved["logmel_std"]) == (stats.mean, stats.std)


def test_a_training_split_of_other_statistics_is_refused(
    run: Path, train_shards: Path, eval_shards: Path, tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    """The model's normalization does not change under it: resuming on a split of other statistics is refused, and
    the run's config.yaml (which records the normalization) resumes it."""
    other = split_with_other_statistics(train_shards, tmp_path / "train")
    before = snapshot(run)
    line = refused(train_args(other, eval_shards, run, *BASE), capsys, status=2)
    assert "augment.logmel_mean: " in line and "augment.logmel_std: " in line
    assert snapshot(run) == before
    capsys.readouterr()
    args = [
        "--config",
        str(run / "config.yaml"),
        "--out_dir",
        str(run),
        "--train_shards",
        str(other),
        "--max_steps",
        "3",
    ]
    assert main(args) == 0 and "resumed from" in capsys.readouterr().out


def test_checkpoint_of_more_ranks_resumes_with_a_warning(
    run: Path, train_shards: Path, eval_shards: Path, capsys: pytest.CaptureFixture
) -> None:
    def two_ranks(state: dict[str, Any]) -> None:
        state["loader"], state["rng"] = state["loader"] * 2, state["rng"] * 2

    mutate(latest_checkpoint(run), two_ranks)
    capsys.readouterr()
    assert main(train_args(train_shards, eval_shards, run, *BASE, "--max_steps", "3")) == 0
    assert "step-00000002.pt was saved by 2 rank(s), this run has 1" in capsys.readouterr().err


def test_a_folder_named_like_a_checkpoint_is_not_one(
    run: Path, train_shards: Path, eval_shards: Path, capsys: pytest.CaptureFixture
) -> None:
    checkpoint_path(run, 9).mkdir()
    capsys.readouterr()
    assert main(train_args(train_shards, eval_shards, run, *BASE, "--max_steps", "3", "--keep_checkpoints", "1")) == 0
    assert "resumed from" in capsys.readouterr().out and checkpoint_path(run, 9).is_dir()
    names = sorted(p.name for p in (run / "checkpoints").iterdir())
    assert names == ["best.json", "best.pt", "step-00000003.pt", "step-00000009.pt"]  # the best evaluation's beside


def test_a_second_training_of_one_folder_is_refused(
    run: Path, train_shards: Path, eval_shards: Path, capsys: pytest.CaptureFixture
) -> None:
    before = snapshot(run)
    with open(run / LOCK_NAME, "a") as held:
        fcntl.flock(held, fcntl.LOCK_EX | fcntl.LOCK_NB)  # as the first training holds it
        line = refused(train_args(train_shards, eval_shards, run, *BASE, "--max_steps", "3"), capsys)
    assert f"--out_dir {run} is being written by another training" in line and "pass another --out_dir" in line
    assert snapshot(run) == before


def test_a_lock_file_planted_as_a_symlink_is_not_followed(
    run: Path, train_shards: Path, eval_shards: Path, tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    (run / LOCK_NAME).unlink()
    (run / LOCK_NAME).symlink_to(tmp_path / "elsewhere")
    line = refused(train_args(train_shards, eval_shards, run, *BASE), capsys)
    assert f"--out_dir {run}: cannot make or lock it (Too many levels of symbolic links)" in line
    assert not (tmp_path / "elsewhere").exists()


def test_an_out_dir_that_is_a_file_is_refused(
    train_shards: Path, eval_shards: Path, tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    out = tmp_path / "run"
    out.write_text("not a folder")
    line = refused(train_args(train_shards, eval_shards, out, *BASE), capsys)
    assert f"--out_dir {out}: cannot make or lock it" in line
    assert out.read_text() == "not a folder"


class _Trap:
    """Unpickled, it would create the file it names."""

    def __init__(self, path: Path) -> None:
        self.path = path

    def __reduce__(self) -> tuple[Any, ...]:
        return (os.mkdir, (str(self.path),))


def _write_truncated(path: Path, good: Path) -> None:
    path.write_bytes(good.read_bytes()[: good.stat().st_size // 2])


def _with_repeated_weight(path: Path, good: Path) -> None:
    """`good` with one weight a view of 2**31 elements over one stored number."""
    state = torch.load(good, map_location="cpu", weights_only=True)
    state["model"]["head.weight"] = repeated_tensor()
    torch.save(state, path)


@pytest.mark.parametrize(
    ("write", "message"),
    [
        (
            _write_truncated,
            "not a readable checkpoint (not a zip archive: File is not a zip file);",
        ),
        (
            lambda path, _: path.write_bytes(random.Random(4096).randbytes(4096)),
            "not a readable checkpoint (not a zip archive: ",
        ),
        (lambda path, _: path.write_bytes(b""), "not a readable checkpoint (not a zip archive: "),
        (lambda path, _: torch.save({"x": _Trap(path.with_name("trapped"))}, path), "not a checkpoint of tensors"),
        (lambda path, _: path.write_bytes(pickle.dumps(_Trap(path.with_name("trapped")))), "not a zip archive"),
        (lambda path, _: torch.save(torch.zeros(3), path), "holds a Tensor, not a checkpoint dict"),
        (lambda path, _: torch.save({"model": {}}, path), "not a training checkpoint (no optimizer, schedule, step"),
        (lambda path, good: with_deflated_record(good, path), "is compressed (method 8)"),
        (_with_repeated_weight, "its weights are not the tensors it stores"),
    ],
    ids=[
        "truncated", "random-bytes", "empty", "class-in-torch-save", "plain-pickle", "tensor", "partial-dict",
        "deflated-2GiB", "repeated-tensor",
    ],
)  # fmt: skip
def test_a_corrupt_latest_checkpoint_is_named(
    run: Path,
    train_shards: Path,
    eval_shards: Path,
    capsys: pytest.CaptureFixture,
    write: Callable[[Path, Path], None],
    message: str,
) -> None:
    bad = checkpoint_path(run, 3)
    write(bad, checkpoint_path(run, 2))
    before = snapshot(run)
    line = refused(train_args(train_shards, eval_shards, run, *BASE, "--max_steps", "4"), capsys)
    assert line.startswith(f"error: {bad}: ") and message in line
    assert line.endswith("delete it to resume from the previous checkpoint")
    assert not (run / "checkpoints" / "trapped").exists()
    assert snapshot(run) == before


def _nan_weight(state: dict[str, Any]) -> None:
    state["model"]["head.weight"][0, 0] = float("nan")


def _other_momentum_shape(state: dict[str, Any]) -> None:
    moments = state["optimizer"]["state"][0]
    moments["exp_avg"] = torch.zeros(3, 3)


def _missing_weight(state: dict[str, Any]) -> None:
    del state["model"]["head.bias"]


@pytest.mark.slow
@pytest.mark.parametrize(
    ("change", "message"),
    [
        (lambda s: s.pop("rng"), "not a training checkpoint (no rng)"),
        (lambda s: s.update(step=-1), "'step' is -1, not a count of steps"),
        (lambda s: s.update(step="2"), "'step' is '2', not a count of steps"),
        (lambda s: s.update(loader=[]), "'loader' and 'rng' are not lists of one state per rank, of one length"),
        (lambda s: s.update(loader=s["loader"] * 2), "'loader' and 'rng' are not lists of one state per rank"),
        (lambda s: s["loader"][0].update(batches=10**9), "its loader position, batch 1000000000, is past the 4"),
        (lambda s: s["loader"][0].update(epoch="x"), "a 'loader' state is not a mapping of a non-negative epoch"),
        (lambda s: s["rng"][0].update(torch=torch.zeros(7, dtype=torch.uint8)), "its rng does not fit this run"),
        (lambda s: s["rng"][0].update(torch=None), "an 'rng' state holds no torch generator state"),
        (_nan_weight, "its weights hold NaN or infinite values (head.weight)"),
        (_missing_weight, 'its model does not fit this run (Error(s) in loading state_dict for MBT: Missing key(s)'),
        (lambda s: s["model"].update(extra=3), "'model' is not a mapping of tensors"),
        (lambda s: s["optimizer"]["param_groups"][0].update(initial_lr=1e9), "its optimizer's initial_lr differ"),
        (lambda s: s["optimizer"]["param_groups"].pop(), "its optimizer does not hold this run's parameter groups"),
        (_other_momentum_shape, "its optimizer state 0 does not fit the model's parameters"),
        (lambda s: s["schedule"].update(optimizer={}), "its schedule is not the state of this run's schedule at step"),
        (lambda s: s["schedule"].update(last_epoch=99), "its schedule is not the state of this run's schedule"),
        (lambda s: s.update(config=[1]), "'optimizer', 'schedule' and 'config' are not all mappings"),
    ],
    ids=[
        "no-rng", "negative-step", "string-step", "no-ranks", "ranks-disagree", "position-past-epoch", "epoch-text",
        "rng-size", "rng-none", "nan-weight", "missing-weight", "non-tensor-weight", "optimizer-lr", "optimizer-groups",
        "moment-shape", "schedule-key", "schedule-step", "config-list",
    ],
)  # fmt: skip
def test_a_tampered_checkpoint_is_refused(
    run: Path, train_shards: Path, eval_shards: Path, capsys: pytest.CaptureFixture, change: Mutation, message: str
) -> None:
    latest = latest_checkpoint(run)
    mutate(latest, change)
    before = snapshot(run)
    line = refused(train_args(train_shards, eval_shards, run, *BASE, "--max_steps", "3"), capsys)
    assert line.startswith(f"error: {latest}: ") and message in line, line
    assert snapshot(run) == before


@pytest.mark.parametrize(
    ("change", "message"),
    [
        (lambda s: s["config"].update(learning_rate=1), "its config does not fit this version (config: unknown key"),
        (lambda s: s["config"]["model"].update(num_heads=0), r"--model.num_heads must be in 1..256"),
        (lambda s: s["config"].update(lr=float("nan")), "lr: expected float (a finite number), got nan"),
        (lambda s: s["data"]["classes"].append("x"), "class 12 is not a mapping of index 12"),
        (lambda s: s.update(data={"classes": []}), "its class record is not a mapping of 'classes' and 'multi_label'"),
    ],
    ids=["unknown-key", "zero-heads", "nan-lr", "class-not-a-record", "record-keys"],
)
def test_a_checkpoint_of_unreadable_settings_is_refused(
    run: Path, train_shards: Path, eval_shards: Path, capsys: pytest.CaptureFixture, change: Mutation, message: str
) -> None:
    latest = latest_checkpoint(run)
    mutate(latest, change)
    before = snapshot(run)
    line = refused(train_args(train_shards, eval_shards, run, *BASE, "--max_steps", "3"), capsys, status=2)
    assert str(latest) in line and message in line, line
    assert snapshot(run) == before


def _tower_weights(run: Path, path: Path, nan: bool) -> None:
    """The video tower of the base run's model as a ViT state dict, with a NaN in its first block if `nan`."""
    state = torch.load(latest_checkpoint(run), map_location="cpu", weights_only=True)["model"]
    prefix = "towers.video."
    vit = {k.removeprefix(prefix): v for k, v in state.items() if k.startswith(prefix)}
    if nan:
        vit["blocks.0.attn.qkv.weight"][0, 0] = float("nan")
    torch.save(vit, path)


def _deflated_tower_weights(path: Path, run: Path) -> None:
    """The video tower's weights as a ViT file with one record deflated from 2 GiB of zeros."""
    _tower_weights(run, path.with_name("whole.pth"), nan=False)
    with_deflated_record(path.with_name("whole.pth"), path)


@pytest.mark.parametrize(
    ("name", "write", "message"),
    [
        (
            "random.pth",
            lambda p, run: p.write_bytes(random.Random(2048).randbytes(2048)),
            "not a readable ViT checkpoint (not a zip archive: ",
        ),
        ("empty.pth", lambda p, run: p.write_bytes(b""), "not a readable ViT checkpoint (not a zip archive: "),
        ("trap.pth", lambda p, run: torch.save({"w": _Trap(p.with_name("trapped"))}, p), "not a ViT checkpoint of"),
        ("junk.safetensors", lambda p, run: p.write_bytes(b"\x08" + b"\0" * 7 + b"{}"), "not a readable ViT"),
        ("numbers.pth", lambda p, run: torch.save({"patch_embed.proj.weight": 3}, p), "not a state dict of tensors"),
        ("tensor.pth", lambda p, run: torch.save(torch.zeros(2), p), "not a state dict"),
        ("ours.pt", lambda p, run: shutil.copy(latest_checkpoint(run), p), "does not fit the video tower"),
        ("nan.pth", lambda p, run: _tower_weights(run, p, nan=True), "its weights hold NaN or infinite values"),
        ("noise.npz", lambda p, run: p.write_bytes(random.Random(7).randbytes(2048)), "not a readable .npz archive"),
        ("deflated.pth", _deflated_tower_weights, "is compressed (method 8)"),
        ("repeated.pth", lambda p, run: torch.save({"pos_embed": repeated_tensor()}, p), "not the tensors it stores"),
        ("stated.safetensors", lambda p, run: p.write_bytes(stated_tensor_safetensors()), "states bytes 0..2147483648"),
        ("deflated.npz", lambda p, run: deflated_npz(p), "once read"),
        ("stated.npz", lambda p, run: stated_npz(p), "embedding/kernel.npy states shape (16, 16, 8, 262144)"),
        ("deep.npz", lambda p, run: deep_vit_npz(p), "parameters, more than its arrays hold"),
    ],
)
def test_init_video_that_is_no_vit_checkpoint_is_refused(
    base_run: Path,
    train_shards: Path,
    eval_shards: Path,
    tmp_path: Path,
    capsys: pytest.CaptureFixture,
    name: str,
    write: Callable[[Path, Path], None],
    message: str,
) -> None:
    path = tmp_path / name
    write(path, base_run)
    line = refused(train_args(train_shards, eval_shards, tmp_path / "run", *BASE, "--init_video", str(path)), capsys)
    assert line.startswith("error: --init_video") and str(path) in line and message in line, line
    assert not (tmp_path / "trapped").exists()
    assert latest_checkpoint(tmp_path / "run") is None


@pytest.mark.parametrize("mode", ["vit", "scenic"])
def test_init_video_from_a_vit_of_the_model_loads(
    base_run: Path, train_shards: Path, eval_shards: Path, tmp_path: Path, capsys: pytest.CaptureFixture, mode: str
) -> None:
    """The control of the test above: the same tower weights without the NaN initialise the run (the demo's "vit"
    mode; "scenic" leaves the audio tower's CLS token at zero, as scenic's initialiser does)."""
    path = tmp_path / "vit.pth"
    _tower_weights(base_run, path, nan=False)
    capsys.readouterr()
    both = ["--init", mode, "--init_video", str(path), "--init_audio", str(path)]
    assert main(train_args(train_shards, "", tmp_path / "run", "--max_steps", "1", *both)) == 0
    out = capsys.readouterr().out
    assert f"init: video tower <- {path}\n" in out
    cls_note = " (its CLS token left at zero: scenic restores no 'clsspectrogram')" if mode == "scenic" else ""
    assert f"init: audio tower <- {path}{cls_note}\n" in out
    saved = yaml.safe_load((tmp_path / "run" / "config.yaml").read_text())
    assert saved["init"] == mode


def test_a_full_disk_stops_the_log_at_the_row_that_met_it_with_whole_rows_in_both_files(full_disk: FullDisk) -> None:
    log = RunLog(full_disk.folder)
    log.write({"step": 1, "loss": 0.5})
    full_disk.fill()  # each file keeps the rest of its last page: the events' rows are the longer, they fill first
    with pytest.raises(DiskFullError) as err:
        for step in range(2, 1000):
            log.write({"step": step, "epoch": 0, "loss": 0.5, "lr": 0.1, "clips_per_s": 3.0})
    assert str(err.value) == f"cannot write {log.events}: No space left on device; {RERUN}"
    rows = [json.loads(line) for line in log.path.read_text().splitlines()]
    logged = [(e.step, e.summary.value[0].tag) for e in EventFileLoader(str(log.events)).Load() if e.summary.value]
    # TensorBoard reads row 1's loss and the 4 scalars of every later row but the last, which met the full disk.
    assert logged[:2] == [(1, "train/loss"), (2, "train/epoch")] and len(logged) == 1 + 4 * (len(rows) - 2)
    assert logged[-1] == (rows[-2]["step"], "train/clips_per_s")


@pytest.mark.slow
def test_a_full_disk_at_the_start_is_an_error_naming_config_yaml(
    train_shards: Path, full_disk: FullDisk, capsys: pytest.CaptureFixture
) -> None:
    out = full_disk.folder / "run"
    full_disk.fill()
    assert main(train_args(train_shards, "", out, "--max_steps", "1")) == 1
    expected = f"error: cannot write {out / 'config.yaml'}: No space left on device; {RERUN}"
    assert capsys.readouterr().err.strip().splitlines()[-1] == expected
    assert sorted(p.name for p in out.iterdir()) == [LOCK_NAME]


def test_metrics_log_cut_mid_line_is_continued_and_plotted(tmp_path: Path) -> None:
    log_path = tmp_path / "metrics.jsonl"
    rows = [
        b'{"step": 1, "loss": 0.5}',
        b"[1, 2]",
        b'{"step": "x", "loss": 1}',
        b"\xff\xfe",
        b'{"step": 2, "loss": NaN}',
    ]
    log_path.write_bytes(b"\n".join(rows) + b'\n{"step": 3, "lo')
    log = RunLog(tmp_path)
    log.write({"step": 4, "epoch": 0, "loss": 0.25})
    lines = log_path.read_text(errors="replace").splitlines()
    assert lines[-2] == '{"step": 3, "lo' and json.loads(lines[-1])["step"] == 4
    assert plot_curves(log_path, tmp_path / "curves.png") == 4  # the list, the text step, the bytes, the cut row
    assert (tmp_path / "curves.png").read_bytes()[:4] == b"\x89PNG"


def test_weights_that_became_non_finite_are_not_checkpointed(
    train_shards: Path, tmp_path: Path, capsys: pytest.CaptureFixture, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A step whose loss was finite but whose update was not: the checkpoint after it is not written."""
    update = torch.optim.AdamW.step

    def poisoned(self: torch.optim.AdamW, *args: Any, **kwargs: Any) -> Any:
        result = update(self, *args, **kwargs)
        with torch.no_grad():
            self.param_groups[0]["params"][0].fill_(float("inf"))
        return result

    monkeypatch.setattr(torch.optim.AdamW, "step", poisoned)
    out = tmp_path / "run"
    capsys.readouterr()
    assert main(train_args(train_shards, "", out, *BASE)) == 1
    err = capsys.readouterr().err  # after the progress bar's last line
    assert "error: the weights became NaN or infinite by step 1 (towers.video.patch_embed.proj.weight)" in err
    assert "Traceback" not in err and latest_checkpoint(out) is None
