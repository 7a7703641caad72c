"""Helpers for loader tests: the augmentation sizes that fit 2 s demo clips, and reading a loader out."""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from pipelines.config import AugmentConfig
from shards.manifest import load_manifest
from shards.schema import sample_exts
from shards.tar import iter_tar_samples
from shards.writer import ShardWriter

# 2 s clips: 200 log-mel frames, so 160-frame windows (4 test clips start at 0, 13, 27, 40) and smaller masks.
SMALL_AUG = AugmentConfig(audio_frames=160, time_mask_px=40, freq_mask_px=24)


def rows_by_key(loader: Any) -> dict[tuple[str, int], dict[str, torch.Tensor]]:
    """{(key, clip_index): row} over one pass of an evaluation loader; fails on a (key, clip) seen twice."""
    rows: dict[tuple[str, int], dict[str, torch.Tensor]] = {}
    for batch in loader:
        for i, key in enumerate(batch["key"]):
            ident = (key, int(batch["clip_index"][i]))
            assert ident not in rows, f"{ident} seen twice"
            rows[ident] = {name: batch[name][i] for name in ("video", "audio", "labels")}
    return rows


def stopped_and_resumed(make_loader: Callable[[], Any], stop_after: int) -> tuple[list[dict], dict, Any]:
    """An epoch read by a training loader stopped after `stop_after` batches and then by a new one resumed from its
    state (through JSON, as a checkpoint keeps it): (all the batches, the state, the resumed loader)."""
    first = make_loader()
    stream = iter(first)
    head = [next(stream) for _ in range(stop_after)]
    state = first.state_dict()
    resumed = make_loader()
    resumed.load_state_dict(json.loads(json.dumps(state)))
    return head + list(resumed), state, resumed


def assert_same_batches(got: list[dict], want: list[dict]) -> None:
    """The same keys and the same video, audio and labels, batch by batch."""
    assert len(got) == len(want)
    for a, b in zip(got, want, strict=True):
        assert a["key"] == b["key"]
        for name in ("video", "audio", "labels"):
            assert torch.equal(a[name], b[name]), name


def rewrite_split(source: Path, out: Path, change: Callable[[dict[str, bytes]], dict[str, bytes]]) -> Path:
    """A copy of the split in `source` at `out`, each sample's members {ext: payload} passed through `change`
    (written by the shard writer: the manifest and index files match the new shards)."""
    manifest = load_manifest(source)
    out.mkdir()
    shards = []
    for info in manifest.shards:
        with ShardWriter(out / info.name) as writer:
            for key, members in iter_tar_samples(source / info.name):
                members = change(members)
                writer.add(key, [(f"{key}.{ext}", members[ext]) for ext in sample_exts(manifest.features.num_frames)])
            shards.append(writer.close())
    dataclasses.replace(manifest, shards=shards).write(out)
    return out
