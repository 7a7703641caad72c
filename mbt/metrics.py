"""Evaluation metrics: AudioSet's (macro mAP, mean AUC, d-prime) for multi-label, top-k accuracy for single-label.

Scores are logits: AP and AUC depend only on each class's ranking of the samples, which the sigmoid keeps, and raw
logits do not saturate into ties the way float32 probabilities do.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from statistics import NormalDist
from typing import Any

import numpy as np
from numpy.typing import ArrayLike
from sklearn.metrics import average_precision_score, roc_auc_score


def _scores_targets(scores: ArrayLike, targets: ArrayLike) -> tuple[np.ndarray, np.ndarray]:
    """Both as float64 (N, C) arrays, checked to have the same shape, finite scores and 0/1 targets."""
    scores, targets = np.asarray(scores, dtype=np.float64), np.asarray(targets, dtype=np.float64)
    if scores.ndim != 2 or scores.shape != targets.shape:
        raise ValueError(f"scores and targets must both be (N, C), got {scores.shape} and {targets.shape}")
    _check_finite(scores)
    if not np.isin(targets, (0.0, 1.0)).all():
        raise ValueError(
            f"targets must be multi-hot (0 or 1); rows {_first_row(~np.isin(targets, (0.0, 1.0)))} are not"
        )
    return scores, targets


def _check_finite(scores: np.ndarray) -> None:
    """ValueError naming the first rows with a NaN or infinite score (sklearn's own error names none)."""
    if not np.isfinite(scores).all():
        raise ValueError(f"scores must be finite; rows {_first_row(~np.isfinite(scores))} hold NaN or infinity")


def _first_row(bad: np.ndarray) -> str:
    rows = np.flatnonzero(bad.reshape(bad.shape[0], -1).any(axis=1))
    return ", ".join(map(str, rows[:5])) + (", ..." if rows.size > 5 else "")


def _nanmean(values: np.ndarray) -> float:
    """Mean of the values that are not NaN; NaN when all are."""
    kept = values[~np.isnan(values)]
    return float(kept.mean()) if kept.size else math.nan


def average_precision_per_class(scores: ArrayLike, targets: ArrayLike) -> np.ndarray:
    """AP of each class, (C,) float64, from scores (N, C) and multi-hot targets (N, C); NaN for a class with no
    positive sample (its AP is undefined)."""
    scores, targets = _scores_targets(scores, targets)
    ap = np.full(scores.shape[1], math.nan)
    for c in range(scores.shape[1]):
        if targets[:, c].any():
            ap[c] = average_precision_score(targets[:, c], scores[:, c])
    return ap


def auc_per_class(scores: ArrayLike, targets: ArrayLike) -> np.ndarray:
    """ROC AUC of each class, (C,) float64; NaN for a class whose targets are all 0 or all 1 (AUC undefined)."""
    scores, targets = _scores_targets(scores, targets)
    auc = np.full(scores.shape[1], math.nan)
    for c in range(scores.shape[1]):
        if np.unique(targets[:, c]).size == 2:
            auc[c] = roc_auc_score(targets[:, c], scores[:, c])
    return auc


def mean_average_precision(scores: ArrayLike, targets: ArrayLike) -> float:
    """Macro mAP over the classes that have a positive sample (NaN if none has)."""
    return _nanmean(average_precision_per_class(scores, targets))


def mean_auc(scores: ArrayLike, targets: ArrayLike) -> float:
    """Mean ROC AUC over the classes with both positive and negative samples (NaN if there are none)."""
    return _nanmean(auc_per_class(scores, targets))


def d_prime(auc: float) -> float:
    """Sensitivity index of an AUC, sqrt(2) * Φ⁻¹(auc) (the AudioSet convention): ±inf at 1 and 0, NaN for NaN."""
    if math.isnan(auc):
        return math.nan
    if auc <= 0.0 or auc >= 1.0:
        return math.copysign(math.inf, auc - 0.5)
    return math.sqrt(2.0) * NormalDist().inv_cdf(auc)


def topk_accuracy(logits: ArrayLike, targets: ArrayLike, ks: Sequence[int] = (1, 5)) -> dict[int, float]:
    """{k: fraction of samples whose target class is among the k highest logits} from logits (N, C) and class
    indices (N,); k is capped at C. A tie with the target's logit counts in the target's favour: a sample is right
    when fewer than k classes score strictly higher, whatever order a sort would give the tied ones."""
    logits, targets = np.asarray(logits, dtype=np.float64), np.asarray(targets, dtype=np.int64)
    if logits.ndim != 2 or targets.shape != (logits.shape[0],):
        raise ValueError(f"logits must be (N, C) and targets (N,), got {logits.shape} and {targets.shape}")
    _check_finite(logits)
    if targets.size and (targets.min() < 0 or targets.max() >= logits.shape[1]):
        raise ValueError(f"targets must be class indices in [0, {logits.shape[1]})")
    target_logit = np.take_along_axis(logits, targets[:, None], axis=1)
    higher = (logits > target_logit).sum(axis=1)
    num_samples, num_classes = logits.shape
    return {k: float((higher < min(k, num_classes)).sum() / num_samples) if num_samples else math.nan for k in ks}


def compute_metrics(logits: ArrayLike, labels: ArrayLike, multi_label: bool) -> dict[str, float | int]:
    """The evaluation metrics of logits (N, C) against labels: multi-hot (N, C) when `multi_label` (`mAP`, `mAUC`,
    `d_prime` of the mean AUC), else class indices (N,) (`top1`, and `top5` when there are more than 5 classes: with
    5 or fewer it is 1 whatever the model); always `num_samples`."""
    logits = np.asarray(logits)
    metrics: dict[str, float | int] = {"num_samples": int(logits.shape[0])}
    if multi_label:
        auc = mean_auc(logits, labels)
        metrics.update(mAP=mean_average_precision(logits, labels), mAUC=auc, d_prime=d_prime(auc))
    else:
        ks = (1, 5) if logits.shape[1] > 5 else (1,)
        metrics.update({f"top{k}": value for k, value in topk_accuracy(logits, labels, ks=ks).items()})
    return metrics


def json_values(row: dict[str, Any]) -> dict[str, Any]:
    """`row` with NaN and infinite floats as None: standard JSON (d' is infinite at an AUC of 1, AP undefined for a
    class without positives), which strict parsers (jq, JavaScript, Go) read."""
    return {k: None if isinstance(v, float) and not math.isfinite(v) else v for k, v in row.items()}
