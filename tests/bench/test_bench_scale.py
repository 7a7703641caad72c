"""tools/bench_scale.py at tiny sizes: every stage runs in its own interpreter on the synthetic split, the exponents
and the PNG come out; the synthetic inputs are what the real readers accept."""

from pathlib import Path

import numpy as np
import pytest
from conftest import load_tool

from bench.scale import growth_exponent, measure, prepare
from bench.scale_data import write_class_csv, write_custom_csv, write_job_folder, write_segments_csv
from pipelines.sources import SplitIndex
from preprocess.custom_csv import read_custom_csv
from preprocess.custom_fields import CsvLayout
from preprocess.datasets import read_audioset_classes, read_audioset_segments
from preprocess.job_merge import merge

bench_scale = load_tool("bench_scale")


def test_growth_exponent_reads_linear_and_quadratic():
    sizes = [10, 100, 1000]
    assert growth_exponent(sizes, [2.0 * n for n in sizes]) == pytest.approx(1.0)
    assert growth_exponent(sizes, [n * n for n in sizes]) == pytest.approx(2.0)
    assert bench_scale.parse_sizes("10k,2M,500") == [10_000, 2_000_000, 500]


def test_synthetic_inputs_are_what_the_readers_accept(tmp_path):
    classes = read_audioset_classes(write_class_csv(tmp_path / "class_labels_indices.csv"))
    rows = read_audioset_segments(write_segments_csv(tmp_path / "segments.csv", 300), [mid for mid, _ in classes])
    assert len(classes) == 527 and len(rows) == 300 and all(1 <= len(r.labels) <= 4 for r in rows)
    custom = read_custom_csv(write_custom_csv(tmp_path / "custom.csv", 1000), CsvLayout(split="train"))
    assert 700 < len(custom.rows) < 900 and custom.multi_label and len(custom.classes) == 97
    assert custom.rows[0].key == "P00_0000_" + str(round(custom.rows[0].start_s * 1000))
    folder = write_job_folder(tmp_path / "train", 1100, shard_size=512, num_jobs=1000)
    manifest, pending = merge(folder)
    assert manifest is not None and manifest.num_samples == 1100 and len(manifest.shards) == 3 and not pending.count
    index = SplitIndex(folder)
    assert len(index) == 1100 and len({ref.key for ref in index.samples}) == 1100


def test_a_stage_is_measured_alone(tmp_path):
    prepare(tmp_path, 2000)
    for stage in ("csv_plan", "csv_custom_plan"):
        run = measure(stage, tmp_path, 2000)
        assert run.seconds > 0 and run.peak_mb > run.stage_mb >= 0
    prepare(tmp_path / "w", 2000, ("worker",))
    worker = measure("worker", tmp_path / "w", 2000)  # a forked child's copied pages, not the parent's peak
    assert worker.seconds > 0 and 0 <= worker.stage_mb < worker.peak_mb


@pytest.mark.slow
def test_bench_scale_runs_at_tiny_sizes(tmp_path, capsys):
    assert (
        bench_scale.main(["--sizes", "500,2k", "--plot", str(tmp_path / "scale.png"), "--scratch", str(tmp_path)]) == 0
    )
    out = capsys.readouterr().out
    for stage in ("csv_plan", "merge", "index", "worker", "order", "eval"):
        assert f"  {stage:<9} time" in out
    assert "core-hours per TB" in out
    assert (tmp_path / "scale.png").read_bytes()[:4] == b"\x89PNG"
    assert [p.name for p in Path(tmp_path).iterdir()] == ["scale.png"]  # the synthetic data is removed
    assert np.isfinite(float(out.split("csv_plan  time")[1].split()[0]))
