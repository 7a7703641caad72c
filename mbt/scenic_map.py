"""scenic's MBT parameter tree (google-research/scenic, `projects/mbt/model.py`) as this project's MBTConfig and state
dict: a pure mapping of arrays (`mbt.scenic` reads the file), exact or refused with the scenic config field named.

scenic's `MBT` maps onto MBTConfig(video_embed="tubelet", gelu="tanh") with:
  cls, clsspectrogram           the towers' CLS tokens: model.classifier='token' → pool="cls"; none: 'gap', 'gmp' or
                                'gsp', which the arrays do not tell apart (ScenicOptions.classifier) → that pool
  embedding                     '3d_conv' tubelets (kt, kh, kw, 3, D); 'temporal_sampling' patches (kh, kw, 3, D), a
                                tubelet of one frame over the frames scenic's model samples
  embedding_spectrogram         the Conv2D (time, mel, 3, D), whose three tiled channels become one (summed)
  posembed_input[_spectrogram]  position embeddings over [CLS, patches], as here (the bottleneck has none)
  encoderblock_N[_spectrogram]  timm Blocks: q/k/v (D, heads, head_dim) → qkv, out (heads, head_dim, D) → proj; with
                                model.share_encoder the rgb blocks serve both towers (copied into each)
  encoder_norm                  one LayerNorm over the concatenated towers: each tower's final norm here
  bottleneck                    (1, n_bottlenecks + 1, D) with 'token': num_bottlenecks = n - 1, cls_bottleneck
  output_projection             the shared head
The rgb tower is this project's video tower, the spectrogram tower its audio tower. scenic's `MBT` never reads
model.attention_config (only MBTClassificationModel refuses 'factorized_encoder'), so every MBT is 'spacetime'.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch

from mbt.model import MBTConfig
from shards.schema import MAX_FRAMES

SCENIC_IMG_SIZE = 224  # scenic's crop_size, when neither img_size nor num_frames is given
SCENIC_MEL_BINS = 128
TOWERS = {"video": "", "audio": "_spectrogram"}  # scenic's name suffix of each tower (rgb, spectrogram)
CLASSIFIERS = {"token": "cls", "gap": "gap", "gmp": "gmp", "gsp": "gsp"}  # scenic's model.classifier → pool
TEMPORAL_ENCODINGS = {5: "3d_conv", 4: "temporal_sampling"}  # axes of the rgb 'embedding/kernel' → method


@dataclass(frozen=True)
class ScenicOptions:
    """What the arrays do not record, as scenic's config names it. fusion_layer (model.fusion_layer): needed for
    two towers; classifier (model.classifier): needed without CLS tokens; test_with_bottlenecks
    (model.test_with_bottlenecks, scenic's default True); img_size / num_frames: one is enough to split the rgb grid
    (neither: scenic's 224 px); num_mel_bins: the spectrogram's; logmel_mean/std: the input normalization."""

    fusion_layer: int | None = None
    classifier: str | None = None
    test_with_bottlenecks: bool = True
    img_size: int | None = None
    num_frames: int | None = None
    num_mel_bins: int = SCENIC_MEL_BINS
    logmel_mean: float | None = None
    logmel_std: float | None = None


class _Params:
    """The flat tree, each array taken once: what is never taken is left over (`unused`)."""

    def __init__(self, flat: dict[str, np.ndarray]) -> None:
        self.flat, self.taken = flat, set()

    def __contains__(self, key: str) -> bool:
        return key in self.flat

    def shape(self, key: str, ndim: int | None = None) -> tuple[int, ...]:
        if key not in self.flat:
            raise ValueError(f"no {key!r}")
        if ndim is not None and self.flat[key].ndim != ndim:
            raise ValueError(f"{key!r} has shape {self.flat[key].shape}, not {ndim} axes")
        return self.flat[key].shape

    def take(self, key: str) -> torch.Tensor:
        if key not in self.flat:
            raise ValueError(f"no {key!r}")
        self.taken.add(key)
        return torch.from_numpy(np.array(self.flat[key], dtype=np.float32))

    def unused(self) -> list[str]:
        return sorted(set(self.flat) - self.taken)


def _tower_names(params: _Params, tower: str, two: bool) -> dict[str, str]:
    suffix = TOWERS[tower]
    block = f"Transformer/encoderblock_{{}}{suffix}"
    if f"{block.format(0)}/LayerNorm_0/scale" not in params:  # model.share_encoder: both towers use the rgb blocks
        block = "Transformer/encoderblock_{}"
    cls = "cls" if tower == "video" or not two else "clsspectrogram"
    pos = f"Transformer/posembed_input{suffix}/pos_embedding"
    return {"embed": f"embedding{suffix}", "pos": pos, "cls": cls, "block": block}


def _block(params: _Params, name: str, dim: int) -> dict[str, torch.Tensor]:
    """One timm Block's state from scenic's EncoderBlock `name`."""
    attn, mlp = f"{name}/MultiHeadDotProductAttention_0", f"{name}/MlpBlock_0"
    qkv = [f"{attn}/{p}" for p in ("query", "key", "value")]
    return {
        "norm1.weight": params.take(f"{name}/LayerNorm_0/scale"),
        "norm1.bias": params.take(f"{name}/LayerNorm_0/bias"),
        "attn.qkv.weight": torch.cat([params.take(f"{p}/kernel").reshape(dim, dim).T for p in qkv]),
        "attn.qkv.bias": torch.cat([params.take(f"{p}/bias").reshape(dim) for p in qkv]),
        "attn.proj.weight": params.take(f"{attn}/out/kernel").reshape(dim, dim).T,
        "attn.proj.bias": params.take(f"{attn}/out/bias"),
        "norm2.weight": params.take(f"{name}/LayerNorm_1/scale"),
        "norm2.bias": params.take(f"{name}/LayerNorm_1/bias"),
        "mlp.fc1.weight": params.take(f"{mlp}/Dense_0/kernel").T,
        "mlp.fc1.bias": params.take(f"{mlp}/Dense_0/bias"),
        "mlp.fc2.weight": params.take(f"{mlp}/Dense_1/kernel").T,
        "mlp.fc2.bias": params.take(f"{mlp}/Dense_1/bias"),
    }


def _pool(has_cls: bool, has_bottleneck: bool, classifier: str | None) -> str:
    """MBTConfig.pool of scenic's model.classifier: 'token' when the file holds CLS tokens, else the one given."""
    if classifier == "0":  # its head reads temporal_dims, which only 'token' fills: scenic's MBT.__call__ raises
        raise ValueError("model.classifier='0' is a classifier scenic's MBT cannot run (a KeyError in MBT.__call__), "
                         "so no checkpoint of it exists; give the classifier the model was trained with")  # fmt: skip
    if has_cls:
        if classifier not in (None, "token"):
            raise ValueError(f"model.classifier={classifier!r} given, but the file holds CLS tokens ('cls'): its "
                             "classifier was 'token' (leave --classifier out)")  # fmt: skip
        return "cls"
    if has_bottleneck:  # MBT.__call__ sizes the bottleneck from the CLS branch: UnboundLocalError otherwise
        raise ValueError("a 'bottleneck' without CLS tokens: scenic's MBT makes bottleneck tokens with "
                         "model.classifier='token' only, so this file is not of its MBT; not converted")  # fmt: skip
    if classifier is None:
        raise ValueError("no CLS tokens, so model.classifier was 'gap', 'gmp' or 'gsp' (the mean, maximum or sum of "
                         "all tokens), which the arrays do not tell apart: give --classifier (scenic's released "
                         "config says 'gap')")  # fmt: skip
    if classifier not in CLASSIFIERS or classifier == "token":
        raise ValueError(f"model.classifier={classifier!r} given, but the file holds no CLS token ('cls')")
    return CLASSIFIERS[classifier]


def _square_grids(tokens: int, patch: int, tubelet: int) -> list[str]:
    """The --num-frames of square frames whose tubelets (tubelet x patch x patch) make `tokens` tokens."""
    return [
        f"--num-frames {steps * tubelet} (frames of {side * patch} px)"
        for steps in range(1, MAX_FRAMES // tubelet + 1)
        if tokens % steps == 0 and (side := math.isqrt(tokens // steps)) ** 2 == tokens // steps
    ]


def _video_grid(tokens: int, patch: int, tubelet: int, options: ScenicOptions) -> tuple[int, int]:
    """(img_size, num_frames) whose grid of tubelets (tubelet x patch x patch) has `tokens` tokens; ValueError
    saying what to give, or that the frames are not square (this project's frames are: one model.img_size)."""
    if options.num_frames is not None:
        steps = options.num_frames // tubelet
        per_frame = tokens // max(steps, 1)
        side = math.isqrt(per_frame)
        if options.num_frames % tubelet or steps * per_frame != tokens:
            squares = ", ".join(_square_grids(tokens, patch, tubelet)[:6]) or "no --num-frames (none makes them)"
            raise ValueError(f"its rgb position embedding has {tokens} tubelet tokens, which {options.num_frames} "
                             f"frames in tubelets of {tubelet} frames do not make: give one of {squares}")  # fmt: skip
        if side * side != per_frame:
            raise ValueError(f"its rgb position embedding has {tokens} tubelet tokens: {per_frame} patches of "
                             f"{patch} px per {tubelet} of {options.num_frames} frames, which no square frame makes; "
                             "this project's model takes square frames (model.img_size): not converted")  # fmt: skip
        if options.img_size is None or options.img_size // patch == side:
            return side * patch, options.num_frames
    img_size = options.img_size or SCENIC_IMG_SIZE
    num_frames = tokens // max((img_size // patch) ** 2, 1) * tubelet
    if num_frames % tubelet == 0 and (num_frames // tubelet) * (img_size // patch) ** 2 == tokens:
        return img_size, num_frames
    squares = _square_grids(tokens, patch, tubelet)
    hint = (
        f"give one of {', '.join(squares[:6])}"
        if squares
        else "no number of square frames makes them, and this project's model takes square frames "
        "(model.img_size): a model of frames of another shape is not converted"
    )
    raise ValueError(
        f"its rgb position embedding has {tokens} tubelet tokens, which {img_size} px and {num_frames} frames in "
        f"tubelets of {tubelet}x{patch}x{patch} do not make: {hint}"
    )


def _video_sizes(params: _Params, names: dict[str, str], has_cls: bool, options: ScenicOptions) -> dict[str, int]:
    """The video tower's MBTConfig sizes from its embedding kernel and position embedding."""
    shape = params.shape(f"{names['embed']}/kernel")
    if len(shape) not in TEMPORAL_ENCODINGS:
        raise ValueError(f"'embedding/kernel' of shape {shape}: not the kernel of a temporal_encoding_config.method "
                         f"this converter knows ({', '.join(TEMPORAL_ENCODINGS.values())})")  # fmt: skip
    tubelet, (patch_h, patch_w, channels) = (shape[0] if len(shape) == 5 else 1), shape[-4:-1]
    if patch_h != patch_w or channels != 3:
        raise ValueError(f"'embedding/kernel' of shape {shape}: patches of {patch_h}x{patch_w} over {channels} "
                         f"channels (scenic's model.patches.size [{patch_h}, {patch_w}, {tubelet}]); this project's "
                         "patches are square (model.patch_size) over 3 colour channels: not converted")  # fmt: skip
    tokens = params.shape(names["pos"], 3)[1] - has_cls
    img_size, num_frames = _video_grid(tokens, patch_h, tubelet, options)
    if tubelet == 1 and img_size % patch_h:  # 'temporal_sampling' stacks the frames: a patch would straddle two
        raise ValueError(f"'temporal_sampling' patches of {patch_h} px over frames of {img_size} px: give the "
                         f"--img-size, a multiple of {patch_h}")  # fmt: skip
    return {"tubelet_frames": tubelet, "patch_size": patch_h, "img_size": img_size, "num_frames": num_frames}


def _audio_sizes(params: _Params, names: dict[str, str], has_cls: bool, patch: int, mel_bins: int) -> dict[str, int]:
    """The audio tower's MBTConfig sizes from its embedding kernel and position embedding."""
    shape = params.shape(f"{names['embed']}/kernel", 4)
    if shape[:2] != (patch, patch):
        raise ValueError(f"'embedding_spectrogram/kernel' of shape {shape}: not {patch}x{patch} patches")
    mel_patches = (mel_bins - patch) // patch + 1
    tokens = params.shape(names["pos"], 3)[1] - has_cls
    if mel_patches < 1 or tokens % mel_patches:
        raise ValueError(f"its spectrogram position embedding's {tokens} patches are not rows of {mel_bins} mel "
                         f"bins / {patch}: give the model's --num-mel-bins")  # fmt: skip
    return {"audio_frames": tokens // mel_patches * patch, "num_mel_bins": mel_bins, "audio_patch_stride": patch}


def scenic_to_mbt(
    flat: dict[str, np.ndarray], options: ScenicOptions
) -> tuple[MBTConfig, dict[str, torch.Tensor], list[str]]:
    """(MBTConfig, its state dict, the arrays left out because scenic's model never uses them) for scenic MBT
    parameters `flat` ({'Transformer/encoderblock_0/…/kernel': array}); ValueError naming the key that is missing,
    of another shape or unknown, or the scenic config field of a model this project's MBT does not compute."""
    params = _Params(flat)
    towers = [t for t in TOWERS if f"embedding{TOWERS[t]}/kernel" in params]
    if not towers:
        raise ValueError("no 'embedding/kernel' (rgb) or 'embedding_spectrogram/kernel' (spectrogram)")
    if "pre_logits/kernel" in params:
        raise ValueError("a 'pre_logits' layer: model.representation_size is set (a Dense and tanh before the head), "
                         "which this project's MBT does not have; not converted")  # fmt: skip
    two = len(towers) == 2
    names = {t: _tower_names(params, t, two) for t in towers}
    first = names[towers[0]]
    has_cls = first["cls"] in params
    pool = _pool(has_cls, "bottleneck" in params, options.classifier)
    dim = params.shape(f"{first['embed']}/bias", 1)[0]
    heads, head_dim = params.shape(f"{first['block'].format(0)}/MultiHeadDotProductAttention_0/query/kernel", 3)[1:]
    if heads * head_dim != dim:
        raise ValueError(f"attention of {heads} heads of {head_dim} is not the width {dim}")
    mlp_dim = params.shape(f"{first['block'].format(0)}/MlpBlock_0/Dense_0/kernel", 2)[1]
    depth = 0
    while f"{first['block'].format(depth)}/LayerNorm_0/scale" in params:
        depth += 1
    sizes = _video_sizes(params, names["video"], has_cls, options) if "video" in towers else {}
    if "audio" in towers:
        patch = sizes.get("patch_size", params.shape(f"{names['audio']['embed']}/kernel", 4)[0])
        sizes |= {"patch_size": patch} | _audio_sizes(params, names["audio"], has_cls, patch, options.num_mel_bins)
    sizes.setdefault("audio_patch_stride", sizes["patch_size"])
    if two and options.fusion_layer is None:
        raise ValueError("the file does not record scenic's model.fusion_layer (the first layer whose towers fuse): "
                         "give --fusion-layer (scenic's released AudioSet config: 8)")  # fmt: skip
    if two and not 0 <= options.fusion_layer <= depth:
        raise ValueError(f"--fusion-layer {options.fusion_layer}: scenic's model.fusion_layer is in 0..{depth}")
    bottlenecks = params.shape("bottleneck", 3)[1] if "bottleneck" in params and two else 0
    fusion_layer = options.fusion_layer if two else depth
    fusion = towers[0] if not two else "bottleneck" if bottlenecks else "late" if fusion_layer == depth else "cross"
    cfg = MBTConfig(
        num_classes=params.shape("output_projection/kernel", 2)[1], fusion=fusion, fusion_layer=fusion_layer,
        num_bottlenecks=bottlenecks - 1 if bottlenecks else MBTConfig.num_bottlenecks, cls_bottleneck=True,
        test_with_bottlenecks=options.test_with_bottlenecks, pool=pool, embed_dim=dim, depth=depth, num_heads=heads,
        mlp_ratio=mlp_dim / dim, video_embed="tubelet", gelu="tanh", **sizes,
    )  # fmt: skip
    unused = ["bottleneck"] if "bottleneck" in params and not two else []  # one modality: scenic never fuses it
    for key in unused:
        params.take(key)
    state = {"head.weight": params.take("output_projection/kernel").T}
    state["head.bias"] = params.take("output_projection/bias")
    if bottlenecks:
        state["bottleneck"] = params.take("bottleneck")
    for tower in towers:
        name, prefix = names[tower], f"towers.{tower}."
        kernel = params.take(f"{name['embed']}/kernel")
        if tower == "audio":  # (time, mel, 3, D) → (D, 1, time, mel)
            kernel = kernel.sum(2, keepdim=True).permute(3, 2, 0, 1)
        else:  # (kt, kh, kw, 3, D) or (kh, kw, 3, D) → (D, 3, kt, kh, kw)
            kernel = kernel.permute(4, 3, 0, 1, 2) if kernel.ndim == 5 else kernel.permute(3, 2, 0, 1).unsqueeze(2)
        state[f"{prefix}patch_embed.proj.weight"] = kernel
        state[f"{prefix}patch_embed.proj.bias"] = params.take(f"{name['embed']}/bias")
        state[f"{prefix}pos_embed"] = params.take(name["pos"])
        if pool == "cls":
            state[f"{prefix}cls_token"] = params.take(name["cls"])
        for layer in range(depth):
            for key, value in _block(params, name["block"].format(layer), dim).items():
                state[f"{prefix}blocks.{layer}.{key}"] = value
        state[f"{prefix}norm.weight"] = params.take("Transformer/encoder_norm/scale")
        state[f"{prefix}norm.bias"] = params.take("Transformer/encoder_norm/bias")
    if left := params.unused():
        raise ValueError(f"{len(left)} arrays this mapping does not know: {left[:8]}")
    return cfg, state, unused
