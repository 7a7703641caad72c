"""tools/bench_train.py and `bench.train`: loader-fed against synthetic-fed training at the tiny size, on the demo's
training shards."""

from __future__ import annotations

from pathlib import Path

import pytest
from conftest import load_tool

from bench.train import model_config
from shards.manifest import load_manifest

bench_train = load_tool("bench_train")


@pytest.mark.slow  # trains for the benchmark: ~15 s
def test_bench_train_prints_the_ratio(train_shards: Path, capsys: pytest.CaptureFixture[str]) -> None:
    args = ["--size", "tiny", "--steps", "2", "--warmup", "1", "--blocks", "2", "--batch", "2", "--crop", "64"]
    args += ["--workers", "1", "--device", "cpu", "--loader", "torch", "--shards", str(train_shards)]
    assert bench_train.main(args) == 0
    lines = capsys.readouterr().out.strip().splitlines()
    pairs = dict(pair.split("=") for pair in lines[-1].split())
    assert float(pairs["loader_vs_synthetic"]) > 0 and float(pairs["loader_vs_synthetic_median"]) > 0
    assert float(pairs["real_clips_s"]) > 0 and float(pairs["synthetic_clips_s"]) > 0
    assert "real feed: torch loader, 1 workers" in "\n".join(lines)


def test_model_fits_the_shards(train_shards: Path) -> None:
    manifest = load_manifest(train_shards)
    cfg = model_config("tiny", manifest)
    assert cfg.num_classes == manifest.num_classes
    assert cfg.num_frames == manifest.features.num_frames
    assert (cfg.img_size, cfg.audio_frames) == (224, min(800, manifest.features.fbank_frames))
    small = model_config("tiny", manifest, frames=2, crop=32, audio_frames=64)
    assert (small.num_frames, small.img_size, small.audio_frames) == (2, 32, 64)


def test_bench_train_help(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exit_info:
        bench_train.main(["--help"])
    assert exit_info.value.code == 0
    assert "loader_vs_synthetic" in capsys.readouterr().out
