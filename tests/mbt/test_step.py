"""The training step's loss as scenic's MBT trains: sigmoid or softmax cross-entropy summed over the classes and
averaged over the examples, one loss per tower (their mean), mixup's one λ and targets for every tower."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from dist_clip_check import MAX_NORM, MODEL, initial_model, rank_batch
from test_model import TINY, inputs, random_head

from mbt.config import TrainConfig
from mbt.model import MBT
from mbt.step import TrainStep, loss_fn, soft_targets
from pipelines.config import AugmentConfig
from pipelines.mixup import mixup


def scenic_sigmoid_ce(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """scenic's weighted_sigmoid_cross_entropy without weights: the sum over every example and class of
    -(y log σ(x) + (1 - y) log σ(-x)), over the number of examples."""
    per_class = -(targets * F.logsigmoid(logits) + (1 - targets) * F.logsigmoid(-logits))
    return per_class.sum() / logits.shape[0]


def scenic_softmax_ce(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """scenic's weighted_softmax_cross_entropy without weights: sum of -y log softmax(x), over the examples."""
    return (-targets * F.log_softmax(logits, dim=-1)).sum() / logits.shape[0]


def test_multi_label_loss_sums_the_classes():
    """Not BCE's default mean over examples x classes, which is the reference's loss divided by the classes."""
    gen = torch.Generator().manual_seed(0)
    logits = 3 * torch.randn(4, 6, generator=gen)
    targets = soft_targets((torch.rand(4, 6, generator=gen) < 0.3).float(), 6, label_smoothing=0.3)
    loss = loss_fn(logits, targets, multi_label=True)
    assert loss == pytest.approx(scenic_sigmoid_ce(logits, targets).item(), rel=1e-6)
    assert loss == pytest.approx(6 * F.binary_cross_entropy_with_logits(logits, targets).item(), rel=1e-6)


def test_single_label_loss_is_scenics_softmax_cross_entropy():
    gen = torch.Generator().manual_seed(0)
    logits = 3 * torch.randn(4, 6, generator=gen)
    targets = soft_targets(torch.tensor([0, 5, 2, 2]), 6, label_smoothing=0.1)
    assert targets[0, 0] == pytest.approx(0.9 + 0.1 / 6) and targets[0, 1] == pytest.approx(0.1 / 6)
    loss = loss_fn(logits, targets, multi_label=False)
    assert loss == pytest.approx(scenic_softmax_ce(logits, targets).item(), rel=1e-6)


@pytest.mark.parametrize("multi_label", [True, False])
def test_the_towers_losses_are_averaged(multi_label):
    """Logits (towers, B, C) against one set of targets (B, C): the mean of each tower's loss, which is not the loss
    of the averaged logits."""
    gen = torch.Generator().manual_seed(0)
    logits = 3 * torch.randn(2, 4, 6, generator=gen)
    labels = (torch.rand(4, 6, generator=gen) < 0.3).float() if multi_label else torch.tensor([0, 5, 2, 2])
    targets = soft_targets(labels, 6, label_smoothing=0.3)
    reference = scenic_sigmoid_ce if multi_label else scenic_softmax_ce
    expected = (reference(logits[0], targets) + reference(logits[1], targets)) / 2
    loss = loss_fn(logits, targets, multi_label)
    assert loss == pytest.approx(expected.item(), rel=1e-6)
    assert loss != pytest.approx(reference(logits.mean(0), targets).item(), rel=1e-3)


@pytest.mark.parametrize("pool", ["cls", "gap"])
def test_train_step_trains_each_tower_on_its_own_logits(pool):
    """TrainStep's loss is the mean of the towers' losses against the same mixed-up, smoothed targets (one λ);
    with 'gap' the model has one logits and one loss."""
    cfg = TrainConfig(
        model=TINY.replace(pool=pool), augment=AugmentConfig(mixup_alpha=0.5), batch_size=4, label_smoothing=0.3
    )
    torch.manual_seed(0)
    model = random_head(MBT(cfg.model))
    video, audio = inputs(batch=4)
    batch = {"video": video, "audio": audio, "labels": (torch.rand(4, 5) < 0.4).float(), "key": list("abcd")}
    rng = np.random.default_rng([cfg.seed, 7, 0, 0])  # the step's draw: seed, step, rank, micro-batch
    mixed = mixup(dict(batch), 0.5, 5, rng)
    targets = soft_targets(mixed["labels"], 5, cfg.label_smoothing)
    with torch.no_grad():
        per_tower = model(mixed["video"], mixed["audio"], per_tower=True)
    assert per_tower.shape[0] == (2 if pool == "cls" else 1)
    expected = torch.stack([scenic_sigmoid_ce(logits, targets) for logits in per_tower]).mean()
    step = TrainStep(model, cfg, multi_label=True, loader_batches=1, device=torch.device("cpu"))
    assert step(iter([batch]), 7) == pytest.approx(expected.item(), rel=1e-5)


@pytest.mark.parametrize("backend", ["auto", "math"])
def test_the_step_runs_attention_under_the_configured_backend(backend, monkeypatch):
    """--sdpa_backend restricts training's attention to one kernel (the GPU check picks the fastest); auto leaves
    the choice to PyTorch. Seen here through the backend the step's forward runs under."""
    cfg = TrainConfig(model=TINY, batch_size=2, sdpa_backend=backend)
    model = MBT(cfg.model)
    seen = []
    original = F.scaled_dot_product_attention

    def spy(*args, **kwargs):
        seen.append(torch._C._get_math_sdp_enabled() and not torch._C._get_flash_sdp_enabled())
        return original(*args, **kwargs)

    monkeypatch.setattr(F, "scaled_dot_product_attention", spy)
    video, audio = inputs(batch=2)
    batch = {"video": video, "audio": audio, "labels": (torch.rand(2, 5) < 0.4).float(), "key": ["a", "b"]}
    TrainStep(model, cfg, multi_label=True, loader_batches=1, device=torch.device("cpu"))(iter([batch]), 0)
    assert seen and all(only_math == (backend == "math") for only_math in seen)


def test_an_unknown_sdpa_backend_is_refused():
    from mbt.config import ConfigError
    from mbt.validate import validate

    with pytest.raises(ConfigError, match="--sdpa_backend 'fast' is not one of auto, flash, cudnn"):
        validate(TrainConfig(sdpa_backend="fast", train_shards="", eval_shards=""), train=False)


def test_an_unknown_clip_grad_scope_is_refused_and_the_demo_keeps_global_clipping():
    from mbt.config import ConfigError, preset
    from mbt.validate import validate

    with pytest.raises(ConfigError, match="--clip_grad_scope 'mean' is not one of per_rank, global"):
        validate(TrainConfig(clip_grad_scope="mean", train_shards="", eval_shards=""), train=False)
    assert [preset(name).clip_grad_scope for name in ("audioset", "vggsound", "custom", "demo")] == [
        "per_rank", "per_rank", "per_rank", "global"
    ]  # fmt: skip


def clipped(grads: dict[str, torch.Tensor], max_norm: float) -> dict[str, torch.Tensor]:
    """`grads` scaled to norm max_norm where theirs is larger, as torch's clip_grad_norm_ (norm + 1e-6)."""
    norm = torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(g) for g in grads.values()]))
    scale = min(1.0, max_norm / (norm.item() + 1e-6))
    return {name: g * scale for name, g in grads.items()}


@pytest.mark.slow
def test_per_rank_clipping_averages_each_ranks_clipped_gradient(tmp_path):
    """scenic's trainer clips each device's gradient, then averages (`clip_grads` before `pmean`): on two gloo
    ranks "per_rank" updates by mean(clip(g0), clip(g1)) and "global" by clip(mean(g0, g1)), each rank's gradient
    g_r computed here in one process from the same model and its batch; the two differ."""
    script = Path(__file__).parents[1] / "support" / "dist_clip_check.py"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", str(script)]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    run = subprocess.run([*cmd, str(tmp_path)], capture_output=True, text=True, timeout=300, env=env)
    assert run.returncode == 0, run.stderr[-4000:]
    updates = torch.load(tmp_path / "updates.pt", weights_only=True)
    grads = []
    for rank in range(2):
        model, batch = initial_model(), rank_batch(rank)
        logits = model(batch["video"], batch["audio"], per_tower=True)
        loss_fn(logits, soft_targets(batch["labels"], MODEL.num_classes, 0.0), True).backward()
        grads.append({name: p.grad.clone() for name, p in model.named_parameters()})
    assert all(clipped(g, MAX_NORM)["head.weight"].norm() < g["head.weight"].norm() for g in grads)  # both clip
    mean = {name: (grads[0][name] + grads[1][name]) / 2 for name in grads[0]}
    expected = {
        "global": clipped(mean, MAX_NORM),
        "per_rank": {name: (a + b) / 2 for (name, a), b in zip(clipped(grads[0], MAX_NORM).items(),
                                                              clipped(grads[1], MAX_NORM).values(), strict=True)},
    }  # fmt: skip
    for scope, want in expected.items():
        for name, update in updates[scope].items():
            torch.testing.assert_close(update, want[name], rtol=1e-4, atol=1e-7, msg=f"{scope}: {name}")
    differ = max((updates["per_rank"][k] - updates["global"][k]).abs().max().item() for k in mean)
    assert differ > 100 * 1e-7, differ
