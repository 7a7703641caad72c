"""Training augmentation (pipelines.augment): the reference's (scenic's AudioSet config, DMVR's ops) by default, AST's
Inception crop and time mask as options; and the normalization the loaders take from the model."""

from __future__ import annotations

import colorsys

import numpy as np
import pytest
import torch
from loader_checks import SMALL_AUG

from pipelines import open_split
from pipelines.augment import (
    IDENTITY_COLOR,
    apply_color,
    apply_color_normalized,
    color_params,
    scale_jitter_box,
    spec_augment,
)
from pipelines.config import AugmentConfig, logmel_norm, records_logmel_norm, with_logmel_norm
from pipelines.torch_loader import TorchLoader
from shards.manifest import LogmelStats, load_manifest


def test_defaults_are_scenics_audioset_config():
    aug = AugmentConfig()
    assert (aug.video_crop, aug.scale_jitter, aug.crop_px, aug.eval_short_side_px) == (
        "scale_jitter",
        (0.9, 1.33),
        224,
        256,
    )
    assert (aug.color_prob, aug.color_drop_prob, aug.flip_prob) == (0.8, 0.1, 0.5)
    assert (aug.num_freq_masks, aug.freq_mask_px, aug.num_time_masks, aug.time_mask_px) == (1, 48, 0, 48)
    assert (aug.audio_frames, aug.frames_used, aug.num_test_clips) == (800, 8, 4)
    with pytest.raises(ValueError, match="video_crop must be one of scale_jitter, inception"):
        AugmentConfig(video_crop="random")


def test_scale_jitter_box_is_the_region_a_resize_jitter_and_crop_show():
    """A 342 x 256 frame resized to short side 256 (a no-op), each axis scaled by U(0.9, 1.33), cropped to 224: the
    region shown is 224 / scale pixels of the frame on each axis, anywhere inside it."""
    aug = AugmentConfig()
    rng = np.random.default_rng(0)
    heights, widths = [], []
    for _ in range(2000):
        top, left, h, w = scale_jitter_box(256, 342, aug, rng)
        assert 0 <= top <= 256 - h and 0 <= left <= 342 - w
        heights.append(h)
        widths.append(w)
    for sizes in (heights, widths):
        assert min(sizes) >= round(224 / 1.33) and max(sizes) <= round(224 / 0.9)
        assert min(sizes) <= 172 and max(sizes) >= 246  # the whole range is drawn
    assert np.corrcoef(heights, widths)[0, 1] < 0.2  # the axes are jittered independently
    half = scale_jitter_box(512, 684, aug, np.random.default_rng(1))  # frames twice as large: a twice larger box
    assert 2 * round(224 / 1.33) - 2 <= half[2] <= 2 * round(224 / 0.9) + 2


def test_color_params_follow_dmvrs_probabilities_and_ranges():
    aug = AugmentConfig()
    rng = np.random.default_rng(0)
    params = torch.stack([color_params(aug, rng) for _ in range(4000)])
    augmented = (params[:, :4] != torch.tensor(IDENTITY_COLOR[:4])).any(1).float().mean()
    assert abs(augmented - 0.8) < 0.03 and abs(params[:, 4].mean() - 0.1) < 0.02
    on = params[(params[:, :4] != torch.tensor(IDENTITY_COLOR[:4])).any(1)]
    assert on[:, 0].abs().max() <= 32 / 255 and on[:, 1].min() >= 0.6 and on[:, 1].max() <= 1.4
    assert on[:, 2].min() >= 0.6 and on[:, 2].max() <= 1.4 and on[:, 3].abs().max() <= 0.2
    assert torch.equal(color_params(AugmentConfig(color_prob=0, color_drop_prob=0), rng), torch.tensor(IDENTITY_COLOR))


def tf_color(pixel: tuple[float, float, float], frame_mean: np.ndarray, params: list[float]) -> np.ndarray:
    """DMVR's color_default_augm on one pixel, from TF's definitions (HSV via colorsys), for a one-pixel frame."""
    delta, saturation, contrast, hue, grey = params
    rgb = np.array(pixel) + delta
    h, s, v = colorsys.rgb_to_hsv(*rgb)
    rgb = np.array(colorsys.hsv_to_rgb(h, min(max(s * saturation, 0.0), 1.0), v))
    rgb = (rgb - frame_mean) * contrast + frame_mean
    h, s, v = colorsys.rgb_to_hsv(*rgb)
    rgb = np.clip(colorsys.hsv_to_rgb((h + hue) % 1.0, s, v), 0.0, 1.0)
    return np.full(3, rgb @ np.array([0.2989, 0.5870, 0.1140])) if grey else rgb


def test_apply_color_computes_tfs_colour_ops():
    rng = np.random.default_rng(3)
    video = torch.tensor(rng.uniform(0.05, 0.95, size=(2, 1, 1, 1, 3)), dtype=torch.float32)  # 1-pixel frames
    params = torch.tensor([[0.08, 1.3, 0.7, 0.15, 0.0], [-0.1, 0.6, 1.4, -0.2, 1.0]], dtype=torch.float32)
    got = apply_color(video, params).numpy()
    for clip in range(2):
        pixel = video[clip, 0, 0, 0].double().numpy()
        hsv = colorsys.rgb_to_hsv(*(pixel + params[clip, 0].item()))
        shifted = np.array(colorsys.hsv_to_rgb(hsv[0], min(hsv[1] * params[clip, 1].item(), 1.0), hsv[2]))
        want = tf_color(tuple(pixel), shifted, params[clip].tolist())  # a 1-pixel frame is its own mean
        np.testing.assert_allclose(got[clip, 0, 0, 0], want, atol=1e-5)
    identity = torch.tensor([IDENTITY_COLOR] * 2)
    assert torch.equal(apply_color(video, identity), video)
    normalized = torch.rand(2, 3, 3, 4, 4) * 2 - 1  # (B, F, 3, H, W) as the DALI graph gives it
    assert torch.equal(apply_color_normalized(normalized, identity, dim=2), normalized)
    moved = apply_color_normalized(normalized, params, dim=2)
    expected = (apply_color((normalized * 0.5 + 0.5).movedim(2, -1), params) - 0.5) / 0.5
    torch.testing.assert_close(moved.movedim(2, -1), expected, atol=1e-5, rtol=0)


def lingvo_band(max_width: int, extent: int, u_width: float, u_start: float) -> tuple[int, int]:
    """(start, width) of one band as lingvo's SpectrumAugmenter._GetMask draws it with max_ratio 1 from its two
    uniforms: length = min(int(max_width * u), max(int(1.0 * extent), 1)), start = int(u' * (extent - length + 1))."""
    width = min(int(max_width * u_width), max(extent, 1))
    return int(u_start * (extent - width + 1)), width


def bands(masked: torch.Tensor) -> tuple[list[int], list[int]]:
    """The all-zero mel bins and frames of a (T, bins) log-mel of ones."""
    zero = masked == 0
    return zero.all(0).nonzero().flatten().tolist(), zero.all(1).nonzero().flatten().tolist()


def test_spec_augment_default_is_scenics_one_frequency_mask():
    """scenic's AudioSet config gives lingvo 1 frequency mask of at most 48 bins, and 4 time masks and a time warp
    with max ratio 0, which lingvo skips (`_TimeMask`, `_TimeWarp`: max_ratio <= 0 returns the input): one band of
    bins, contiguous, of width U{0, ..., 47}, and no frame masked."""
    rng = np.random.default_rng(0)
    widths = []
    for _ in range(1000):  # 16 frames: the draws are those of any length (time masks off)
        bins, frames = bands(spec_augment(torch.ones(1, 16, 128), AugmentConfig(), rng)[0])
        assert frames == [] and bins == list(range(bins[0], bins[0] + len(bins)) if bins else [])
        widths.append(len(bins))
    counts = np.bincount(widths, minlength=48)
    assert len(counts) == 48 and counts.min() > 0  # every width 0..47 drawn, none of 48
    assert abs(np.mean(widths) - 23.5) < 1.0  # uniform: the mean of 0..47


def test_spec_augment_draws_lingvos_band_from_the_same_uniforms():
    """The band a draw gives is lingvo's `_GetMask` band from the same two uniforms, the width cut to the axis where
    the max exceeds it (a frequency mask of up to 20 bins over 8 bins: the whole axis 12 times in 20)."""

    class Uniforms:  # numpy's integers(0, n) as floor(u * n), with the uniforms recorded
        def __init__(self, seed: int) -> None:
            self.rng, self.drawn = np.random.default_rng(seed), []

        def integers(self, low: int, high: int) -> int:
            self.drawn.append(self.rng.random())
            return low + int(self.drawn[-1] * (high - low))

    for seed in range(200):
        for extent, max_width in ((128, 48), (8, 20)):
            uniforms = Uniforms(seed)
            aug = AugmentConfig(freq_mask_px=max_width, num_time_masks=0)
            bins, _ = bands(spec_augment(torch.ones(1, 16, extent), aug, uniforms)[0])
            start, width = lingvo_band(max_width, extent, *uniforms.drawn)
            assert bins == list(range(start, start + width)), (seed, extent)


def test_spec_augment_time_masks_are_an_option():
    """--augment.num_time_masks 4 --augment.time_mask_px 48: the masks the config lists (4 of U{0..47} frames)."""
    rng = np.random.default_rng(0)
    aug = AugmentConfig(num_time_masks=4)
    masked_frames = [len(bands(spec_augment(torch.ones(1, 800, 128), aug, rng)[0])[1]) for _ in range(200)]
    assert max(masked_frames) <= 4 * 47 and max(masked_frames) > 47  # more than one mask's width


def test_training_batches_are_colour_augmented_and_evaluation_never(train_shards):
    split = open_split(train_shards)
    plain = SMALL_AUG.replace(color_prob=0.0, color_drop_prob=0.0)
    coloured = SMALL_AUG.replace(color_prob=1.0, color_drop_prob=0.0)
    a = next(iter(TorchLoader(split, True, 4, augment=plain, num_workers=0, seed=5)))
    b = next(iter(TorchLoader(split, True, 4, augment=coloured, num_workers=0, seed=5)))
    assert a["key"] == b["key"] and not torch.equal(a["video"], b["video"]) and torch.equal(a["audio"], b["audio"])
    assert b["video"].min() >= -1 and b["video"].max() <= 1 and "color" not in b
    grey = next(iter(TorchLoader(split, True, 4, augment=plain.replace(color_drop_prob=1.0), num_workers=0, seed=5)))
    channels = grey["video"].unbind(2)
    assert torch.allclose(channels[0], channels[1], atol=1e-5) and torch.allclose(channels[1], channels[2], atol=1e-5)
    e1 = next(iter(TorchLoader(split, False, 2, augment=plain, num_workers=0)))
    e2 = next(iter(TorchLoader(split, False, 2, augment=coloured.replace(color_drop_prob=1.0), num_workers=0)))
    assert torch.equal(e1["video"], e2["video"])


def test_the_loaders_normalize_with_the_models_statistics(train_shards, eval_shards):
    """Normalization belongs to the model: given the training split's mean/std, an evaluation split is normalized
    with them, not with its own manifest's."""
    train_stats, eval_stats = load_manifest(train_shards).logmel, load_manifest(eval_shards).logmel
    assert (train_stats.mean, train_stats.std) != (eval_stats.mean, eval_stats.std)
    model = SMALL_AUG.replace(logmel_mean=train_stats.mean, logmel_std=train_stats.std)
    own = next(iter(TorchLoader(open_split(eval_shards), False, 1, augment=SMALL_AUG, num_workers=0)))["audio"]
    theirs = next(iter(TorchLoader(open_split(eval_shards), False, 1, augment=model, num_workers=0)))["audio"]
    raw = own * eval_stats.std + eval_stats.mean
    torch.testing.assert_close(theirs, (raw - train_stats.mean) / train_stats.std, atol=1e-4, rtol=1e-4)


def test_one_normalization_rule_the_models_statistics_else_the_splits() -> None:
    """Each of the model's mean and std where set, else the split's: what the loaders normalize with and what
    training writes into the config (an older checkpoint records neither)."""
    stats = LogmelStats(count=4, total=-8.0, total_sq=32.0)  # mean -2, std 2
    unset = AugmentConfig()
    assert logmel_norm(unset, stats) == (-2.0, 2.0) and not records_logmel_norm(unset)
    assert with_logmel_norm(unset, stats) == unset.replace(logmel_mean=-2.0, logmel_std=2.0)
    given = unset.replace(logmel_mean=1.5)
    assert logmel_norm(given, stats) == (1.5, 2.0) and not records_logmel_norm(given)  # the value given is kept
    model = with_logmel_norm(given, stats)
    assert (model.logmel_mean, model.logmel_std) == (1.5, 2.0) and records_logmel_norm(model)
    assert with_logmel_norm(model, LogmelStats(count=1, total=9.0, total_sq=90.0)) == model  # the model's stays
