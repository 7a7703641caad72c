"""MBT: equivalence with timm's ViT, fusion semantics, variants, the head as scenic's (zero init, per-tower logits,
'gap', 'gmp', 'gsp'), scenic's bottleneck token count and test-time bottlenecks."""

from __future__ import annotations

import pytest
import torch

from mbt.config import preset
from mbt.embeddings import forward_with_embeddings
from mbt.model import MBT, MBTConfig

TINY = MBTConfig(
    num_classes=5, embed_dim=32, depth=4, num_heads=2, fusion_layer=2, num_bottlenecks=3,
    num_frames=2, img_size=32, audio_frames=64, num_mel_bins=32,
)  # fmt: skip


def inputs(batch: int = 2, seed: int = 0, cfg: MBTConfig = TINY) -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    video = torch.randn(batch, cfg.num_frames, 3, cfg.img_size, cfg.img_size, generator=gen)
    audio = torch.randn(batch, 1, cfg.audio_frames, cfg.num_mel_bins, generator=gen)
    return video, audio


def random_head(model: MBT) -> MBT:
    """`model` with a random head: at its zero init no gradient reaches the towers and all logits are 0."""
    torch.manual_seed(1)
    torch.nn.init.normal_(model.head.weight, std=0.5)
    torch.nn.init.normal_(model.head.bias, std=0.5)
    return model


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
    video_tokens, audio_tokens, b = 1 + 2 * 4, 1 + 4 * 2, 3 + 1  # scenic's one more with the CLS pool
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
    model = random_head(MBT(TINY))
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
    model = random_head(MBT(TINY)).eval()
    with torch.no_grad():
        features = model.forward_features(*inputs())
        per_tower = torch.stack([model.head(features["video"][:, 0]), model.head(features["audio"][:, 0])])
        assert torch.allclose(model.forward_head(features, per_tower=True), per_tower, atol=1e-6)
        assert torch.allclose(model.forward_head(features), per_tower.mean(0), atol=1e-6)


def test_head_starts_at_zero():
    """scenic's output projection: zero kernel and bias (timm's init would draw the kernel)."""
    model = MBT(TINY)
    assert torch.count_nonzero(model.head.weight) == 0 and torch.count_nonzero(model.head.bias) == 0


@pytest.mark.parametrize("fusion", ["bottleneck", "late", "audio"])
def test_per_tower_gives_each_towers_logits_in_training(fusion):
    """scenic's MBT returns each tower's logits in training (its trainer averages their losses); their mean is the
    evaluation's logits. A single tower has one."""
    model = random_head(MBT(TINY.replace(fusion=fusion))).eval()
    video, audio = inputs()
    with torch.no_grad():
        both = model(video, audio, per_tower=True)
        assert both.shape == (len(model.towers), 2, 5)
        assert torch.allclose(both.mean(0), model(video, audio), atol=1e-6)


def test_gap_has_no_cls_and_pools_all_tokens_of_all_towers():
    """scenic's 'gap': no CLS token in any tower; one head on the mean over the concatenated tokens of both towers
    (bottleneck tokens left out), so that the video tower's 12 tokens outweigh the audio tower's 8."""
    cfg = TINY.replace(pool="gap", num_frames=3)
    model = random_head(MBT(cfg)).eval()
    for tower in model.towers.values():
        assert tower.cls_token is None and "cls_token" not in tower.state_dict()
    assert model.towers["video"].pos_embed.shape == (1, 4, 32) and model.towers["audio"].pos_embed.shape == (1, 8, 32)
    video, audio = inputs(cfg=cfg)
    with torch.no_grad():
        features = model.forward_features(video, audio)
        assert features["video"].shape[1] == 12 and features["audio"].shape[1] == 8
        pooled = torch.cat([features["video"], features["audio"]], dim=1).mean(1)
        assert torch.allclose(model(video, audio), model.head(pooled), atol=1e-6)
        assert torch.allclose(model(video, audio, per_tower=True), model.head(pooled)[None], atol=1e-6)


@pytest.mark.parametrize(("pool", "reduce"), [("gmp", lambda t: t.max(1).values), ("gsp", lambda t: t.sum(1))])
def test_gmp_and_gsp_pool_all_tokens_by_maximum_and_sum(pool, reduce):
    """scenic's 'gmp' and 'gsp': one head on the per-channel maximum or sum over both towers' tokens together."""
    cfg = TINY.replace(pool=pool, fusion="cross")
    model = random_head(MBT(cfg)).eval()
    video, audio = inputs(cfg=cfg)
    with torch.no_grad():
        features = model.forward_features(video, audio)
        pooled = reduce(torch.cat([features["video"], features["audio"]], dim=1))
        assert torch.allclose(model(video, audio), model.head(pooled), atol=1e-5)
        assert forward_with_embeddings(model, video, audio)[1]["audio"].equal(reduce(features["audio"]))


def test_bottleneck_tokens_one_more_with_cls_unless_pinned():
    """scenic makes n_bottlenecks + 1 tokens with its 'token' classifier (the default here); cls_bottleneck=False
    (the demo's) makes num_bottlenecks; without CLS tokens the count is num_bottlenecks either way."""
    counts = {
        (pool, pinned): MBT(TINY.replace(pool=pool, cls_bottleneck=not pinned)).bottleneck.shape[1]
        for pool in ("cls", "gap") for pinned in (False, True)
    }  # fmt: skip
    assert counts == {("cls", False): 4, ("cls", True): 3, ("gap", False): 3, ("gap", True): 3}


def test_bottleneck_tokens_of_the_presets_and_of_scenics_released_config():
    """The scenic presets hold scenic's 5 (n_bottlenecks=4 + 1 with the CLS pool), the demo the 4 it was tuned with.
    scenic's released config text (classifier 'gap', n_bottlenecks 4), as `pool="gap"`, holds 4: scenic's MBT
    itself cannot run it (its checkpoints are 'token', 5)."""
    tokens = {name: preset(name).model.bottleneck_tokens for name in ("audioset", "vggsound", "custom", "demo")}
    assert tokens == {"audioset": 5, "vggsound": 5, "custom": 5, "demo": 4}
    assert preset("audioset").model.replace(pool="gap").bottleneck_tokens == 4


def test_without_test_bottlenecks_evaluation_runs_the_towers_apart():
    """scenic's test_with_bottlenecks=False: in training the fused layers see the bottleneck tokens; at evaluation
    every layer runs each tower alone (the same weights): the logits are late fusion's, and no bottleneck tokens
    are embedded."""
    model = random_head(MBT(TINY.replace(test_with_bottlenecks=False)))
    late = MBT(TINY.replace(fusion="late"))
    late.load_state_dict({k: v for k, v in model.state_dict().items() if k != "bottleneck"})
    video, audio = inputs()
    with torch.no_grad():
        assert model.train().bottleneck_in_use() and not model.eval().bottleneck_in_use()
        assert torch.equal(model(video, audio), late.eval()(video, audio))
        assert not torch.allclose(model.train()(video, audio), late.train()(video, audio), atol=1e-3)
        logits, embedded = forward_with_embeddings(model.eval(), video, audio)
    assert torch.equal(logits, late.eval()(video, audio)) and "bottleneck" not in embedded


def test_checkpointing_and_bf16_autocast():
    torch.manual_seed(0)
    plain = random_head(MBT(TINY))
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
     ({"num_bottlenecks": 0, "cls_bottleneck": False}, "num_bottlenecks"), ({"num_heads": 5}, "divisible"),
     ({"video_embed": "conv"}, "video_embed"), ({"gelu": "fast"}, "gelu"),
     ({"video_embed": "tubelet", "tubelet_frames": 3}, "tubelets of 3"),
     ({"video_embed": "tubelet", "tubelet_frames": 0}, "tubelets of 0")],
)  # fmt: skip
def test_invalid_configs(change, message):
    with pytest.raises(ValueError, match=message):
        TINY.replace(**change)


def test_mbt_b_shapes():
    cfg = MBTConfig()
    model = MBT(cfg.replace(depth=1, fusion_layer=0))
    assert model.towers["video"].grid_size == (14, 14) and model.towers["audio"].grid_size == (50, 8)
    assert MBTConfig(audio_patch_stride=10).audio_grid == (79, 12)


def test_per_tower_traces_in_one_graph():
    """torch.compile (here dynamo with the eager backend: no compiler needed) takes `per_tower` as a forward
    argument without a graph break, as TrainStep calls it."""
    model = random_head(MBT(TINY)).train()
    video, audio = inputs()
    compiled = torch.compile(model, backend="eager", fullgraph=True)
    torch.manual_seed(0)
    ours = compiled(video, audio, per_tower=True)
    torch.manual_seed(0)
    assert torch.allclose(ours, model(video, audio, per_tower=True), atol=1e-5) and ours.shape == (2, 2, 5)


def test_default_video_embedding_and_gelu_are_unchanged():
    """The defaults stay the per-frame patches with a temporal embedding and timm's exact GELU; the scenic options
    are opt-in."""
    cfg = MBTConfig()
    assert (cfg.video_embed, cfg.gelu) == ("frame", "exact")
    video = MBT(TINY).towers["video"]
    assert video.temporal_embed is not None and video.patch_embed.proj.weight.ndim == 4
    assert video.blocks[0].mlp.act.approximate == "none"
    assert MBT(TINY.replace(gelu="tanh")).towers["audio"].blocks[0].mlp.act.approximate == "tanh"


def test_tubelet_tokens_in_time_row_column_order():
    """video_embed='tubelet': one Conv3d over tubelet_frames x patch x patch, tokens t·H'·W' + h·W' + w, one position
    embedding over them all (no temporal embedding), as scenic's 3d_conv tokeniser."""
    cfg = TINY.replace(video_embed="tubelet", num_frames=4, tubelet_frames=2)
    tower = MBT(cfg).towers["video"]
    assert tower.temporal_embed is None and tower.grid_size == (2, 2, 2) and tower.pos_embed.shape == (1, 9, 32)
    video, _ = inputs(cfg=cfg)
    proj = tower.patch_embed.proj
    with torch.no_grad():
        tokens = tower.tokens(video)
        for t, h, w in [(0, 0, 0), (0, 1, 0), (1, 0, 1), (1, 1, 1)]:
            clip = video[:, 2 * t : 2 * t + 2, :, 16 * h : 16 * h + 16, 16 * w : 16 * w + 16]
            expected = torch.einsum("bfchw,dcfhw->bd", clip, proj.weight) + proj.bias
            index = 1 + t * 4 + h * 2 + w
            assert torch.allclose(tokens[:, index], expected + tower.pos_embed[:, index], atol=1e-5)
    with pytest.raises(ValueError, match="tubelet grid"):
        tower.tokens(video[:, :2])
