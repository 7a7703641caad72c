"""Where data lives by default: under `data/` of the working directory, never inside a package (a package holds
code; `rm -rf data/` deletes data only). Every path is a default: a folder passed explicitly is used where it is."""

from __future__ import annotations

from pathlib import Path

DATA_ROOT = Path("data")
SHARDS_ROOT = DATA_ROOT / "shards"  # data/shards/<dataset>/<split>/: manifest.json, shard-*.tar, .idx
RAW_ROOT = DATA_ROOT / "raw"  # data/raw/<dataset>/: a dataset's videos and CSVs as downloaded (the demo's: made)
LEGACY_SHARDS_ROOT = Path("shards")  # the default before data/ (inside the format package): named in hints only


def split_dir(dataset: str, split: str) -> Path:
    """The default folder of a dataset's split: data/shards/<dataset>/<split>."""
    return SHARDS_ROOT / dataset / split


def legacy_hint(folder: str | Path) -> str:
    """A hint for a default split folder that is missing where an older version left it (shards/<dataset>/<split>):
    the command that moves it, or "" when there is nothing there."""
    folder = Path(folder)
    try:
        relative = folder.relative_to(SHARDS_ROOT)
    except ValueError:
        return ""
    old = LEGACY_SHARDS_ROOT / relative
    if not (old / "manifest.json").is_file():
        return ""
    return (
        f"; an older version wrote it to {old}: move it (mkdir -p {folder.parent} && mv {old} {folder}) or pass {old}"
    )
