"""What prediction writes for a person: a video's timeline of class probabilities as a PNG."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from serve.outputs import TIMELINE_CLASSES, plot_timeline


def test_a_timeline_figure_is_written(tmp_path: Path) -> None:
    probs = np.array([[0.9, 0.1, 0.2], [0.5, 0.5, 0.2], [0.1, 0.9, 0.2]])
    path = plot_timeline(tmp_path / "t.png", [(0, 2), (1, 3), (2, 4)], probs, ["dog", "cat", "bird"], "video")
    assert path.stat().st_size > 0 and TIMELINE_CLASSES >= 3
