"""`bench.offline_cost`: the arithmetic of the offline stage's cost on hand-made records, the files a finished job
really writes, the record's checks, and README's sizing table against what the committed record renders."""

from __future__ import annotations

import json
import os
import re
import subprocess
from pathlib import Path

import pytest
from conftest import REPO, audioset_args, load_tool, tool_command

from bench.offline_cost import (
    AUDIOSET_2M_SEGMENTS,
    LAUNCH_FILE,
    Dataset,
    Rate,
    Record,
    RecordError,
    core_hours,
    cost,
    datasets,
    job_defaults,
    launch_num_jobs,
    load_record,
    output_files,
    project,
)
from bench.offline_cost_table import README_BEGIN, README_END, MarkerError, readme_table, report, with_table
from experiments.demo_data import DemoDataset

# a start-up of 36 s of CPU: 100 jobs pay an hour of it
RATE = Rate(fps=2.0, clips_per_s_per_core=2.0, job_start_cpu_s=36.0, tar_bytes_per_clip=750_000.0,
            idx_bytes_per_clip=1_000.0, verify_bytes_per_s_per_core=35e6)  # fmt: skip
RECORD = Record("a test CPU, 2 cores", "2026-12-07T12:00Z", "tools/offline_cost.py --measure", (1.0, 2.5), "by hand",
                (RATE, Rate(25.0, 0.5, 1.5, 6.5e6, 5_000.0, 40e6)))  # fmt: skip


def test_files_follow_the_shard_size_and_jobs() -> None:
    files = output_files(1025, 512, 3)  # 1025 rows: 3 shards (342, 342, 341)
    assert files == {"tar": 3, "idx": 3, "record": 3, "split": 5, "part_lock": 3}
    assert output_files(1024, 512, 1) == {"tar": 2, "idx": 2, "record": 2, "split": 5, "part_lock": 1}


def test_cost_from_rates() -> None:
    split = Dataset("AudioSet-2M unbalanced", AUDIOSET_2M_SEGMENTS, 100)
    c = cost(split, RATE, 512)
    assert c.shards == 3988 and c.files == 3 * 3988 + 5 + 100
    assert c.bytes_written == pytest.approx(AUDIOSET_2M_SEGMENTS * 751_000)  # 1.53 TB
    steady = core_hours(AUDIOSET_2M_SEGMENTS, 2)
    assert c.job_core_hours == pytest.approx(AUDIOSET_2M_SEGMENTS / 2.0 / 3600 + 1.0) == steady + 1.0  # + start-ups
    assert c.verify_core_hours == pytest.approx(AUDIOSET_2M_SEGMENTS * 750_000 / 35e6 / 3600)  # tars only
    costs = project(RECORD, (split, Dataset("small", 10, 1)), 4)
    assert [(c.dataset.name, c.fps, c.shards) for c in costs] == [
        ("AudioSet-2M unbalanced", 2.0, 510_448),
        ("AudioSet-2M unbalanced", 25.0, 510_448),
        ("small", 2.0, 3),
        ("small", 25.0, 3),
    ]
    assert costs[1].job_core_hours - 100 * 1.5 / 3600 == pytest.approx(4 * (costs[0].job_core_hours - 1.0))
    assert costs[2].job_core_hours == pytest.approx(10 / 2.0 / 3600 + 36 / 3600)  # one job, one start-up


def test_a_finished_job_holds_the_files_counted(demo: DemoDataset, tmp_path: Path) -> None:
    out = tmp_path / "eval"
    for index in range(2):  # the 3 eval clips in shards of 1, as 2 partitioned jobs
        args = audioset_args(demo, out, "--shard-size", "1", "--num-jobs", "2", "--job-index", str(index))
        args[1] = str(demo.eval_csv)
        assert load_tool("shard_audioset").main(args) == 0
    found = sorted(str(p.relative_to(out)) for p in out.rglob("*") if p.is_file())
    kinds = {
        "tar": [f for f in found if f.endswith(".tar")],
        "idx": [f for f in found if f.endswith(".idx")],
        "record": [f for f in found if re.fullmatch(r"_state/shard-\d+\.json", f)],
        "part_lock": [f for f in found if re.fullmatch(r"_state/part-\d+\.lock", f)],
    }
    kinds["split"] = sorted(set(found) - {f for files in kinds.values() for f in files})
    assert {kind: len(files) for kind, files in kinds.items()} == output_files(3, 1, 2)
    assert sum(output_files(3, 1, 2).values()) == len(found)


def test_defaults_are_the_tools_and_the_launch_files() -> None:
    assert job_defaults() == (512, 1)
    sbatch = (REPO / "tools/slurm/shard_audioset.sbatch").read_text()
    size = int(re.search(r"NUM_JOBS=\$\{NUM_JOBS:-(\d+)\}", sbatch).group(1))
    assert re.search(rf"#SBATCH --array=0-{size - 1}\n", sbatch)  # the SLURM array runs the same number of jobs
    assert launch_num_jobs() == size
    assert [d.num_jobs for d in datasets()] == [size, 1, 1]


def test_launch_file_without_a_count_is_refused(tmp_path: Path) -> None:
    bad = tmp_path / "job.yaml"
    bad.write_text("spec:\n  completions: many\n")
    with pytest.raises(RecordError, match=f"{bad}: spec.completions"):
        launch_num_jobs(bad)
    assert LAUNCH_FILE.is_file()


def test_record_round_trip_and_checks(tmp_path: Path) -> None:
    path = tmp_path / "rates.json"
    path.write_text(RECORD.to_json())
    assert load_record(path) == RECORD
    data = json.loads(RECORD.to_json())
    for broken in (
        {**data, "version": 99},
        {**data, "machine": 3},
        {**data, "load_average": [1.0]},
        {**data, "rates": []},
        {**data, "rates": [{**data["rates"][0], "clips_per_s_per_core": 0}]},
        {**data, "rates": [{**data["rates"][0], "tar_bytes_per_clip": True}]},
        {**data, "rates": [{k: v for k, v in data["rates"][0].items() if k != "fps"}]},
    ):
        path.write_text(json.dumps(broken))
        with pytest.raises(RecordError, match=f"{path}: measure again"):
            load_record(path)
    with pytest.raises(RecordError, match=r"cannot read .*missing\.json.*--measure"):
        load_record(tmp_path / "missing.json")


def test_report_and_readme_table_render_every_cost() -> None:
    costs = project(RECORD, datasets(), 512)
    text = report(RECORD, costs, 512)
    assert "| AudioSet-2M unbalanced | 2,041,789 | 100 | 2 | 3,988 | 12,069 | 1.53 TB | 285 | 12 |" in text
    assert "| 25 | 0.50 | 1.50 | 6.50 MB + 5,000 B | 40.0 |" in text
    table = readme_table(RECORD, costs, 512)
    assert table.startswith(README_BEGIN) and table.endswith(README_END)
    assert (
        "| AudioSet-2M unbalanced (2,041,789 clips, 100 jobs) | 25 | 3,988 | 12,069 | 13.3 TB | 1,134 core-hours |"
        in table
    )
    assert len([line for line in table.splitlines() if line.startswith("|")]) == 2 + len(costs)


def test_with_table_replaces_only_the_block(tmp_path: Path) -> None:
    readme = tmp_path / "README.md"
    text = f"# title\n\n{README_BEGIN}\nold\n{README_END}\n\n## next\n"
    assert with_table(text, "NEW", readme) == "# title\n\nNEW\n\n## next\n"
    for broken in (
        "# no markers\n",
        f"{README_END}\n{README_BEGIN}\n",
        f"{README_BEGIN}\n{README_BEGIN}\n{README_END}",
    ):
        with pytest.raises(MarkerError, match=f"{readme} must hold the sizing block once"):
            with_table(broken, "NEW", readme)


def test_readme_table_is_the_committed_records() -> None:
    """README's sizing table is what tools/offline_cost.py renders from docs/offline_cost.json: they cannot drift."""
    record = load_record(REPO / "docs" / "offline_cost.json")
    shard_size = job_defaults()[0]
    expected = readme_table(record, project(record, datasets(), shard_size), shard_size)
    text = (REPO / "README.md").read_text()
    assert text[text.index(README_BEGIN) : text.index(README_END) + len(README_END)] == expected, (
        "README.md's sizing table differs from docs/offline_cost.json's: run tools/offline_cost.py --write-readme"
    )


@pytest.mark.slow
def test_tool_measures_records_and_writes_the_table(tmp_path: Path) -> None:
    readme = tmp_path / "README.md"
    readme.write_text(f"intro\n{README_BEGIN}\n{README_END}\n")
    args = ["--measure", "--record", str(tmp_path / "rates.json"), "--fps", "2", "--clips", "2", "--repeats", "1",
            "--verify-clips", "2", "--data", str(tmp_path), "--write-readme", "--readme", str(readme)]  # fmt: skip
    # in a fresh interpreter: the jobs it forks must pay their own torch import, which pytest's process holds
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    run = subprocess.run(tool_command("offline_cost", *args), capture_output=True, text=True, env=env)
    assert run.returncode == 0, run.stderr
    record = load_record(tmp_path / "rates.json")
    assert [rate.fps for rate in record.rates] == [2.0] and record.command.startswith("tools/offline_cost.py --measure")
    assert 100_000 < record.rates[0].tar_bytes_per_clip < 5_000_000 and record.rates[0].idx_bytes_per_clip > 0
    assert 0.1 < record.rates[0].job_start_cpu_s < 30  # torch imported, workers started: about a second
    assert readme.read_text() == f"intro\n{readme_table(record, project(record, datasets(), 512), 512)}\n"
    assert "| AudioSet-2M unbalanced | 2,041,789 | 100 | 2 | 3,988 |" in run.stdout
