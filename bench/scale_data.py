"""Synthetic AudioSet metadata at any size for the scale benchmark (`tools/bench_scale.py`): a 527-class
`class_labels_indices.csv` and a segments CSV in AudioSet's own format (three `#` lines, then
`YTID, start, end, "mid,mid"`), rows drawn from a fixed seed with distinct 11-character YouTube-style ids."""

from __future__ import annotations

import json
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


def write_job_folder(
    folder: Path, num_samples: int, shard_size: int = 512, num_jobs: int = 1000, num_frames: int = 1
) -> Path:
    """The output folder of a finished shard job of `num_samples` tiny samples, without its manifest: `_state/`
    (job.json, partition.json of `num_jobs` parts, one record per shard), sparse shard tars of the recorded sizes
    and their `.idx` files (`num_frames` frames, log-mel, labels and meta per sample), as
    `preprocess.job_merge.merge` and `pipelines.sources.SplitIndex` read them. Nothing is decoded or hashed: made in
    seconds per 100k samples."""
    from preprocess.job_state import PARTITION_FILE, STATE_DIR, count_shards, record_path, shard_rows
    from shards.index import format_index
    from shards.manifest import LogmelStats
    from shards.schema import SHARD_PATTERN, FeatureParams, sample_exts

    features = FeatureParams(num_frames=num_frames)
    exts = sample_exts(features.num_frames)
    (folder / STATE_DIR).mkdir(parents=True, exist_ok=True)
    classes = [{"index": i, "id": mid, "name": f"Class {i}"} for i, mid in enumerate(class_mids())]
    job = {"dataset": "audioset", "split": folder.name, "num_rows": num_samples, "shard_size": shard_size, "seed": 0,
           "classes": classes, "multi_label": True, "features": features.to_dict()}  # fmt: skip
    (folder / STATE_DIR / "job.json").write_text(json.dumps(job))
    (folder / STATE_DIR / PARTITION_FILE).write_text(json.dumps({"num_jobs": num_jobs}))
    num_shards = count_shards(num_samples, shard_size)
    member_bytes = 1024  # a 512-byte header and a payload of at most 512 bytes
    for k in range(num_shards):
        rows = shard_rows(num_samples, num_shards, k)
        name = SHARD_PATTERN.format(k)
        size = 512 + rows * len(exts) * member_bytes + 1024
        with open(folder / name, "wb") as f:
            f.truncate(size)  # sparse: the index and the records are what these stages read
        samples = (
            [(ext, 512 + ((s * len(exts) + j) * member_bytes), 100, f"k{k}_{s}.{ext}") for j, ext in enumerate(exts)]
            for s in range(rows)
        )
        (folder / name.replace(".tar", ".idx")).write_text(format_index(samples))
        shard = {"name": name, "num_samples": rows, "bytes": size, "sha256": f"{k:064x}"}
        logmel = LogmelStats(rows * 128_000, -4.0 * rows * 128_000, 36.0 * rows * 128_000)
        record = {"index": k, "shard": shard, "logmel": logmel.to_dict(), "failures": []}
        record_path(folder, k).write_text(json.dumps(record, sort_keys=True))
    return folder


def _hms(centiseconds: int) -> str:
    seconds, cs = divmod(centiseconds, 100)
    return f"{seconds // 3600:02d}:{seconds // 60 % 60:02d}:{seconds % 60:02d}.{cs:02d}"


def write_custom_csv(path: Path, num_rows: int, seed: int = 0, num_classes: int = 97) -> Path:
    """A collection's own CSV as `tools/shard_csv.py` reads it, EPIC-KITCHENS-like: `video,start,end,label,split`,
    videos `Pxx/Pxx_nnnn.MP4` of 500 segments each, HH:MM:SS.ff times (starts increasing within a video, 2 s
    segments), one verb label a row or (one row in five) two, split train (four rows in five) or val."""
    rng = random.Random(seed)
    verbs = [f"verb{i:02d}" for i in range(num_classes)]
    with open(path, "w") as f:
        f.write("video,start,end,label,split\n")
        start = 0
        for row in range(num_rows):
            video, start = row // 500, 0 if row % 500 == 0 else start
            start += rng.randint(10, 300)
            labels = ";".join(rng.sample(verbs, 1 if rng.random() < 0.8 else 2))
            split = "train" if rng.random() < 0.8 else "val"
            name = f"P{video // 100:02d}/P{video // 100:02d}_{video:04d}.MP4"
            f.write(f"{name},{_hms(start)},{_hms(start + 200)},{labels},{split}\n")
    return path
