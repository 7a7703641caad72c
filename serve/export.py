"""A trained model as a folder that stands alone: `model.safetensors` (the weights) and `config.json` (the model
config, the classes, the feature parameters and schema version of the shards it was trained on, its input
normalization and evaluation settings), written from a training checkpoint, a run or another export (the format:
`mbt.exported`); `serve.load.load_pretrained` reads it back.

    python tools/export_model.py runs/demo/bottleneck exported/demo
"""

from __future__ import annotations

import dataclasses
import json
import os
from pathlib import Path
from typing import Any

from safetensors.torch import save_file

from mbt.exported import CONFIG_FILE, FORMAT, FORMAT_VERSION, WEIGHTS_FILE
from mbt.model import MBTConfig
from pipelines.config import VIDEO_MEAN, VIDEO_STD
from serve.load import Preprocessing, load_model
from shards.atomic import atomic_path, write_bytes_atomic


def export_config(model: MBTConfig, prep: Preprocessing) -> dict[str, Any]:
    """config.json's content: plain JSON values only."""
    augment = dataclasses.asdict(prep.augment.replace(logmel_mean=None, logmel_std=None))
    return {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "model": dataclasses.asdict(model),
        "augment": augment,  # evaluation crops, frames used, audio frames, test clips
        "normalization": {
            "logmel_mean": prep.augment.logmel_mean,
            "logmel_std": prep.augment.logmel_std,
            "video_mean": list(VIDEO_MEAN),
            "video_std": list(VIDEO_STD),
        },
        "features": prep.features.to_dict(),
        "schema_version": prep.schema_version,
        "multi_label": prep.multi_label,
        "classes": prep.classes,
    }


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def export_model(source: str | Path, out_dir: str | Path, features_from: str | None = None) -> Preprocessing:
    """Write the model of the checkpoint, run or export `source` as `out_dir`/model.safetensors and config.json
    (each written to a temporary name, then renamed; a full disk is DiskFullError naming the file); returns its
    preprocessing (`found` names the form of `source`)."""
    model, prep = load_model(source, features_from)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    with atomic_path(out / WEIGHTS_FILE) as tmp:  # safetensors writes a file by name only
        save_file({name: t.contiguous() for name, t in model.state_dict().items()}, str(tmp))
        os.chmod(tmp, 0o666 & ~_umask())  # safetensors creates it 0600: give it config.json's mode, as open() would
    text = json.dumps(export_config(model.cfg, prep), indent=1, allow_nan=False) + "\n"
    write_bytes_atomic(out / CONFIG_FILE, text.encode())
    return prep
