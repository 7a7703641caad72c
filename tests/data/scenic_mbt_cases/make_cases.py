"""Write this folder's cases with scenic's own MBT (google-research/scenic, `scenic/projects/mbt/model.py`): per case a
tiny model with non-trivial random parameters (`<case>.msgpack`, flax's `{'params': tree}`), its inputs and scenic's
logits (`<case>.npz`), and `cases.json` (each case's model config and what scenic did with it).

Kept as documentation of how the fixtures were made; the test suite reads the files and never runs this (it needs
jax). README.md says how to run it: a scratch venv with jax[cpu], flax, ml-collections, immutabledict, absl-py, clu,
scenic's source on PYTHONPATH and a stand-in `tensorflow.io.gfile`.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import jax
import ml_collections
import numpy as np
import optax
from flax import serialization, traverse_util
from flax.core import unfreeze
from scenic.projects.mbt import model as mbt_model

OUT = Path(__file__).resolve().parent
PARAM_SEED, INPUT_SEED, BATCH = 20240601, 1234, 2
BASE = {
    "modality_fusion": ["spectrogram", "rgb"], "fusion_layer": 1, "use_bottleneck": True,
    "test_with_bottlenecks": True, "n_bottlenecks": 2, "share_encoder": False, "classifier": "token",
    "hidden_size": 16, "num_heads": 2, "mlp_dim": 32, "num_layers": 2, "num_classes": 3, "representation_size": None,
    "patches": {"size": [8, 8, 2]}, "attention_config": {"type": "spacetime"},
    "temporal_encoding_config": {"method": "3d_conv", "kernel_init_method": "central_frame_initializer",
                                 "n_sampled_frames": 4},
    "inputs": {"rgb": [4, 16, 16], "spectrogram": [24, 16]},  # (frames, height, width) and (time, mel bins)
}  # fmt: skip
NO_BOTTLENECK = {"use_bottleneck": False}
CASES = {
    "token_bottleneck": {},
    "fusion_layer_0": {"fusion_layer": 0},
    "fusion_layer_last": {"fusion_layer": 2},
    "test_without_bottlenecks": {"test_with_bottlenecks": False},
    "cross": NO_BOTTLENECK,
    "late": {**NO_BOTTLENECK, "fusion_layer": 2},
    "gap": {**NO_BOTTLENECK, "classifier": "gap"},
    "gmp": {**NO_BOTTLENECK, "classifier": "gmp"},
    "gsp": {**NO_BOTTLENECK, "classifier": "gsp"},
    "gmp_rgb": {**NO_BOTTLENECK, "classifier": "gmp", "modality_fusion": ["rgb"]},
    "classifier_0": {**NO_BOTTLENECK, "classifier": "0"},
    "gap_with_bottleneck": {"classifier": "gap"},
    "share_encoder": {"share_encoder": True},
    "share_encoder_cross": {**NO_BOTTLENECK, "share_encoder": True},
    "rgb_only": {"modality_fusion": ["rgb"]},
    "spectrogram_only": {**NO_BOTTLENECK, "modality_fusion": ["spectrogram"]},
    "tubelet_16x16x2": {"patches": {"size": [16, 16, 2]}, "inputs": {"rgb": [4, 32, 32], "spectrogram": [48, 32]}},
    "tubelet_8x8x4": {"patches": {"size": [8, 8, 4]}, "inputs": {"rgb": [8, 16, 16], "spectrogram": [24, 16]}},
    "temporal_sampling": {
        "temporal_encoding_config": {"method": "temporal_sampling", "n_sampled_frames": 2},
        "inputs": {"rgb": [2, 16, 16], "spectrogram": [24, 16]},
    },
    "factorized_encoder": {"attention_config": {"type": "factorized_encoder"}},
    "representation_size": {"representation_size": 8},
    "non_square_frames": {"inputs": {"rgb": [4, 16, 24], "spectrogram": [24, 16]}},
}  # fmt: skip
LAYOUTS_OF = "token_bottleneck"  # the case whose parameters are also written in scenic's training-state layouts


def build(config: dict) -> mbt_model.MBT:
    """scenic's MBT with the arguments MBTMultilabelClassificationModel.build_flax_model passes (dropout, attention
    dropout and stochastic depth 0, so that train=True is deterministic)."""
    return mbt_model.MBT(
        num_classes=config["num_classes"], modality_fusion=tuple(config["modality_fusion"]),
        fusion_layer=config["fusion_layer"], use_bottleneck=config["use_bottleneck"],
        test_with_bottlenecks=config["test_with_bottlenecks"], n_bottlenecks=config["n_bottlenecks"],
        share_encoder=config["share_encoder"], mlp_dim=config["mlp_dim"], num_layers=config["num_layers"],
        num_heads=config["num_heads"], representation_size=config["representation_size"],
        patches=ml_collections.ConfigDict(config["patches"]), hidden_size=config["hidden_size"],
        temporal_encoding_config=ml_collections.ConfigDict(config["temporal_encoding_config"]),
        attention_config=ml_collections.ConfigDict(config["attention_config"]), classifier=config["classifier"],
        dropout_rate=0.0, attention_dropout_rate=0.0, stochastic_droplayer_rate=0.0,
    )  # fmt: skip


def inputs(config: dict) -> dict[str, np.ndarray]:
    """rgb (B, F, H, W, 3) in [-1, 1] (scenic's zero-centred frames) and the one-channel log-mel (B, T, mel)."""
    rng = np.random.default_rng(INPUT_SEED)
    frames, height, width = config["inputs"]["rgb"]
    rgb = rng.integers(0, 256, (BATCH, frames, height, width, 3)).astype(np.float32) / 255 * 2 - 1
    spectrogram = rng.standard_normal((BATCH, *config["inputs"]["spectrogram"])).astype(np.float32)
    return {"rgb": rgb, "spectrogram": spectrogram}


def model_input(config: dict, arrays: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """A fresh input dict (MBT.__call__ replaces its entries) of the case's modalities; the spectrogram tiled to
    3 channels as scenic's `_decode_spectrogram` does."""
    tiled = {"rgb": arrays["rgb"], "spectrogram": np.repeat(arrays["spectrogram"][..., None], 3, axis=-1)}
    return {m: tiled[m] for m in config["modality_fusion"]}


def values(params: dict) -> dict:
    """Every parameter replaced by non-trivial values (peaked attention, position embeddings as large as the
    patches), walked in sorted order from one seeded generator: std 1/sqrt(fan_in) for kernels (2/sqrt for query
    and key), 0.1 for biases, 1 ± 0.1 for LayerNorm scales, 0.5 for tokens."""
    rng = np.random.default_rng(PARAM_SEED)
    flat = traverse_util.flatten_dict(unfreeze(params))
    out = {}
    for path in sorted(flat):
        shape, name, parent = flat[path].shape, path[-1], path[-2] if len(path) > 1 else ""
        mean, std = 0.0, 0.5
        if name == "kernel":
            fan_in = shape[0] if parent in ("query", "key", "value") else int(np.prod(shape[:-1]))
            std = (2.0 if parent in ("query", "key") else 1.0) / np.sqrt(fan_in)
        elif name == "bias":
            std = 0.1
        elif name == "scale":
            mean, std = 1.0, 0.1
        out[path] = (mean + std * rng.standard_normal(shape)).astype(np.float32)
    return traverse_util.unflatten_dict(out)


def run_case(name: str, overrides: dict) -> dict:
    """Write `name`.msgpack and `name`.npz for one case; its cases.json entry (scenic's exception, if it raised)."""
    config = {**BASE, **overrides}
    arrays = inputs(config)
    entry = {"config": {k: v for k, v in config.items()}, "files": []}
    model = build(config)
    try:
        init = model.init(jax.random.PRNGKey(0), model_input(config, arrays), train=False)
    except Exception as err:  # what scenic's own code does with this config: recorded, no files
        entry["scenic"] = f"{type(err).__name__}: {err}"
        return entry
    params = values(init["params"])
    logits = np.asarray(model.apply({"params": params}, model_input(config, arrays), train=False))
    trained = model.apply({"params": params}, model_input(config, arrays), train=True)
    out = {"rgb": arrays["rgb"], "spectrogram": arrays["spectrogram"], "logits": logits}
    if isinstance(trained, dict):  # 'token': each tower's logits, before the average
        out |= {f"train_logits_{m}": np.asarray(v) for m, v in trained.items()}
    else:
        out["train_logits"] = np.asarray(trained)
    (OUT / f"{name}.msgpack").write_bytes(serialization.msgpack_serialize({"params": params}))
    np.savez_compressed(OUT / f"{name}.npz", **out)
    entry["scenic"] = "ok"
    entry["files"] = [f"{name}.msgpack", f"{name}.npz"]
    if name == LAYOUTS_OF:
        entry["files"] += write_layouts(params)
    return entry


def write_layouts(params: dict) -> list[str]:
    """The same parameters in the layouts of scenic's checkpoints: a bare tree; the flax.optim era's TrainState
    (global_step, optimizer {target, state {step, param_states: momentum per parameter}}, model_state, rng,
    accum_train_time; scenic at the MBT release, train_lib/train_utils.py); today's TrainState (opt_state, params,
    global_step, model_state, rng, metadata: scenic's train_lib/train_utils.py TrainState, its pytree fields)."""
    momentum = jax.tree_util.tree_map(lambda p: {"momentum": np.zeros_like(p)}, params)
    layouts = {
        "layout_bare": params,
        "layout_optimizer_target": {
            "global_step": 7, "optimizer": {"target": params, "state": {"step": 7, "param_states": momentum}},
            "model_state": {}, "rng": np.asarray(jax.random.PRNGKey(1)), "accum_train_time": 1.5,
        },
        "layout_train_state": {
            "opt_state": serialization.to_state_dict(optax.sgd(0.1, momentum=0.9).init(params)), "params": params,
            "global_step": 7, "model_state": {}, "rng": np.asarray(jax.random.PRNGKey(1)),
            "metadata": {"chrono": {"accum_train_time": 1.5}},
        },
    }  # fmt: skip
    for name, tree in layouts.items():
        (OUT / f"{name}.msgpack").write_bytes(serialization.msgpack_serialize(tree))
    return [f"{name}.msgpack" for name in layouts]


def main() -> int:
    cases = {name: run_case(name, overrides) for name, overrides in CASES.items()}
    (OUT / "cases.json").write_text(json.dumps(cases, indent=1) + "\n")
    for name, entry in cases.items():
        print(f"{name}: {entry['scenic']}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
