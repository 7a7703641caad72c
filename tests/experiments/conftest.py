"""The experiments' tests: the session's demo shards as `make demo` lays them out."""

from __future__ import annotations

from pathlib import Path

import pytest


@pytest.fixture
def shards(train_shards: Path, eval_shards: Path, tmp_path: Path) -> Path:
    """A folder with train/ and eval/, as `make demo` shards them."""
    folder = tmp_path / "shards"
    folder.mkdir()
    (folder / "train").symlink_to(train_shards)
    (folder / "eval").symlink_to(eval_shards)
    return folder
