"""Export a trained MBT as a folder that stands alone: model.safetensors and config.json (model config, classes,
feature parameters, normalization, the shards' schema version). `serve.load_pretrained(OUT_DIR)` loads it.

    python tools/export_model.py runs/demo/bottleneck exported/demo
    python tools/export_model.py step-00001000.pt out --features-from data/shards/audioset/balanced_train

The source is a training checkpoint, a run folder (its latest checkpoint) or an export; a line says which. Exits 1
with one `error:` line when the model or its training split's manifest cannot be read.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from mbt.checkpoint import CheckpointFileError
from mbt.exported import CONFIG_FILE, WEIGHTS_FILE, ExportError
from serve.export import export_model


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("source", type=Path, help="a training checkpoint (.pt), a run folder (its latest) or an export")
    parser.add_argument("out_dir", type=Path, help="folder for model.safetensors and config.json")
    parser.add_argument(
        "--features-from", help="the training split whose manifest holds the feature parameters (default: the one "
        "the run's config.yaml names)",
    )  # fmt: skip
    args = parser.parse_args(argv)
    try:
        prep = export_model(args.source, args.out_dir, args.features_from)
    except (CheckpointFileError, ExportError, OSError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 1
    print(prep.found)
    print(f"wrote {args.out_dir / WEIGHTS_FILE}, {args.out_dir / CONFIG_FILE}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
