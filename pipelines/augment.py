"""Training augmentation of the PyTorch loader, with the parameters of `pipelines.config.AugmentConfig` (the DALI
graph applies the same ones with DALI operators, `pipelines.dali_graph`).

Video, MBT's reference (scenic's AudioSet config, DMVR's ops), in this order: frames resized so that their short side
is `eval_short_side_px` (scenic's min_resize), each axis scaled by its own factor from `scale_jitter`, a random
`crop_px` square cropped, a flip, then colour augmentation with probability `color_prob` (brightness ±32/255,
saturation and contrast ×[0.6, 1.4], hue ±0.2, as TF's `random_*` ops compute them: saturation and hue in HSV,
contrast about each frame's channel means) and a grey-scale drop with probability `color_drop_prob`; the same draw for
every frame of a clip. The other crop, `video_crop="inception"`, is AST's/timm's random resized crop.
The crop and flip run in the loader's workers on uint8 frames; the colour ops run where the batch is normalized (on
the GPU when training on one: `apply_color`), from per-clip parameters the workers draw (`color_params`).
Audio: SpecAugment's frequency and time masks (zero, the mean after normalization); by default one frequency mask
alone, what scenic's AudioSet config gives lingvo's augmenter (its time masks and warp have max ratio 0).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
import torch

from pipelines.config import VIDEO_MEAN, VIDEO_STD, AugmentConfig

# DMVR's color_default_augm: the ranges scenic's MBT trains with.
BRIGHTNESS_DELTA = 32 / 255
SATURATION_RANGE = (0.6, 1.4)
CONTRAST_RANGE = (0.6, 1.4)
HUE_DELTA = 0.2
COLOR_PARAMS = 5  # per clip: brightness delta, saturation, contrast, hue delta, grey (0/1); identity: 0, 1, 1, 0, 0
IDENTITY_COLOR = (0.0, 1.0, 1.0, 0.0, 0.0)
_GREY = (0.2989, 0.5870, 0.1140)  # TF's rgb_to_grayscale weights


def random_resized_crop_box(height: int, width: int, aug: AugmentConfig, rng: np.random.Generator) -> tuple[int, ...]:
    """(top, left, h, w) of an Inception-style random crop (torchvision's algorithm, numpy's generator)."""
    area = height * width
    log_ratio = np.log(aug.resize_ratio)
    for _ in range(10):
        target = area * rng.uniform(*aug.resize_scale)
        ratio = np.exp(rng.uniform(*log_ratio))
        w = round(np.sqrt(target * ratio))
        h = round(np.sqrt(target / ratio))
        if 0 < w <= width and 0 < h <= height:
            return int(rng.integers(0, height - h + 1)), int(rng.integers(0, width - w + 1)), h, w
    ratio = min(max(width / height, aug.resize_ratio[0]), aug.resize_ratio[1])
    w, h = (width, round(width / ratio)) if width / height > ratio else (round(height * ratio), height)
    w, h = min(w, width), min(h, height)
    return (height - h) // 2, (width - w) // 2, h, w


def scale_jitter_window(size: Any, scales: Any, position: Any, aug: AugmentConfig, ops: Any = np) -> tuple[Any, Any]:
    """(top_left, extent), each (2,) as (rows, columns) in the frame's pixels: the region that scenic's resize →
    scale jitter → random crop shows of a frame of `size` (H, W): the frame resized to a short side of
    `eval_short_side_px`, each axis scaled by its factor in `scales` (drawn from U(scale_jitter), independently),
    then a `crop_px` square at relative `position` (U[0, 1) per axis). Cropping this box and resizing it to `crop_px`
    is the same picture, with one resize instead of two.

    The one copy of the rule: the torch loader runs it on numpy arrays, the DALI graph on its DataNodes, `ops`
    giving `floor`, `minimum` and `maximum` (numpy's by default)."""
    base = aug.eval_short_side_px / ops.minimum(size[0], size[1])
    extent = ops.minimum(ops.maximum(ops.floor(aug.crop_px / (base * scales) + 0.5), 1.0), size)
    top_left = ops.minimum(ops.floor(position * (size - extent + 1.0)), size - extent)
    return top_left, extent


def scale_jitter_box(height: int, width: int, aug: AugmentConfig, rng: np.random.Generator) -> tuple[int, ...]:
    """(top, left, h, w) of `scale_jitter_window` for a height x width frame, drawn with `rng`."""
    size = np.array([height, width], dtype=np.float64)
    top_left, extent = scale_jitter_window(size, rng.uniform(*aug.scale_jitter, size=2), rng.random(2), aug)
    return int(top_left[0]), int(top_left[1]), int(extent[0]), int(extent[1])


def train_video(frames: Sequence[torch.Tensor], aug: AugmentConfig, rng: np.random.Generator) -> torch.Tensor:
    """uint8 (F, 3, crop, crop) from a clip's uint8 (3, H, W) frames (a sequence, or a (F, 3, H, W) tensor): one crop
    (`aug.video_crop`; bilinear, antialiased) and one flip for all frames. Only the crop box of each frame is copied
    (channels-last, the layout the uint8 resize is fast on) before the resize."""
    box = scale_jitter_box if aug.video_crop == "scale_jitter" else random_resized_crop_box
    top, left, h, w = box(frames[0].shape[-2], frames[0].shape[-1], aug, rng)
    region = torch.stack([frame[:, top : top + h, left : left + w].permute(1, 2, 0) for frame in frames])
    size = (aug.crop_px, aug.crop_px)
    out = torch.nn.functional.interpolate(region.permute(0, 3, 1, 2), size=size, mode="bilinear", antialias=True)
    return out.flip(-1) if rng.random() < aug.flip_prob else out


def color_params(aug: AugmentConfig, rng: np.random.Generator) -> torch.Tensor:
    """float32 (COLOR_PARAMS,): one clip's colour augmentation, drawn as DMVR draws it (identity where skipped)."""
    params = list(IDENTITY_COLOR)
    if rng.random() < aug.color_prob:
        params[:4] = [
            rng.uniform(-BRIGHTNESS_DELTA, BRIGHTNESS_DELTA),
            rng.uniform(*SATURATION_RANGE),
            rng.uniform(*CONTRAST_RANGE),
            rng.uniform(-HUE_DELTA, HUE_DELTA),
        ]
    if rng.random() < aug.color_drop_prob:
        params[4] = 1.0
    return torch.tensor(params, dtype=torch.float32)


def _rgb_to_hsv(rgb: torch.Tensor, dim: int) -> torch.Tensor:
    """HSV (h in [0, 1)) of RGB along axis `dim`, as TF's rgb_to_hsv computes it."""
    r, g, b = rgb.unbind(dim)
    value, low = rgb.amax(dim), rgb.amin(dim)
    chroma = value - low
    safe = torch.where(chroma > 0, chroma, torch.ones_like(chroma))
    hue = torch.where(value == r, (g - b) / safe, torch.where(value == g, (b - r) / safe + 2.0, (r - g) / safe + 4.0))
    hue = torch.where(chroma > 0, (hue / 6.0) % 1.0, torch.zeros_like(hue))
    saturation = torch.where(value > 0, chroma / torch.where(value > 0, value, torch.ones_like(value)), value * 0)
    return torch.stack([hue, saturation, value], dim)


def _hsv_to_rgb(hsv: torch.Tensor, dim: int) -> torch.Tensor:
    """RGB along axis `dim` from HSV, as TF's hsv_to_rgb computes it."""
    hue, saturation, value = (t.unsqueeze(dim) for t in hsv.unbind(dim))
    shifts = torch.tensor([3.0, 2.0, 4.0], device=hsv.device).reshape([3] + [1] * (hsv.ndim - 1 - dim % hsv.ndim))
    distance = (hue * 6.0 - shifts).abs()
    signs = torch.tensor([1.0, -1.0, -1.0], device=hsv.device).reshape(shifts.shape)
    offsets = torch.tensor([-1.0, 2.0, 2.0], device=hsv.device).reshape(shifts.shape)
    weights = (distance * signs + offsets).clamp(0.0, 1.0)  # |dh-3|-1, 2-|dh-2|, 2-|dh-4|
    return ((weights - 1.0) * saturation + 1.0) * value


def apply_color(video: torch.Tensor, params: torch.Tensor, dim: int = -1) -> torch.Tensor:
    """Colour-augmented float video (B, F, ...) in [0, 1], its RGB along axis `dim` (-1: channels last, 2: (B, F, 3,
    H, W)), with each clip's `params` (B, 5) from `color_params`: brightness, saturation (HSV), contrast (about each
    frame's channel means), hue (HSV), clip to [0, 1], then grey where asked. Clips whose parameters are the identity
    come out unchanged."""
    dim %= video.ndim
    spatial = tuple(d for d in range(2, video.ndim) if d != dim)
    shape = (-1,) + (1,) * (video.ndim - 1)
    delta, saturation, contrast, hue, grey = (params[:, i].to(video.device).reshape(shape) for i in range(5))
    augmented = (params[:, :4] != torch.tensor(IDENTITY_COLOR[:4])).any(1).to(video.device).reshape(shape)
    x = video + delta
    h, s, v = _rgb_to_hsv(x, dim).unbind(dim)
    x = _hsv_to_rgb(torch.stack([h, (s * saturation.squeeze(dim)).clamp(0.0, 1.0), v], dim), dim)
    mean = x.mean(dim=spatial, keepdim=True)
    x = (x - mean) * contrast + mean
    h, s, v = _rgb_to_hsv(x, dim).unbind(dim)
    x = _hsv_to_rgb(torch.stack([(h + hue.squeeze(dim)) % 1.0, s, v], dim), dim).clamp(0.0, 1.0)
    x = torch.where(augmented, x, video)
    weights = torch.tensor(_GREY, device=x.device).reshape([3] + [1] * (x.ndim - 1 - dim))
    grey_value = (x * weights).sum(dim, keepdim=True).expand_as(x)
    return torch.where(grey > 0, grey_value, x)


def apply_color_normalized(video: torch.Tensor, params: torch.Tensor, dim: int) -> torch.Tensor:
    """`apply_color` on video already normalized with VIDEO_MEAN / VIDEO_STD (the DALI graph's output), its RGB
    along `dim`; the identity where no clip is augmented."""
    if bool((params == torch.tensor(IDENTITY_COLOR)).all()):
        return video
    shape = [3] + [1] * (video.ndim - 1 - dim % video.ndim)
    mean = torch.tensor(VIDEO_MEAN, device=video.device).reshape(shape)
    std = torch.tensor(VIDEO_STD, device=video.device).reshape(shape)
    return (apply_color(video * std + mean, params, dim) - mean) / std


def spec_augment(audio: torch.Tensor, aug: AugmentConfig, rng: np.random.Generator) -> torch.Tensor:
    """Zero (the mean, after normalization) random bands of a (1, T, bins) log-mel, drawn as lingvo's
    SpectrumAugmenter draws them (scenic's SpecAugment, `_GetMask` with max_ratio 1): `num_freq_masks` frequency
    bands, then `num_time_masks` time bands, each of width floor(u · max) = U{0, ..., max - 1} (`freq_mask_px`,
    `time_mask_px`; no band where the max is 0) cut to the axis' length, at a start uniform over where it fits."""
    _, frames, bins = audio.shape
    for axis, extent, max_px, count in ((2, bins, aug.freq_mask_px, aug.num_freq_masks),
                                        (1, frames, aug.time_mask_px, aug.num_time_masks)):  # fmt: skip
        for _ in range(count if max_px > 0 else 0):
            width = min(int(rng.integers(0, max_px)), extent)
            start = int(rng.integers(0, extent - width + 1))
            audio.narrow(axis, start, width).zero_()
    return audio
