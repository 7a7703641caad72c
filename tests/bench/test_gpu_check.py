"""tools/gpu_check.py's dry run (tiny model, CPU, DALI on the CPU, a few clips), so that the one prepared GPU run
cannot rot: every part runs and the results folder holds its figures."""

from __future__ import annotations

import json

import pytest
from conftest import load_tool

from pipelines import dali_available


@pytest.mark.slow
def test_dry_run_writes_every_parts_results(tmp_path):
    gpu_check = load_tool("gpu_check")
    out = tmp_path / "results"
    parts = "equal,loaders,sdpa,train,compile"  # `tests` runs pytest itself: left to the GPU run
    args = ["--dry-run", "--out", str(out), "--data", str(tmp_path / "data"), "--clips", "8", "--parts", parts]
    assert gpu_check.main(args) == 0
    results = json.loads((out / "results.json").read_text())
    parts = results["parts"]
    assert results["dry_run"] and parts["split"]["clips"] == 8
    assert not [name for name, part in parts.items() if "error" in part], parts
    assert parts["loaders"]["torch_train"]["clips_per_s"] > 0
    assert parts["sdpa"]["fastest"] in ("flash", "cudnn", "efficient", "math")
    assert parts["train"]["torch"]["loader_vs_synthetic"] > 0
    assert "note" in parts["compile"]
    if dali_available():
        assert parts["equal"]["within_tolerance"]
        assert parts["loaders"]["dali_train"]["cpu_ms_per_clip"] > 0 and parts["train"]["dali"]["real_clips_s"] > 0
    assert (out / "summary.md").read_text().startswith("# GPU check")
    assert "loader_vs_synthetic" in results["last_line"]


def test_photo_split_is_a_readable_split(tmp_path):
    from bench.photo_split import write_photo_split
    from pipelines import open_split
    from pipelines.config import AugmentConfig
    from pipelines.torch_loader import TorchLoader
    from shards.schema import FeatureParams

    features = FeatureParams(num_frames=4, short_side_px=64, segment_s=2.0)
    split = open_split(write_photo_split(tmp_path / "split", 5, features, num_classes=7, shard_size=2))
    assert len(split) == 5 and len(split.manifest.shards) == 3 and split.manifest.num_classes == 7
    aug = AugmentConfig(crop_px=48, eval_short_side_px=64, frames_used=2, audio_frames=128)
    batch = next(iter(TorchLoader(split, True, 5, num_workers=0, augment=aug)))
    assert batch["video"].shape == (5, 2, 3, 48, 48) and batch["video"].std() > 0.1  # textured, not flat
