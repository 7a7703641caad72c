"""tools/model_report.py, tools/bench_model.py and `bench.model`: FLOP counts that agree with the model's structure,
and both tools' command lines at the tiny size."""

from __future__ import annotations

import subprocess
import sys

import pytest
import torch
from conftest import REPO, load_tool

from bench.model import variant_flops
from bench.timing import peak_tflops
from mbt.flops import count_flops, describe, size_config
from mbt.model import FUSIONS, MBTConfig

model_report = load_tool("model_report")
bench_model = load_tool("bench_model")

TINY = size_config("tiny")


def name_values(line: str) -> dict[str, float]:
    """A tool's last line of name=value pairs as a dict."""
    return {name: float(value) for name, value in (pair.split("=") for pair in line.split())}


def head_params_m(cfg: MBTConfig) -> float:
    """Millions of parameters of the shared linear head."""
    return (cfg.embed_dim + 1) * cfg.num_classes / 1e6


@pytest.fixture(scope="module")
def tiny_rows() -> dict[str, dict]:
    """count_flops of each variant at the tiny size, by fusion."""
    return {row["fusion"]: row for row in variant_flops(TINY)}


def test_describe_counts_scenics_extra_bottleneck_token() -> None:
    """B is num_bottlenecks, "+1" where the CLS pool holds scenic's n_bottlenecks + 1 tokens; the FLOPs count them."""
    assert " B=4+1 " in describe(TINY)
    assert " B=4 " in describe(TINY.replace(cls_bottleneck=False)) and " B=4 " in describe(TINY.replace(pool="gap"))
    four = count_flops(TINY.replace(cls_bottleneck=False))["forward_gflops"]
    assert four < count_flops(TINY)["forward_gflops"] < count_flops(TINY.replace(num_bottlenecks=5))["forward_gflops"]


def test_flops_follow_the_fusion(tiny_rows: dict[str, dict]) -> None:
    video, audio = tiny_rows["video"], tiny_rows["audio"]
    late, bottleneck, cross = tiny_rows["late"], tiny_rows["bottleneck"], tiny_rows["cross"]
    # late fusion is the two towers side by side, the shared head run once per tower
    assert late["forward_gflops"] == pytest.approx(video["forward_gflops"] + audio["forward_gflops"], rel=1e-6)
    assert late["params_m"] == pytest.approx(video["params_m"] + audio["params_m"] - head_params_m(TINY), rel=1e-6)
    # the bottleneck tokens add a little; attending over the other modality's tokens adds much more
    assert late["forward_gflops"] < bottleneck["forward_gflops"] < 1.1 * late["forward_gflops"]
    assert cross["forward_gflops"] > 1.1 * bottleneck["forward_gflops"]
    assert cross["attention_gflops"] > bottleneck["attention_gflops"] > late["attention_gflops"] > 0
    for row in tiny_rows.values():
        assert 2.5 < row["backward_ratio"] < 3.5  # backward counted: about twice the forward


def test_count_flops_is_per_clip() -> None:
    one, four = count_flops(TINY), count_flops(TINY, batch=4)
    assert four["forward_gflops"] == pytest.approx(one["forward_gflops"], rel=1e-6)
    assert four["train_gflops"] == pytest.approx(one["train_gflops"], rel=1e-6)


def test_count_flops_attention_matches_the_analytic_count() -> None:
    cfg = TINY.replace(fusion="audio")
    tokens = 1 + cfg.audio_grid[0] * cfg.audio_grid[1]
    expected = cfg.depth * 2 * (2 * tokens * tokens * cfg.embed_dim)  # QK^T and AV, a MAC = 2 FLOPs
    assert count_flops(cfg)["attention_gflops"] == pytest.approx(expected / 1e9)


def test_model_report_help(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exit_info:
        model_report.main(["--help"])
    assert exit_info.value.code == 0
    assert "--num-bottlenecks" in capsys.readouterr().out


@pytest.mark.slow
def test_model_report_main(capsys: pytest.CaptureFixture[str]) -> None:
    assert model_report.main(["--size", "tiny", "--markdown"]) == 0
    lines = capsys.readouterr().out.strip().splitlines()
    assert sum(line.startswith("| ") for line in lines) == 1 + len(FUSIONS)
    values = name_values(lines[-1])
    assert {f"{f}_gflops" for f in FUSIONS} <= values.keys()
    assert values["bottleneck_vs_cross"] < 1 < values["bottleneck_vs_late"]
    assert values["params_m"] > 0


def test_peak_by_device_name() -> None:
    assert peak_tflops("NVIDIA H100 80GB HBM3") == 989
    assert peak_tflops("NVIDIA H100 PCIe") == 756
    assert peak_tflops("NVIDIA A100-SXM4-80GB") == 312
    assert peak_tflops("NVIDIA GeForce GTX 1080") is None


def test_bench_model_main(capsys: pytest.CaptureFixture[str]) -> None:
    assert bench_model.main(["--size", "tiny", "--steps", "2", "--warmup", "1", "--device", "cpu"]) == 0
    values = name_values(capsys.readouterr().out.strip().splitlines()[-1])
    assert values["mbt_vs_encoders"] > 0
    assert values["mbt_vs_encoders"] == pytest.approx(
        values["mbt_ms"] / (values["video_ms"] + values["audio_ms"]), rel=1e-2
    )
    assert "mfu" not in values


@pytest.mark.slow
def test_bench_model_imports_neither_preprocess_nor_pipelines() -> None:
    # the GPU machines have torch, timm and numpy only
    code = (
        "import runpy, sys; sys.argv = ['tools/bench_model.py', '--help']\n"
        "try: runpy.run_path(sys.argv[0], run_name='__main__')\n"
        "except SystemExit: pass\n"
        "print(sorted(m for m in sys.modules if m.split('.')[0] in ('preprocess', 'pipelines')))"
    )
    out = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, check=True).stdout
    assert out.strip().splitlines()[-1] == "[]"


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_bench_model_cuda(capsys: pytest.CaptureFixture[str]) -> None:
    args = ["--size", "tiny", "--batch", "2", "--steps", "2", "--warmup", "1", "--device", "cuda", "--bf16"]
    assert bench_model.main([*args, "--peak-tflops", "100"]) == 0
    values = name_values(capsys.readouterr().out.strip().splitlines()[-1])
    assert 0 < values["mfu"] < 1
