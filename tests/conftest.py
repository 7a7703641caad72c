"""Shared fixtures: a small demo dataset made by ffmpeg once per test session, and the tools' entry points."""

from __future__ import annotations

import importlib.util
import sys
from collections.abc import Iterator
from pathlib import Path
from types import ModuleType

import pytest
from full_disk import FullDisk, small_tmpfs

from experiments.demo_data import DemoDataset, make_demo_dataset

REPO = Path(__file__).resolve().parents[1]
DEMO_SECONDS = 2.0


def load_tool(name: str) -> ModuleType:
    """tools/<name>.py as a module, so that tests call its main() in-process."""
    spec = importlib.util.spec_from_file_location(f"tool_{name}", REPO / "tools" / f"{name}.py")
    assert spec and spec.loader
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def tool_command(name: str, *args: str) -> list[str]:
    """The command line that runs tools/<name>.py with this interpreter."""
    return [sys.executable, str(REPO / "tools" / f"{name}.py"), *args]


@pytest.fixture(scope="session")
def demo(tmp_path_factory: pytest.TempPathFactory) -> DemoDataset:
    """12 clips of 2 s (9 train, 3 eval) in AudioSet layout."""
    return make_demo_dataset(tmp_path_factory.mktemp("demo"), clips=12, seconds=DEMO_SECONDS, workers=2)


def audioset_args(demo: DemoDataset, out: Path, *extra: str) -> list[str]:
    """shard_audioset.py arguments for the demo's train split into `out`."""
    return [
        "--segments",
        str(demo.train_csv),
        "--labels",
        str(demo.class_labels_csv),
        "--videos",
        str(demo.videos_dir),
        "--out",
        str(out),
        "--segment-seconds",
        str(DEMO_SECONDS),
        "--fps",
        "4",
        "--quiet",
        *extra,
    ]  # fmt: skip  (4 frames per second: 8 frames in a 2 s clip)


def shard_demo_split(demo: DemoDataset, out: Path, split: str = "train", shard_size: int = 2) -> Path:
    """Shard the demo's `split` ('train': 9 clips, 'eval': 3) into `out` with `shard_size` samples per shard."""
    csv = demo.train_csv if split == "train" else demo.eval_csv
    args = audioset_args(demo, out, "--shard-size", str(shard_size))
    args[1] = str(csv)
    assert load_tool("shard_audioset").main(args) == 0
    return out


@pytest.fixture(scope="session")
def train_shards(demo: DemoDataset, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The demo's 9 training clips in 5 uneven shards (2, 2, 2, 2, 1)."""
    return shard_demo_split(demo, tmp_path_factory.mktemp("shards") / "train", "train", shard_size=2)


@pytest.fixture(scope="session")
def eval_shards(demo: DemoDataset, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The demo's 3 evaluation clips in 2 shards (2, 1)."""
    return shard_demo_split(demo, tmp_path_factory.mktemp("shards") / "eval", "eval", shard_size=2)


@pytest.fixture
def demo_shards(train_shards: Path, eval_shards: Path, tmp_path: Path) -> Path:
    """A folder with train/ and eval/ (links to the session's demo shards), as `make demo` lays them out."""
    folder = tmp_path / "shards"
    folder.mkdir()
    (folder / "train").symlink_to(train_shards)
    (folder / "eval").symlink_to(eval_shards)
    return folder


@pytest.fixture
def full_disk(tmp_path: Path) -> Iterator[FullDisk]:
    """A 16 MiB tmpfs at tmp_path/disk that the test fills when it wants a full disk (skipped without mount)."""
    with small_tmpfs(tmp_path / "disk", "16m") as disk:
        yield disk
