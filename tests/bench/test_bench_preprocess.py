"""`bench.preprocess`: the shard job's inputs read from the demo's AudioSet-layout CSVs, and the CPU time of the jobs
it runs: the job's, its start-up's and the steady state between them (the core-hours projection is
`bench.offline_cost`'s, tested in test_offline_cost.py)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import DEMO_SECONDS

from bench.preprocess import job_inputs, run_jobs_forked
from experiments.demo_data import DemoDataset
from shards.schema import FeatureParams


def test_job_inputs_find_every_clip(demo: DemoDataset) -> None:
    params = FeatureParams(segment_s=DEMO_SECONDS)
    paths, spec = job_inputs(demo.class_labels_csv, demo.videos_dir, [demo.train_csv, demo.eval_csv], params)
    assert len(paths) == len(spec["rows"]) == 12 and all(path.is_file() for path in paths)
    assert [row.ytid for row in spec["rows"]] == [path.stem for path in paths]
    assert spec["params"] is params and spec["videos_dir"] == demo.videos_dir and spec["shard_size"] == 4
    assert len(spec["classes"]) == len({label for row in spec["rows"] for label in row.labels})


def test_forked_jobs_are_refused_where_torch_is_imported() -> None:
    import torch  # noqa: F401  (a forked job would inherit it and not pay its own import)

    with pytest.raises(RuntimeError, match="torch is imported"):
        run_jobs_forked([])


# In a fresh interpreter (pytest's has torch): the CPU of bare decoding, of the job (its folder kept) and of its
# start-up alone, and the steady state between the two.
MEASURE_COSTS = """
import json, sys
from dataclasses import asdict
from pathlib import Path
from bench.preprocess import bare_decode_cost, job_cost, job_inputs, start_spec, steady_cpu_s_per_clip
from shards.schema import FeatureParams
labels, videos, train, scratch = (Path(a) for a in sys.argv[1:5])
params = FeatureParams(segment_s=float(sys.argv[5]), num_frames=8)
paths, spec = job_inputs(labels, videos, [train], params)
costs = {"bare": bare_decode_cost(paths, params.segment_s, params, 1),
         "job": job_cost(spec, 1, scratch, keep=scratch / "kept"),
         "start": job_cost(start_spec(spec, scratch), 1, scratch)}
print(json.dumps({"clips": len(paths), "steady_cpu_s": steady_cpu_s_per_clip(costs["job"], costs["start"], len(paths)),
                  **{name: asdict(cost) for name, cost in costs.items()}}))
"""


@pytest.mark.slow
def test_job_cpu_holds_its_ffmpeg_runs(demo: DemoDataset, tmp_path: Path) -> None:
    args = [str(demo.class_labels_csv), str(demo.videos_dir), str(demo.train_csv), str(tmp_path), str(DEMO_SECONDS)]
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).parents[2])}
    run = subprocess.run([sys.executable, "-c", MEASURE_COSTS, *args], capture_output=True, text=True, env=env)
    assert run.returncode == 0, run.stderr
    costs = json.loads(run.stdout)
    assert all(costs[name]["wall_s"] > 0 and costs[name]["cpu_s"] > 0 for name in ("bare", "job", "start"))
    # the decoding is the job's, less its start-up: its workers' ffmpeg runs are counted (by os.wait4)
    assert costs["steady_cpu_s"] * costs["clips"] > 0.5 * costs["bare"]["cpu_s"]
    assert costs["steady_cpu_s"] == pytest.approx((costs["job"]["cpu_s"] - costs["start"]["cpu_s"]) / costs["clips"])
    assert (tmp_path / "kept" / "manifest.json").is_file()  # the job's folder, kept where asked
    assert sorted(p.name for p in tmp_path.iterdir()) == ["kept", "no-videos"]  # the others' removed
