"""What a training prints and keeps around its numbers: the start-up summary, plain progress lines when stdout is a
file (no carriage return, a line every `log_every_steps`), evaluation's lines, TensorBoard's grouped tags, the best
checkpoint kept by the validation metric, and the refusal of a run whose estimated memory cannot fit."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from tensorboard.backend.event_processing.event_file_loader import EventFileLoader
from test_train import REPO, read_rows, train_args

import mbt.memory
import mbt.train
from mbt.checkpoint import BEST_NAME, BEST_RECORD, CHECKPOINT_DIR, load_checkpoint, read_best
from mbt.config import load_config, preset
from mbt.evaluate import main as evaluate_main
from mbt.memory import estimate_memory
from mbt.run_log import tensorboard_tag
from mbt.train import main

STEPS = 8  # 9 clips, batch 2: 4 steps per epoch, 2 epochs, an evaluation after each


@pytest.fixture(scope="module")
def logged_run(train_shards: Path, eval_shards: Path, tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, str]:
    """`python -m mbt.train` for 2 epochs with stdout and stderr to files (not a terminal), a line every 2 steps:
    the run directory and what it printed."""
    out = tmp_path_factory.mktemp("logged")
    args = train_args(
        train_shards, eval_shards, out / "run", "--epochs", "2", "--log_every_steps", "2", "--eval_batch_size", "2"
    )
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    with open(out / "stdout", "wb") as stdout, open(out / "stderr", "wb") as stderr:
        code = subprocess.run(
            [sys.executable, "-m", "mbt.train", *args], stdout=stdout, stderr=stderr, env=env
        ).returncode
    printed = (out / "stdout").read_text() + (out / "stderr").read_text()
    assert code == 0, printed
    return out / "run", printed


def test_output_to_a_file_is_plain_lines_every_n_steps(logged_run: tuple[Path, str]) -> None:
    _, printed = logged_run
    assert "\r" not in printed
    steps = re.findall(
        r"^step (\d+)/8 epoch (\d) loss [\d.]+ lr [\d.e+-]+ clips/s [\d.]+ eta \d+:\d\d:\d\d$", printed, re.M
    )
    assert steps == [("2", "0"), ("4", "0"), ("6", "1"), ("8", "1")]
    # 2 batches of 3 clips each evaluation: a line for each (a tenth of the batches, rounded up), then the metrics.
    evaluations = re.findall(r"^evaluate ([12])/2 batch/s [\d.]+ eta \d+:\d\d:\d\d$", printed, re.M)
    assert evaluations == ["1", "2", "1", "2"]
    assert (
        len(
            re.findall(
                r"^step [48] epoch [01]: num_samples=3 mAP=[\d.]+ .*\(best mAP [\d.]+ at step [48]: ", printed, re.M
            )
        )
        == 2
    )


def test_the_start_up_summary_says_what_the_run_is(logged_run: tuple[Path, str]) -> None:
    run_dir, printed = logged_run
    summary = printed.split("\nstep ")[0]
    for expected in [
        r"^model: MBT bottleneck fusion, [\d.]+M parameters \(video [\d.]+M, audio [\d.]+M, shared [\d.]+M\), "
        r"[\d.]+ GFLOPs forward per clip$",
        r"^device: cpu \(one process\), world size 1$",
        r"^batch: 2 clips per step = 2 per rank x 1 rank\(s\) x 1 accumulated micro-batch\(es\)$",
        r"^steps: 4 per epoch, 8 in all \(2 epochs\)$",
        r"^data: training 9 clips \(.*\); evaluation 3 clips \(.*\)$",
        r"^init: none \(random weights\)$",
        r"^memory: about [\d.]+ [GM]iB \(runtime .*\) per rank for 2 clips per rank at fp32; [\d.]+ [GM]iB available",
        rf"^outputs: {re.escape(str(run_dir))} .*best\.pt",
    ]:
        assert re.search(expected, summary, re.M), (expected, summary)


def test_tensorboard_tags_are_grouped(logged_run: tuple[Path, str]) -> None:
    run_dir, _ = logged_run
    (events,) = (run_dir / "tensorboard").glob("events.*")
    tags = {v.tag for e in EventFileLoader(str(events)).Load() for v in e.summary.value}
    assert tags == {
        "train/loss", "train/lr", "train/clips_per_s", "train/epoch",
        "val/mAP", "val/mAUC", "val/d_prime", "val/best_metric",
    }  # fmt: skip


@pytest.mark.parametrize(
    "key, tag",
    [("loss", "train/loss"), ("eval_top1", "val/top1"), ("best_eval_metric", "val/best_metric"), ("step", None)],
)
def test_tensorboard_tag(key: str, tag: str | None) -> None:
    assert tensorboard_tag(key) == tag


def test_the_best_evaluation_is_kept_beside_the_last_checkpoints(
    logged_run: tuple[Path, str], eval_shards: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    run_dir, _ = logged_run
    evaluations = [row for row in read_rows(run_dir) if "eval_metric" in row]
    best_row = max(evaluations, key=lambda row: row["eval_metric"])  # the first of equals: a tie keeps the earlier
    record = read_best(run_dir)
    assert record == {"step": best_row["step"], "metric": "mAP", "value": best_row["eval_metric"]}
    assert all(row["best_step"] <= row["step"] for row in evaluations)
    best = load_checkpoint(run_dir / CHECKPOINT_DIR / BEST_NAME)
    assert best["step"] == record["step"] and best["best"] == record and "optimizer" not in best
    # The weights evaluate as any checkpoint does, to the metric recorded.
    assert evaluate_main(["--checkpoint", str(run_dir / CHECKPOINT_DIR / BEST_NAME), "--shards", str(eval_shards),
                          "--out", str(tmp_path / "eval"), "--loader", "torch"]) == 0  # fmt: skip
    metrics = json.loads((tmp_path / "eval" / "metrics.json").read_text())
    assert metrics["mAP"] == pytest.approx(record["value"], abs=1e-6)


@pytest.mark.parametrize("text", ["", "{}", '{"step": 1, "metric": "mAP", "value": NaN}', "[1]"])
def test_a_bad_best_record_reads_as_none(tmp_path: Path, text: str) -> None:
    (tmp_path / CHECKPOINT_DIR).mkdir()
    (tmp_path / CHECKPOINT_DIR / BEST_NAME).write_bytes(b"")
    (tmp_path / CHECKPOINT_DIR / BEST_RECORD).write_text(text)
    assert read_best(tmp_path) is None


def test_a_run_that_cannot_fit_is_refused_before_anything_is_allocated(
    train_shards: Path, eval_shards: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:  # fmt: skip
    """Just enough for 1 clip per rank, not for 8 (refused at the whole estimate here, not 80% of it): refused,
    naming the --grad_accum that fits with the global batch kept."""
    args = train_args(train_shards, eval_shards, tmp_path / "run", "--batch_size", "8", "--eval_shards", "")
    cfg = load_config(args)
    monkeypatch.setattr(mbt.memory, "resident_bytes", lambda: 500 << 20)  # the same runtime in every estimate
    need_1 = estimate_memory(cfg, 1, torch.device("cpu"), 1).total
    monkeypatch.setattr(mbt.memory, "REFUSE_FRACTION", 1.0)
    monkeypatch.setattr(mbt.memory, "available_memory", lambda *_: (need_1 + (1 << 20), "a test's limit"))
    monkeypatch.setattr(mbt.train, "MBT", None)  # constructing the model would raise
    assert main(args) == 2
    err = capsys.readouterr().err
    assert re.fullmatch(
        r"error: the run needs about [\d.]+ [GM]iB .* for 8 clips per rank at fp32, and [\d.]+ [GM]iB are available "
        r"\(a test's limit\): it cannot fit; it would fit with --grad_accum \d \(\d clips per rank per micro-batch, "
        r"the global batch stays 8: about [\d.]+ [GM]iB\)(, or a smaller model.*)?\n",
        err,
    ), err
    assert not (tmp_path / "run").exists()


def test_mbt_b_on_a_cpu_is_refused_with_a_smaller_batch_or_model_that_fits(monkeypatch: pytest.MonkeyPatch) -> None:
    """The custom preset (MBT-B, 64 clips, 8 s of audio) with 19 GiB: about 70 GiB of activations; fewer clips per
    micro-batch fit, and so do ViT-S/16 towers on 4 frames."""
    monkeypatch.setattr(mbt.memory, "resident_bytes", lambda: 1 << 30)
    monkeypatch.setattr(mbt.memory, "available_memory", lambda *_: (19 << 30, "MemAvailable"))
    cfg = preset("custom").replace(model=preset("custom").model.replace(num_classes=10))
    verdict = mbt.memory.memory_verdict(cfg, 1, torch.device("cpu"))
    assert verdict.refusal is not None and verdict.warning is None
    found = re.search(r"it cannot fit; it would fit with --grad_accum (\d+) \((\d+) clips per rank per micro-batch, "
                      r"the global batch stays 64: about ([\d.]+) GiB\)", verdict.refusal)  # fmt: skip
    assert found and int(found[1]) * int(found[2]) == 64 and float(found[3]) <= 19, verdict.refusal
    assert "or a smaller model, ViT-S/16 towers, 4 frames (--model.embed_dim 384 " in verdict.refusal
    assert "--augment.frames_used 4; " in verdict.refusal  # and its size or batch that fits
