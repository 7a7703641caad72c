"""An ffmpeg that is not on PATH (a cluster module's, conda's): `--ffmpeg PATH` or `MBT_FFMPEG` / `FFMPEG_BINARY`
name it for the shard job and prediction, and the environment check checks the one named; without one, the error
says how to name it."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
from conftest import audioset_args, load_tool

from devenv import envcheck
from experiments.demo_data import DemoDataset
from preprocess import ffmpeg_run
from preprocess.ffmpeg_run import FFMPEG_ENV, ToolMissingError, ffmpeg_binary, require_ffmpeg


@pytest.fixture
def off_path(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """An ffmpeg (a link to the real one) in a folder of its own, with PATH holding no ffmpeg and neither variable
    set (restored after the test, `--ffmpeg` setting one included)."""
    real = shutil.which("ffmpeg")
    assert real is not None
    tools = tmp_path / "modules" / "bin"
    tools.mkdir(parents=True)
    (tools / "ffmpeg").symlink_to(real)
    (tools / "ffprobe").symlink_to(Path(real).with_name("ffprobe"))
    empty = tmp_path / "empty"
    empty.mkdir()
    monkeypatch.setenv("PATH", str(empty))
    for name in FFMPEG_ENV:
        monkeypatch.setenv(name, "")
    return tools / "ffmpeg"


def test_the_ffmpeg_named_first_is_run_and_none_found_says_how_to_name_one(
    off_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    assert envcheck.FFMPEG_ENV == FFMPEG_ENV  # devenv imports nothing of the project: the same names, kept equal
    with pytest.raises(ToolMissingError, match=r"not found on PATH; .* point --ffmpeg \(or MBT_FFMPEG\) at one"):
        require_ffmpeg()
    monkeypatch.setenv("FFMPEG_BINARY", str(off_path))
    assert ffmpeg_binary() == str(off_path)
    require_ffmpeg()
    monkeypatch.setenv("MBT_FFMPEG", "/nowhere/ffmpeg")
    with pytest.raises(ToolMissingError, match=r"MBT_FFMPEG=/nowhere/ffmpeg \(or --ffmpeg\) is not an executable"):
        require_ffmpeg()


def test_the_shard_job_runs_the_ffmpeg_given_with_the_flag(
    off_path: Path, demo: DemoDataset, tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    args = audioset_args(demo, tmp_path / "shards", "--limit", "2", "--workers", "1")
    assert load_tool("shard_audioset").main(args) == 1
    assert "ffmpeg not found on PATH" in capsys.readouterr().err
    assert load_tool("shard_audioset").main([*args, "--ffmpeg", str(off_path)]) == 0
    manifest = json.loads((tmp_path / "shards" / "manifest.json").read_text())
    assert sum(shard["num_samples"] for shard in manifest["shards"]) == 2 and not manifest["failures"]
    assert ffmpeg_run.ffmpeg_binary() == str(off_path)


def test_the_environment_check_checks_the_ffmpeg_named(off_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    assert [r.ok for r in envcheck.check_ffmpeg()] == [False, False]
    monkeypatch.setenv("MBT_FFMPEG", str(off_path))
    ffmpeg, ffprobe = envcheck.check_ffmpeg()
    assert ffmpeg.ok and ffmpeg.line.startswith("ffmpeg ") and str(off_path) in ffmpeg.line
    assert ffprobe.ok and str(off_path.with_name("ffprobe")) in ffprobe.line
    monkeypatch.setenv("MBT_FFMPEG", "/nowhere/ffmpeg")
    assert envcheck.check_ffmpeg()[0].line == "ffmpeg: /nowhere/ffmpeg is not an executable (MBT_FFMPEG)"
