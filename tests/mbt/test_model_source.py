"""One model, three forms: a training checkpoint, a run folder and an export are taken by every tool that takes a
model (mbt.evaluate, tools/predict.py, tools/export_model.py, serve.load_pretrained), each saying which form it
found; mbt.evaluate evaluates a run on the evaluation split its config names, on one process or two (torchrun), and
a model it cannot read is one error line under torchrun."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from conftest import load_tool
from tiny_run import eval_videos, make_run

import serve
from experiments.demo_data import DemoDataset
from mbt.checkpoint import CheckpointFileError, latest_checkpoint
from mbt.evaluate import main as evaluate_main
from mbt.model_source import resolve_model

REPO = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def run(train_shards: Path, eval_shards: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_run(train_shards, tmp_path_factory.mktemp("forms") / "run", eval_shards=eval_shards)


@pytest.fixture(scope="module")
def forms(run: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """{form: path} of one model: its checkpoint, its run folder and its export."""
    exported = tmp_path_factory.mktemp("forms") / "exported"
    assert load_tool("export_model").main([str(run), str(exported)]) == 0
    return {"checkpoint": latest_checkpoint(run), "run folder": run, "export": exported}


def found_line(form: str, path: Path) -> str:
    return {
        "checkpoint": f"model: checkpoint {path}, step 1",
        "run folder": f"model: run folder {path} -> checkpoint step-00000001.pt, step 1",
        "export": f"model: export {path} (model.safetensors, config.json)",
    }[form]


def test_each_form_is_resolved_and_a_folder_of_neither_is_refused(forms: dict[str, Path], tmp_path: Path) -> None:
    for form, path in forms.items():
        source = resolve_model(path)
        assert source.form == form and source.describe(1 if form != "export" else None) == found_line(form, path)
    assert resolve_model(forms["run folder"]).path == forms["checkpoint"]
    with pytest.raises(
        CheckpointFileError, match=r"neither checkpoints/step-\*\.pt \(a training run\) nor config\.json"
    ):
        resolve_model(tmp_path)


def test_load_pretrained_takes_every_form_and_gives_the_same_model(forms: dict[str, Path]) -> None:
    weights = {}
    for form, path in forms.items():
        model, prep = serve.load_pretrained(path)
        assert not model.training and prep.found == found_line(form, path)
        weights[form] = model.head.weight.detach().numpy()
    np.testing.assert_array_equal(weights["checkpoint"], weights["export"])
    np.testing.assert_array_equal(weights["run folder"], weights["export"])


@pytest.mark.parametrize("form", ["checkpoint", "run folder", "export"])
def test_predict_and_export_take_every_form_and_say_which(
    form: str, forms: dict[str, Path], demo: DemoDataset, tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    video = next(iter(eval_videos(demo).values()))
    assert load_tool("predict").main([str(video), "--model", str(forms[form])]) == 0
    assert capsys.readouterr().out.splitlines()[0] == found_line(form, forms[form])
    assert load_tool("export_model").main([str(forms[form]), str(tmp_path / "again")]) == 0
    assert capsys.readouterr().out.splitlines()[0] == found_line(form, forms[form])
    again = json.loads((tmp_path / "again" / "config.json").read_text())
    assert again == json.loads((forms["export"] / "config.json").read_text())


@pytest.mark.parametrize("form", ["checkpoint", "run folder", "export"])
def test_evaluate_takes_every_form_and_a_run_defaults_to_its_eval_split(
    form: str, forms: dict[str, Path], eval_shards: Path, tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    shards = [] if form != "export" else ["--shards", str(eval_shards)]  # an export names no evaluation split
    args = ["--model", str(forms[form]), *shards, "--out", str(tmp_path / "out"), "--loader", "torch"]
    assert evaluate_main([*args, "--num-workers", "0"]) == 0
    out = capsys.readouterr().out.splitlines()
    assert out[0] == found_line(form, forms[form])  # then progress lines (stdout is no terminal), then the result
    assert next(line for line in out if line.startswith("evaluated ")).startswith(
        f"evaluated 3 samples x 4 clips of {eval_shards}"
    )
    assert json.loads((tmp_path / "out" / "metrics.json").read_text())["num_samples"] == 3


def test_evaluate_help_names_the_program_and_the_forms(capsys: pytest.CaptureFixture) -> None:
    with pytest.raises(SystemExit):
        evaluate_main(["--help"])
    out = " ".join(capsys.readouterr().out.split())
    assert out.startswith("usage: python -m mbt.evaluate") and "a run folder (its latest checkpoint)" in out
    assert "rows; default 8)" in out  # --batch-size


def test_evaluate_of_an_export_without_shards_is_one_error_line(
    forms: dict[str, Path], tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    assert evaluate_main(["--model", str(forms["export"]), "--out", str(tmp_path / "out")]) == 1
    error = capsys.readouterr().err
    assert (
        error
        == f"mbt.evaluate: error: {forms['export']}: no run config names its eval_shards (an export); pass --shards\n"
    )


@pytest.mark.slow
def test_evaluate_of_a_run_folder_under_torchrun_and_a_missing_model_in_one_line(
    forms: dict[str, Path], tmp_path: Path
) -> None:
    def torchrun(model: Path, out: Path) -> subprocess.CompletedProcess:
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", "-m",
               "mbt.evaluate", "--model", str(model), "--out", str(out), "--loader", "torch",
               "--num-workers", "0"]  # fmt: skip
        return subprocess.run(cmd, capture_output=True, text=True, timeout=300, cwd=REPO)

    done = torchrun(forms["run folder"], tmp_path / "out")
    assert done.returncode == 0, done.stderr[-3000:]
    assert done.stdout.count("model: run folder") == 1 and "evaluated 3 samples x 4 clips" in done.stdout
    failed = torchrun(tmp_path / "missing.pt", tmp_path / "out2")
    assert failed.returncode != 0
    # One line from the ranks (rank 0's); torchrun's own report of the exit status follows it.
    assert failed.stderr.count("mbt.evaluate: error:") == 1 and "no such checkpoint file" in failed.stderr
    assert "Traceback" not in failed.stderr.split("mbt.evaluate: error:")[0], failed.stderr
