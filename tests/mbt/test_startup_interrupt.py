"""Ctrl-C or SIGTERM outside the training loop (while the run starts, while a model is evaluated): one line and the
shell's status for the signal, no traceback, the previous handlers back after. The loop's own stopping (every rank
after the same step) is tests/mbt/test_train_interrupt.py's."""

from __future__ import annotations

import signal
from pathlib import Path

import pytest
from test_evaluate import cli_args, save_checkpoint
from test_train import train_args

import mbt.evaluate
import mbt.train
from mbt.interrupt import SignalStop, raising_signals

SIGNALS = [signal.SIGINT, signal.SIGTERM]
LINES = {
    signal.SIGINT: "interrupted before {}; rerun the same command",
    signal.SIGTERM: "stopped by SIGTERM before {}; rerun the same command",
}


def signalled(signum: int):
    """A stand-in that sends this process `signum`, as a terminal or a scheduler would, where it is called."""

    def send(*args: object, **kwargs: object) -> None:
        signal.raise_signal(signum)
        raise AssertionError(f"signal {signum} did not stop the command")

    return send


@pytest.mark.parametrize("signum", SIGNALS, ids=["SIGINT", "SIGTERM"])
def test_a_signal_while_the_run_starts_is_one_line(
    signum: int, train_shards: Path, eval_shards: Path, tmp_path: Path, monkeypatch, capsys
) -> None:
    monkeypatch.setattr(mbt.train, "check_memory", signalled(signum))  # opened and validated, not yet training
    before = signal.getsignal(signum)
    code = mbt.train.main(train_args(train_shards, eval_shards, tmp_path / "run"))
    assert code == 128 + signum
    assert capsys.readouterr().err.splitlines() == [LINES[signum].format("training started")]
    assert signal.getsignal(signum) is before
    assert not (tmp_path / "run" / "checkpoints").exists()


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return save_checkpoint(tmp_path_factory.mktemp("ckpt") / "tiny.pt")


@pytest.mark.parametrize("signum", SIGNALS, ids=["SIGINT", "SIGTERM"])
def test_a_signal_while_evaluating_is_one_line(
    signum: int,
    checkpoint: Path,
    eval_shards: Path,
    tmp_path: Path,
    monkeypatch,
    capsys,
) -> None:
    monkeypatch.setattr(mbt.evaluate, "evaluate_split", signalled(signum))
    code = mbt.evaluate.main(cli_args(checkpoint, eval_shards, tmp_path / "eval"))
    assert code == 128 + signum
    err = capsys.readouterr().err.splitlines()
    assert err == ["mbt.evaluate: " + LINES[signum].format("the end")]
    assert not (tmp_path / "eval").exists()


def test_raising_signals_raises_where_the_signal_lands_and_restores_the_handlers() -> None:
    before = {s: signal.getsignal(s) for s in SIGNALS}
    with pytest.raises(SignalStop) as stopped, raising_signals():
        signal.raise_signal(signal.SIGTERM)
    assert stopped.value.signum == signal.SIGTERM and stopped.value.exit_status == 143
    assert {s: signal.getsignal(s) for s in SIGNALS} == before
