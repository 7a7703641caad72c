"""MBT: equivalence with timm's ViT, fusion semantics, variants, initialisation from local ViT checkpoints."""

from __future__ import annotations

import pytest
import torch
from safetensors.torch import save_file
from timm.models.vision_transformer import VisionTransformer

from mbt.model import MBT, CheckpointError, MBTConfig, init_from_vit

TINY = MBTConfig(
    num_classes=5, embed_dim=32, depth=4, num_heads=2, fusion_layer=2, num_bottlenecks=3,
    num_frames=2, img_size=32, audio_frames=64, num_mel_bins=32,
)  # fmt: skip


def inputs(batch: int = 2, seed: int = 0, cfg: MBTConfig = TINY) -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    video = torch.randn(batch, cfg.num_frames, 3, cfg.img_size, cfg.img_size, generator=gen)
    audio = torch.randn(batch, 1, cfg.audio_frames, cfg.num_mel_bins, generator=gen)
    return video, audio


def tiny_vit(img_size=32, in_chans=3, embed_dim=32, depth=4) -> VisionTransformer:
    torch.manual_seed(0)
    vit = VisionTransformer(img_size=img_size, patch_size=16, in_chans=in_chans, embed_dim=embed_dim, depth=depth,
                            num_heads=2, num_classes=0).eval()  # fmt: skip
    with torch.no_grad():  # a trained-looking state: nothing left at its zero or one init
        for p in vit.parameters():
            p.add_(0.02 * torch.randn_like(p))
    return vit


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
    init_from_vit(model, audio=tmp_path / "vit.safetensors")
    mel = torch.randn(2, 1, 64, 32)
    ours = model.forward_features(torch.randn(2, 2, 3, 32, 32), mel)["audio"]
    assert torch.allclose(ours, vit.forward_features(mel), atol=1e-6)


def test_audio_init_sums_rgb_kernels_and_resamples_positions(tmp_path):
    vit = tiny_vit()
    torch.save(vit.state_dict(), tmp_path / "vit.pth")
    model = MBT(TINY)
    init_from_vit(model, video=tmp_path / "vit.pth", audio=tmp_path / "vit.pth")
    audio = model.towers["audio"]
    assert torch.equal(audio.patch_embed.proj.weight, vit.patch_embed.proj.weight.sum(1, keepdim=True))
    assert audio.pos_embed.shape == (1, 1 + 4 * 2, 32) and torch.equal(audio.pos_embed[:, 0], vit.pos_embed[:, 0])
    assert torch.count_nonzero(model.towers["video"].temporal_embed) == 0
    assert torch.equal(model.towers["video"].blocks[3].mlp.fc2.weight, vit.blocks[3].mlp.fc2.weight)


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


@pytest.mark.parametrize("fusion", ["late", "bottleneck", "cross"])
def test_what_the_video_cls_depends_on(fusion):
    model = MBT(TINY.replace(fusion=fusion)).eval()
    video, audio = inputs()
    _, other_audio = inputs(seed=1)
    with torch.no_grad():
        a = model.forward_features(video, audio)["video"][:, 0]
        b = model.forward_features(video, other_audio)["video"][:, 0]
    assert torch.equal(a, b) == (fusion == "late")


def test_bottleneck_fusion_passes_only_bottleneck_tokens_between_towers():
    model = MBT(TINY).eval()
    seen = {"video": [], "audio": []}
    for m, tower in model.towers.items():
        for block in tower.blocks:
            block.register_forward_hook(lambda mod, args, out, m=m: seen[m].append(args[0].shape[1]))
    model(*inputs())
    video_tokens, audio_tokens, b = 1 + 2 * 4, 1 + 4 * 2, 3
    assert seen["video"] == [video_tokens] * 2 + [video_tokens + b] * 2  # never the audio tokens
    assert seen["audio"] == [audio_tokens] * 2 + [audio_tokens + b] * 2
    cross = MBT(TINY.replace(fusion="cross")).eval()
    seen = {"video": [], "audio": []}
    for m, tower in cross.towers.items():
        for block in tower.blocks:
            block.register_forward_hook(lambda mod, args, out, m=m: seen[m].append(args[0].shape[1]))
    cross(*inputs())
    assert seen["video"][2:] == [video_tokens + audio_tokens] * 2


def test_gradients_reach_the_bottleneck_tokens():
    model = MBT(TINY)
    model(*inputs()).sum().backward()
    assert model.bottleneck.grad is not None and model.bottleneck.grad.abs().sum() > 0


@pytest.mark.parametrize("fusion", ["video", "audio"])
def test_single_tower_variants(fusion):
    model = MBT(TINY.replace(fusion=fusion)).eval()
    video, audio = inputs()
    logits = model(video=video if fusion == "video" else None, audio=audio if fusion == "audio" else None)
    assert logits.shape == (2, 5) and list(model.towers) == [fusion]
    with pytest.raises(ValueError, match=f"needs {fusion} input"):
        model()


def test_head_is_shared_and_logits_averaged():
    model = MBT(TINY.replace(pool="gap")).eval()
    with torch.no_grad():
        features = model.forward_features(*inputs())
        pooled = [t[:, 1:].mean(1) for t in features.values()]
        expected = (model.head(pooled[0]) + model.head(pooled[1])) / 2
        assert torch.allclose(model.forward_head(features), expected, atol=1e-6)


def test_checkpointing_and_bf16_autocast():
    torch.manual_seed(0)
    plain = MBT(TINY)
    checked = MBT(TINY.replace(grad_checkpointing=True))
    checked.load_state_dict(plain.state_dict())
    video, audio = inputs()
    plain(video, audio).sum().backward()
    checked(video, audio).sum().backward()
    for (name, p), q in zip(plain.named_parameters(), checked.parameters(), strict=True):
        assert torch.allclose(p.grad, q.grad, atol=1e-5), name
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert plain(video, audio).dtype == torch.bfloat16


@pytest.mark.parametrize(
    ("change", "message"),
    [({"fusion": "early"}, "fusion must be"), ({"fusion_layer": 5}, "fusion_layer"), ({"pool": "max"}, "pool"),
     ({"num_bottlenecks": 0}, "num_bottlenecks"), ({"num_heads": 5}, "divisible")],
)  # fmt: skip
def test_invalid_configs(change, message):
    with pytest.raises(ValueError, match=message):
        TINY.replace(**change)


def test_mbt_b_shapes():
    cfg = MBTConfig()
    model = MBT(cfg.replace(depth=1, fusion_layer=0))
    assert model.towers["video"].grid_size == (14, 14) and model.towers["audio"].grid_size == (50, 8)
    assert MBTConfig(audio_patch_stride=10).audio_grid == (79, 12)
