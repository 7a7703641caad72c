"""Videos whose container header claims another duration than they hold (made here by rewriting the header of a clip
ffmpeg wrote): a timeline is planned as at most a day and what the bytes can hold, its windows are made as they
are decoded, and it ends where the content ends, keeping the windows before (a warning names the file); the peak
memory of predicting a video that claims years is that of predicting it with an honest header."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from conftest import REPO, load_tool
from media import clips_claiming, make_clip, with_claimed_duration
from tiny_run import make_run

from serve.load import from_checkpoint
from serve.predict import InputError, Prediction, Predictor
from serve.segments import Segment

YEARS_S = 3e8  # about 9.5 years: an mkv's duration is a float


@pytest.fixture(scope="module")
def run(train_shards: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_run(train_shards, tmp_path_factory.mktemp("durations") / "run")


@pytest.fixture(scope="module")
def videos(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """6 s clips with honest headers (mkv, mp4), and copies claiming 30 s, years (mkv) or 49 days (mp4's most)."""
    return clips_claiming(tmp_path_factory.mktemp("claims"), 6.0, {"30s": 30.0, "years": YEARS_S})


def timeline(run: Path, video: Path, **kw: object) -> Prediction:
    model, prep = from_checkpoint(run)
    return Predictor(model, prep, window_s=2.0, **kw).predict(Segment(video, video.name))


@pytest.mark.slow
@pytest.mark.parametrize("claim", ["30s", "years"])
@pytest.mark.parametrize("suffix", ["mkv", "mp4"])
def test_a_header_claiming_more_than_the_content_keeps_the_windows_that_decode(
    run: Path, videos: dict[str, Path], claim: str, suffix: str
) -> None:
    honest = timeline(run, videos[f"honest.{suffix}"])
    video = videos[f"{claim}.{suffix}"]
    hostile = timeline(run, video, hop_s=2.0)
    assert hostile.windows == honest.windows == [(0.0, 2.0), (2.0, 4.0), (4.0, 6.0)]
    np.testing.assert_allclose(hostile.logits, honest.logits, atol=1e-6)
    assert honest.warnings == []
    *capped, end = hostile.warnings
    assert end.startswith(f"{video}: nothing decodes from 6 s on") and end.endswith("the timeline stops at 6 s")
    if claim == "years":  # capped as tests/preprocess/test_hostile_pre_durations.py shows
        assert len(capped) == 1 and capped[0].startswith(f"{video}: its header claims ") and "planned as" in capped[0]
    else:
        assert capped == []


@pytest.mark.slow
def test_a_window_past_the_content_is_left_out(run: Path, videos: dict[str, Path]) -> None:
    """Windows of 2 s every 1.5 s: the one from 4.5 s holds 1.5 s of the 6 s clip, and is the last kept, as with
    the honest header; the one from 6 s decodes nothing."""
    honest = timeline(run, videos["honest.mkv"], hop_s=1.5)
    hostile = timeline(run, videos["30s.mkv"], hop_s=1.5)
    assert hostile.windows == honest.windows and hostile.windows[-1] == (3.0, 5.0)
    assert "nothing decodes from 4.5 s on" in hostile.warnings[0] or "decode from 4.5 s on" in hostile.warnings[0]


def test_a_first_window_the_content_does_not_fill_is_refused(run: Path, tmp_path: Path) -> None:
    """Without --window-s too: a 1 s clip claiming 30 s is shorter than one window, as with its honest header."""
    video = with_claimed_duration(make_clip(tmp_path / "short.mkv", seconds=1.0), tmp_path / "claims.mkv", 30.0)
    model, prep = from_checkpoint(run)
    with pytest.raises(InputError, match=rf"{video}: 1\.\d\d s from 0 s, shorter than one window of 2 s"):
        Predictor(model, prep).predict(Segment(video, video.name))


def test_the_tool_prints_one_warning_line_and_writes_the_timeline(
    run: Path, videos: dict[str, Path], tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    video = videos["30s.mkv"]
    args = [str(video), "--model", str(run), "--window-s", "2", "--out-dir", str(tmp_path)]
    assert load_tool("predict").main(args) == 0
    captured = capsys.readouterr()
    assert [line for line in captured.err.splitlines() if line.startswith("warning: ")] == [
        f"warning: {video}: nothing decodes from 6 s on (of the 30 s planned): the timeline stops at 6 s"
    ]
    assert "(3 windows)" in captured.out
    assert len((tmp_path / "30s.timeline.csv").read_text().splitlines()) == 4


def peak_rss_kb(args: list[str], out: Path, kill_above_kb: int | None = None) -> tuple[int, int]:
    """(exit status, peak RSS in KB) of tools/predict.py `args` run in a child (its output in `out`), killed once
    its resident memory passes `kill_above_kb` (a hostile input must not take the machine)."""
    with out.open("w") as log:
        proc = subprocess.Popen([sys.executable, str(REPO / "tools" / "predict.py"), *args], stdout=log, stderr=log)
    while True:
        pid, status, usage = os.wait4(proc.pid, os.WNOHANG)
        if pid:
            proc.returncode = os.waitstatus_to_exitcode(status)
            return proc.returncode, usage.ru_maxrss
        status_lines = Path(f"/proc/{proc.pid}/status").read_text().splitlines()
        rss = next((int(line.split()[1]) for line in status_lines if line.startswith("VmRSS")), 0)  # 0: exiting
        if kill_above_kb is not None and rss > kill_above_kb:
            proc.kill()
        time.sleep(0.1)


@pytest.mark.slow
def test_a_video_claiming_years_takes_the_memory_of_an_honest_one(
    run: Path, videos: dict[str, Path], tmp_path: Path
) -> None:
    """On main this child grew past 3 GB in a minute, planning every window of the claimed years up front."""
    common = ["--model", str(run), "--window-s", "2", "--hop-s", "1", "--out-dir", str(tmp_path)]
    status, honest_kb = peak_rss_kb([str(videos["honest.mkv"]), *common], tmp_path / "honest.log")
    assert status == 0, (tmp_path / "honest.log").read_text()[-2000:]
    status, hostile_kb = peak_rss_kb([str(videos["years.mkv"]), *common], tmp_path / "years.log", 2 * honest_kb)
    assert status == 0, (tmp_path / "years.log").read_text()[-2000:]
    assert hostile_kb < 2 * honest_kb, (hostile_kb, honest_kb)
    assert "the timeline stops at 6 s" in (tmp_path / "years.log").read_text()
