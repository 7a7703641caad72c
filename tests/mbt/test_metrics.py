"""Metrics against hand-computed values and against sklearn's own macro averages."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
from sklearn.metrics import average_precision_score, roc_auc_score

from mbt.metrics import (
    auc_per_class,
    average_precision_per_class,
    compute_metrics,
    d_prime,
    mean_auc,
    mean_average_precision,
    topk_accuracy,
)

# By hand, both classes rank their samples +, -, +, - (class 0: 0.9 0.8 0.3 0.1; class 1: 0.7 0.6 0.5 0.2), so
# AP = (1/1 + 2/3) / 2 = 5/6 and AUC = 3/4 (of the 4 positive-negative pairs, 0.3 < 0.8 resp. 0.5 < 0.6 is wrong).
SCORES = np.array([[0.9, 0.2], [0.8, 0.7], [0.3, 0.6], [0.1, 0.5]])
TARGETS = np.array([[1, 0], [0, 1], [1, 0], [0, 1]])


def test_hand_computed_ap_and_auc():
    np.testing.assert_allclose(average_precision_per_class(SCORES, TARGETS), [5 / 6, 5 / 6])
    np.testing.assert_allclose(auc_per_class(SCORES, TARGETS), [3 / 4, 3 / 4])
    assert mean_average_precision(SCORES, TARGETS) == pytest.approx(5 / 6)
    assert mean_auc(SCORES, TARGETS) == pytest.approx(3 / 4)


def test_macro_averages_equal_sklearn():
    rng = np.random.default_rng(0)
    targets = (rng.random((200, 7)) < 0.3).astype(np.float32)
    scores = rng.normal(size=(200, 7)) + 1.5 * targets
    assert mean_average_precision(scores, targets) == pytest.approx(
        average_precision_score(targets, scores, average="macro"), abs=1e-12
    )
    assert mean_auc(scores, targets) == pytest.approx(roc_auc_score(targets, scores, average="macro"), abs=1e-12)
    per_class = [average_precision_score(targets[:, c], scores[:, c]) for c in range(7)]
    np.testing.assert_allclose(average_precision_per_class(scores, targets), per_class, rtol=0, atol=1e-12)


def test_classes_without_positives_or_negatives_are_left_out():
    targets = np.column_stack([TARGETS, np.zeros(4), np.ones(4)])  # class 2: no positive; class 3: no negative
    scores = np.column_stack([SCORES, [0.4, 0.3, 0.2, 0.1], [0.1, 0.2, 0.3, 0.4]])
    ap = average_precision_per_class(scores, targets)
    assert math.isnan(ap[2]) and ap[3] == 1.0
    assert mean_average_precision(scores, targets) == pytest.approx(np.mean([5 / 6, 5 / 6, 1.0]))
    auc = auc_per_class(scores, targets)
    assert math.isnan(auc[2]) and math.isnan(auc[3])
    assert mean_auc(scores, targets) == pytest.approx(3 / 4)
    assert math.isnan(mean_average_precision(scores[:, 2:3], targets[:, 2:3]))


def test_d_prime():
    assert d_prime(0.5) == 0.0
    assert d_prime(0.8413447460685429) == pytest.approx(math.sqrt(2), abs=1e-9)  # Φ(1)
    assert d_prime(0.15865525393145707) == pytest.approx(-math.sqrt(2), abs=1e-9)  # Φ(-1)
    assert d_prime(1.0) == math.inf and d_prime(0.0) == -math.inf and math.isnan(d_prime(math.nan))


def test_topk_accuracy():
    logits = np.array([[0.1, 0.5, 0.2, 0.0], [0.9, 0.1, 0.3, 0.2], [0.1, 0.2, 0.3, 0.4]])
    targets = np.array([1, 2, 0])  # target ranks 1, 2 and 4
    assert topk_accuracy(logits, targets, ks=(1, 2, 3, 4)) == {1: 1 / 3, 2: 2 / 3, 3: 2 / 3, 4: 1.0}
    assert topk_accuracy(logits, targets, ks=(5,)) == {5: 1.0}  # k capped at the 4 classes
    assert topk_accuracy(np.zeros((2, 3)), np.array([0, 2]), ks=(1,)) == {1: 1.0}  # ties count for the target
    with pytest.raises(ValueError, match="class indices"):
        topk_accuracy(logits, np.array([1, 2, 4]))


def test_compute_metrics():
    multi = compute_metrics(SCORES, TARGETS, multi_label=True)
    assert multi == pytest.approx({"num_samples": 4, "mAP": 5 / 6, "mAUC": 3 / 4, "d_prime": d_prime(3 / 4)})
    assert d_prime(3 / 4) == pytest.approx(0.953873, abs=1e-6)
    single = compute_metrics(SCORES, np.array([0, 1, 1, 1]), multi_label=False)
    assert single == {"num_samples": 4, "top1": 0.75}  # no top-5 of 4 classes: it would be 1 whatever the model
    six = compute_metrics(np.eye(6), np.array([0, 1, 2, 3, 4, 0]), multi_label=False)
    assert six == {"num_samples": 6, "top1": 5 / 6, "top5": 1.0}


def test_metrics_files_are_standard_json(tmp_path):
    """d' is infinite at an AUC of 1: metrics.json holds null there, which strict JSON parsers read."""
    from mbt.metrics import json_values
    from mbt.results import METRICS_FILE, write_results

    assert json_values({"mAP": 1.0, "d_prime": math.inf, "x": math.nan, "n": 3}) == {
        "mAP": 1.0, "d_prime": None, "x": None, "n": 3,
    }  # fmt: skip
    logits = np.array([[5.0, -5.0], [-5.0, 5.0]])
    labels = np.array([[1.0, 0.0], [0.0, 1.0]])
    metrics = compute_metrics(logits, labels, multi_label=True)
    assert math.isinf(metrics["d_prime"])
    write_results(tmp_path, metrics, ["a", "b"], logits, labels, None)
    text = (tmp_path / METRICS_FILE).read_text()
    assert json.loads(text, parse_constant=lambda name: pytest.fail(f"{name} in metrics.json"))["d_prime"] is None
