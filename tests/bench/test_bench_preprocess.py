"""`bench.preprocess`: the shard job's inputs read from the demo's AudioSet-layout CSVs (the core-hours projection
is `bench.offline_cost`'s, tested in test_offline_cost.py)."""

from __future__ import annotations

from conftest import DEMO_SECONDS

from bench.preprocess import job_inputs
from experiments.demo_data import DemoDataset
from shards.schema import FeatureParams


def test_job_inputs_find_every_clip(demo: DemoDataset) -> None:
    params = FeatureParams(segment_s=DEMO_SECONDS)
    paths, spec = job_inputs(demo.class_labels_csv, demo.videos_dir, [demo.train_csv, demo.eval_csv], params)
    assert len(paths) == len(spec["rows"]) == 12 and all(path.is_file() for path in paths)
    assert [row.ytid for row in spec["rows"]] == [path.stem for path in paths]
    assert spec["params"] is params and spec["videos_dir"] == demo.videos_dir and spec["shard_size"] == 4
    assert len(spec["classes"]) == len({label for row in spec["rows"] for label in row.labels})
