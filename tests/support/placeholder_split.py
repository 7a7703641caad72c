"""A split that opens as a real one (`pipelines.open_split`: its manifest, shards of the sizes it lists, their index
files) but whose samples hold empty members: what validation reads, which opens a split and never a sample."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from shards.manifest import LogmelStats, Manifest
from shards.schema import SHARD_PATTERN, FeatureParams, sample_exts
from shards.writer import ShardWriter


def write_placeholder_split(
    folder: Path, features: FeatureParams, classes: list[dict[str, Any]], multi_label: bool = True, shards: int = 1
) -> Path:
    """`folder` holding manifest.json of `features` and `classes` and `shards` shards of one placeholder sample."""
    folder.mkdir(parents=True, exist_ok=True)
    infos = []
    for number in range(shards):
        key = f"clip{number}"
        with ShardWriter(folder / SHARD_PATTERN.format(number)) as writer:
            writer.add(key, [(f"{key}.{ext}", b"") for ext in sample_exts(features.num_frames)])
            infos.append(writer.close())
    Manifest(
        dataset="audioset", split=folder.name, features=features, classes=classes, multi_label=multi_label,
        shards=infos, logmel=LogmelStats(), failures=[], job={},
    ).write(folder)  # fmt: skip
    return folder
