"""Everything after training: a trained model loaded from a checkpoint, a run folder or an export
(`load_model`, `load_pretrained`), prediction on raw videos decoded exactly as the shard job decodes them
(`serve.predict`), segments CSVs and result files (`serve.predict_io`), and exports (`serve.export`).

    from serve import load_pretrained
    model, prep = load_pretrained("exported/demo")   # eval mode; prep feeds serve.predict.Predictor
"""

from __future__ import annotations

from serve.export import load_model, load_pretrained

__all__ = ["load_model", "load_pretrained"]
