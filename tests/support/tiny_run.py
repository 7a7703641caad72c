"""A tiny MBT run folder over the demo shards, as training leaves it (config.yaml, checkpoints/, the class record),
with seeded weights and a random head: for the tests of prediction and export, which need a model, not a good one;
and the demo's evaluation videos by shard key."""

from __future__ import annotations

from pathlib import Path

import torch

from experiments.demo_data import DemoDataset
from mbt.checkpoint import save_checkpoint
from mbt.classes import class_record
from mbt.config import TrainConfig, config_to_dict, save_config
from mbt.model import MBT, MBTConfig
from pipelines.config import AugmentConfig
from shards.manifest import load_manifest

TINY = MBTConfig(
    embed_dim=32, depth=2, num_heads=2, fusion_layer=1, num_frames=8, img_size=32, audio_frames=160, num_mel_bins=128
)
# 2 s demo clips: 200 log-mel frames, 8 frames; 160 of them fed; the log-mel normalization a training records.
TINY_AUG = AugmentConfig(audio_frames=160, crop_px=32, eval_short_side_px=36, logmel_mean=-3.5, logmel_std=4.25)


def make_run(
    train_shards: Path, run_dir: Path, model: MBTConfig = TINY, features: bool = True, eval_shards: Path | None = None
) -> Path:
    """`run_dir` holding config.yaml (naming `eval_shards` if given) and checkpoints/step-00000001.pt of a model of
    `model`'s sizes fitted to the classes of `train_shards`, with the split's feature parameters as training records
    them (`features`; False: as an older checkpoint, without)."""
    manifest = load_manifest(train_shards)
    cfg = TrainConfig(
        model=model.replace(num_classes=manifest.num_classes), augment=TINY_AUG, train_shards=str(train_shards),
        out_dir=str(run_dir), eval_shards=str(eval_shards or ""),
    )  # fmt: skip
    torch.manual_seed(0)
    net = MBT(cfg.model)
    torch.nn.init.normal_(net.head.weight, std=0.5)
    save_config(cfg, run_dir / "config.yaml")
    state = {
        "model": net.state_dict(), "config": config_to_dict(cfg), "step": 1,
        "data": class_record(manifest, str(train_shards)),
    }  # fmt: skip
    if features:
        state["features"] = {"params": manifest.features.to_dict(), "schema_version": manifest.schema_version}
    save_checkpoint(run_dir, 1, state, keep=1)
    return run_dir


def eval_videos(demo: DemoDataset) -> dict[str, Path]:
    """{shard key: video} of the demo's evaluation clips (AudioSet keys: YTID_startms)."""
    return {f"{c.ytid}_0": demo.videos_dir / f"{c.ytid}.mp4" for c in demo.clips if c.split == "eval"}
