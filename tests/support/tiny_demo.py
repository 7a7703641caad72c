"""The demo preset cut to a few steps on the session's 2 s demo clips (the experiments' tests)."""

from __future__ import annotations

from mbt.config import TrainConfig, preset


def tiny_base() -> TrainConfig:
    """The demo preset cut to a few steps on 2 s clips, with no loader processes."""
    base = preset("demo")
    return base.replace(
        model=base.model.replace(audio_frames=192),
        augment=base.augment.replace(audio_frames=192, time_mask_px=16, num_test_clips=1),
        batch_size=4,
        num_workers=0,
        epochs=1,
        eval_every_epochs=1,
        max_steps=2,
    )
