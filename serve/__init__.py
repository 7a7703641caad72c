"""Everything after training, a module a job: a trained model with its preprocessing loaded from a checkpoint, a run
folder or an export (`serve.load`: `load_model`, `load_pretrained`), an export written (`serve.export`), prediction on
raw videos decoded exactly as the shard job decodes them (`serve.predict`), its inputs as segments
(`serve.segments`: files, folders, segments CSVs) and its outputs (`serve.outputs`: probabilities, JSON records,
timeline CSVs, the lines printed).

    from serve import load_pretrained
    model, prep = load_pretrained("exported/demo")   # eval mode; prep feeds serve.predict.Predictor
"""

from __future__ import annotations

from serve.load import load_model, load_pretrained

__all__ = ["load_model", "load_pretrained"]
