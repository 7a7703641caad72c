"""The demo's runner (`experiments.demo`) and the ablation (`experiments.ablation`): summaries, the table, the CSV and
the PNG, on tiny runs over the session's demo shards (2 s clips: 200 log-mel frames, 8 frames); each on a full disk."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import pytest
from full_disk import FullDisk
from tiny_demo import tiny_base

from experiments.ablation import COLUMNS, ablation_runs, plot_ablation, run_ablation, write_csv
from experiments.demo import METRICS, aggregate, format_table, parse_variants, run_demo, write_summary
from experiments.demo_data import DEMO_CLASSES
from shards.atomic import RERUN, DiskFullError

ROW_KEYS = {
    "variant", "fusion", "fusion_layer", "num_bottlenecks", "seed", "mAP", "ap_visual", "ap_audible", "ap_single",
    "ap_cross", "forward_gflops", "params_m", "train_s", "num_eval_clips", "run_dir",
}  # fmt: skip


def row(variant: str, seed: int, ap_cross: float) -> dict:
    return {"variant": variant, "seed": seed, **dict.fromkeys(METRICS, 0.5), "ap_cross": ap_cross}


def test_aggregate_gives_mean_and_spread_over_seeds() -> None:
    rows = [row("bottleneck", 0, 0.9), row("late", 0, 0.5), row("bottleneck", 1, 0.7), row("late", 1, 0.5)]
    [bottleneck, late] = aggregate(rows)
    assert (bottleneck["variant"], bottleneck["seeds"], late["variant"]) == ("bottleneck", [0, 1], "late")
    assert bottleneck["ap_cross"] == pytest.approx(0.8)
    assert bottleneck["ap_cross_std"] == pytest.approx(0.1414, abs=1e-4)
    assert (bottleneck["ap_cross_min"], bottleneck["ap_cross_max"], late["ap_cross_std"]) == (0.7, 0.9, 0.0)
    table = format_table([bottleneck, late])
    assert "MBT, bottleneck fusion" in table and "0.800 ± 0.141" in table and "late fusion" in table
    assert "±" not in format_table(aggregate(rows[:2]))


def test_parse_variants_names_the_unknown() -> None:
    assert parse_variants("bottleneck, late") == ["bottleneck", "late"]
    with pytest.raises(ValueError, match="unknown variants \\['early'\\]"):
        parse_variants("bottleneck,early")


@pytest.mark.slow
def test_tiny_demo_writes_the_summary(demo_shards: Path, tmp_path: Path) -> None:
    out = tmp_path / "runs"
    rows = run_demo(demo_shards, out, ["bottleneck", "audio"], seeds=1, base=tiny_base())
    path = write_summary(out, rows)
    summary = json.loads(path.read_text())
    assert [r["variant"] for r in summary["runs"]] == ["bottleneck", "audio"]
    for run in summary["runs"]:
        assert set(run) == ROW_KEYS
        assert json.loads((Path(run["run_dir"]) / "summary.json").read_text()) == run
        assert run["num_eval_clips"] == 3 and run["forward_gflops"] > 0 and run["train_s"] > 0
    bottleneck, audio = summary["variants"]
    assert set(bottleneck) == {"variant", "seeds"} | {f"{k}{s}" for k in METRICS for s in ("", "_std", "_min", "_max")}
    assert bottleneck["forward_gflops"] > audio["forward_gflops"]
    assert len(DEMO_CLASSES) == 12
    # Again, into the same folders (a finished run is trained again), two at a time (`--jobs 2`, experiments.parallel):
    # each in a spawned process with its output in `<run folder>.log`; the rows are the same, in the order asked.
    again = run_demo(demo_shards, out, ["bottleneck", "late", "audio"], seeds=1, base=tiny_base(), jobs=2)
    assert [r["variant"] for r in again] == ["bottleneck", "late", "audio"]
    same = ("mAP", "ap_cross", "ap_single", "forward_gflops", "num_eval_clips", "run_dir")
    for first, second in zip(summary["runs"], again[::2], strict=True):
        assert {k: first[k] for k in same} == {k: second[k] for k in same}
    for variant in ("bottleneck", "late", "audio"):
        assert "step 2 epoch 0: num_samples=3 mAP=" in (out / f"{variant}.log").read_text()  # the training's lines


def test_the_ablation_csv_cannot_hold_a_formula(tmp_path: Path) -> None:
    row = dict.fromkeys(COLUMNS, 0.5) | {"sweep": "=1+1", "name": "late", "fusion": "late", "ap_cross": -0.25}
    with open(write_csv([row], tmp_path / "a.csv"), newline="") as f:
        (read,) = csv.DictReader(f)
    assert read["sweep"] == "'=1+1" and read["name"] == "late" and read["ap_cross"] == "-0.25"


def test_ablation_runs_cover_both_sweeps() -> None:
    runs = ablation_runs(depth=4, fusion_layer=2, bottlenecks=[1, 4, 16])
    layers = [(c["fusion"], c.get("fusion_layer")) for sweep, c in runs if sweep == "fusion_layer"]
    assert layers == [("bottleneck", i) for i in range(4)] + [("late", None)] + [("cross", i) for i in range(4)]
    assert [c["num_bottlenecks"] for sweep, c in runs if sweep == "bottlenecks"] == [1, 4, 16]
    with pytest.raises(ValueError, match=r"not in 0\.\.3"):
        ablation_runs(depth=4, fusion_layer=2, bottlenecks=[4], fusion_layers=[4])


@pytest.mark.slow
def test_tiny_ablation_writes_csv_and_png(demo_shards: Path, tmp_path: Path) -> None:
    base = tiny_base()
    runs = ablation_runs(base.model.depth, base.model.fusion_layer, bottlenecks=[4], fusion_layers=[2])
    runs = [(sweep, changes) for sweep, changes in runs if changes["fusion"] != "cross"]
    rows = run_ablation(demo_shards, tmp_path / "ablation", runs, base=base)
    # bottleneck at Lf 2 with 4 tokens is in both sweeps and trained once
    assert len(rows) == len(runs) == 3 and len(list((tmp_path / "ablation" / "runs").iterdir())) == 2
    path = tmp_path / "ablation" / "ablation.csv"  # written after every run
    with open(path, newline="") as f:
        read = list(csv.DictReader(f))
    assert tuple(read[0]) == COLUMNS and len(read) == 3
    assert [r["sweep"] for r in read] == ["fusion_layer", "fusion_layer", "bottlenecks"]
    assert read[0]["ap_cross"] == read[2]["ap_cross"] and {r["fusion"] for r in read} == {"bottleneck", "late"}
    assert (tmp_path / "ablation" / "ablation.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert write_csv(rows[:1], path).read_text().count("\n") == 2
    assert plot_ablation([], tmp_path / "empty.png").is_file()


@pytest.mark.slow
def test_the_ablations_files_and_the_summary_on_a_full_disk_name_the_file(full_disk: FullDisk) -> None:
    ablation = {"sweep": "fusion_layer", "name": "bn", "fusion": "bottleneck", "fusion_layer": 2, "num_bottlenecks": 4,
                "forward_gflops": 0.1, "params_m": 0.2, "train_s": 1.0}  # fmt: skip
    rows = [{**row("bottleneck", seed, 0.5), **ablation} for seed in range(40)]
    folder = full_disk.folder
    writers = {
        "ablation.csv": lambda rows: write_csv(rows, folder / "ablation.csv"),
        "ablation.png": lambda rows: plot_ablation(rows, folder / "ablation.png"),
        "summary.json": lambda rows: write_summary(folder, rows),
    }
    for name, write in writers.items():
        write(rows[:1])
        previous = (folder / name).read_bytes()
        full_disk.fill()
        with pytest.raises(DiskFullError, match=f"^cannot write {folder / name}: No space left on device; {RERUN}$"):
            write(rows)
        assert (folder / name).read_bytes() == previous and not list(folder.glob("*.tmp"))
        full_disk.free()
