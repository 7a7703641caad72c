"""The PyTorch loader over real shards: the batch contract, fixed epoch lengths, exactly-once evaluation,
resume, augmentation, mixup and bad input."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from loader_checks import (
    CONSECUTIVE_AUG,
    SMALL_AUG,
    TIMED_AUG,
    assert_same_batches,
    check_consecutive_test_clips,
    check_consecutive_training_rows,
    check_frames_inside_the_window,
    check_synchronized_test_clips,
    rows_by_key,
    stopped_and_resumed,
    write_timed_split,
)

from pipelines import build_loader, open_split, resolve_loader
from pipelines.augment import spec_augment, train_video
from pipelines.config import AugmentConfig, LoaderError
from pipelines.mixup import mixup
from pipelines.order import train_batches
from pipelines.reading import SampleReader
from pipelines.sources import SplitIndex
from pipelines.torch_loader import TorchLoader
from pipelines.windows import eval_clips, eval_windows
from shards.manifest import load_manifest
from shards.schema import LOGMEL_DTYPE, LOGMEL_EXT

ROOT = Path(__file__).resolve().parents[2]


def loader(folder, train, batch_size=2, **kw) -> TorchLoader:
    kw.setdefault("augment", SMALL_AUG)
    kw.setdefault("num_workers", 0)
    return TorchLoader(open_split(folder), train=train, batch_size=batch_size, **kw)


def test_training_batches_follow_the_contract(train_shards):
    manifest = load_manifest(train_shards)
    batches = list(loader(train_shards, True, batch_size=3, num_workers=2))
    assert len(batches) == 3
    for batch in batches:
        assert batch["video"].shape == (3, 8, 3, 224, 224) and batch["video"].dtype == torch.float32
        assert batch["video"].min() >= -1 and batch["video"].max() <= 1
        assert batch["audio"].shape == (3, 1, 160, 128) and batch["audio"].dtype == torch.float32
        assert batch["labels"].shape == (3, manifest.num_classes) and batch["labels"].dtype == torch.float32
        assert batch["clip_index"].tolist() == [0, 0, 0] and len(batch["key"]) == 3
    keys = [k for b in batches for k in b["key"]]
    assert len(set(keys)) == 9  # 9 samples, batch 3, one rank: the epoch is the whole split


def test_a_process_with_persistent_workers_exits(train_shards):
    """The workers ignore SIGTERM (a rank ends them itself, mbt.interrupt): at exit the loader ends them the orderly
    way, or multiprocessing's exit hook would SIGTERM them and wait forever."""
    code = (
        "from loader_checks import SMALL_AUG\n"
        "from pipelines import open_split\n"
        "from pipelines.torch_loader import TorchLoader\n"
        f"loader = TorchLoader(open_split({str(train_shards)!r}), train=True, batch_size=3, augment=SMALL_AUG, "
        "num_workers=1)\n"
        "print(len(list(loader)))\n"
    )
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), str(ROOT / "tests" / "support")])}
    done = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120)
    assert (done.returncode, done.stdout, done.stderr) == (0, "3\n", "")


@pytest.mark.slow
@pytest.mark.parametrize("world_size", [1, 2, 3, 4])
@pytest.mark.parametrize("batch_size", [1, 2, 4])
def test_every_rank_has_the_same_number_of_batches(train_shards, world_size, batch_size):
    expected = train_batches(9, batch_size, world_size)
    seen = []
    for rank in range(world_size):
        run = loader(
            train_shards, True, batch_size, rank=rank, world_size=world_size, num_workers=2 if rank == 0 else 0
        )
        batches = list(run)
        assert len(run) == len(batches) == expected
        assert all(len(b["key"]) == batch_size for b in batches)
        seen += [k for b in batches for k in b["key"]]
    if batch_size * world_size <= 9:  # the split holds a global batch: no sample is read twice in an epoch
        assert len(seen) == len(set(seen))


def test_epochs_reshuffle_and_seeds_decide(train_shards):
    run = loader(train_shards, True, batch_size=3)
    first = [b["key"] for b in run]
    second = [b["key"] for b in run]  # the loader moved on to epoch 1 by itself
    assert first != second and sorted(k for b in first for k in b) == sorted(k for b in second for k in b)
    again = loader(train_shards, True, batch_size=3)
    assert [b["key"] for b in again] == first
    assert [b["key"] for b in loader(train_shards, True, batch_size=3, seed=7)] != first


@pytest.mark.slow
@pytest.mark.parametrize("world_size", [1, 2, 3, 4])
@pytest.mark.parametrize("batch_size", [1, 2, 5])
def test_evaluation_sees_every_sample_once(eval_shards, train_shards, world_size, batch_size):
    for folder in (eval_shards, train_shards):
        keys = {s.key for s in SplitIndex(folder).samples}
        rows = {}
        for rank in range(world_size):
            part = rows_by_key(
                loader(folder, False, batch_size, rank=rank, world_size=world_size, num_workers=rank % 2 * 2)
            )
            assert not set(part) & set(rows)
            rows.update(part)
        assert set(rows) == {(k, c) for k in keys for c in range(SMALL_AUG.num_test_clips)}


def test_evaluation_tensors_do_not_depend_on_ranks_workers_or_batch(eval_shards):
    reference = rows_by_key(loader(eval_shards, False, batch_size=5))
    other = {}
    for rank in range(2):
        other.update(rows_by_key(loader(eval_shards, False, batch_size=1, rank=rank, world_size=2, num_workers=2)))
    assert set(other) == set(reference)
    for ident, row in reference.items():
        for name in ("video", "audio", "labels"):
            assert torch.equal(row[name], other[ident][name]), (ident, name)


def test_evaluation_clips_are_evenly_spaced_windows(eval_shards):
    rows = rows_by_key(loader(eval_shards, False, batch_size=1))
    manifest = load_manifest(eval_shards)
    key = SplitIndex(eval_shards).samples[0].key
    starts = eval_windows(200, 160, 4)
    assert starts == [0, 13, 26, 40]  # DMVR: a float linspace cast to int

    mean, std = manifest.logmel.mean, manifest.logmel.std
    full = (rows[(key, 0)]["audio"][0] * std + mean).numpy()
    shifted = (rows[(key, 1)]["audio"][0] * std + mean).numpy()
    assert np.allclose(full[13:160], shifted[: 160 - 13], atol=1e-3)
    # "spread": 8 frames from the 1.6 s window's eighths; rows 0 and 40 of 200 pick stored frames (of 8) as below,
    # and each stored frame the two share is shown the same in both (the others differ where the box moves)
    (first, _), _, _, (last, _) = eval_clips(SMALL_AUG, manifest.features)
    assert first.tolist() == [0, 1, 2, 2, 3, 4, 5, 6] and last.tolist() == [2, 2, 3, 4, 5, 6, 6, 7]
    shared = [(i, j) for i, a in enumerate(first) for j, b in enumerate(last) if a == b]
    assert len(shared) == 9  # stored frame 2 (twice in each: 4 pairs), 3, 4, 5 and 6 (twice in the last: 2 pairs)
    for i, j in shared:
        assert torch.equal(rows[(key, 0)]["video"][i], rows[(key, 3)]["video"][j]), (i, j)


@pytest.mark.slow
def test_resume_continues_the_stream(train_shards):
    kw = {"batch_size": 1, "num_workers": 2}
    uninterrupted = list(loader(train_shards, True, **kw))
    batches, state, resumed = stopped_and_resumed(lambda: loader(train_shards, True, **kw), 4)
    assert state == {"epoch": 0, "batches": 4}
    assert_same_batches(batches, uninterrupted)
    assert resumed.state_dict() == {"epoch": 1, "batches": 0}


def test_one_crop_and_flip_for_all_frames_of_a_clip():
    image = torch.randint(0, 256, (3, 64, 96), dtype=torch.uint8)
    frames = image.expand(8, 3, 64, 96).contiguous()
    for seed in range(5):
        out = train_video(frames, AugmentConfig(crop_px=32), np.random.default_rng(seed))
        assert out.shape == (8, 3, 32, 32) and all(torch.equal(out[0], f) for f in out)


def test_spec_augment_masks_a_band_of_each_kind():
    audio = torch.ones(1, 160, 128)
    aug = AugmentConfig(freq_mask_px=48, time_mask_px=40, num_time_masks=1)
    masked = spec_augment(audio.clone(), aug, np.random.default_rng(3))
    zero_bins = (masked[0] == 0).all(0).sum().item()
    zero_frames = (masked[0] == 0).all(1).sum().item()
    assert 0 < zero_bins < 48 and 0 < zero_frames < 40


def test_frames_used_below_stored_picks_a_sorted_subset(train_shards):
    batch = next(iter(loader(train_shards, True, batch_size=2, augment=SMALL_AUG.replace(frames_used=4))))
    assert batch["video"].shape == (2, 4, 3, 224, 224)
    with pytest.raises(LoaderError, match="frames_used=9"):
        loader(train_shards, True, augment=SMALL_AUG.replace(frames_used=9))


def test_mixup_uses_one_lambda_for_both_modalities():
    gen = torch.Generator().manual_seed(0)
    batch = {
        "video": torch.rand(4, 2, 3, 8, 8, generator=gen),
        "audio": torch.rand(4, 1, 16, 8, generator=gen),
        "labels": torch.tensor([0, 2, 1, 2]),
        "key": list("abcd"),
    }
    mixed = mixup(batch, alpha=0.5, num_classes=3, rng=np.random.default_rng(0))
    lam = mixed["mixup_lambda"]
    assert 0 < lam < 1
    assert torch.allclose(mixed["video"], lam * batch["video"] + (1 - lam) * batch["video"].flip(0))
    assert torch.allclose(mixed["audio"], lam * batch["audio"] + (1 - lam) * batch["audio"].flip(0))
    assert torch.allclose(mixed["labels"].sum(1), torch.ones(4)) and mixed["labels"].shape == (4, 3)
    assert mixup(batch, alpha=0.0, num_classes=3, rng=np.random.default_rng(0)) is batch


def test_auto_picks_torch_without_cuda(train_shards):
    if not torch.cuda.is_available():
        assert resolve_loader("auto") == "torch"
    assert isinstance(build_loader(open_split(train_shards), True, 2, loader="torch", augment=SMALL_AUG), TorchLoader)
    with pytest.raises(LoaderError, match="--loader"):
        resolve_loader("fast")


# Bad input: each case gives an error that names the shard (and key) and says what to do.


@pytest.fixture
def damaged(eval_shards, tmp_path):
    copy = tmp_path / "eval"
    shutil.copytree(eval_shards, copy)
    return copy


def _first_jpeg(folder):
    ref = SplitIndex(folder).samples[0]
    return folder / "shard-000000.tar", ref.key, ref.members["frame03.jpg"]


def test_corrupt_sample_names_shard_and_key_or_is_skipped(damaged):
    tar, key, (offset, size) = _first_jpeg(damaged)
    data = bytearray(tar.read_bytes())
    data[offset : offset + size] = b"\0" * size
    tar.write_bytes(bytes(data))
    with pytest.raises(LoaderError, match=rf"shard-000000\.tar: sample {key}: bad JPEG.*--skip-bad-samples"):
        list(loader(damaged, False, batch_size=2, num_workers=2))
    run = loader(damaged, False, batch_size=2, skip_bad_samples=True)
    rows = rows_by_key(run)
    assert {k for k, _ in rows} == {s.key for s in SplitIndex(damaged).samples} - {key}
    assert len(run.skipped) == 1 and key in run.skipped[0]
    train_run = loader(damaged, True, batch_size=3, skip_bad_samples=True)
    assert len(next(iter(train_run))["key"]) == 3  # training replaces the bad sample: batches stay full


def test_truncated_shard(damaged):
    tar = damaged / "shard-000000.tar"
    tar.write_bytes(tar.read_bytes()[:5000])
    with pytest.raises(LoaderError, match=r"shard-000000\.tar: 5000 bytes, the manifest says"):
        loader(damaged, False)


def test_missing_index_file(damaged):
    (damaged / "shard-000001.idx").unlink()
    with pytest.raises(LoaderError, match=r"shard-000001\.idx: index file missing .*wds2idx"):
        loader(damaged, False)


def test_manifest_that_does_not_match_the_shards(damaged):
    data = json.loads((damaged / "manifest.json").read_text())
    data["shards"][1]["num_samples"] = 5
    (damaged / "manifest.json").write_text(json.dumps(data))
    with pytest.raises(LoaderError, match="manifest does not match the shards"):
        loader(damaged, False)


def test_empty_shard_list(damaged):
    data = json.loads((damaged / "manifest.json").read_text())
    data["shards"] = []
    (damaged / "manifest.json").write_text(json.dumps(data))
    with pytest.raises(LoaderError, match="lists no shards"):
        loader(damaged, False)


def test_shards_of_another_schema_version(damaged):
    data = json.loads((damaged / "manifest.json").read_text())
    data["schema_version"] = 99
    (damaged / "manifest.json").write_text(json.dumps(data))
    with pytest.raises(LoaderError, match=r"schema version 99.*re-shard"):
        loader(damaged, False)


# Where shards come from: folders, lists of folders, shard files, brace patterns, file: URLs.


def test_brace_pattern_selects_shards(train_shards):
    pattern = str(train_shards / "shard-{000001..000002}.tar")
    index = SplitIndex(pattern)
    whole = SplitIndex(train_shards)
    assert [p.name for p in index.shard_paths] == ["shard-000001.tar", "shard-000002.tar"]
    assert {s.key for s in index.samples} < {s.key for s in whole.samples} and len(index) == 4
    assert index.manifest.logmel == whole.manifest.logmel  # the split's normalization, not the subset's
    rows = rows_by_key(loader(f"file:{pattern}", False, batch_size=3))
    assert {k for k, _ in rows} == {s.key for s in index.samples}


def test_list_of_folders_is_one_split(train_shards, eval_shards):
    index = SplitIndex([train_shards, eval_shards])
    assert len(index) == 9 + 3 and len(index.index_paths) == 5 + 2
    train, evaluation = load_manifest(train_shards).logmel, load_manifest(eval_shards).logmel
    assert index.manifest.logmel == train + evaluation
    assert len(list(loader([train_shards, eval_shards], True, batch_size=4))) == 3


def test_remote_urls_and_bad_sources_say_what_to_do(train_shards):
    with pytest.raises(LoaderError, match=r"not a local path; stream shards with a pipe: URL .* or mount the bucket"):
        SplitIndex("s3://bucket/shard-000000.tar")
    with pytest.raises(LoaderError, match=r"\['shard-000099\.tar'\] not in its manifest"):
        SplitIndex(str(train_shards / "shard-000099.tar"))
    with pytest.raises(LoaderError, match="no shards given"):
        SplitIndex([])


def test_training_frames_lie_inside_the_audio_window(tmp_path):
    split = open_split(write_timed_split(tmp_path / "timed"))
    check_frames_inside_the_window(TorchLoader(split, True, 3, augment=TIMED_AUG, num_workers=0))


def test_test_clips_are_synchronized_windows(tmp_path):
    split = open_split(write_timed_split(tmp_path / "timed"))
    check_synchronized_test_clips(TorchLoader(split, False, 2, augment=TIMED_AUG, num_workers=0))


def test_consecutive_training_rows_start_with_their_audio(tmp_path):
    check_consecutive_training_rows(loader(write_timed_split(tmp_path / "timed"), True, 3, augment=CONSECUTIVE_AUG))


def test_consecutive_test_clips_are_each_modalitys_windows(tmp_path):
    check_consecutive_test_clips(loader(write_timed_split(tmp_path / "timed"), False, 2, augment=CONSECUTIVE_AUG))


def test_fixed_normalization_ignores_the_splits_statistics(eval_shards):
    """scenic's (x - 1.102) / 2.762, whatever the manifest's mean and std."""
    aug = SMALL_AUG.replace(logmel_mean=1.102, logmel_std=2.762)
    rows = rows_by_key(loader(eval_shards, False, batch_size=3, augment=aug))
    index = SplitIndex(eval_shards)
    manifest = index.manifest
    assert (manifest.logmel.mean, manifest.logmel.std) != (1.102, 2.762)
    ref = index.samples[0]
    raw = SampleReader(index).read(ref, [LOGMEL_EXT])[LOGMEL_EXT]
    stored = np.frombuffer(raw, LOGMEL_DTYPE).reshape(manifest.features.logmel_shape)
    for clip, start in enumerate(eval_windows(200, 160, 4)):
        want = (stored[start : start + 160].astype(np.float32) - np.float32(1.102)) / np.float32(2.762)
        np.testing.assert_allclose(rows[(ref.key, clip)]["audio"][0].numpy(), want, rtol=0, atol=1e-6)
