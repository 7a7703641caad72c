"""How a trained model is fed when evaluated or served with `--preset NAME` (`mbt.evaluate`, `tools/predict.py`):
the preset's clips instead of those its checkpoint records (`--preset scenic_as`: a converted scenic checkpoint).
"""

from __future__ import annotations

from mbt.config import TrainConfig, preset
from mbt.config_io import ConfigError
from mbt.model import MBTConfig
from mbt.validate import recipe_problems
from pipelines.config import AugmentConfig


def preset_augment(name: str, trained: AugmentConfig) -> AugmentConfig:
    """The preset's AugmentConfig (clip sampling, audio window and padding, evaluation crops, test clips), normalized
    by the log-mel statistics the preset fixes (scenic_as: scenic's) or else by the model's own (`trained`'s);
    ConfigError for an unknown preset."""
    chosen = preset(name).augment
    return chosen.replace(
        logmel_mean=trained.logmel_mean if chosen.logmel_mean is None else chosen.logmel_mean,
        logmel_std=trained.logmel_std if chosen.logmel_std is None else chosen.logmel_std,
    )


def preset_feed(name: str, model: MBTConfig, trained: AugmentConfig, where: str) -> AugmentConfig:
    """`preset_augment(name, trained)` for `model` (read from `where`); ConfigError naming what differs when the
    preset's inputs do not fit the model (crop size, audio frames, frames per clip)."""
    augment = preset_augment(name, trained)
    if problems := recipe_problems(TrainConfig(model=model, augment=augment), train=False):
        raise ConfigError(f"--preset {name} does not fit {where}: " + "; ".join(problems))
    return augment
