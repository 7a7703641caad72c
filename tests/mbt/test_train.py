"""Training in one process on CPU over the demo shards with a tiny MBT: the run directory, resume after a SIGKILL
giving the losses and weights of an uninterrupted run, configs refused before any work, a non-finite loss, and
keeping the last K checkpoints."""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
import yaml
from full_disk import FullDisk
from test_evaluate import raw_evaluation_audio, record_evaluation_audio, split_with_other_statistics

import mbt.train
from mbt.checkpoint import checkpoint_path, latest_checkpoint, list_checkpoints, load_checkpoint
from mbt.config import ConfigError, TrainConfig, config_from_dict, load_config
from mbt.evaluate import main as evaluate_main
from mbt.train import main
from mbt.validate import validate
from shards.manifest import load_manifest

REPO = Path(__file__).resolve().parents[2]
# 2 s clips hold 200 log-mel frames: 160-frame windows; a tiny MBT on 32 px crops.
TINY = [
    "--augment.audio_frames", "160", "--model.audio_frames", "160", "--augment.time_mask_px", "40",
    "--model.embed_dim", "32", "--model.depth", "2", "--model.num_heads", "2", "--model.fusion_layer", "1",
    "--model.img_size", "32", "--augment.crop_px", "32", "--augment.eval_short_side_px", "36",
    "--loader", "torch", "--num_workers", "0", "--batch_size", "2", "--log_every_steps", "1",
    "--eval_every_epochs", "1", "--checkpoint_every_steps", "50",
]  # fmt: skip
# Dropout, stochastic depth and mixup on, so that resuming has to restore every random stream.
RANDOM = ["--model.drop_path_rate", "0.2", "--model.drop_rate", "0.1", "--augment.mixup_alpha", "0.5"]
# 9 clips, batch 2: 4 steps per epoch, 12 in all; checkpoints at 2, 4, ..., 12, the last 2 kept.
EPOCHS, STEPS_PER_EPOCH = 3, 4
TOTAL_STEPS = EPOCHS * STEPS_PER_EPOCH
RUN = ["--epochs", str(EPOCHS), "--checkpoint_every_steps", "2", "--keep_checkpoints", "2", *RANDOM]


def train_args(train_shards: Path, eval_shards: Path | str, out_dir: Path, *extra: str) -> list[str]:
    return [
        "--train_shards", str(train_shards), "--eval_shards", str(eval_shards), "--out_dir", str(out_dir),
        *TINY, *extra,
    ]  # fmt: skip


def resolved_config(args: list[str]) -> TrainConfig:
    """The config of a training run with `args`: its log-mel normalization is the training split's statistics."""
    cfg = load_config(args)
    stats = load_manifest(cfg.train_shards).logmel
    return cfg.replace(augment=cfg.augment.replace(logmel_mean=stats.mean, logmel_std=stats.std))


def read_rows(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines() if line.strip()]


def losses_by_step(run_dir: Path) -> dict[int, float]:
    """The loss logged for each step; the last row wins where a resumed run logged a step again."""
    return {row["step"]: row["loss"] for row in read_rows(run_dir) if "loss" in row}


def error_lines(stderr: str) -> list[str]:
    """The `error:` lines of a run's stderr (the progress bar writes there too, and ends without a newline)."""
    return re.findall(r"error: [^\r\n]*", stderr)


def assert_same_weights(a: Path, b: Path) -> None:
    wa, wb = load_checkpoint(a)["model"], load_checkpoint(b)["model"]
    assert wa.keys() == wb.keys()
    for name in wa:
        torch.testing.assert_close(wb[name], wa[name], rtol=0, atol=1e-6, msg=f"{name} differs")


def assert_resumed_at_step_3_equals(args: list[str], whole: Path, resumed: Path) -> None:
    """A run of `args` (2 epochs of 4 steps, a checkpoint every step) in `resumed` that starts from `whole`'s step-3
    checkpoint logs `whole`'s losses for steps 4 to 8 and ends with its weights."""
    checkpoint_path(resumed, 3).parent.mkdir(parents=True)
    shutil.copy(checkpoint_path(whole, 3), checkpoint_path(resumed, 3))  # as if the run had died after step 3
    out = args.index("--out_dir") + 1
    assert main([*args[:out], str(resumed), *args[out + 1 :]]) == 0
    reference, again = losses_by_step(whole), losses_by_step(resumed)
    assert sorted(again) == [4, 5, 6, 7, 8]
    for step in again:
        assert again[step] == pytest.approx(reference[step], rel=0, abs=1e-6), f"step {step}"
    assert_same_weights(checkpoint_path(whole, 8), checkpoint_path(resumed, 8))


@pytest.fixture(scope="module")
def reference_run(train_shards: Path, eval_shards: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """An uninterrupted run of RUN."""
    out = tmp_path_factory.mktemp("train") / "reference"
    assert main(train_args(train_shards, eval_shards, out, *RUN)) == 0
    return out


def test_training_writes_the_run_directory(
    reference_run: Path, train_shards: Path, eval_shards: Path, tmp_path: Path
) -> None:
    saved = yaml.safe_load((reference_run / "config.yaml").read_text())
    cfg = resolved_config(train_args(train_shards, eval_shards, reference_run, *RUN))
    assert cfg.augment.logmel_mean is not None and cfg.augment.logmel_std > 0
    assert config_from_dict(saved) == cfg  # with the training split's log-mel normalization
    assert load_config(["--config", str(reference_run / "config.yaml")]) == cfg

    last = latest_checkpoint(reference_run)
    assert last == checkpoint_path(reference_run, TOTAL_STEPS)
    state = torch.load(last, map_location="cpu", weights_only=True)
    assert {"model", "optimizer", "schedule", "step", "loader", "rng", "config"} <= state.keys()
    assert state["step"] == TOTAL_STEPS
    manifest = load_manifest(train_shards)  # what predict decodes new videos with
    assert state["features"] == {"params": manifest.features.to_dict(), "schema_version": manifest.schema_version}
    assert config_from_dict(state["config"]) == cfg
    assert len(state["rng"]) == 1 and isinstance(state["rng"][0]["torch"], torch.Tensor)

    rows = read_rows(reference_run)
    train_rows = [r for r in rows if "loss" in r]
    assert [r["step"] for r in train_rows] == list(range(1, TOTAL_STEPS + 1))
    assert [r["epoch"] for r in train_rows] == [s // STEPS_PER_EPOCH for s in range(TOTAL_STEPS)]
    for row in train_rows:
        assert {"step", "epoch", "loss", "lr", "clips_per_s"} <= row.keys()
        assert np.isfinite(row["loss"]) and row["lr"] >= 0 and row["clips_per_s"] > 0
    assert train_rows[-1]["lr"] == pytest.approx(0.0, abs=1e-12)  # cosine ends at 0
    eval_rows = [r for r in rows if "eval_metric" in r]
    assert [r["step"] for r in eval_rows] == [STEPS_PER_EPOCH * (e + 1) for e in range(EPOCHS)]
    assert all(r["eval_metric_name"] == "mAP" for r in eval_rows)

    assert list((reference_run / "tensorboard").glob("events.out.tfevents.*"))
    assert (reference_run / "curves.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    metrics = json.loads((reference_run / "eval" / "metrics.json").read_text())
    assert metrics["num_samples"] == 3
    assert {"mAP", "mAUC", "d_prime"} <= metrics.keys()
    assert metrics["mAP"] == eval_rows[-1]["eval_metric"]
    with np.load(reference_run / "eval" / "predictions.npz") as npz:
        keys = list(npz["keys"])
        assert keys == sorted(keys) and len(keys) == 3
        assert npz["logits"].shape == (3, load_manifest(train_shards).num_classes)


def test_keeps_the_last_checkpoints(reference_run: Path) -> None:
    assert [p.name for p in list_checkpoints(reference_run)] == ["step-00000010.pt", "step-00000012.pt"]
    assert not list((reference_run / "checkpoints").glob("*.tmp"))


@pytest.mark.slow
def test_resume_after_sigkill_equals_uninterrupted(
    reference_run: Path, train_shards: Path, eval_shards: Path, tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    out = tmp_path / "killed"
    args = train_args(train_shards, eval_shards, out, *RUN)
    with open(tmp_path / "first.log", "wb") as log:
        proc = subprocess.Popen(
            [sys.executable, "-m", "mbt.train", *args], cwd=REPO, stdout=log, stderr=subprocess.STDOUT,
            start_new_session=True,
        )  # fmt: skip
        try:
            deadline = time.monotonic() + 120
            while latest_checkpoint(out) is None and proc.poll() is None and time.monotonic() < deadline:
                time.sleep(0.01)
            if proc.poll() is not None:
                pytest.fail(f"the run ended (exit {proc.returncode}) before it could be killed after a checkpoint")
            assert latest_checkpoint(out) is not None, "no checkpoint within 120 s"
            os.killpg(proc.pid, signal.SIGKILL)
        finally:
            if proc.poll() is None:
                os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(timeout=30)
    assert proc.returncode == -signal.SIGKILL
    killed_at = int(load_checkpoint(latest_checkpoint(out))["step"])
    assert 2 <= killed_at < TOTAL_STEPS

    capsys.readouterr()
    assert main(args) == 0
    resumed_line = re.search(r"resumed from (\S+) at step (\d+)", capsys.readouterr().out)
    assert resumed_line and int(resumed_line[2]) == killed_at
    reference, resumed = losses_by_step(reference_run), losses_by_step(out)
    assert sorted(resumed) == list(range(1, TOTAL_STEPS + 1))
    for step in range(killed_at + 1, TOTAL_STEPS + 1):
        assert resumed[step] == pytest.approx(reference[step], rel=0, abs=1e-6), f"step {step}"
    assert latest_checkpoint(out).name == latest_checkpoint(reference_run).name
    assert_same_weights(latest_checkpoint(reference_run), latest_checkpoint(out))


def test_rerunning_a_finished_run_only_evaluates(
    reference_run: Path, train_shards: Path, eval_shards: Path, tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    out = shutil.copytree(reference_run, tmp_path / "finished")
    (out / "eval" / "metrics.json").unlink()
    rows = read_rows(out)
    capsys.readouterr()
    assert main(train_args(train_shards, eval_shards, out, *RUN)) == 0
    assert f"at step {TOTAL_STEPS}" in capsys.readouterr().out
    assert read_rows(out) == rows
    assert json.loads((out / "eval" / "metrics.json").read_text())["mAP"] == rows[-1]["eval_metric"]


@pytest.mark.slow
def test_a_full_disk_at_a_checkpoint_stops_the_run_and_the_rerun_resumes_from_the_previous(
    reference_run: Path, train_shards: Path, eval_shards: Path, full_disk: FullDisk, monkeypatch, capsys
) -> None:
    out = full_disk.folder / "run"
    args = train_args(train_shards, eval_shards, out, *RUN)
    save = mbt.train.save_checkpoint

    def fill_then_save(run_dir: Path, step: int, *rest: Any, **keywords: Any) -> Path:
        if step == 6:
            full_disk.fill()
        return save(run_dir, step, *rest, **keywords)

    monkeypatch.setattr(mbt.train, "save_checkpoint", fill_then_save)
    capsys.readouterr()
    assert main(args) == 1
    assert error_lines(capsys.readouterr().err) == [
        f"error: cannot write {checkpoint_path(out, 6)}: No space left on device; free space, then rerun the same "
        f"command (it resumes from {checkpoint_path(out, 4)})"
    ]
    assert latest_checkpoint(out) == checkpoint_path(out, 4) and not list(out.rglob("*.tmp"))
    full_disk.free()
    monkeypatch.undo()
    assert main(args) == 0
    assert f"resumed from {checkpoint_path(out, 4)} at step 4" in capsys.readouterr().out
    reference, resumed = losses_by_step(reference_run), losses_by_step(out)
    assert sorted(resumed) == list(range(1, TOTAL_STEPS + 1))
    for step in range(5, TOTAL_STEPS + 1):
        assert resumed[step] == pytest.approx(reference[step], rel=0, abs=1e-6), f"step {step}"
    assert_same_weights(latest_checkpoint(reference_run), latest_checkpoint(out))


@pytest.mark.slow
def test_resume_with_grad_accum_equals_uninterrupted(train_shards: Path, eval_shards: Path, tmp_path: Path) -> None:
    # Per-rank batch 1 and 2 micro-batches a step: 4 steps per epoch, 8 in all; resume mid-epoch from step 3.
    run = ["--epochs", "2", "--grad_accum", "2", "--checkpoint_every_steps", "1", "--keep_checkpoints", "20", *RANDOM]
    args = train_args(train_shards, eval_shards, tmp_path / "whole", *run)
    assert main(args) == 0
    assert_resumed_at_step_3_equals(args, tmp_path / "whole", tmp_path / "resumed")


@pytest.mark.slow
def test_streamed_shards_train_resume_and_evaluate(train_shards: Path, eval_shards: Path, tmp_path: Path) -> None:
    """Both splits as pipe: URLs, 2 loader workers: resuming mid-epoch gives the uninterrupted losses, and the
    streamed evaluation during training equals mbt.evaluate of the same checkpoint over the shard folder."""
    piped_train, piped_eval = (f"pipe:cat {folder}/manifest.json" for folder in (train_shards, eval_shards))
    run = ["--epochs", "2", "--checkpoint_every_steps", "1", "--keep_checkpoints", "20", "--num_workers", "2", *RANDOM]
    whole = tmp_path / "whole"
    args = train_args(piped_train, piped_eval, whole, *run)
    assert main(args) == 0
    assert load_checkpoint(checkpoint_path(whole, 3))["loader"] == [{"epoch": 0, "batches": 3, "readers": 2}]
    assert_resumed_at_step_3_equals(args, whole, tmp_path / "resumed")

    streamed = json.loads((whole / "eval" / "metrics.json").read_text())
    out = tmp_path / "indexed-eval"
    evaluate = ["--checkpoint", str(checkpoint_path(whole, 8)), "--shards", str(eval_shards), "--out", str(out)]
    assert evaluate_main([*evaluate, "--loader", "torch", "--batch-size", "2"]) == 0
    assert json.loads((out / "metrics.json").read_text()) == pytest.approx(streamed, rel=0, abs=1e-6)


def test_evaluation_normalizes_with_the_training_splits_statistics(
    train_shards: Path, eval_shards: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Normalization belongs to the model: the evaluation split's own statistics (here another mean and std) are
    not used; the training split's are, as config.yaml and the checkpoint record."""
    audio_seen = record_evaluation_audio(monkeypatch)
    other = split_with_other_statistics(eval_shards, tmp_path / "eval")
    args = train_args(train_shards, other, tmp_path / "run", "--max_steps", "1")
    assert main(args) == 0
    cfg = resolved_config(args)
    assert config_from_dict(load_checkpoint(checkpoint_path(tmp_path / "run", 1))["config"]) == cfg
    stats = load_manifest(train_shards).logmel
    raw = raw_evaluation_audio(other, cfg.augment, cfg.eval_batch_size)
    torch.testing.assert_close(torch.cat(audio_seen), (raw - stats.mean) / stats.std, rtol=0, atol=1e-5)


@pytest.mark.parametrize("streamed", [False, True], ids=["brace-pattern", "streamed"])
def test_the_custom_preset_trains_on_a_patterned_or_streamed_training_split(
    train_shards: Path, tmp_path: Path, streamed: bool
) -> None:
    """The head takes the classes of the training split as main opened it, however it is given."""
    source = f"pipe:cat {train_shards}/manifest.json" if streamed else f"{train_shards}/shard-{{000000..000004}}.tar"
    out = tmp_path / "run"
    assert main(["--preset", "custom", *train_args(source, "", out, "--max_steps", "1")]) == 0
    saved = yaml.safe_load((out / "config.yaml").read_text())
    assert saved["train_shards"] == source and saved["model"]["num_classes"] == load_manifest(train_shards).num_classes


def test_the_custom_cpu_preset_trains_a_small_mbt_on_your_shards(train_shards: Path, tmp_path: Path) -> None:
    """The demo's small MBT with the head of the training split, in seconds a step on a CPU."""
    out = tmp_path / "run"
    args = ["--train_shards", str(train_shards), "--eval_shards", "", "--out_dir", str(out), "--max_steps", "1"]
    assert main(["--preset", "custom-cpu", *args, "--num_workers", "0", "--batch_size", "2"]) == 0
    saved = yaml.safe_load((out / "config.yaml").read_text())
    assert saved["model"]["num_classes"] == load_manifest(train_shards).num_classes
    assert saved["model"]["embed_dim"] == 64 and saved["model"]["depth"] == 4


def test_empty_eval_shards_trains_without_evaluation(train_shards: Path, tmp_path: Path) -> None:
    out = tmp_path / "run"
    assert main(train_args(train_shards, "", out, "--epochs", "2")) == 0
    rows = read_rows(out)
    assert [r["step"] for r in rows] == list(range(1, 2 * STEPS_PER_EPOCH + 1))
    assert not (out / "eval").exists() and (out / "curves.png").is_file()


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        (["--preset", "nope"], "unknown preset 'nope'"),
        (["--model.fusion_layer", "3"], "fusion_layer must be in 0..depth=2"),
        (["--batch_size", "3", "--grad_accum", "2"], "not divisible by world size 1 × grad_accum 2"),
        (["--train_shards", "{missing}"], "no manifest.json there"),
        (["--eval_shards", "{missing}"], "--eval_shards"),
        (["--preset", "audioset"], "--init scenic starts the towers from ImageNet ViT weights"),
    ],
    ids=["preset", "fusion-layer", "batch", "train-shards", "eval-shards", "recipe-without-vit"],
)
def test_invalid_configs_are_refused_before_any_work(
    extra: list[str],
    message: str,
    train_shards: Path,
    eval_shards: Path,
    tmp_path: Path,
    capsys: pytest.CaptureFixture,
) -> None:
    out = tmp_path / "run"
    extra = [arg.format(missing=tmp_path / "missing") for arg in extra]
    assert main(train_args(train_shards, eval_shards, out, *extra)) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and message in err
    assert not out.exists()


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the message of a machine without CUDA")
def test_device_cuda_without_cuda_is_refused(
    train_shards: Path, eval_shards: Path, tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    out = tmp_path / "run"
    assert main(train_args(train_shards, eval_shards, out, "--device", "cuda")) == 2
    assert "torch sees no CUDA device" in capsys.readouterr().err and not out.exists()


def test_batch_must_divide_over_world_size(train_shards: Path, eval_shards: Path, tmp_path: Path) -> None:
    cfg = load_config(train_args(train_shards, eval_shards, tmp_path / "run", "--batch_size", "3"))
    validate(cfg, world_size=1)
    with pytest.raises(ConfigError, match=r"global batch 3 is not divisible by world size 2 × grad_accum 1"):
        validate(cfg, world_size=2)


def test_non_finite_loss_stops_the_run(
    train_shards: Path, eval_shards: Path, tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    out = tmp_path / "run"
    blow_up = ["--optimizer", "sgd", "--lr", "1e30", "--clip_grad_norm", "0", "--warmup_epochs", "0", "--epochs", "1"]
    assert main(train_args(train_shards, eval_shards, out, *blow_up)) == 1
    err = capsys.readouterr().err
    assert "error: non-finite loss" in err
    logged = losses_by_step(out)  # the steps before it were finite and logged; the message names the next one
    assert f"at step {max(logged) + 1} (epoch 0)" in err
    assert all(np.isfinite(v) for v in logged.values())
    assert latest_checkpoint(out) is None
