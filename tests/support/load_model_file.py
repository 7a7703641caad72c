"""Load model files as a user's command does, each in a process of its own whose peak memory is measured
(tests/mbt/test_hostile_model_files.py): `loaded`, or `refused: ` and the one-line error.

    python load_model_file.py KIND PATH [KIND PATH ...]

prints a JSON list of [peak resident KiB, output] per file. This process imports every loader once; each file is
then loaded in a fork of it (milliseconds, not the seconds of a fresh interpreter importing torch), whose peak
resident memory `os.wait4` reports: the imports are in every fork's peak alike, and what a file makes its loader
allocate comes on top.

KIND: checkpoint (`mbt.evaluate`, `serve.from_checkpoint`: `load_trained` then `build_model`), export
(`serve.load_pretrained`), vit (`--init_video` into a model of tiny_run.TINY's sizes), scenic
(`tools/convert_scenic.py` with the tiny fixture's options), run-config (`mbt.train --config PATH`). Each imports
only what its command imports, so that processes of one kind compare.
"""

from __future__ import annotations

import io
import json
import os
import sys
from contextlib import redirect_stderr, redirect_stdout
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


def measure(jobs: list[tuple[str, Path]]) -> list[tuple[int, str]]:
    """(peak resident KiB, output) of loading each (kind, path) of `jobs` in a fork of this process."""
    import mbt.checkpoint
    import mbt.pretrained
    import mbt.scenic
    import mbt.train  # noqa: F401
    import serve.load  # noqa: F401

    results = []
    for kind, path in jobs:
        read_end, write_end = os.pipe()
        pid = os.fork()
        if pid == 0:  # the fork: load, hand its output to the parent, leave without running the parent's exit code
            os.close(read_end)
            output = io.StringIO()
            with redirect_stdout(output), redirect_stderr(output):
                main(kind, str(path))
            os.write(write_end, output.getvalue().encode())
            os._exit(0)
        os.close(write_end)
        with os.fdopen(read_end, "rb") as pipe:
            output = pipe.read().decode()
        _, _, usage = os.wait4(pid, 0)
        results.append((usage.ru_maxrss, output))
    return results


if __name__ == "__main__":
    args = sys.argv[1:]
    print(json.dumps(measure([(kind, Path(path)) for kind, path in zip(args[::2], args[1::2], strict=True)])))
