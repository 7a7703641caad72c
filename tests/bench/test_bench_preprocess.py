"""`bench.preprocess`: the shard job's inputs read from the demo's AudioSet-layout CSVs, and the core-hours
projection of tools/bench_preprocess.py."""

from __future__ import annotations

import pytest
from conftest import DEMO_SECONDS

from bench.preprocess import AUDIOSET_2M_SEGMENTS, VGGSOUND_SEGMENTS, job_inputs, projected_core_hours
from experiments.demo_data import DemoDataset
from shards.schema import FeatureParams


def test_job_inputs_find_every_clip(demo: DemoDataset) -> None:
    params = FeatureParams(segment_s=DEMO_SECONDS)
    paths, spec = job_inputs(demo.class_labels_csv, demo.videos_dir, [demo.train_csv, demo.eval_csv], params)
    assert len(paths) == len(spec["rows"]) == 12 and all(path.is_file() for path in paths)
    assert [row.ytid for row in spec["rows"]] == [path.stem for path in paths]
    assert spec["params"] is params and spec["videos_dir"] == demo.videos_dir and spec["shard_size"] == 4
    assert len(spec["classes"]) == len({label for row in spec["rows"] for label in row.labels})


def test_projected_core_hours() -> None:
    hours = projected_core_hours(2.0)
    assert hours["audioset"] == pytest.approx(AUDIOSET_2M_SEGMENTS / 2.0 / 3600)
    assert hours["vggsound"] == pytest.approx(VGGSOUND_SEGMENTS / 2.0 / 3600)
