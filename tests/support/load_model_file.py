"""Load one model file as a user's command does, in a process of its own whose peak memory the caller measures
(tests/mbt/test_hostile_model_files.py); prints `loaded`, or `refused: ` and the one-line error.

    python load_model_file.py KIND PATH

KIND: checkpoint (`mbt.evaluate`, `serve.from_checkpoint`: `load_trained` then `build_model`), export
(`serve.load_pretrained`), vit (`--init_video` into a model of tiny_run.TINY's sizes), scenic
(`tools/convert_scenic.py` with the tiny fixture's options), run-config (`mbt.train --config PATH`). Each imports
only what its command imports, so that processes of one kind compare.
"""

from __future__ import annotations

import sys
from pathlib import Path


def load(kind: str, path: Path) -> None:
    """Load `path` as `kind`; the loader's own error when it refuses the file."""
    if kind == "checkpoint":
        from mbt.checkpoint import build_model, load_trained

        build_model(load_trained(path), path)
    elif kind == "export":
        from serve.load import load_pretrained

        load_pretrained(path)
    elif kind == "vit":
        from tiny_run import TINY

        from mbt.model import MBT
        from mbt.pretrained import init_from_vit

        init_from_vit(MBT(TINY), video=path)
    elif kind == "scenic":
        from mbt.scenic import ScenicOptions, convert

        convert(path, ScenicOptions(fusion_layer=1, img_size=32, num_mel_bins=32))  # tests/data/scenic_mbt_tiny's
    elif kind == "run-config":
        from mbt.config import ConfigError
        from mbt.train import main

        if main(["--config", str(path)]) != 0:  # it prints its own error line
            raise ConfigError("mbt.train refused the run")
    else:
        raise SystemExit(f"unknown kind {kind!r}")


def main(kind: str, path: str) -> int:
    try:
        load(kind, Path(path))
    except (RuntimeError, ValueError) as err:  # the loaders' errors: CheckpointFileError, ExportError, ...
        print(f"refused: {type(err).__name__}: {err}")
        return 0
    print("loaded")
    return 0


if __name__ == "__main__":
    sys.exit(main(*sys.argv[1:]))
