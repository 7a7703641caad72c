"""Synthetic AudioSet metadata at any size for the scale benchmark (`tools/bench_scale.py`): a 527-class
`class_labels_indices.csv` and a segments CSV in AudioSet's own format (three `#` lines, then
`YTID, start, end, "mid,mid"`), rows drawn from a fixed seed with distinct 11-character YouTube-style ids."""

from __future__ import annotations

import random
from pathlib import Path

AUDIOSET_CLASSES = 527
_YTID_CHARS = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_"


def class_mids(num_classes: int = AUDIOSET_CLASSES) -> list[str]:
    """Freebase-style mids, one per class: /m/0s000, /m/0s001, ..."""
    return [f"/m/0s{i:03d}" for i in range(num_classes)]


def write_class_csv(path: Path, num_classes: int = AUDIOSET_CLASSES) -> Path:
    """`class_labels_indices.csv` (`index,mid,display_name`, names quoted as AudioSet quotes them)."""
    lines = ["index,mid,display_name", *(f'{i},{mid},"Class {i}"' for i, mid in enumerate(class_mids(num_classes)))]
    path.write_text("\n".join(lines) + "\n")
    return path


def ytid(n: int) -> str:
    """The n-th distinct 11-character id over YouTube's alphabet (a bijection of n, so rows never collide)."""
    chars = []
    for _ in range(11):
        n, digit = divmod(n, len(_YTID_CHARS))
        chars.append(_YTID_CHARS[digit])
    return "".join(reversed(chars))


def write_segments_csv(path: Path, num_rows: int, seed: int = 0, num_classes: int = AUDIOSET_CLASSES) -> Path:
    """A segments CSV of `num_rows` rows as AudioSet writes them: 1 to 4 labels per row (AudioSet averages 2.7),
    starts on whole seconds up to 300 s, 10 s segments; ids `ytid(seed * 10**9 + row)`."""
    rng = random.Random(seed)
    mids = class_mids(num_classes)
    with open(path, "w") as f:
        f.write("# Segments csv created Sun Mar  5 10:54:31 2017\n")
        f.write(f"# num_ytids={num_rows}, num_segs={num_rows}, num_unique_labels={num_classes}\n")
        f.write("# YTID, start_seconds, end_seconds, positive_labels\n")
        for row in range(num_rows):
            start = rng.randrange(300)
            labels = ",".join(rng.sample(mids, rng.randint(1, 4)))
            f.write(f'{ytid(seed * 10**9 + row)}, {start:.3f}, {start + 10:.3f}, "{labels}"\n')
    return path
