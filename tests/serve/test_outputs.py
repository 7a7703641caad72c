"""What prediction writes for a person: a video's timeline of class probabilities as a PNG and a CSV, and the lines
printed (text from data neutralised in both)."""

from __future__ import annotations

import csv
from pathlib import Path

import numpy as np

from serve import outputs
from serve.outputs import TIMELINE_CLASSES, plot_timeline, top_lines, write_timeline_csv
from serve.predict import Prediction


def test_a_timeline_figure_is_written_with_its_legend_beside_the_lines(tmp_path: Path, monkeypatch) -> None:
    boxes = []
    saved = outputs.save_figure

    def measure(fig, path):  # the legend's and the plot's boxes as drawn, before the figure is closed
        renderer = fig.canvas.get_renderer()
        ax = fig.axes[0]
        boxes.append((ax.get_title(), ax.get_legend().get_window_extent(renderer), ax.get_window_extent(renderer)))
        return saved(fig, path)

    monkeypatch.setattr(outputs, "save_figure", measure)
    probs = np.array([[0.9, 0.1, 0.2], [0.5, 0.5, 0.2], [0.1, 0.9, 0.2]])
    path = plot_timeline(tmp_path / "t.png", [(0, 2), (1, 3), (2, 4)], probs, ["dog", "cat", "bird"], "video.mp4")
    assert path.stat().st_size > 0 and TIMELINE_CLASSES >= 3
    title, legend, lines = boxes[0]
    assert title == "video.mp4" and legend.x0 >= lines.x1  # the legend is right of the plot, not over it


def test_the_timeline_csv_and_the_printed_lines_neutralise_text_from_data(tmp_path: Path) -> None:
    names = ["=cmd|' /C calc'!A0", "Dog"]
    logits = np.array([[3.0, -1.0], [-1.0, 3.0]])
    prediction = Prediction("clip\x1b[2J.mp4", [(0.0, 2.0), (1.0, 3.0)], logits, names, multi_label=True)
    path = write_timeline_csv(tmp_path / "t.csv", prediction)
    rows = list(csv.reader(path.open()))
    assert rows[0] == ["start_s", "end_s", "top_class", "top_probability", "'" + names[0], "Dog"]
    assert rows[1][:3] == ["0.000", "2.000", "'" + names[0]] and rows[2][2] == "Dog"
    prediction.class_names = ["Dog\x1b]0;x\x07", "Cat"]
    lines = top_lines(prediction, k=2)
    assert lines[0] == "clip\\x1b[2J.mp4 (2 windows):" and "Dog\\x1b]0;x\\x07" in lines[1]
    assert not any("\x1b" in line for line in lines)
