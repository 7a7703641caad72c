"""Progress as people read it: plain lines into files and pipes (every N items or seconds, and at the end), a bar
on a terminal only, never a carriage return into a file."""

from __future__ import annotations

import io

from shards.progress import Progress, format_eta


class Terminal(io.StringIO):
    def isatty(self) -> bool:
        return True


class Clock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def test_lines_every_n_items_and_at_the_end_with_rate_and_eta() -> None:
    out, err, clock = io.StringIO(), io.StringIO(), Clock()
    with Progress(10, "eval/split", "clips", every_n=4, out=out, err=err, clock=clock) as progress:
        for _ in range(10):
            clock.now += 0.5
            progress.update()
    assert out.getvalue().splitlines() == [
        "eval/split 4/10 clips/s 2 eta 0:00:03",
        "eval/split 8/10 clips/s 2 eta 0:00:01",
        "eval/split 10/10 clips/s 2 eta 0:00:00",
    ]
    assert err.getvalue() == ""


def test_lines_every_s_seconds() -> None:
    out, clock = io.StringIO(), Clock()
    progress = Progress(None, "job", every_s=30, out=out, err=io.StringIO(), clock=clock)
    for _ in range(100):
        clock.now += 1
        progress.update()
    assert [line.split()[1] for line in out.getvalue().splitlines()] == ["30", "60", "90"]
    assert all(line.endswith("eta ?") for line in out.getvalue().splitlines())


def test_a_caller_reports_its_own_fields_from_a_resumed_count() -> None:
    out, clock = io.StringIO(), Clock()
    progress = Progress(300, "step", initial=100, out=out, err=io.StringIO(), clock=clock)
    for _ in range(20):
        clock.now += 0.1
        progress.update()
    progress.report({"epoch": "7", "loss": "4.2", "lr": "2.9e-03", "clips/s": "210"})
    progress.write("step 120 epoch 7: mAP=0.5")
    assert out.getvalue().splitlines() == [
        "step 120/300 epoch 7 loss 4.2 lr 2.9e-03 clips/s 210 eta 0:00:18",
        "step 120 epoch 7: mAP=0.5",
    ]


def test_a_terminal_gets_a_bar_and_a_file_beside_it_still_gets_lines() -> None:
    """stderr a terminal: the bar is drawn there; stdout a file (`> log`): the lines go to the file too; both
    terminals: the bar alone."""
    out, err = io.StringIO(), Terminal()
    with Progress(3, "step", out=out, err=err) as progress:
        progress.update(3)
        progress.report({"loss": "1.0"})
    assert "\r" in err.getvalue() and out.getvalue() == "step 3/3 loss 1.0 eta 0:00:00\n"
    out, err = Terminal(), Terminal()
    with Progress(3, "step", out=out, err=err) as progress:
        progress.update(3)
        progress.report({"loss": "1.0"})
    assert out.getvalue() == "" and "loss=1.0" in err.getvalue()


def test_disabled_progress_says_nothing() -> None:
    out, err = io.StringIO(), Terminal()
    with Progress(3, "step", enabled=False, every_n=1, out=out, err=err) as progress:
        progress.update(3)
        progress.report({"loss": "1.0"})
        progress.write("hello")
    assert out.getvalue() == err.getvalue() == ""


def test_eta_format() -> None:
    assert [format_eta(s) for s in (0, 14.4, 3599.6, 36000, float("inf"), -1)] == [
        "0:00:00", "0:00:14", "1:00:00", "10:00:00", "?", "?",
    ]  # fmt: skip
