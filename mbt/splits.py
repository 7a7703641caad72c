"""The splits of a run, each opened once (`pipelines.open_split`: a folder, shard files or brace patterns of them,
or streamed `pipe:` URLs) before anything reads it: the `custom` preset's head takes the training split's classes
(`with_split_classes`), validation checks every split against the model (`mbt.fits.data_problems`), and training
and its evaluations read the same `Split` objects. A split that cannot be opened is not raised here: it is a problem
in the words validation lists with the others.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from mbt.config import TrainConfig
from pipelines import LoaderError, Split, open_split
from pipelines.sources import is_plain_path
from shards.layout import legacy_hint
from shards.schema import MANIFEST_NAME

SPLIT_KEYS = ("train_shards", "eval_shards")  # the config keys that name a run's splits, training's first


@dataclass(frozen=True)
class RunSplits:
    """The splits a run reads, by config key (SPLIT_KEYS order): `sources` holds each split given, as given;
    `opened` those that opened; `problems` why each other could not (one line naming its key, saying what to do)."""

    sources: dict[str, str] = field(default_factory=dict)
    opened: dict[str, Split] = field(default_factory=dict)
    problems: dict[str, str] = field(default_factory=dict)

    @property
    def train(self) -> Split | None:
        return self.opened.get("train_shards")

    @property
    def eval(self) -> Split | None:
        return self.opened.get("eval_shards")


def open_run_splits(cfg: TrainConfig, train: bool = True) -> RunSplits:
    """Each split `cfg` names, opened once: the training split (when `train`; evaluation reads none) and the
    evaluation split; an empty key names none."""
    splits = RunSplits()
    for key in SPLIT_KEYS if train else SPLIT_KEYS[1:]:
        source = getattr(cfg, key)
        if not source:
            continue
        splits.sources[key] = source
        opened = _open(key, source)
        if isinstance(opened, str):
            splits.problems[key] = opened
        else:
            splits.opened[key] = opened
    return splits


def _open(key: str, source: str) -> Split | str:
    """The split `source` (given as --`key`), or why it cannot be opened."""
    if is_plain_path(source) and not (Path(source) / MANIFEST_NAME).is_file():
        return (
            f"--{key} {source}: no {MANIFEST_NAME} there; shard the split first (tools/shard_audioset.py or "
            f"tools/shard_vggsound.py; `make demo-shards` makes the demo's) or point --{key} at a sharded split"
            + legacy_hint(source)
        )
    try:
        return open_split(source)
    except LoaderError as err:
        return f"--{key}: {err}"


def with_split_classes(cfg: TrainConfig, splits: RunSplits) -> TrainConfig:
    """`cfg` with `model.num_classes` 0 (the `custom` preset: the data's own head) set to the number of classes of
    the opened training split of `splits`; `cfg` as it is when the count is set or no training split opened
    (validation names why). Training resolves it before validating, so config.yaml and checkpoints keep the count."""
    if cfg.model.num_classes != 0 or splits.train is None:
        return cfg
    return cfg.replace(model=cfg.model.replace(num_classes=splits.train.manifest.num_classes))
