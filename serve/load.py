"""A trained model ready to use, with its preprocessing, from any of the three forms training and export leave
(`mbt.model_source`): a training checkpoint, a run folder (its latest checkpoint) or an exported folder (the format
`serve.export` writes and `mbt.exported` reads: model.safetensors and config.json).

    model, prep = serve.load_pretrained("runs/demo/bottleneck")   # eval mode; prep feeds serve.predict.Predictor
    print(prep.found)   # model: run folder runs/demo/bottleneck -> checkpoint step-00001200.pt, step 1200

An older checkpoint does not record the shards' feature parameters (frames per second, segment, log-mel settings),
its classes or its log-mel normalization: they are read from the manifest of its training split (the run's
config.yaml names it), or of the split given instead.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from mbt.checkpoint import CheckpointFileError, build_model
from mbt.classes import ClassListError, class_record
from mbt.exported import CONFIG_FILE, FORMAT, FORMAT_VERSION, WEIGHTS_FILE, ExportError
from mbt.model import MBT
from mbt.model_size import build_fitted
from mbt.model_source import ModelSource, load_source, resolve_model, run_setting
from pipelines import LoaderError
from pipelines.config import AugmentConfig, records_logmel_norm, with_logmel_norm
from pipelines.sources import split_manifest
from shards.manifest import LogmelStats, Manifest
from shards.schema import FeatureParams

__all__ = ["CONFIG_FILE", "FORMAT", "FORMAT_VERSION", "WEIGHTS_FILE", "ExportError", "Preprocessing", "load_model"]


@dataclass(frozen=True)
class Preprocessing:
    """What turns a video into the model's input and its logits into names: the shards' feature parameters, the
    evaluation settings with the model's log-mel normalization (`augment.logmel_mean/std`, always set), the
    classes ({index, id, name}) and whether they are multi-label; and the line saying which form of the model was
    found (`mbt.model_source.ModelSource.describe`)."""

    features: FeatureParams
    augment: AugmentConfig
    classes: list[dict[str, Any]]
    multi_label: bool
    schema_version: int
    found: str

    @property
    def class_names(self) -> list[str]:
        return [c["name"] or c["id"] for c in self.classes]

    def manifest(self) -> Manifest:
        """A manifest without shards that `pipelines.transforms.SampleBuilder` builds evaluation rows from."""
        return Manifest(
            dataset="", split="", features=self.features, classes=self.classes, multi_label=self.multi_label,
            shards=[], logmel=LogmelStats(), failures=[], job={}, schema_version=self.schema_version,
        )  # fmt: skip


def from_checkpoint(
    path: str | Path, features_from: str | None = None, source: ModelSource | None = None
) -> tuple[MBT, Preprocessing]:
    """The model of a training checkpoint (or the latest of a run folder) in eval mode on the CPU, and its
    preprocessing: feature parameters, classes and normalization from the checkpoint; from the manifest of
    `features_from` or else of the run's training split (config.yaml) for what an older checkpoint lacks."""
    source = source or resolve_model(path)
    if source.form == "export":
        raise CheckpointFileError(f"{path}: an export, not a training checkpoint or run (serve.load_pretrained)")
    checkpoint = source.path
    trained = load_source(source)
    augment = trained.augment
    recorded = trained.features is not None and trained.classes is not None and records_logmel_norm(augment)
    if features_from is None and recorded:
        record, features, version = trained.classes, trained.features, trained.schema_version
    else:  # an older checkpoint, or features asked for from another split
        split = features_from or run_setting(source, "train_shards", "--features-from with the split it was trained on")
        try:
            manifest = split_manifest(split)
            record = trained.classes or class_record(manifest, split)
        except (LoaderError, ClassListError) as err:
            problem = f"the feature parameters of {split} cannot be read: {err}"
            raise CheckpointFileError(f"{checkpoint}: {problem}") from None
        augment = with_logmel_norm(augment, manifest.logmel)
        features, version = manifest.features, manifest.schema_version
    prep = Preprocessing(
        features, augment, record["classes"], record["multi_label"], version, source.describe(trained.step)
    )
    return build_model(trained, checkpoint).eval(), prep


def load_model(
    source: str | Path, features_from: str | None = None, device: str | torch.device = "cpu"
) -> tuple[MBT, Preprocessing]:
    """The model named by `source` in any of its three forms (`mbt.model_source.resolve_model`) on `device`, in eval
    mode, and its preprocessing (`prep.found` says which form was found). An export is read by
    `mbt.exported.read_export`: everything it holds checked before anything is allocated from it (ExportError naming
    the file); a checkpoint or run by `from_checkpoint` (CheckpointFileError)."""
    found = resolve_model(source)
    if found.form != "export":
        model, prep = from_checkpoint(found.path, features_from, found)
        return model.to(device), prep
    trained = load_source(found)
    record = trained.classes
    prep = Preprocessing(
        trained.features, trained.augment, record["classes"], record["multi_label"], trained.schema_version,
        found.describe(),
    )  # fmt: skip
    return build_fitted(trained.model, trained.state).to(device).eval(), prep


def load_pretrained(source: str | Path, device: str | torch.device = "cpu") -> tuple[MBT, Preprocessing]:
    """The trained model named by `source` (an export folder, a run folder or a checkpoint) on `device`, in eval
    mode, and its preprocessing: `load_model`."""
    return load_model(source, device=device)
