"""Stochastic depth as scenic's EncoderBlock drops branches (`mbt.blocks`): per layer at l / max(L - 1, 1) · rate, a
dropped branch's example left as its input, a kept one unscaled (scenic) or scaled by 1 / (1 - p) (timm,
`drop_path_scale=True`); at inference both are the plain block."""

from __future__ import annotations

import pytest
import torch
from test_model import TINY, inputs

from mbt.blocks import drop_path_rates, encoder_blocks
from mbt.config import preset
from mbt.model import MBT, MBTConfig


def test_each_layer_drops_at_scenics_rate():
    """scenic's Encoder: droplayer_p = lyr / max(num_layers - 1, 1) * stochastic_droplayer_rate."""
    assert drop_path_rates(0.3, 12) == [lyr / 11 * 0.3 for lyr in range(12)]
    assert drop_path_rates(0.3, 1) == [0.0]
    model = MBT(TINY.replace(depth=4, fusion_layer=2, drop_path_rate=0.3))
    for tower in model.towers.values():
        probs = [(b.drop_path1.drop_prob, b.drop_path2.drop_prob) for b in tower.blocks[1:]]
        assert probs == [(lyr / 3 * 0.3,) * 2 for lyr in range(1, 4)]
        assert isinstance(tower.blocks[0].drop_path1, torch.nn.Identity)  # layer 0: never dropped


def test_scenics_stochastic_depth_is_the_default_of_the_recipe():
    assert MBTConfig().drop_path_scale is False
    assert preset("audioset").model.drop_path_scale is False and preset("vggsound").model.drop_path_scale is False
    assert preset("demo").model.drop_path_scale is True  # as the demo was tuned (its rate is 0: no effect)


@pytest.mark.parametrize("scale", [False, True], ids=["scenic", "timm"])
def test_expected_output_of_a_dropped_block(scale):
    """A block whose MLP branch adds nothing: x + b · s · attn(x), b ~ Bernoulli(1 - p) per example. Each example's
    output is x or x + s · attn(x), s = 1 (scenic) or 1 / (1 - p) (timm), so that the expected output is
    x + (1 - p) · attn(x) in scenic's mode and inference's x + attn(x) in timm's."""
    p = 0.6
    cfg = TINY.replace(depth=2, drop_path_rate=p, drop_path_scale=scale)
    torch.manual_seed(0)
    block = encoder_blocks(cfg)[1]  # layer 1 of 2: p = 1 / 1 · 0.6
    with torch.no_grad():
        block.mlp.fc2.weight.zero_()
        block.mlp.fc2.bias.zero_()
        x = torch.randn(1, 3, cfg.embed_dim).expand(4000, -1, -1)
        branch = block.attn(block.norm1(x[:1]))
        out = block.train()(x)
    s = 1 / (1 - p) if scale else 1.0
    dropped = torch.isclose(out, x, atol=1e-6).flatten(1).all(1)
    kept = torch.isclose(out, x + s * branch, atol=1e-5).flatten(1).all(1)
    assert bool((dropped ^ kept).all())  # every example: the branch dropped, or kept and scaled by s alone
    assert abs(dropped.float().mean().item() - p) < 0.03
    expected = x[0] + ((1 - p) * s) * branch[0]
    assert torch.allclose(out.mean(0), expected, atol=0.05 * branch.abs().max().item())


def test_inference_runs_every_branch_in_both_modes():
    """In eval mode nothing is dropped or scaled: scenic's and timm's modes, and no stochastic depth at all, give
    the same logits from the same weights."""
    video, audio = inputs()
    logits = []
    for rate, scale in ((0.0, False), (0.5, False), (0.5, True)):
        torch.manual_seed(0)
        model = MBT(TINY.replace(drop_path_rate=rate, drop_path_scale=scale)).eval()
        torch.nn.init.normal_(model.head.weight)
        with torch.no_grad():
            logits.append(model(video, audio))
    assert torch.equal(logits[0], logits[1]) and torch.equal(logits[0], logits[2])
