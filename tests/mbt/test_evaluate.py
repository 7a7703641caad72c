"""Evaluation: clip averaging and gathering with a toy model, then `python -m mbt.evaluate` on a tiny MBT checkpoint
over the demo shards, whose predictions and metrics do not depend on batch size, loader workers or world size."""

from __future__ import annotations

import dataclasses
import json
import logging
import shutil
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from dist_evaluate_main import NUM_CLASSES, ToyModel, toy_batches, toy_labels, toy_logits
from loader_checks import SMALL_AUG

import mbt.sharded_eval
from experiments.demo_data import DEMO_CLASSES
from mbt.dist import DistInfo
from mbt.evaluate import main
from mbt.metrics import compute_metrics
from mbt.model import MBT, MBTConfig
from mbt.sharded_eval import EvaluationError, evaluate
from pipelines import build_loader, open_split
from pipelines.config import AugmentConfig
from pipelines.sources import SplitIndex
from shards.manifest import load_manifest
from shards.schema import MANIFEST_NAME

REPO = Path(__file__).resolve().parents[2]
SCRIPT = Path(__file__).parents[1] / "support" / "dist_evaluate_main.py"
SINGLE = DistInfo(rank=0, local_rank=0, world_size=1, device=torch.device("cpu"))
TINY = MBTConfig(
    num_classes=len(DEMO_CLASSES), embed_dim=32, depth=2, num_heads=2, fusion_layer=1, num_frames=8, img_size=32,
    audio_frames=160, num_mel_bins=128,
)  # fmt: skip
# The log-mel normalization a training records: its training split's statistics (here made up).
AUG = SMALL_AUG.replace(crop_px=32, eval_short_side_px=36, logmel_mean=-3.5, logmel_std=4.25)

Results = tuple[dict[str, np.ndarray], dict[str, Any]]


def torchrun(*args: str) -> list[str]:
    return [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", *args]


def read_results(out: Path) -> Results:
    with np.load(out / "predictions.npz") as npz:
        predictions = dict(npz)
    return predictions, json.loads((out / "metrics.json").read_text())


def save_checkpoint(path: Path, cfg: MBTConfig = TINY, augment: AugmentConfig = AUG) -> Path:
    """A checkpoint as training writes it: seeded weights (a random head: a trained one is not at its zero init)
    and the config as plain (JSON) values."""
    torch.manual_seed(0)
    model = MBT(cfg)
    torch.nn.init.normal_(model.head.weight, std=0.5)
    config = json.loads(json.dumps({"model": dataclasses.asdict(cfg), "augment": dataclasses.asdict(augment)}))
    torch.save({"model": model.state_dict(), "config": config, "step": 0}, path)
    return path


def split_with_other_statistics(folder: Path, out: Path) -> Path:
    """A copy of the split in `folder` whose manifest's log-mel statistics are another mean (+3) and std (x2)."""
    shutil.copytree(folder, out)
    manifest = json.loads((out / MANIFEST_NAME).read_text())
    stats = manifest["logmel"]
    mean, std, count = stats["mean"] + 3, stats["std"] * 2, stats["count"]
    stats |= {"mean": mean, "std": std, "sum": mean * count, "sum_sq": (std**2 + mean**2) * count}
    (out / MANIFEST_NAME).write_text(json.dumps(manifest))
    assert load_manifest(out).logmel.mean == pytest.approx(mean) and load_manifest(out).logmel.std == pytest.approx(std)
    return out


def record_evaluation_audio(monkeypatch: pytest.MonkeyPatch) -> list[torch.Tensor]:
    """A list that gets the audio (B, 1, T, mel) MBT is given by each forward in evaluation mode, in order (not
    the shape-only forwards on the meta device that count FLOPs and memory)."""
    seen: list[torch.Tensor] = []
    forward = MBT.forward

    def recording(self: MBT, video=None, audio=None, per_tower: bool = False) -> torch.Tensor:
        if not self.training and audio.device.type != "meta":
            seen.append(audio.detach().clone())
        return forward(self, video, audio, per_tower)

    monkeypatch.setattr(MBT, "forward", recording)
    return seen


def raw_evaluation_audio(shards: Path, augment: AugmentConfig, batch_size: int) -> torch.Tensor:
    """The evaluation loader's audio rows of the split with `augment`, in order, before normalization."""
    raw = augment.replace(logmel_mean=0.0, logmel_std=1.0)
    loader = build_loader(open_split(shards), False, batch_size, loader="torch", num_workers=0, augment=raw)
    return torch.cat([batch["audio"] for batch in loader])


def cli_args(checkpoint: Path, shards: Path, out: Path, batch_size: int = 2, num_workers: int = 0) -> list[str]:
    return [
        "--checkpoint", str(checkpoint), "--shards", str(shards), "--out", str(out), "--loader", "torch",
        "--batch-size", str(batch_size), "--num-workers", str(num_workers),
    ]  # fmt: skip


def assert_same(a: Results, b: Results) -> None:
    """Equal keys and labels, logits within 1e-5, metrics within 1e-6."""
    (pred_a, metrics_a), (pred_b, metrics_b) = a, b
    assert list(pred_a["keys"]) == list(pred_b["keys"])
    np.testing.assert_array_equal(pred_a["labels"], pred_b["labels"])
    np.testing.assert_allclose(pred_a["logits"], pred_b["logits"], rtol=0, atol=1e-5)
    assert metrics_a.keys() == metrics_b.keys() and metrics_a["num_samples"] == metrics_b["num_samples"]
    assert metrics_a == pytest.approx(metrics_b, rel=0, abs=1e-6)


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return save_checkpoint(tmp_path_factory.mktemp("ckpt") / "tiny.pt")


@pytest.fixture(scope="module")
def evaluated(checkpoint: Path, tmp_path_factory: pytest.TempPathFactory) -> Callable[[Path, int, int], Results]:
    """Runs `python -m mbt.evaluate` in this process once per (shards, batch size, workers) and reads its output."""
    cache: dict[tuple[Path, int, int], Results] = {}

    def run(shards: Path, batch_size: int, num_workers: int) -> Results:
        if (shards, batch_size, num_workers) not in cache:
            out = tmp_path_factory.mktemp("eval")
            assert main(cli_args(checkpoint, shards, out, batch_size, num_workers)) == 0
            cache[shards, batch_size, num_workers] = read_results(out)
        return cache[shards, batch_size, num_workers]

    return run


@pytest.mark.parametrize("multi_label", [True, False])
def test_evaluate_averages_clips_and_sorts_by_key(tmp_path, multi_label):
    expected_logits, labels = toy_logits(5).mean(axis=1), toy_labels(5, multi_label)
    expected = compute_metrics(expected_logits, labels, multi_label)
    for batch_size in (1, 2, 5):
        model = ToyModel().train()
        out = tmp_path / str(batch_size)
        batches = toy_batches(list(range(5)), batch_size, multi_label)
        metrics = evaluate(model, batches, SINGLE, multi_label, NUM_CLASSES, out_dir=out)
        assert model.training, "evaluate must give the model back in training mode"
        predictions, written = read_results(out)
        assert list(predictions["keys"]) == [f"s{i:02d}" for i in range(5)]
        np.testing.assert_allclose(predictions["logits"], expected_logits, rtol=0, atol=1e-6)
        assert predictions["logits"].dtype == np.float32
        np.testing.assert_array_equal(predictions["labels"], labels)
        assert metrics == written == pytest.approx(expected, rel=0, abs=1e-9)
        assert (out / "per_class_ap.csv").exists() == multi_label


def test_evaluate_refuses_a_sample_from_two_ranks(monkeypatch):
    monkeypatch.setattr(mbt.sharded_eval, "all_gather_objects", lambda obj: [obj, obj])
    with pytest.raises(EvaluationError, match="s00 was evaluated by ranks 0 and 1"):
        evaluate(ToyModel(), toy_batches([0], 1, True), SINGLE, True, NUM_CLASSES)


@pytest.mark.slow
def test_collectives_and_an_empty_rank_under_torchrun(tmp_path):
    """rank 1 gets no batch at all: the gather still gives rank 0 every sample."""
    run = subprocess.run(torchrun(str(SCRIPT), str(tmp_path)), capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr[-3000:]
    result = json.loads((tmp_path / "dist.json").read_text())
    assert result["gathered"] == [{"rank": 0, "world_size": 2}, {"rank": 1, "world_size": 2}]
    assert result["broadcast"] == "rank 1"
    expected = compute_metrics(toy_logits(5).mean(axis=1), toy_labels(5, True), True)
    assert result["metrics"] == pytest.approx(expected, rel=0, abs=1e-6)


@pytest.mark.slow
@pytest.mark.parametrize("split", ["eval", "train"])
def test_cli_same_for_any_batch_size_and_workers(request, evaluated, split):
    shards = request.getfixturevalue(f"{split}_shards")
    one_by_one = evaluated(shards, 1, 0)
    predictions, metrics = one_by_one
    keys = sorted(s.key for s in SplitIndex(shards).samples)
    assert metrics["num_samples"] == len(keys) == {"eval": 3, "train": 9}[split]
    assert list(predictions["keys"]) == keys
    assert predictions["logits"].shape == predictions["labels"].shape == (len(keys), TINY.num_classes)
    assert set(metrics) == {"num_samples", "mAP", "mAUC", "d_prime"}
    assert_same(one_by_one, evaluated(shards, 4, 2))


def test_cli_streamed_split_equals_its_folder(eval_shards, evaluated, checkpoint, tmp_path):
    out = tmp_path / "eval"
    assert main(cli_args(checkpoint, f"pipe:cat {eval_shards}/manifest.json", out, batch_size=2, num_workers=2)) == 0
    assert_same(evaluated(eval_shards, 1, 0), read_results(out))


@pytest.mark.slow
def test_cli_same_on_two_processes(train_shards, evaluated, checkpoint, tmp_path):
    out = tmp_path / "eval"
    cmd = torchrun("-m", "mbt.evaluate", *cli_args(checkpoint, train_shards, out, batch_size=2, num_workers=1))
    run = subprocess.run(cmd, capture_output=True, text=True, timeout=300, cwd=REPO)
    assert run.returncode == 0, run.stderr[-3000:]
    assert run.stdout.count("evaluated 9 samples x 4 clips") == 1, run.stdout
    assert (out / "per_class_ap.csv").read_text().count("\n") == 1 + TINY.num_classes
    assert_same(evaluated(train_shards, 1, 0), read_results(out))


def test_cli_normalizes_with_the_checkpoints_statistics(eval_shards, checkpoint, monkeypatch, tmp_path, caplog):
    """The model's normalization (its training split's, in the checkpoint) on a split whose statistics differ."""
    audio_seen = record_evaluation_audio(monkeypatch)
    shards = split_with_other_statistics(eval_shards, tmp_path / "eval")
    with caplog.at_level(logging.WARNING):
        assert main(cli_args(checkpoint, shards, tmp_path / "out")) == 0
    assert "log-mel normalization" not in caplog.text
    expected = (raw_evaluation_audio(shards, AUG, batch_size=2) - AUG.logmel_mean) / AUG.logmel_std
    torch.testing.assert_close(torch.cat(audio_seen), expected, rtol=0, atol=1e-5)


def test_cli_warns_that_an_older_checkpoint_uses_the_splits_statistics(eval_shards, monkeypatch, tmp_path, caplog):
    audio_seen = record_evaluation_audio(monkeypatch)
    older = save_checkpoint(tmp_path / "older.pt", augment=AUG.replace(logmel_mean=None, logmel_std=None))
    shards = split_with_other_statistics(eval_shards, tmp_path / "eval")
    with caplog.at_level(logging.WARNING):
        assert main(cli_args(older, shards, tmp_path / "out")) == 0
    assert f"{older} records no log-mel normalization (an older checkpoint): {shards} is normalized with its own" in (
        caplog.text
    )
    stats = load_manifest(shards).logmel
    expected = (raw_evaluation_audio(shards, AUG, batch_size=2) - stats.mean) / stats.std
    torch.testing.assert_close(torch.cat(audio_seen), expected, rtol=0, atol=1e-5)


def test_cli_rejects_bad_inputs(eval_shards, checkpoint, tmp_path, capsys):
    def error(checkpoint: Path, shards: Path = eval_shards) -> str:
        assert main(cli_args(checkpoint, shards, tmp_path / "out")) == 1
        return capsys.readouterr().err

    assert "no such checkpoint file" in error(tmp_path / "missing.pt")
    torch.save({"state_dict": {}}, tmp_path / "weights.pt")
    assert "not a training checkpoint" in error(tmp_path / "weights.pt")
    five_classes = save_checkpoint(tmp_path / "five.pt", TINY.replace(num_classes=5))
    assert "--model.num_classes 5, but the shards in" in error(five_classes)  # one message, shared with training
    assert str(tmp_path / "no_shards") in error(checkpoint, tmp_path / "no_shards")
    assert not (tmp_path / "out").exists()
