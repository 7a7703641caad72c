"""Initialisation from ImageNet ViT checkpoints (`mbt.pretrained`) as scenic's: each tower equals timm's ViT with
the same weights, position grids resized as scipy.ndimage.zoom(order=1), the bottleneck tokens taken from the video
ViT's position embedding, the original JAX `.npz` read through timm's own reader, and files that cannot be used
named; what scenic's `initialise_from_train_state` restores ("scenic", the default) and every tensor ("vit")."""

from __future__ import annotations

import numpy as np
import pytest
import scipy.ndimage
import timm.models.vision_transformer
import torch
from safetensors.torch import save_file
from test_model import TINY
from timm.models.vision_transformer import VisionTransformer, _load_weights

from mbt.model import MBT
from mbt.pretrained import CheckpointError, init_from_vit


def tiny_vit(img_size=32, in_chans=3, embed_dim=32, depth=4, **options) -> VisionTransformer:
    torch.manual_seed(0)
    vit = VisionTransformer(img_size=img_size, patch_size=16, in_chans=in_chans, embed_dim=embed_dim, depth=depth,
                            num_heads=2, num_classes=0, **options).eval()  # fmt: skip
    with torch.no_grad():  # a trained-looking state: nothing left at its zero or one init
        for p in vit.parameters():
            p.add_(0.02 * torch.randn_like(p))
    return vit


def vit_to_npz(vit: VisionTransformer, big_vision: bool = False) -> dict[str, np.ndarray]:
    """`vit`'s weights as the arrays of a JAX checkpoint: google-research/vision_transformer's layout (the
    imagenet21k ViT-B_16.npz: a position embedding with the CLS's, sublayers MultiHeadDotProductAttention_1,
    LayerNorm_2, MlpBlock_3, and the pre-logits and head MBT does not use), or big_vision's ('params/' prefix, a
    position embedding of the patches only, sublayers numbered 0, 1, 0). The inverse of timm's `_load_weights`."""
    sd = {k: v.detach().numpy() for k, v in vit.state_dict().items()}
    width, heads = vit.embed_dim, vit.blocks[0].attn.num_heads
    attention, norm2, mlp = ("MultiHeadDotProductAttention_0", "LayerNorm_1", "MlpBlock_0") if big_vision else (
        "MultiHeadDotProductAttention_1", "LayerNorm_2", "MlpBlock_3")  # fmt: skip
    arrays = {
        "cls": sd["cls_token"],
        "embedding/kernel": sd["patch_embed.proj.weight"].transpose(2, 3, 1, 0),  # OIHW → HWIO
        "embedding/bias": sd["patch_embed.proj.bias"],
        "pos_embedding" if big_vision else "Transformer/posembed_input/pos_embedding": sd["pos_embed"],
        "Transformer/encoder_norm/scale": sd["norm.weight"],
        "Transformer/encoder_norm/bias": sd["norm.bias"],
    }
    if not big_vision:
        arrays |= {"pre_logits/kernel": np.eye(width, dtype=np.float32), "pre_logits/bias": np.zeros(width, np.float32),
                   "head/kernel": np.zeros((width, 7), np.float32), "head/bias": np.zeros(7, np.float32)}  # fmt: skip
    for i in range(len(vit.blocks)):
        block, ours = f"Transformer/encoderblock_{i}/", f"blocks.{i}."
        for theirs, name in (("LayerNorm_0", "norm1"), (norm2, "norm2")):
            arrays[f"{block}{theirs}/scale"] = sd[f"{ours}{name}.weight"]
            arrays[f"{block}{theirs}/bias"] = sd[f"{ours}{name}.bias"]
        for theirs, name in (("Dense_0", "fc1"), ("Dense_1", "fc2")):
            arrays[f"{block}{mlp}/{theirs}/kernel"] = sd[f"{ours}mlp.{name}.weight"].T
            arrays[f"{block}{mlp}/{theirs}/bias"] = sd[f"{ours}mlp.{name}.bias"]
        out = sd[f"{ours}attn.proj.weight"].reshape(width, heads, -1)
        arrays[f"{block}{attention}/out/kernel"] = out.transpose(1, 2, 0)  # (heads, head width, width)
        arrays[f"{block}{attention}/out/bias"] = sd[f"{ours}attn.proj.bias"]
        for j, name in enumerate(("query", "key", "value")):  # (width, heads, head width), rows of timm's qkv
            rows = slice(j * width, (j + 1) * width)
            arrays[f"{block}{attention}/{name}/kernel"] = sd[f"{ours}attn.qkv.weight"][rows].T.reshape(width, heads, -1)
            arrays[f"{block}{attention}/{name}/bias"] = sd[f"{ours}attn.qkv.bias"][rows].reshape(heads, -1)
    prefix = "params/" if big_vision else ""
    return {prefix + k: np.ascontiguousarray(v) for k, v in arrays.items()}


def save_npz(path, vit: VisionTransformer, big_vision: bool = False):
    np.savez(path, **vit_to_npz(vit, big_vision))
    return path


def grid_of(pos: torch.Tensor, shape: tuple[int, int]) -> np.ndarray:
    """The patch positions of a position embedding (1, 1 + h * w, D) as an (h, w, D) array."""
    return pos[0, 1:].detach().numpy().reshape(*shape, -1)


def test_video_tower_on_one_frame_is_timms_vit(tmp_path):
    vit = tiny_vit()
    torch.save({"model": vit.state_dict()}, tmp_path / "vit.pth")
    model = MBT(TINY.replace(fusion="late", num_frames=1)).eval()
    assert init_from_vit(model, video=tmp_path / "vit.pth") == [f"video tower <- {tmp_path / 'vit.pth'}"]
    frame = torch.randn(2, 3, 32, 32)
    ours = model.forward_features(frame[:, None], torch.randn(2, 1, 64, 32))["video"]
    assert torch.allclose(ours, vit.forward_features(frame), atol=1e-6)


def test_audio_tower_is_timms_vit_on_the_spectrogram(tmp_path):
    vit = tiny_vit(img_size=(64, 32), in_chans=1)
    save_file(vit.state_dict(), tmp_path / "vit.safetensors")
    model = MBT(TINY.replace(fusion="late")).eval()
    init_from_vit(model, audio=tmp_path / "vit.safetensors", mode="vit")  # "scenic" leaves the audio CLS at zero
    mel = torch.randn(2, 1, 64, 32)
    ours = model.forward_features(torch.randn(2, 2, 3, 32, 32), mel)["audio"]
    assert torch.allclose(ours, vit.forward_features(mel), atol=1e-6)


def test_audio_init_sums_rgb_kernels(tmp_path):
    vit = tiny_vit()
    torch.save(vit.state_dict(), tmp_path / "vit.pth")
    model = MBT(TINY)
    init_from_vit(model, video=tmp_path / "vit.pth", audio=tmp_path / "vit.pth")
    audio = model.towers["audio"]
    assert torch.equal(audio.patch_embed.proj.weight, vit.patch_embed.proj.weight.sum(1, keepdim=True))
    assert audio.pos_embed.shape == (1, 1 + 4 * 2, 32) and torch.equal(audio.pos_embed[:, 0], vit.pos_embed[:, 0])
    assert torch.count_nonzero(model.towers["video"].temporal_embed) == 0
    assert torch.equal(model.towers["video"].blocks[3].mlp.fc2.weight, vit.blocks[3].mlp.fc2.weight)


def test_position_grids_resize_as_scenic_with_scipy_zoom(tmp_path):
    """scenic resizes the ViT's square grid with scipy.ndimage.zoom(order=1) (bilinear, corners aligned) to the
    audio grid (here 4x4 → 10x2), a video grid of another size (4x4 → 3x3) and, in "vit" mode, for all the
    bottleneck tokens to gh x gw = n tokens (gh = int(sqrt(6)) = 2, gw = 3); timm's bicubic resampling is not
    that."""
    vit = tiny_vit(img_size=64)
    torch.save(vit.state_dict(), tmp_path / "vit.pth")
    model = MBT(TINY.replace(img_size=48, audio_frames=160, num_bottlenecks=6, cls_bottleneck=False))
    lines = init_from_vit(model, video=tmp_path / "vit.pth", audio=tmp_path / "vit.pth", mode="vit")
    assert lines[1] == f"bottleneck tokens <- {tmp_path / 'vit.pth'} (its 4x4 position grid resized to 2x3)"
    grid = grid_of(vit.pos_embed, (4, 4))
    for tower, shape in ((model.towers["audio"], (10, 2)), (model.towers["video"], (3, 3))):
        expected = scipy.ndimage.zoom(grid, (shape[0] / 4, shape[1] / 4, 1), order=1)
        assert expected.shape[:2] == tower.grid_size == shape
        np.testing.assert_allclose(grid_of(tower.pos_embed, shape), expected, rtol=0, atol=1e-6)
        assert torch.equal(tower.pos_embed[:, 0], vit.pos_embed[:, 0])  # the CLS position as it is
    expected = scipy.ndimage.zoom(grid, (2 / 4, 3 / 4, 1), order=1).reshape(1, 6, -1)
    np.testing.assert_allclose(model.bottleneck.detach().numpy(), expected, rtol=0, atol=1e-6)


@pytest.mark.parametrize(("mode", "tokens", "grid"), [("vit", 5, 5), ("scenic", 6, 5), ("scenic", 1, 0)])
def test_bottleneck_tokens_of_no_grid_stay_random(tmp_path, mode, tokens, grid):
    """5 grid tokens: int(sqrt(5)) x 5 // 2 = 2x2 is not 5 (scenic's rule would assert), nor are 0 (scenic's would
    divide by zero): the random init is kept. In "scenic" mode with CLS tokens the grid is all tokens but the
    first."""
    torch.save(tiny_vit().state_dict(), tmp_path / "vit.pth")
    model = MBT(TINY.replace(num_bottlenecks=tokens, cls_bottleneck=False))
    before = model.bottleneck.detach().clone()
    lines = init_from_vit(model, video=tmp_path / "vit.pth", mode=mode)
    assert lines[1].startswith(f"bottleneck tokens: kept random ({grid} tokens")
    assert torch.equal(model.bottleneck, before)


def test_scenic_mode_restores_what_scenics_initialiser_restores(tmp_path):
    """scenic's `initialise_from_train_state` from one ViT .npz for both towers (its AudioSet recipe): every tensor of
    the video tower, and of the audio tower all but the CLS token (scenic's MBT names it 'clsspectrogram', and the
    initialiser copies the ViT's 'cls' to 'cls_spectrogram', which is no parameter: it keeps its zero init); the
    bottleneck tokens (n_bottlenecks + 1 = 5 with the token classifier) are the ViT's CLS position, then its 4x4
    patch grid zoomed to int(sqrt(4)) x 4 // 2 = 2x2. The "vit" mode differs in those two tensors alone."""
    vit = tiny_vit(img_size=64)
    path = save_npz(tmp_path / "ViT-B_16.npz", vit)
    states, lines = {}, {}
    for mode in ("scenic", "vit"):
        torch.manual_seed(0)
        model = MBT(TINY.replace(img_size=48, audio_frames=160, num_bottlenecks=4))
        lines[mode] = init_from_vit(model, video=path, audio=path, mode=mode)
        states[mode] = model.state_dict()
    differ = {k for k, v in states["vit"].items() if not torch.equal(states["scenic"][k], v)}
    assert differ == {"towers.audio.cls_token", "bottleneck"}
    assert torch.count_nonzero(states["scenic"]["towers.audio.cls_token"]) == 0
    for mode, tower in (("scenic", "video"), ("vit", "video"), ("vit", "audio")):
        torch.testing.assert_close(states[mode][f"towers.{tower}.cls_token"], vit.cls_token.detach(), rtol=0, atol=0)
    pos = vit.pos_embed.detach()
    grid = scipy.ndimage.zoom(grid_of(pos, (4, 4)), (2 / 4, 2 / 4, 1), order=1).reshape(1, 4, -1)
    expected = np.concatenate([pos[:, :1].numpy(), grid], axis=1)
    np.testing.assert_allclose(states["scenic"]["bottleneck"].numpy(), expected, rtol=0, atol=1e-6)
    assert lines["scenic"] == [
        f"video tower <- {path}",
        f"bottleneck tokens <- {path} (its CLS position, then its 4x4 position grid resized to 2x2)",
        f"audio tower <- {path} (its CLS token left at zero: scenic restores no 'clsspectrogram')",
    ]


def test_scenic_mode_without_cls_tokens_or_beside_no_video_tower(tmp_path):
    """scenic's 'gap' classifier: no CLS row, the grid resized to all n tokens (4: 2x2). A spectrogram-only model
    names its CLS 'cls' (scenic's MBT: one modality takes no suffix), which the initialiser restores."""
    vit = tiny_vit(img_size=64)
    path = save_npz(tmp_path / "vit.npz", vit)
    model = MBT(TINY.replace(img_size=48, pool="gap", num_bottlenecks=4))
    init_from_vit(model, video=path, audio=path)
    grid = scipy.ndimage.zoom(grid_of(vit.pos_embed, (4, 4)), (2 / 4, 2 / 4, 1), order=1).reshape(1, 4, -1)
    np.testing.assert_allclose(model.bottleneck.detach().numpy(), grid, rtol=0, atol=1e-6)
    audio_only = MBT(TINY.replace(fusion="audio", audio_frames=160))
    assert init_from_vit(audio_only, audio=path) == [f"audio tower <- {path}"]
    assert torch.equal(audio_only.towers["audio"].cls_token, vit.cls_token)
    with pytest.raises(ValueError, match="mode must be one of scenic, vit, got 'full'"):
        init_from_vit(audio_only, audio=path, mode="full")


def test_tubelets_start_from_the_central_frame_and_a_tiled_grid(tmp_path):
    """A tubelet tower from an image ViT, as scenic's MBT-B/16x2 (`central_frame_initializer`, 'resize_tile'): the
    2D kernel at the tubelet's central frame (index 2 // 2 = 1) and zero elsewhere, so that each tubelet token is the
    ViT's patch embedding of its second frame; the position grid resized (4x4 → 3x3) and the same at each time step."""
    vit = tiny_vit(img_size=64)
    torch.save(vit.state_dict(), tmp_path / "vit.pth")
    model = MBT(TINY.replace(video_embed="tubelet", num_frames=4, tubelet_frames=2, img_size=48, fusion="late"))
    init_from_vit(model, video=tmp_path / "vit.pth")
    tower = model.towers["video"]
    weight = tower.patch_embed.proj.weight
    assert torch.equal(weight[:, :, 1], vit.patch_embed.proj.weight) and torch.count_nonzero(weight[:, :, 0]) == 0
    grid = scipy.ndimage.zoom(grid_of(vit.pos_embed, (4, 4)), (3 / 4, 3 / 4, 1), order=1).reshape(9, -1)
    np.testing.assert_allclose(tower.pos_embed[0, 1:].detach().numpy(), np.tile(grid, (2, 1)), rtol=0, atol=1e-6)
    assert torch.equal(tower.pos_embed[:, 0], vit.pos_embed[:, 0])
    video = torch.randn(2, 4, 3, 48, 48)
    with torch.no_grad():
        tokens = tower.tokens(video)[:, 1:].reshape(2, 2, 9, -1)
        for t in range(2):
            patches = vit.patch_embed.proj(video[:, 2 * t + 1]).flatten(2).transpose(1, 2)
            expected = patches + tower.pos_embed[:, 1 + 9 * t : 10 + 9 * t]
            assert torch.allclose(tokens[:, t], expected, atol=1e-5)


def test_gap_towers_take_no_cls_from_the_vit(tmp_path):
    """pool='gap' towers have no CLS token: the ViT's CLS token and position are left out."""
    vit = tiny_vit()
    torch.save(vit.state_dict(), tmp_path / "vit.pth")
    model = MBT(TINY.replace(pool="gap", fusion="late", num_frames=1)).eval()
    init_from_vit(model, video=tmp_path / "vit.pth", audio=tmp_path / "vit.pth")
    video = model.towers["video"]
    assert video.cls_token is None and torch.equal(video.pos_embed, vit.pos_embed[:, 1:])
    frame = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        assert torch.allclose(video.tokens(frame[:, None]), vit._pos_embed(vit.patch_embed(frame))[:, 1:], atol=1e-6)


@pytest.mark.parametrize("big_vision", [False, True], ids=["vision_transformer", "big_vision"])
def test_npz_layout_is_what_timms_reader_reads(tmp_path, monkeypatch, big_vision):
    """The test's inverse mapping (vit_to_npz) holds every array timm's `_load_weights` reads, under the names it
    reads, and nothing else but the head and pre-logits that MBT does not use; it gives the ViT back."""
    vit = tiny_vit(no_embed_class=big_vision)
    arrays = vit_to_npz(vit, big_vision)

    class Recorded(dict):
        def __init__(self, arrays: dict[str, np.ndarray]) -> None:
            super().__init__(arrays)
            self.read: set[str] = set()

        def __getitem__(self, key: str) -> np.ndarray:
            self.read.add(key)
            return super().__getitem__(key)

    recorded = Recorded(arrays)
    monkeypatch.setattr(timm.models.vision_transformer, "_load_npz_checkpoint", lambda path, **options: recorded)
    fresh = VisionTransformer(img_size=32, patch_size=16, embed_dim=32, depth=4, num_heads=2, num_classes=0,
                              no_embed_class=big_vision)  # fmt: skip
    _load_weights(fresh, "unused.npz")
    assert recorded.read == {k for k in arrays if not k.startswith(("head/", "pre_logits/"))}
    for name, value in vit.state_dict().items():
        assert torch.equal(fresh.state_dict()[name], value), name


@pytest.mark.parametrize("big_vision", [False, True], ids=["vision_transformer", "big_vision"])
def test_towers_from_the_original_npz_equal_timms_vit(tmp_path, big_vision):
    """ViT checkpoints in the JAX .npz layout: an RGB ViT for the video tower and a one-channel one for the audio
    tower (both 32x32, 2x2 patches); each tower then computes what timm's ViT with those weights computes."""
    rgb, mono = tiny_vit(no_embed_class=big_vision), tiny_vit(in_chans=1, no_embed_class=big_vision)
    video_npz, audio_npz = (
        save_npz(tmp_path / "rgb.npz", rgb, big_vision),
        save_npz(tmp_path / "mono.npz", mono, big_vision),
    )
    model = MBT(TINY.replace(fusion="late", num_frames=1, audio_frames=32, num_mel_bins=32)).eval()
    assert init_from_vit(model, video=video_npz, audio=audio_npz, mode="vit") == [
        f"video tower <- {video_npz}", f"audio tower <- {audio_npz}"
    ]  # fmt: skip
    frame, mel = torch.randn(2, 3, 32, 32), torch.randn(2, 1, 32, 32)
    with torch.no_grad():
        features = model.forward_features(frame[:, None], mel)
        assert torch.allclose(features["video"], rgb.forward_features(frame), atol=1e-5)
        assert torch.allclose(features["audio"], mono.forward_features(mel), atol=1e-5)


def test_npz_initialises_as_the_same_timm_file(tmp_path):
    """The .npz of a ViT and its timm state dict give MBT the same weights, resized grids and bottleneck included."""
    vit = tiny_vit(img_size=64)
    torch.save(vit.state_dict(), tmp_path / "vit.pth")
    save_npz(tmp_path / "vit.npz", vit)
    models = {}
    for name in ("vit.pth", "vit.npz"):
        torch.manual_seed(0)
        models[name] = MBT(TINY.replace(num_bottlenecks=4))
        init_from_vit(models[name], video=tmp_path / name, audio=tmp_path / name)
    for (key, a), b in zip(
        models["vit.pth"].state_dict().items(), models["vit.npz"].state_dict().values(), strict=True
    ):
        assert torch.allclose(a, b, atol=1e-6), key


def test_bad_checkpoints_name_what_is_wrong(tmp_path):
    model = MBT(TINY)
    with pytest.raises(CheckpointError, match="no such checkpoint file"):
        init_from_vit(model, video=tmp_path / "missing.pth")
    torch.save(tiny_vit(embed_dim=64).state_dict(), tmp_path / "wide.pth")
    with pytest.raises(
        CheckpointError,
        match=r"wide\.pth.*of another shape.*blocks\.0\.attn\.proj\.bias: checkpoint \(64,\) vs model \(32,\)",
    ):
        init_from_vit(model, video=tmp_path / "wide.pth")
    torch.save(tiny_vit(depth=2).state_dict(), tmp_path / "shallow.pth")
    with pytest.raises(CheckpointError, match=r"keys missing \['blocks\.2\."):
        init_from_vit(model, audio=tmp_path / "shallow.pth")


def test_npz_that_is_no_vit_is_named(tmp_path):
    model = MBT(TINY)
    whole = save_npz(tmp_path / "vit.npz", tiny_vit())
    (tmp_path / "noise.npz").write_bytes(np.random.default_rng(0).bytes(4096))
    (tmp_path / "cut.npz").write_bytes(whole.read_bytes()[: whole.stat().st_size // 2])
    np.savez(tmp_path / "other.npz", weights=np.zeros(3, np.float32))
    partial = {
        k: v for k, v in vit_to_npz(tiny_vit()).items() if k != "Transformer/encoderblock_1/MlpBlock_3/Dense_1/bias"
    }
    np.savez(tmp_path / "partial.npz", **partial)
    wide = vit_to_npz(tiny_vit(embed_dim=64))
    np.savez(tmp_path / "wide.npz", **wide)
    for name, message in [
        ("noise.npz", "not a readable .npz archive of arrays"),
        ("cut.npz", "not a readable .npz archive of arrays"),
        ("other.npz", "no patch embedding 'embedding/kernel' of 4 axes: not a ViT .npz"),
        ("partial.npz", "not a ViT in the vision_transformer / big_vision .npz layout"),
        ("wide.npz", r"of another shape .*checkpoint \(64,\) vs model \(32,\)"),
    ]:
        with pytest.raises(CheckpointError, match=rf"^{tmp_path / name}: .*{message}"):
            init_from_vit(model, video=tmp_path / name)
