"""tools/convert_scenic.py and `mbt.scenic`: scenic's MBT (flax) converted into this project's MBT gives scenic's
logits. The fixture `tests/data/scenic_mbt_tiny` (its README says how it was made) holds a tiny scenic MBT (depth 2,
width 64, 16x16x2 tubelets, 'token' classifier, fusion layer 1) with non-trivial random parameters, a fixed input,
scenic's logits and its activations at each stage. Damaged or unexpected files are refused naming the file and key;
a full disk is one error line naming the output."""

from __future__ import annotations

import copy
from pathlib import Path

import msgpack
import numpy as np
import pytest
import torch
from conftest import load_tool
from hostile_files import nested_msgpack_lists

from mbt import flax_msgpack
from mbt.checkpoint import build_model, load_trained
from mbt.flax_msgpack import read_flax_msgpack
from mbt.model import MBT
from mbt.scenic import ScenicCheckpointError, ScenicOptions, convert
from shards.atomic import RERUN

FIXTURE = Path(__file__).parents[1] / "data" / "scenic_mbt_tiny"
PARAMS = FIXTURE / "params.msgpack"
OPTIONS = ScenicOptions(fusion_layer=1, img_size=32, num_mel_bins=32)
FLAGS = ["--fusion-layer", "1", "--img-size", "32", "--num-mel-bins", "32"]
ATOL = 1e-5  # the fixture README's tolerance: an exact-GELU or eps-1e-5 port misses it (1.2e-4, 2.6e-5)

convert_scenic = load_tool("convert_scenic")


def flax_bytes(tree: object) -> bytes:
    """`tree` serialized as flax.serialization.msgpack_serialize does (arrays as ExtType 1)."""

    def ext(obj: object) -> msgpack.ExtType:
        if isinstance(obj, np.ndarray):
            return msgpack.ExtType(1, msgpack.packb((obj.shape, obj.dtype.name, obj.tobytes("C")), use_bin_type=True))
        raise TypeError(type(obj))

    return msgpack.packb(tree, default=ext, use_bin_type=True)


def scenic_tree() -> dict:
    return copy.deepcopy(read_flax_msgpack(PARAMS))


def model_of(checkpoint: Path) -> MBT:
    return build_model(load_trained(checkpoint), checkpoint).eval()  # what mbt.evaluate reads


def scenic_inputs() -> tuple[dict[str, np.ndarray], torch.Tensor, torch.Tensor]:
    """io.npz and its inputs in this project's layout: video (B, F, 3, H, W), one-channel log-mel (B, 1, T, mel)."""
    io = dict(np.load(FIXTURE / "io.npz"))
    video = torch.from_numpy(io["rgb"].transpose(0, 1, 4, 2, 3).copy())
    return io, video, torch.from_numpy(io["spectrogram_1ch"][:, None].copy())


@pytest.fixture(scope="module")
def converted(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("scenic") / "tiny.pt"
    assert convert_scenic.main([str(PARAMS), str(out), *FLAGS]) == 0
    return out


def test_the_writer_here_is_flaxs():
    """The test's writer gives the fixture's bytes back, so the layouts built with it below are flax's."""
    assert flax_bytes(read_flax_msgpack(PARAMS)) == PARAMS.read_bytes()


def test_converted_model_gives_scenics_logits(converted, capsys):
    io, video, audio = scenic_inputs()
    model = model_of(converted)
    cfg = model.cfg
    assert (cfg.fusion, cfg.fusion_layer, cfg.bottleneck_tokens, cfg.num_bottlenecks, cfg.pool, cfg.depth) == (
        "bottleneck", 1, 5, 4, "cls", 2)  # fmt: skip
    assert (cfg.video_embed, cfg.tubelet_frames, cfg.num_frames, cfg.audio_frames, cfg.gelu) == (
        "tubelet", 2, 4, 48, "tanh")  # fmt: skip
    with torch.no_grad():
        logits, per_tower = model(video, audio), model(video, audio, per_tower=True)
    difference = np.abs(logits.numpy() - io["logits"]).max()
    print(f"max |logits - scenic's| = {difference:.2e}")
    assert difference < ATOL
    towers = dict(zip(cfg.modalities, per_tower.numpy(), strict=True))
    np.testing.assert_allclose(towers["video"], io["train_logits_rgb"], rtol=0, atol=ATOL)
    np.testing.assert_allclose(towers["audio"], io["train_logits_spectrogram"], rtol=0, atol=ATOL)


def test_stages_match_scenics_intermediates(converted):
    """Stage by stage, to say where a port goes wrong: tokens with positions, the GELU of RGB layer 0's MLP
    (tanh approximation), the final norm over [spectrogram, rgb] tokens."""
    _, video, audio = scenic_inputs()
    stages = np.load(FIXTURE / "intermediates.npz")
    model = model_of(converted)
    towers = model.towers
    captured = {}
    towers["video"].blocks[0].mlp.act.register_forward_hook(lambda m, i, out: captured.setdefault("gelu", out))
    with torch.no_grad():
        tokens = {m: towers[m].tokens(x) for m, x in (("video", video), ("audio", audio))}
        features = model.forward_features(video, audio)
    checks = {
        "tokens_rgb_with_pos": tokens["video"],
        "tokens_spectrogram_with_pos": tokens["audio"],
        "layer0_rgb_mlp_hidden_gelu": captured["gelu"],
        "encoder_norm_out": torch.cat([features["audio"], features["video"]], dim=1),
    }
    for name, ours in checks.items():
        np.testing.assert_allclose(ours.numpy(), stages[name], rtol=0, atol=1e-4, err_msg=name)


def chunked(array: np.ndarray, size: int) -> dict:
    """flax's form of an array over MAX_CHUNK_SIZE (here: `size` elements a chunk)."""
    flat = array.reshape(-1)
    chunks = {str(i): flat[start : start + size] for i, start in enumerate(range(0, flat.size, size))}
    shape = {str(i): n for i, n in enumerate(array.shape)}
    return {"__msgpack_chunked_array__": True, "shape": shape, "chunks": chunks}


def training_states() -> dict[str, dict]:
    params = scenic_tree()["params"]
    with_chunks = copy.deepcopy(params)
    with_chunks["embedding"]["kernel"] = chunked(params["embedding"]["kernel"], 10_000)
    return {
        "optax TrainState": {"opt_state": {"0": {"trace": params}, "1": {}}, "params": params, "global_step": 5,
                             "model_state": {}, "rng": np.array([0, 7], np.uint32), "metadata": {"chrono": {}}},
        "flax.optim TrainState": {"optimizer": {"target": params, "state": {"step": 5, "param_states": {}}},
                                  "global_step": 5, "accum_train_time": 1.5},
        "bare tree": params,
        "chunked array": {"params": with_chunks},
    }  # fmt: skip


@pytest.mark.parametrize("layout", list(training_states()))
def test_training_checkpoint_layouts(tmp_path, layout):
    """scenic's training states (optax era: params; flax.optim era, the released checkpoints: optimizer/target),
    a bare parameter tree and flax's chunked arrays convert to the same weights as the variables dict."""
    path = tmp_path / "checkpoint_5"
    path.write_bytes(flax_bytes(training_states()[layout]))
    ours, reference = convert(path, OPTIONS), convert(PARAMS, OPTIONS)
    assert ours["config"] == reference["config"] and list(ours["model"]) == list(reference["model"])
    assert all(torch.equal(ours["model"][k], v) for k, v in reference["model"].items())


def test_bfloat16_arrays_read_as_float32(tmp_path):
    values = np.array([1.0, -2.5, 3.140625], np.float32)
    bf16 = msgpack.packb(((3,), "bfloat16", (values.view(np.uint32) >> 16).astype(np.uint16).tobytes()))
    (tmp_path / "bf16").write_bytes(msgpack.packb({"x": msgpack.ExtType(1, bf16)}, use_bin_type=True))
    np.testing.assert_array_equal(read_flax_msgpack(tmp_path / "bf16")["x"], values)


def edit(change) -> bytes:
    tree = scenic_tree()
    change(tree["params"])
    return flax_bytes(tree)


ATTN = "Transformer/encoderblock_1_spectrogram/MultiHeadDotProductAttention_0"
BAD_ARRAY = msgpack.ExtType(1, msgpack.packb(((2,), "float32", b"abc")))
OBJECT_ARRAY = msgpack.ExtType(1, msgpack.packb(((1,), "object", b"\0" * 8)))
DAMAGED = {
    "truncated": (lambda: PARAMS.read_bytes()[:50_000], "not a flax msgpack checkpoint"),
    "not msgpack": (lambda: b"PK\x03\x04 a zip file", "not a flax msgpack checkpoint"),
    "a list": (lambda: msgpack.packb([1, 2]), "holds a list, not a map"),
    "short array": (lambda: msgpack.packb({"x": BAD_ARRAY}), "shape (2,) and dtype float32 holds 3 bytes"),
    "object dtype": (lambda: msgpack.packb({"x": OBJECT_ARRAY}), "dtype 'object'"),
    "bytes key": (lambda: msgpack.packb({b"params": 1}, use_bin_type=True), "a map key that is not a string"),
    "deep nesting": (lambda: b"\x81\xa1a" * 100 + b"\xc0", "maps nested more than 64 deep"),
    "long lists": (lambda: nested_msgpack_lists(4096), "2048 exceeds max_array_len(64)"),
    "no Transformer": (lambda: flax_bytes({"state": {"x": np.zeros(2)}}), "top-level keys are ['state']"),
    "missing query": (
        lambda: edit(lambda p: p["Transformer"][ATTN.split("/")[1]]["MultiHeadDotProductAttention_0"]["query"].clear()),
        f"no '{ATTN}/query/kernel'",
    ),
    "query size": (
        lambda: edit(lambda p: p["Transformer"][ATTN.split("/")[1]]["MultiHeadDotProductAttention_0"]["query"].update(
            kernel=np.zeros(3, np.float32))),
        "shape '[64, 64]' is invalid for input of size 3",
    ),
    "head shape": (
        lambda: edit(lambda p: p["output_projection"].update(bias=np.zeros(4, np.float32))),
        "head.bias has shape (4,), the config's model (5,)",
    ),
    "tubelet grid": (
        lambda: edit(lambda p: p["Transformer"]["posembed_input"].update(pos_embedding=np.zeros((1, 8, 64), "f4"))),
        "rgb position embedding has 7 tubelet tokens",
    ),
    "unknown array": (
        lambda: edit(lambda p: p.update(adapter={"kernel": np.zeros((64, 64), np.float32)})),
        "does not know: ['adapter/kernel']",
    ),
    "int array": (lambda: edit(lambda p: p.update(cls=np.zeros((1, 1, 64), np.int32))), "'cls' is a ndarray, not"),
    "pre-logits": (
        lambda: edit(lambda p: p.update(pre_logits={"kernel": np.zeros((64, 64), np.float32)})),
        "a 'pre_logits' layer: model.representation_size is set",
    ),
    "NaN": (
        lambda: edit(lambda p: p.update(bottleneck=np.full((1, 5, 64), np.nan, np.float32))),
        "not finite ['bottleneck']",
    ),
}  # fmt: skip


@pytest.mark.parametrize("case", list(DAMAGED))
def test_damaged_or_unexpected_files_are_named(tmp_path, case):
    make, message = DAMAGED[case]
    path = tmp_path / "checkpoint"
    path.write_bytes(make())
    with pytest.raises(ScenicCheckpointError) as err:
        convert(path, OPTIONS)
    assert str(err.value).startswith(str(path)) and message in str(err.value)


def test_what_the_shapes_do_not_say_is_asked_for(tmp_path, monkeypatch, capsys):
    with pytest.raises(ScenicCheckpointError, match="give --fusion-layer"):
        convert(PARAMS, ScenicOptions(img_size=32, num_mel_bins=32))
    with pytest.raises(ScenicCheckpointError, match="--num-mel-bins"):
        convert(PARAMS, ScenicOptions(fusion_layer=1, img_size=32))
    by_frames = convert(PARAMS, ScenicOptions(fusion_layer=1, num_frames=4, num_mel_bins=32))
    assert by_frames["config"]["model"]["img_size"] == 32
    with pytest.raises(ScenicCheckpointError, match="a folder"):
        convert(tmp_path, OPTIONS)
    monkeypatch.setattr(flax_msgpack, "MAX_FILE_BYTES", 1000)
    assert convert_scenic.main([str(PARAMS), str(tmp_path / "out.pt"), *FLAGS]) == 1
    assert "bytes, more than a scenic checkpoint's (1000); not read" in capsys.readouterr().err
    assert not (tmp_path / "out.pt").exists()


def test_a_full_disk_is_one_error_line_naming_the_output(full_disk, capsys):
    out = full_disk.folder / "tiny.pt"
    full_disk.fill()
    assert convert_scenic.main([str(PARAMS), str(out), *FLAGS]) == 1
    assert capsys.readouterr().err == f"error: cannot write {out}: No space left on device; {RERUN}\n"
    assert full_disk.files() == []
