"""Where data lives by default (shards/layout.py): under data/, and a split left at the old place is named."""

from __future__ import annotations

from pathlib import Path

import pytest

from mbt.config import preset
from mbt.splits import open_run_splits
from shards.layout import SHARDS_ROOT, legacy_hint, split_dir


def test_default_split_folders_are_under_data() -> None:
    assert split_dir("audioset", "eval") == Path("data/shards/audioset/eval")
    assert SHARDS_ROOT.parts[0] == "data"
    for name in ("audioset", "vggsound", "custom", "demo"):
        cfg = preset(name)
        assert (
            Path(cfg.train_shards).parent == SHARDS_ROOT / name and Path(cfg.eval_shards).parent == SHARDS_ROOT / name
        )


def test_a_split_at_the_old_default_place_is_named_with_the_move(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(tmp_path)
    new = split_dir("audioset", "eval")
    assert legacy_hint(new) == ""
    old = Path("shards/audioset/eval")
    old.mkdir(parents=True)
    (old / "manifest.json").write_text("{}")
    hint = legacy_hint(new)
    assert f"mv {old} {new}" in hint
    assert legacy_hint(tmp_path / "elsewhere") == ""  # an explicit folder elsewhere: nothing to say
    cfg = preset("audioset")
    problem = open_run_splits(cfg, train=False).problems["eval_shards"]
    assert "no manifest.json there" in problem and f"mv {old} {new}" in problem
