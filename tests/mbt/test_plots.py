"""Result figures and tables: the most-confused pairs of a single-label evaluation, per-class AP as PNG files, and the
evaluation's files named by the split's classes (a class name that a spreadsheet would run written as text)."""

from __future__ import annotations

import csv
from pathlib import Path

import numpy as np

from mbt import plots
from mbt.metrics import average_precision_per_class
from mbt.plots import confused_pairs, confusion_matrix
from mbt.results import write_results

NAMES = ["dog", "cat", "bird"]


def one_hot_logits(predicted: list[int], num_classes: int = 3) -> np.ndarray:
    return np.eye(num_classes, dtype=np.float32)[predicted]


def test_confused_pairs_counts_true_to_predicted_most_first() -> None:
    labels = np.array([0, 0, 0, 1, 1, 2, 2, 2])
    logits = one_hot_logits([1, 1, 0, 0, 1, 0, 2, 2])
    assert confused_pairs(logits, labels) == [(0, 1, 2, 3), (1, 0, 1, 2), (2, 0, 1, 3)]
    assert confused_pairs(one_hot_logits([0, 1, 2]), np.array([0, 1, 2])) == []


def test_single_label_results_hold_the_confusion_with_names(tmp_path: Path) -> None:
    labels = np.array([0, 0, 1, 2])
    logits = one_hot_logits([1, 0, 1, 2])
    write_results(tmp_path, {"num_samples": 4}, ["a", "b", "c", "d"], logits, labels, None, NAMES)
    rows = list(csv.DictReader((tmp_path / "confusion.csv").open()))
    assert rows == [
        {"true_index": "0", "true_name": "dog", "predicted_index": "1", "predicted_name": "cat", "count": "1",
         "fraction": "0.500000"}
    ]  # fmt: skip
    assert (tmp_path / "confusion.png").stat().st_size > 0 and not (tmp_path / "per_class_ap.csv").exists()


def test_the_confusion_png_is_a_classes_by_classes_matrix_with_labelled_axes(tmp_path: Path, monkeypatch) -> None:
    drawn = []
    saved = plots.save_figure
    monkeypatch.setattr(plots, "save_figure", lambda fig, path: (drawn.append(fig), saved(fig, path))[1])
    labels, logits = np.array([0, 0, 1, 2]), one_hot_logits([1, 0, 1, 2])
    np.testing.assert_array_equal(confusion_matrix(logits, labels), [[1, 1, 0], [0, 1, 0], [0, 0, 1]])
    write_results(tmp_path, {"num_samples": 4}, ["a", "b", "c", "d"], logits, labels, None, NAMES)
    ax, colorbar = drawn[0].axes
    np.testing.assert_array_equal(ax.images[0].get_array(), [[1, 1, 0], [0, 1, 0], [0, 0, 1]])
    assert ax.get_xlabel() == "predicted class" and ax.get_ylabel() == "true class"
    assert [t.get_text() for t in ax.get_xticklabels()] == NAMES == [t.get_text() for t in ax.get_yticklabels()]
    assert all(float(t).is_integer() for t in colorbar.get_yticks())  # whole counts, no 0.5 samples
    assert "3 of 4 samples" in ax.get_title()
    many = 40  # beyond the named classes: integer indices as ticks
    plots.plot_confusion(tmp_path / "many.png", confusion_matrix(np.eye(many), np.arange(many)))
    ax = drawn[1].axes[0]
    assert all(float(t).is_integer() for t in ax.get_xticks()) and ax.images[0].get_array().shape == (many, many)


def test_multi_label_results_hold_per_class_ap_with_names_and_a_figure(tmp_path: Path) -> None:
    labels = np.array([[1, 0, 0], [0, 1, 0], [1, 1, 0]], dtype=np.float32)
    logits = np.array([[2.0, -1, 0], [-1, 2, 0], [1, 1, 0]], dtype=np.float32)
    ap = average_precision_per_class(logits, labels)
    write_results(tmp_path, {"num_samples": 3}, ["a", "b", "c"], logits, labels, ap, NAMES)
    rows = list(csv.DictReader((tmp_path / "per_class_ap.csv").open()))
    assert [r["class_name"] for r in rows] == NAMES and rows[2]["ap"] == "nan"
    assert (tmp_path / "per_class_ap.png").stat().st_size > 0


FORMULAS = ['=HYPERLINK("http://x","click")', "@SUM(A1:A9)", "-dog"]  # '-dog' holds no formula: kept


def test_class_names_that_a_spreadsheet_would_run_are_written_as_text(tmp_path: Path) -> None:
    write_results(tmp_path / "s", {}, ["a", "b", "c"], one_hot_logits([1, 2, 0]), np.array([0, 1, 2]), None, FORMULAS)
    rows = list(csv.DictReader((tmp_path / "s" / "confusion.csv").open()))
    assert [(r["true_name"], r["predicted_name"]) for r in rows] == [
        ("'" + FORMULAS[0], "'" + FORMULAS[1]),
        ("'" + FORMULAS[1], "-dog"),
        ("-dog", "'" + FORMULAS[0]),
    ]
    labels = np.eye(3, dtype=np.float32)
    write_results(tmp_path / "m", {}, ["a", "b", "c"], labels, labels, np.ones(3), FORMULAS)
    rows = list(csv.DictReader((tmp_path / "m" / "per_class_ap.csv").open()))
    assert [r["class_name"] for r in rows] == ["'" + FORMULAS[0], "'" + FORMULAS[1], "-dog"]
    assert [r["ap"] for r in rows] == ["1.000000"] * 3
