"""The DALI loader over real shards, on the CPU: the torch loader's evaluation tensors, exactly-once evaluation,
equal training epochs on every rank, one crop per clip, SpecAugment, resume and bad input; and on the GPU where
there is one."""

from __future__ import annotations

import json
import logging
import subprocess
import sys
import threading

import numpy as np
import pytest
import torch
from conftest import REPO, shard_demo_split
from loader_checks import (
    CONSECUTIVE_AUG,
    SMALL_AUG,
    TIMED_AUG,
    check_consecutive_test_clips,
    check_consecutive_training_rows,
    check_frames_inside_the_window,
    check_synchronized_test_clips,
    rewrite_split,
    rows_by_key,
    write_timed_split,
)

from pipelines import open_split
from pipelines.config import LoaderError
from pipelines.order import eval_range, train_batches
from pipelines.reading import SampleReader
from pipelines.sources import SplitIndex
from pipelines.torch_loader import TorchLoader
from shards.manifest import load_manifest
from shards.schema import LOGMEL_DTYPE, LOGMEL_EXT, frame_ext

pytestmark = pytest.mark.dali
pytest.importorskip("nvidia.dali")


from pipelines.dali_loader import DaliLoader  # noqa: E402

# Measured on these shards (DALI 2.4 CPU decoder vs torchvision 0.26 decode_jpeg, both libjpeg-turbo): video and
# audio are bit-identical. The bounds leave room for one or two JPEG decode LSBs on other builds.
VIDEO_MAX_DIFF = 2 / 127.5
VIDEO_MEAN_DIFF = 0.01
AUDIO_ATOL = 1e-6


def dali(folder, train, batch_size=2, **kw) -> DaliLoader:
    kw.setdefault("augment", SMALL_AUG)
    return DaliLoader(open_split(folder), train=train, batch_size=batch_size, **kw)


def assert_video_close(got: torch.Tensor, want: torch.Tensor, max_diff: float, mean_diff: float) -> None:
    diff = (got.cpu() - want).abs()
    assert diff.max() <= max_diff and diff.mean() <= mean_diff, (diff.max().item(), diff.mean().item())


@pytest.fixture(scope="module")
def torch_rows(train_shards):
    """{(key, clip): row} of the torch loader's evaluation of the 9 training clips (the reference)."""
    return rows_by_key(TorchLoader(open_split(train_shards), False, 5, augment=SMALL_AUG, num_workers=0))


@pytest.fixture(scope="module")
def shards_of_4(demo, tmp_path_factory):
    """The 9 training clips in 3 shards of 4, 4 and 1 samples."""
    return shard_demo_split(demo, tmp_path_factory.mktemp("dali") / "train4", "train", shard_size=4)


# Evaluation


@pytest.mark.slow
@pytest.mark.parametrize("world_size", [1, 2])
@pytest.mark.parametrize("batch_size", [1, 3, 4])
def test_evaluation_gives_the_torch_loaders_tensors(train_shards, torch_rows, world_size, batch_size):
    for rank in range(world_size):
        kw = {"rank": rank, "world_size": world_size, "augment": SMALL_AUG}
        reference = list(TorchLoader(open_split(train_shards), False, batch_size, num_workers=0, **kw))
        loader = DaliLoader(open_split(train_shards), False, batch_size, **kw)
        batches = list(loader)
        assert len(batches) == len(reference) == len(loader)
        for got, want in zip(batches, reference, strict=True):
            assert got["key"] == want["key"]
            assert torch.equal(got["clip_index"], want["clip_index"])
            assert got["labels"].dtype == torch.float32 and torch.equal(got["labels"], want["labels"])
            assert got["audio"].shape == want["audio"].shape and got["audio"].dtype == torch.float32
            torch.testing.assert_close(got["audio"], want["audio"], rtol=0, atol=AUDIO_ATOL)
            assert got["video"].shape == want["video"].shape and got["video"].dtype == torch.float32
            assert_video_close(got["video"], want["video"], VIDEO_MAX_DIFF, VIDEO_MEAN_DIFF)


def test_evaluation_resize_and_frame_windows_match_the_torch_loader(train_shards):
    """Shards at 256 px evaluated at 240 px, a 200 px crop, 4 of 8 frames in 3 clips. The resampling filters
    differ (DALI's vs torchvision's antialiased bilinear): measured max 19/255 and mean 0.03/255 of the pixel range."""
    aug = SMALL_AUG.replace(eval_short_side_px=240, crop_px=200, frames_used=4, num_test_clips=3)
    want = rows_by_key(TorchLoader(open_split(train_shards), False, 4, augment=aug, num_workers=0))
    got = rows_by_key(DaliLoader(open_split(train_shards), False, 4, augment=aug))
    assert set(got) == set(want) and got[next(iter(got))]["video"].shape == (4, 3, 200, 200)
    for ident, row in want.items():
        torch.testing.assert_close(got[ident]["audio"], row["audio"], rtol=0, atol=AUDIO_ATOL)
        assert_video_close(got[ident]["video"], row["video"], max_diff=0.25, mean_diff=VIDEO_MEAN_DIFF)


def test_consecutive_clips_and_repeated_audio_give_the_torch_loaders_tensors(train_shards):
    """3 frames at stride 2 of the 8 stored, and the last test clip's window reaching the 2 padded log-mel rows of
    the 2 s clips (198 computed), repeated from the clip's start."""
    aug = SMALL_AUG.replace(frames_used=3, frame_sampling="consecutive", frame_stride=2, audio_pad="repeat")
    want = rows_by_key(TorchLoader(open_split(train_shards), False, 4, augment=aug, num_workers=0))
    got = rows_by_key(DaliLoader(open_split(train_shards), False, 4, augment=aug))
    assert set(got) == set(want) and got[next(iter(got))]["video"].shape == (3, 3, 224, 224)
    for ident, row in want.items():
        torch.testing.assert_close(got[ident]["audio"], row["audio"], rtol=0, atol=AUDIO_ATOL)
        assert_video_close(got[ident]["video"], row["video"], VIDEO_MAX_DIFF, VIDEO_MEAN_DIFF)
    zeros = rows_by_key(
        TorchLoader(open_split(train_shards), False, 4, augment=aug.replace(audio_pad="zeros"), num_workers=0)
    )
    assert all(torch.equal(zeros[i]["audio"][:, :158], want[i]["audio"][:, :158]) for i in want if i[1] == 3)
    assert not any(torch.equal(zeros[i]["audio"], want[i]["audio"]) for i in want if i[1] == 3)


@pytest.mark.slow
@pytest.mark.parametrize("world_size", [1, 2, 3, 4])
@pytest.mark.parametrize("batch_size", [1, 2, 5])
def test_evaluation_sees_every_sample_once(eval_shards, train_shards, world_size, batch_size):
    for folder in (eval_shards, train_shards):
        split = SplitIndex(folder)
        rows = {}
        for rank in range(world_size):
            part = rows_by_key(dali(folder, False, batch_size, rank=rank, world_size=world_size))
            assert {k for k, _ in part} == {split.samples[i].key for i in eval_range(len(split), rank, world_size)}
            assert not set(part) & set(rows)
            rows.update(part)
        assert set(rows) == {(s.key, c) for s in split.samples for c in range(SMALL_AUG.num_test_clips)}


def test_an_evaluation_pass_left_half_way_starts_afresh(eval_shards):
    loader = dali(eval_shards, False, 1)
    next(iter(loader))
    assert len(rows_by_key(loader)) == 3 * SMALL_AUG.num_test_clips
    assert len(rows_by_key(loader)) == 3 * SMALL_AUG.num_test_clips
    assert loader.state_dict() == {"epoch": 0, "batches": 0}


def first_label_only(members: dict[str, bytes]) -> dict[str, bytes]:
    return {**members, "labels.i32": members["labels.i32"][:4]}


def test_single_label_splits_give_class_indices(train_shards, tmp_path):
    copy = rewrite_split(train_shards, tmp_path / "single", first_label_only)
    data = json.loads((copy / "manifest.json").read_text())
    data["multi_label"] = False
    (copy / "manifest.json").write_text(json.dumps(data))
    want = [b["labels"] for b in TorchLoader(open_split(copy), False, 4, augment=SMALL_AUG, num_workers=0)]
    got = [b["labels"] for b in dali(copy, False, 4)]
    assert all(g.dtype == torch.int64 and torch.equal(g, w) for g, w in zip(got, want, strict=True))
    batch = next(iter(dali(copy, True, 3)))
    assert batch["labels"].shape == (3,) and batch["labels"].dtype == torch.int64


# Training


def test_training_batches_follow_the_contract(train_shards, torch_rows):
    manifest = load_manifest(train_shards)
    loader = dali(train_shards, True, batch_size=3)
    batches = list(loader)
    assert len(batches) == len(loader) == 3
    for batch in batches:
        assert batch["video"].shape == (3, 8, 3, 224, 224) and batch["video"].dtype == torch.float32
        assert batch["video"].min() >= -1 and batch["video"].max() <= 1
        assert batch["audio"].shape == (3, 1, 160, 128) and batch["audio"].dtype == torch.float32
        assert batch["labels"].shape == (3, manifest.num_classes) and batch["labels"].dtype == torch.float32
        assert batch["clip_index"].tolist() == [0, 0, 0] and len(batch["key"]) == 3
        for key, labels in zip(batch["key"], batch["labels"], strict=True):
            assert torch.equal(labels, torch_rows[(key, 0)]["labels"])  # multi-hot, as the torch loader's
    assert loader.epoch == 1 and loader.position == 0


@pytest.mark.slow
@pytest.mark.parametrize("world_size", [1, 2, 3, 4])
@pytest.mark.parametrize("batch_size", [1, 2, 4])
def test_every_rank_has_the_same_number_of_batches(shards_of_4, world_size, batch_size):
    """Shards of 4, 4 and 1 samples; 4 ranks are more than the 3 shards. Ranks read disjoint blocks of samples."""
    expected = train_batches(9, batch_size, world_size)
    seen = []
    for rank in range(world_size):
        loader = dali(shards_of_4, True, batch_size, rank=rank, world_size=world_size)
        for _ in range(2):
            batches = list(loader)
            assert len(loader) == len(batches) == expected
            assert all(len(b["key"]) == batch_size and b["video"].shape[0] == batch_size for b in batches)
        seen.append({k for b in batches for k in b["key"]})
    if batch_size * world_size <= 9:  # each rank's block holds a batch: no sample is read by two ranks
        assert sum(len(keys) for keys in seen) == len(set().union(*seen))


def test_frames_of_a_clip_share_one_crop_and_flip(train_shards, tmp_path):
    def same_frames(members):
        return {**members, **{frame_ext(i): members[frame_ext(0)] for i in range(8)}}

    still = rewrite_split(train_shards, tmp_path / "still", same_frames)
    loader = dali(still, True, 3, augment=SMALL_AUG.replace(crop_px=96))
    first = {}
    for batch in loader:
        video = batch["video"]
        assert video.shape == (3, 8, 3, 96, 96)
        assert torch.equal(video, video[:, :1].expand_as(video))
        first.update(zip(batch["key"], video, strict=True))
    again = {k: v for b in loader for k, v in zip(b["key"], b["video"], strict=True) if k in first}
    assert any(not torch.equal(v, first[k]) for k, v in again.items())  # drawn anew for each clip read


def test_training_frames_lie_inside_the_audio_window(tmp_path):
    check_frames_inside_the_window(dali(write_timed_split(tmp_path / "timed"), True, 3, augment=TIMED_AUG))


def test_test_clips_are_synchronized_windows(tmp_path):
    check_synchronized_test_clips(dali(write_timed_split(tmp_path / "timed"), False, 2, augment=TIMED_AUG))


def test_consecutive_training_rows_start_with_their_audio(tmp_path):
    check_consecutive_training_rows(dali(write_timed_split(tmp_path / "timed"), True, 3, augment=CONSECUTIVE_AUG))


def test_consecutive_test_clips_are_each_modalitys_windows(tmp_path):
    check_consecutive_test_clips(dali(write_timed_split(tmp_path / "timed"), False, 2, augment=CONSECUTIVE_AUG))


def test_frames_used_above_stored_is_refused(train_shards):
    with pytest.raises(LoaderError, match="frames_used=9"):
        dali(train_shards, True, augment=SMALL_AUG.replace(frames_used=9))


def test_audio_is_a_random_window_with_spec_augment_bands(train_shards):
    index = SplitIndex(train_shards)
    manifest, reader = index.manifest, SampleReader(index)
    by_key = {s.key: s for s in index.samples}
    rows = [(k, a[0].numpy()) for b in dali(train_shards, True, 3) for k, a in zip(b["key"], b["audio"], strict=True)]
    starts, masked_bins, masked_frames = set(), [], []
    for key, audio in rows:
        raw = reader.read(by_key[key], [LOGMEL_EXT])[LOGMEL_EXT]
        logmel = np.frombuffer(raw, LOGMEL_DTYPE).reshape(manifest.features.logmel_shape).astype(np.float32)
        normalized = (logmel - manifest.logmel.mean) / manifest.logmel.std
        kept = audio != 0
        matches = [s for s in range(200 - 160 + 1) if np.array_equal(audio[kept], normalized[s : s + 160][kept])]
        assert matches, key
        starts.add(matches[0])
        masked_bins.append(int((~kept).all(0).sum()))
        masked_frames.append(int((~kept).all(1).sum()))
    assert len(starts) > 1  # the window moves
    assert max(masked_bins) < SMALL_AUG.freq_mask_px
    assert max(masked_frames) <= SMALL_AUG.num_time_masks * (SMALL_AUG.time_mask_px - 1)  # 4 masks (the option)
    assert max(masked_bins) > 0 and max(masked_frames) > 0


def test_a_frequency_mask_wider_than_the_bins_is_cut_to_them(train_shards):
    """As lingvo cuts a band to its axis: widths U{0..999} over 128 bins mask every bin 872 times in 1000."""
    aug = SMALL_AUG.replace(freq_mask_px=1000, num_time_masks=0)
    rows = [a[0].numpy() for b in dali(train_shards, True, 3, augment=aug) for a in b["audio"]]
    whole = [bool((row == 0).all()) for row in rows]
    assert sum(whole) >= len(rows) // 2 and all(((row == 0).all(0) | (row != 0).all(0)).all() for row in rows)


def test_resume_continues_the_stream(train_shards):
    uninterrupted = dali(train_shards, True, 2)
    want = list(uninterrupted) + list(uninterrupted)
    first = dali(train_shards, True, 2)
    stream = iter(first)
    head = [next(stream) for _ in range(3)]
    state = json.loads(json.dumps(first.state_dict()))
    assert state["epoch"] == 0 and state["batches"] == 3 and state["dali"]["rank"] == 0
    resumed = dali(train_shards, True, 2)
    resumed.load_state_dict(state)
    got = head + list(resumed) + list(resumed)
    assert len(got) == len(want) == 2 * len(resumed)
    for g, w in zip(got, want, strict=True):
        assert g["key"] == w["key"]
        for name in ("video", "audio", "labels"):
            assert torch.equal(g[name], w[name]), name
    assert resumed.state_dict()["epoch"] == 2 and resumed.state_dict()["batches"] == 0


def test_a_state_without_this_ranks_checkpoint_starts_a_new_stream(train_shards, caplog):
    rank0 = dali(train_shards, True, 1, rank=0, world_size=2)
    next(iter(rank0))
    rank1 = dali(train_shards, True, 1, rank=1, world_size=2)
    with caplog.at_level(logging.WARNING, logger="pipelines.dali_loader"):
        rank1.load_state_dict(rank0.state_dict())
    assert "no DALI checkpoint of rank 1 of 2" in caplog.text
    rest = list(rank1)
    assert len(rest) == len(rank1) - 1
    keys = {k for b in rest for k in b["key"]}
    assert keys <= {s.key for i, s in enumerate(SplitIndex(train_shards).samples) if i in eval_range(9, 1, 2)}
    assert rank1.state_dict()["epoch"] == 1


# Bad input and set-up errors


@pytest.fixture
def damaged(eval_shards, tmp_path):
    copy = tmp_path / "eval"
    copy.mkdir()
    for path in eval_shards.iterdir():
        if path.is_file():
            (copy / path.name).write_bytes(path.read_bytes())
    return copy


def run_with_timeout(function, timeout_s: float = 60.0) -> BaseException | None:
    """What `function()` raised (None if nothing); fails the test if it is still running after `timeout_s`."""
    outcome: list[BaseException | None] = []

    def target() -> None:
        try:
            function()
            outcome.append(None)
        except BaseException as err:
            outcome.append(err)

    thread = threading.Thread(target=target, daemon=True)
    thread.start()
    thread.join(timeout_s)
    assert not thread.is_alive(), f"still running after {timeout_s} s"
    return outcome[0]


@pytest.mark.parametrize("train", [False, True])
def test_corrupt_jpeg_names_shard_and_key(damaged, train):
    ref = SplitIndex(damaged).samples[0]
    offset, size = ref.members[frame_ext(3)]
    tar = damaged / "shard-000000.tar"
    data = bytearray(tar.read_bytes())
    data[offset : offset + size] = b"\0" * size
    tar.write_bytes(bytes(data))
    error = run_with_timeout(lambda: list(dali(damaged, train, batch_size=3)))
    assert isinstance(error, LoaderError)
    assert f"shard-000000.tar: sample {ref.key}: bad JPEG" in str(error) and "decoders.image" in str(error)


def test_missing_index_file(damaged):
    (damaged / "shard-000001.idx").unlink()
    with pytest.raises(LoaderError, match=r"shard-000001\.idx: index file missing .*wds2idx"):
        dali(damaged, False)


def test_refused_settings(eval_shards):
    with pytest.raises(LoaderError, match="cannot skip bad samples"):
        dali(eval_shards, False, skip_bad_samples=True)
    for device in ("tpu", "meta", 3.5):
        with pytest.raises(LoaderError, match="device must be"):
            dali(eval_shards, False, device=device)
    if not torch.cuda.is_available():
        for device in ("gpu", "cuda", torch.device("cuda", 0)):
            with pytest.raises(LoaderError, match="needs CUDA"):
                dali(eval_shards, False, device=device)


@pytest.mark.slow
def test_importable_without_dali(eval_shards):
    code = (
        "import sys; sys.modules['nvidia.dali'] = None\n"
        "from pipelines.dali_loader import DaliLoader\n"
        "from pipelines import LoaderError, open_split\n"
        f"try: DaliLoader(open_split({str(eval_shards)!r}), False, 2)\n"
        "except LoaderError as err: print(err)\n"
    )
    run = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=REPO, timeout=120)
    assert run.returncode == 0, run.stderr[-2000:]
    assert "nvidia-dali not installed: pip install -e '.[dali]'" in run.stdout


# GPU


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_gpu_pipeline_matches_the_cpu_reference(train_shards, torch_rows):
    """nvJPEG decodes differently from libjpeg-turbo; the bounds are a few decode LSBs (not measured here)."""
    rows = rows_by_key(DaliLoader(open_split(train_shards), False, 4, augment=SMALL_AUG, device="gpu"))
    assert set(rows) == set(torch_rows)
    for ident, row in rows.items():
        assert row["video"].is_cuda and row["audio"].is_cuda
        torch.testing.assert_close(row["audio"].cpu(), torch_rows[ident]["audio"], rtol=0, atol=1e-5)
        assert torch.equal(row["labels"].cpu(), torch_rows[ident]["labels"])
        assert_video_close(row["video"], torch_rows[ident]["video"], max_diff=8 / 127.5, mean_diff=VIDEO_MEAN_DIFF)
    loader = DaliLoader(open_split(train_shards), True, 3, augment=SMALL_AUG, device="gpu")
    batches = list(loader)
    assert len(batches) == len(loader) == 3
    for batch in batches:
        assert batch["video"].is_cuda and batch["video"].shape == (3, 8, 3, 224, 224)
        assert batch["audio"].is_cuda and batch["audio"].shape == (3, 1, 160, 128)


def test_the_graph_draws_its_crop_window_by_the_torch_loaders_rule():
    """`pipelines.augment.scale_jitter_window` on DALI DataNodes gives the numpy window for the same draws."""
    from nvidia.dali import fn, pipeline_def

    from pipelines.augment import scale_jitter_window
    from pipelines.config import AugmentConfig
    from pipelines.dali_graph import DALI_OPS

    aug = AugmentConfig()
    draws = [([256.0, 342.0], [0.93, 1.21], [0.25, 0.8]), ([256.0, 455.0], [1.33, 0.9], [0.999, 0.0])]
    for size, scales, position in draws:

        @pipeline_def(batch_size=1, num_threads=1, device_id=None)
        def window(size=size, scales=scales, position=position):
            nodes = [fn.constant(fdata=values, shape=[2]) for values in (size, scales, position)]
            return scale_jitter_window(*nodes, aug, DALI_OPS)

        pipe = window()
        pipe.build()
        got = [np.array(out[0]) for out in pipe.run()]
        want = scale_jitter_window(np.array(size), np.array(scales), np.array(position), aug)
        for g, w in zip(got, want, strict=True):
            np.testing.assert_array_equal(g, w)
