"""Helpers for loader tests: the augmentation sizes that fit 2 s demo clips, and reading a loader out."""

from __future__ import annotations

import dataclasses
import json
import math
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torchvision.io import encode_jpeg

from pipelines.config import AugmentConfig
from shards.manifest import LogmelStats, Manifest, load_manifest
from shards.schema import FeatureParams, Sample, encode_sample, sample_exts
from shards.tar import iter_tar_samples
from shards.writer import ShardWriter

# 2 s clips: 200 log-mel frames, so 160-frame windows (4 test clips start at 0, 13, 26, 40) and smaller masks.
SMALL_AUG = AugmentConfig(audio_frames=160, time_mask_px=40, freq_mask_px=24, num_time_masks=4)  # time masks: on


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


TIMED = FeatureParams(num_frames=20, short_side_px=64, segment_s=10.0)  # 2 frames a second, 1000 log-mel frames
TIMED_AUG = AugmentConfig(
    crop_px=48, eval_short_side_px=64, num_freq_masks=0, num_time_masks=0, color_prob=0.0, color_drop_prob=0.0,
    logmel_mean=0.0, logmel_std=1.0,
)  # fmt: skip


def frame_value(i: int) -> int:
    return 5 + 12 * i


def write_timed_split(out: Path, samples: int = 6) -> Path:
    """A split whose data tells the time: frame i of every clip is uniformly grey `frame_value(i)`, log-mel row t
    holds t (loaded with TIMED_AUG's normalization, the audio a row shows gives its window's start)."""
    out.mkdir(parents=True)
    frames = [bytes(encode_jpeg(torch.full((3, 64, 96), frame_value(i), dtype=torch.uint8)).numpy()) for i in range(20)]
    logmel = np.repeat(np.arange(TIMED.fbank_frames, dtype=np.float16)[:, None], TIMED.num_mel_bins, axis=1)
    with ShardWriter(out / "shard-000000.tar") as writer:
        for n in range(samples):
            writer.add(
                f"clip{n}", encode_sample(Sample(f"clip{n}", frames, logmel, np.array([n % 2], np.int32)), TIMED)
            )
        info = writer.close()
    classes = [{"index": c, "id": f"c{c}", "name": f"class {c}"} for c in range(2)]
    Manifest("timed", "train", TIMED, classes, True, [info], LogmelStats(1, 0.0, 1.0), [], {}).write(out)
    return out


def shown_frames(video: torch.Tensor) -> list[int]:
    """The stored frame indices a (F, 3, H, W) normalized clip of the timed split shows."""
    grey = ((video.float().mean(dim=(1, 2, 3)) * 0.5 + 0.5) * 255).cpu().numpy()
    return [round(float(g - 5) / 12) for g in grey]


def check_frames_inside_the_window(loader: Any) -> None:
    """Every training row of the timed split shows frames_used frames, the k-th from the k-th of equal parts of its
    audio window (the stored frame nearest some time in it), in time order; and the windows and jitter vary."""
    used, window = TIMED_AUG.frames_used, TIMED_AUG.audio_frames
    seen = set()
    for batch in loader:
        for video, audio in zip(batch["video"], batch["audio"], strict=True):
            start = int(audio[0, 0, 0])
            frames = shown_frames(video)
            assert len(frames) == used and frames == sorted(frames)
            for k, i in enumerate(frames):
                low = math.floor((start + k * window / used) * TIMED.num_frames / TIMED.fbank_frames)
                high = math.floor((start + (k + 1) * window / used) * TIMED.num_frames / TIMED.fbank_frames)
                assert low <= i <= min(high, TIMED.num_frames - 1), (start, k, frames)
            seen.add((start, tuple(frames)))
    assert len(seen) > 1


def check_synchronized_test_clips(loader: Any) -> None:
    """Each of the 4 test clips of a sample shows its own audio window and the frames from inside it."""
    from pipelines.windows import eval_windows, spread_ids

    starts = eval_windows(TIMED.fbank_frames, TIMED_AUG.audio_frames, TIMED_AUG.num_test_clips)
    rows = 0
    for batch in loader:
        for video, audio, clip in zip(batch["video"], batch["audio"], batch["clip_index"].tolist(), strict=True):
            assert int(audio[0, 0, 0]) == starts[clip]
            assert shown_frames(video) == spread_ids(starts[clip], TIMED_AUG, TIMED, None).tolist()
            rows += 1
    assert rows == 6 * TIMED_AUG.num_test_clips


# scenic's sampling on the timed split: 4 frames at stride 2 (4 s at 2 per second) from where the audio starts.
CONSECUTIVE_AUG = TIMED_AUG.replace(frames_used=4, frame_sampling="consecutive", frame_stride=2, audio_pad="repeat")


def check_consecutive_training_rows(loader: Any, epochs: int = 2) -> None:
    """Every training row of the timed split shows 4 stored frames at stride 2 from a first frame drawn from
    0..13, and the log-mel from that frame's moment on (row 50 · first), repeated from the clip's start past its
    end (DMVR); over `epochs` epochs the first frames vary and some audio windows wrap."""
    from pipelines.windows import first_frame_choices, synced_audio_start

    offsets, rows = [0, 2, 4, 6], TIMED.fbank_frames
    firsts, wrapped = set(), False
    for _ in range(epochs):
        for batch in loader:
            for video, audio in zip(batch["video"], batch["audio"], strict=True):
                frames = shown_frames(video)
                first = frames[0]
                assert frames == [first + k for k in offsets]
                assert 0 <= first < first_frame_choices(CONSECUTIVE_AUG, TIMED) == 14
                start = synced_audio_start(first, TIMED)
                shown = audio[0, :, 0].round().int().tolist()
                assert shown == [(start + j) % rows for j in range(CONSECUTIVE_AUG.audio_frames)], (first, start)
                firsts.add(first)
                wrapped |= start + CONSECUTIVE_AUG.audio_frames > rows
    assert len(firsts) > 1 and wrapped


def check_consecutive_test_clips(loader: Any) -> None:
    """Test clip k of each sample of the timed split shows the frames from DMVR's k-th of 4 evenly spaced video
    windows (of 4 · 2 frames over 20: 0, 4, 8, 12) and the k-th audio window (0, 66, 133, 200)."""
    rows = 0
    for batch in loader:
        for video, audio, clip in zip(batch["video"], batch["audio"], batch["clip_index"].tolist(), strict=True):
            first, start = (0, 4, 8, 12)[clip], (0, 66, 133, 200)[clip]
            assert shown_frames(video) == [first + k for k in (0, 2, 4, 6)]
            assert audio[0, :, 0].round().int().tolist() == list(range(start, start + CONSECUTIVE_AUG.audio_frames))
            rows += 1
    assert rows == 6 * CONSECUTIVE_AUG.num_test_clips
