"""Clips as scenic samples them, end to end: the shard job at 25 frames per second, both loaders' consecutive
frames and repeated audio, the validation that refuses shards too sparse for them (with the rate to re-shard at),
and `--preset scenic_as` evaluating a checkpoint of scenic's shape on 10 s clips sharded at 25 frames per second."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import pytest
import torch
from conftest import audioset_args, load_tool
from loader_checks import SMALL_AUG, rows_by_key

from experiments.demo_data import DEMO_CLASSES, make_demo_dataset
from mbt.config import preset
from mbt.config_io import ConfigError
from mbt.evaluate import main as evaluate_main
from mbt.fits import fits
from mbt.model import MBT, MBTConfig
from mbt.preset_feed import preset_augment, preset_feed
from pipelines import build_loader, open_split
from pipelines.windows import audio_window, eval_clips, real_frames
from shards.manifest import LogmelStats, Manifest, load_manifest
from shards.schema import FeatureParams, decode_sample
from shards.tar import iter_tar_samples

# 16 frames at stride 2 of 25 per second: 1.28 s inside the 1.6 s audio window of the demo's 2 s clips.
CLIP = SMALL_AUG.replace(frames_used=16, frame_sampling="consecutive", frame_stride=2, audio_pad="repeat")


def shard(demo, out: Path, fps: str, *extra: str) -> Path:
    args = audioset_args(demo, out, *extra)
    args[args.index("--fps") + 1] = fps
    assert load_tool("shard_audioset").main(args) == 0
    return out


@pytest.fixture(scope="module")
def shards_25fps(demo, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The demo's 9 training clips (2 s, 25 fps videos) sharded at 25 frames per second: 50 per clip."""
    return shard(demo, tmp_path_factory.mktemp("fps25") / "train", "25", "--shard-size", "4")


def test_the_shard_job_stores_25_frames_per_second(shards_25fps):
    manifest = load_manifest(shards_25fps)
    features = manifest.features
    assert (features.num_frames, features.frames_per_s) == (50, 25)
    samples = [
        decode_sample(key, members, features, manifest.num_classes)
        for info in manifest.shards
        for key, members in iter_tar_samples(shards_25fps / info.name)
    ]
    assert len(samples) == 9
    for sample in samples:
        meta = sample.meta
        # frame i is the first at or after (i + 0.5) / 25 s: source frame i + 1; the 50th has none, repeated
        assert (meta["frames_decoded"], meta["frames_repeated"], len(meta["frame_times_s"])) == (49, 1, 50)
        # the real log-mel the loaders repeat is the one meta.json records: 198 rows computed, 2 of padding
        assert real_frames(sample.logmel) == meta["fbank_frames_computed"] == 198 and meta["fbank_pad_frames"] == 2


@pytest.mark.slow  # shards made by ffmpeg at 25 fps, both loaders: ~15 s
def test_consecutive_clips_of_25_fps_shards_in_both_loaders(shards_25fps):
    split = open_split(shards_25fps)
    want = rows_by_key(build_loader(split, False, 4, loader="torch", num_workers=0, augment=CLIP))
    assert len(want) == 9 * 4 and next(iter(want.values()))["video"].shape == (16, 3, 224, 224)
    assert [int(ids[0]) for ids, _ in eval_clips(CLIP, split.manifest.features)] == [0, 6, 12, 18]  # 50 - 32 = 18
    batch = next(iter(build_loader(split, True, 3, loader="torch", num_workers=0, augment=CLIP)))
    assert batch["video"].shape == (3, 16, 3, 224, 224)
    pytest.importorskip("nvidia.dali")
    got = rows_by_key(build_loader(split, False, 4, loader="dali", augment=CLIP))
    assert got.keys() == want.keys()
    for ident, row in want.items():
        torch.testing.assert_close(got[ident]["audio"], row["audio"], rtol=0, atol=1e-6)
        assert (got[ident]["video"] - row["video"]).abs().max() <= 2 / 127.5  # a JPEG decode LSB or two
    assert next(iter(build_loader(split, True, 3, loader="dali", augment=CLIP)))["video"].shape == (3, 16, 3, 224, 224)


def test_validation_refuses_shards_too_sparse_and_names_the_rate(train_shards, shards_25fps):
    """4 frames at stride 2: 0.32 s at 25 per second; 2 s of the 4 per second shards (8 frames hold them)."""
    model, clip = MBTConfig(num_classes=len(DEMO_CLASSES), num_frames=4, audio_frames=160), CLIP.replace(frames_used=4)
    assert fits(model, clip, load_manifest(shards_25fps)) == []
    [problem] = fits(model, clip, load_manifest(train_shards), "the shards in demo/train")
    assert problem == (
        "--augment.frames_used 4 consecutive frames at --augment.frame_stride 2 span 2 s of the shards in "
        "demo/train (4 frames per second, 8 per clip), more than the 1.6 s audio window or the clip: re-shard with "
        "--fps 5 or more (scenic's clips: 32 frames at stride 2 of --fps 25, 2.56 s), or lower --augment.frame_stride"
    )


def audioset_manifest(frames: int) -> Manifest:
    """An AudioSet split of 10 s clips at `frames` frames per clip (no shards: `fits` reads the manifest only)."""
    classes = [{"index": i, "id": f"/m/{i}", "name": f"class {i}"} for i in range(527)]
    return Manifest("audioset", "eval", FeatureParams(num_frames=frames), classes, True, [], LogmelStats(), [], {})


def test_the_scenic_as_preset_fits_25_fps_shards():
    cfg = preset("scenic_as")
    assert fits(cfg.model, cfg.augment, audioset_manifest(250)) == []
    assert fits(cfg.model, cfg.augment.replace(frame_stride=1), audioset_manifest(125)) == []  # 12.5/s, stride 1
    [problem] = fits(cfg.model, cfg.augment, audioset_manifest(40))  # --fps 4, the old advice: 32 frames over 16 s
    assert "span 16 s of the shards (4 frames per second, 40 per clip)" in problem
    assert "re-shard with --fps 8 or more (scenic's clips: 32 frames at stride 2 of --fps 25, 2.56 s)" in problem


def test_a_preset_feeds_a_checkpoint_with_its_clips_and_fixed_statistics():
    trained = SMALL_AUG.replace(logmel_mean=-3.5, logmel_std=4.25)
    scenic = preset_augment("scenic_as", trained)
    assert (scenic.frame_sampling, scenic.frame_stride, scenic.frames_used) == ("consecutive", 2, 32)
    assert (scenic.audio_pad, scenic.num_test_clips) == ("repeat", 4)
    assert (scenic.logmel_mean, scenic.logmel_std) == (1.102, 2.762)
    audioset = preset_augment("audioset", trained)  # no fixed statistics: the model's own
    assert (audioset.logmel_mean, audioset.logmel_std, audioset.frame_sampling) == (-3.5, 4.25, "spread")


def test_a_preset_that_does_not_fit_the_model_is_refused_naming_it():
    scenic_model = preset("scenic_as").model
    assert preset_feed("scenic_as", scenic_model, SMALL_AUG, "scenic.pt").frame_stride == 2
    with pytest.raises(ConfigError, match=r"--preset demo does not fit scenic\.pt: .*crop"):
        preset_feed("demo", scenic_model, SMALL_AUG, "scenic.pt")


@pytest.mark.slow
def test_evaluate_with_the_scenic_as_preset(tmp_path, monkeypatch, capsys):
    """A checkpoint of scenic's input shapes (32 frames in 16x16x2 tubelets at 224 px, 800 log-mel rows; tiny
    towers) that records other clips is evaluated with scenic's on 10 s clips sharded at 25 frames per second:
    consecutive frames, 4 test clips, (x - 1.102) / 2.762."""
    demo = make_demo_dataset(tmp_path / "raw", clips=4, seconds=10.0, size=(96, 64), workers=2)
    shards = shard(demo, tmp_path / "shards", "25", "--segment-seconds", "10", "--short-side", "128")
    cfg = MBTConfig(
        num_classes=len(DEMO_CLASSES), embed_dim=32, depth=2, num_heads=2, fusion_layer=1, num_frames=32,
        video_embed="tubelet", tubelet_frames=2, gelu="tanh", pool="gap",
    )  # fmt: skip
    recorded = SMALL_AUG.replace(frames_used=32, audio_frames=800)  # what a converter may write: spread frames
    torch.manual_seed(0)
    config = json.loads(json.dumps({"model": dataclasses.asdict(cfg), "augment": dataclasses.asdict(recorded)}))
    torch.save({"model": MBT(cfg).state_dict(), "config": config, "step": 0}, tmp_path / "scenic.pt")
    seen, forward = [], MBT.forward

    def recording(self: MBT, video=None, audio=None, per_tower: bool = False) -> torch.Tensor:
        seen.append((video.detach().clone(), audio.detach().clone()))
        return forward(self, video, audio, per_tower)

    monkeypatch.setattr(MBT, "forward", recording)
    args = ["--checkpoint", str(tmp_path / "scenic.pt"), "--shards", str(shards), "--out", str(tmp_path / "eval"),
            "--loader", "torch", "--num-workers", "0", "--batch-size", "1"]  # fmt: skip
    assert evaluate_main([*args, "--preset", "scenic_as"]) == 0
    assert "evaluated 3 samples x 4 clips" in capsys.readouterr().out
    video, audio = seen[0]
    assert video.shape == (4, 32, 3, 224, 224) and audio.shape == (4, 1, 800, 128)
    split = open_split(shards)
    first = split.manifest.shards[0].name
    key, members = next(iter_tar_samples(shards / first))
    stored = decode_sample(key, members, split.manifest.features, split.manifest.num_classes).logmel
    for clip, (_, start) in enumerate(eval_clips(preset("scenic_as").augment, split.manifest.features)):
        want = (torch.from_numpy(audio_window(stored, start, 800, "repeat")).float() - 1.102) / 2.762
        torch.testing.assert_close(audio[clip, 0], want, rtol=0, atol=1e-5)
    assert evaluate_main([*args, "--preset", "demo"]) == 1  # the demo's 2 frames of 64 px do not fit this model
    assert "--preset demo does not fit" in capsys.readouterr().err
