"""One way to name a trained model, in three forms: a training checkpoint (`.pt`), a run folder (its latest
checkpoint) or an export folder (`mbt.exported`: model.safetensors and config.json). `resolve_model` says which form
a path is, `load_source` reads any of them as the `TrainedModel` a checkpoint gives, and every tool that takes a
model (`mbt.evaluate`, `tools/predict.py`, `tools/export_model.py`, `serve.load`) uses both and prints what it found:

    model: run folder runs/demo -> checkpoint step-00001200.pt, step 1200
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from mbt.checkpoint import CHECKPOINT_DIR, CheckpointFileError, TrainedModel, latest_checkpoint, load_trained
from mbt.config import ConfigError
from mbt.config_io import read_yaml
from mbt.exported import CONFIG_FILE, WEIGHTS_FILE, is_export, read_export

RUN_CONFIG = "config.yaml"  # what training writes in its run folder


@dataclass(frozen=True)
class ModelSource:
    """A model as named (`given`) and found: its `form` ("checkpoint", "run folder" or "export") and `path`, the
    checkpoint file or the export folder."""

    form: str
    given: Path
    path: Path

    @property
    def run_dir(self) -> Path | None:
        """The run folder of a checkpoint inside one (run/checkpoints/x.pt beside run/config.yaml), else None."""
        run = self.path.parent.parent
        return run if self.form != "export" and (run / RUN_CONFIG).is_file() else None

    def describe(self, step: int | None = None) -> str:
        """One line naming the form found, e.g. "model: run folder runs/x -> checkpoint step-00001200.pt, step 1200"."""
        if self.form == "export":
            return f"model: export {self.given} ({WEIGHTS_FILE}, {CONFIG_FILE})"
        at = f", step {step}" if step is not None else ""
        if self.form == "run folder":
            return f"model: run folder {self.given} -> checkpoint {self.path.name}{at}"
        return f"model: checkpoint {self.given}{at}"


def resolve_model(path: str | Path) -> ModelSource:
    """The form of the model named by `path`: an export folder (`mbt.exported.is_export`), a run folder (its latest
    checkpoints/step-*.pt), else a checkpoint file (whose reading says if it is none). CheckpointFileError for a
    folder that is neither."""
    path = Path(path)
    if is_export(path):
        return ModelSource("export", path, path)
    if path.is_dir():
        found = latest_checkpoint(path)
        if found is None:
            raise CheckpointFileError(
                f"{path}: a folder with neither {CHECKPOINT_DIR}/step-*.pt (a training run) nor {CONFIG_FILE} (an "
                "export)"
            )
        return ModelSource("run folder", path, found)
    return ModelSource("checkpoint", path, path)


def load_source(source: ModelSource) -> TrainedModel:
    """The weights and what goes with them of `source`: `mbt.checkpoint.load_trained` of its checkpoint, or
    `mbt.exported.read_export` of its export (CheckpointFileError or ExportError naming the file)."""
    return read_export(source.path) if source.form == "export" else load_trained(source.path)


def run_setting(source: ModelSource, key: str, instead: str) -> str:
    """The split named `key` (train_shards, eval_shards) in the config.yaml of the run `source` belongs to;
    CheckpointFileError saying to pass the flag `instead` when there is no such run config or it names none."""
    run = source.run_dir
    if run is None:
        where = "an export" if source.form == "export" else f"{source.path} is not in a run folder with {RUN_CONFIG}"
        raise CheckpointFileError(f"{source.given}: no run config names its {key} ({where}); pass {instead}")
    config = run / RUN_CONFIG
    try:
        value = read_yaml(config).get(key)
    except ConfigError as err:
        raise CheckpointFileError(f"{config}: {err}") from None
    if not isinstance(value, str) or not value:
        raise CheckpointFileError(f"{config}: names no {key}; pass {instead}")
    return value
