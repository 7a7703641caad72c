"""`bench.pipeline.ratios`: the last line of tools/bench_pipeline.py, in its order, with the figures of loaders that
were not measured left out."""

from __future__ import annotations

import pytest

from bench.pipeline import ratios

MEASURED = {"bound": 100.0, "torch": 50.0, "torch_u8": 80.0, "stream": 40.0, "torch_plain": 60.0, "perfile": 20.0,
            "first_batch_s": 0.5, "stream_first_batch_s": 0.7}  # fmt: skip
CPU_MS = {"torch_plain": [10.0, 12.0, 11.0], "perfile": [33.0], "torch": [9.0]}


def test_ratios_of_the_cpu_loaders() -> None:
    out = ratios(MEASURED, CPU_MS)
    assert list(out) == [
        "torch_vs_bound", "torch_u8_vs_bound", "stream_vs_torch", "torch_vs_perfile", "torch_vs_perfile_cpu",
        "first_batch_s", "stream_first_batch_s", "torch_clips_per_s",
    ]  # fmt: skip
    assert out["torch_vs_bound"] == 0.5 and out["torch_u8_vs_bound"] == 0.8 and out["stream_vs_torch"] == 0.8
    assert out["torch_vs_perfile"] == 3.0 and out["torch_vs_perfile_cpu"] == 3.0  # medians: 33 / 11
    assert (out["first_batch_s"], out["stream_first_batch_s"], out["torch_clips_per_s"]) == (0.5, 0.7, 50.0)


def test_ratios_name_the_gpu_dali_and_naive_loaders_where_measured() -> None:
    out = ratios({**MEASURED, "torch_gpu": 200.0, "naive": 5.0, "dali_cpu": 25.0, "dali_gpu": 400.0}, CPU_MS)
    keys = list(out)
    assert keys[3:6] == ["torch_gpu_vs_bound", "torch_vs_naive", "torch_vs_perfile"]
    assert keys[7:9] == ["dali_cpu_vs_torch", "dali_gpu_vs_torch"]
    assert out["torch_gpu_vs_bound"] == 2.0 and out["torch_vs_naive"] == 10.0
    assert out["dali_cpu_vs_torch"] == 0.5 and out["dali_gpu_vs_torch"] == pytest.approx(8.0)
