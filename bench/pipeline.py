"""The loaders against the JPEG decode bound, a naive on-the-fly ffmpeg loader and the per-file baseline
(`tools/bench_pipeline.py`): each measured on the same shards and cores, in training mode; the PyTorch, streamed and
per-file loaders alternate over rounds (median). Shards of natural-content clips are made by the offline stage."""

from __future__ import annotations

import multiprocessing
import shutil
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset
from torchvision.io import ImageReadMode, decode_jpeg

from bench.loader import batch_clips, cpu_seconds_between, cpu_seconds_by_process
from bench.perfile import perfile_loader, write_perfile_copy
from bench.photo_clips import PHOTOS, make_photo_clips
from pipelines import dali_available, open_split
from pipelines.augment import spec_augment, train_video
from pipelines.config import AugmentConfig
from pipelines.reading import SampleReader
from pipelines.sources import SplitIndex
from pipelines.torch_loader import TorchLoader
from pipelines.transforms import decode_frames
from preprocess.datasets import ClipRow
from preprocess.videos import AUDIOSET_NAME_TEMPLATES, VideoIndex
from shards.schema import MANIFEST_NAME, FeatureParams, frame_ext

_JPEGS: list[list[bytes]] = []


def make_shards(data: Path, clips: int) -> tuple[Path, Path]:
    """(split folder, videos folder) of `clips` photo clips sharded by the offline stage, kept in `data`."""
    from preprocess.job import JobSpec, run_job  # the offline stage (ffmpeg) only where shards are made

    videos = data / "videos"
    rows = make_photo_clips(videos, clips)
    out = data / "shards"
    run_job(
        JobSpec(
            dataset="bench", split="train", rows=rows, multi_label=True, videos_dir=videos, out_dir=out,
            classes=[{"index": i, "id": name, "name": name} for i, name in enumerate(PHOTOS)],
            name_templates=AUDIOSET_NAME_TEMPLATES, shard_size=32, progress=False,
        )
    )  # fmt: skip
    return out, videos


def _decode_range(bounds: tuple[int, int]) -> int:
    torch.set_num_threads(1)
    for jpegs in _JPEGS[bounds[0] : bounds[1]]:
        for data in jpegs:
            decode_jpeg(torch.frombuffer(bytearray(data), dtype=torch.uint8), mode=ImageReadMode.RGB)
    return bounds[1] - bounds[0]


def bound_clips_per_s(index: SplitIndex, cores: int, repeats: int) -> float:
    """Clips/s of decoding every clip's stored frames with decode_jpeg, `cores` processes, bytes in memory."""
    reader = SampleReader(index)
    frames = [frame_ext(i) for i in range(index.manifest.features.num_frames)]
    _JPEGS[:] = [list(reader.read(ref, frames).values()) for ref in index.samples]
    n = len(_JPEGS)
    chunks = [(n * i // cores, n * (i + 1) // cores) for i in range(cores)]
    with multiprocessing.get_context("fork").Pool(cores) as pool:
        pool.map(_decode_range, [(0, 1)] * cores)  # warm: workers started, libraries loaded
        start = time.perf_counter()
        for _ in range(repeats):
            pool.map(_decode_range, chunks)
        return n * repeats / (time.perf_counter() - start)


def loader_clips_per_s(
    make_loader: Any, epochs: int, cpu_ms: dict[str, list[float]] | None = None, name: str = ""
) -> tuple[float, float]:
    """(clips/s after the first batch, seconds to the first batch) over `epochs` epochs of a fresh loader; its CPU ms
    per clip (process and workers) appended to `cpu_ms[name]`."""
    start = time.perf_counter()
    loader = make_loader()
    first_batch_s, clips, steady_start, cpu_before = 0.0, 0, 0.0, {}
    for epoch in range(epochs):
        if hasattr(loader, "set_epoch"):
            loader.set_epoch(epoch)
        for batch in loader:
            if not first_batch_s:
                first_batch_s = time.perf_counter() - start
                steady_start, cpu_before = time.perf_counter(), cpu_seconds_by_process()
                continue
            clips += batch_clips(batch)
    if torch.cuda.is_available():
        torch.cuda.synchronize()  # GPU-side work of the last batches is part of the time
    if cpu_ms is not None:
        cpu_ms.setdefault(name, []).append(cpu_seconds_between(cpu_before, cpu_seconds_by_process()) * 1e3 / clips)
    return clips / (time.perf_counter() - steady_start), first_batch_s


def worker_stage_clips_per_s(index: SplitIndex, cores: int, batch_size: int, aug: AugmentConfig, epochs: int) -> float:
    """Clips/s of the torch loader's workers alone: uint8 batches, before the consumer-side normalization."""
    dataset = TorchLoader(index, True, batch_size, num_workers=0, augment=aug).dataset
    items = [(epoch, b) for epoch in range(epochs) for b in range(len(dataset))]
    loader = DataLoader(dataset, batch_size=None, sampler=items, num_workers=cores, prefetch_factor=4)
    batches = iter(loader)
    next(batches)  # workers started: from here on it is steady state, as for the other loaders
    start, clips = time.perf_counter(), 0
    for batch in batches:
        clips += len(batch["key"])
    return clips / (time.perf_counter() - start)


class NaiveClips(Dataset):
    """What on-the-fly video datasets do: ffmpeg decodes the clip's mp4 each time it is loaded."""

    def __init__(self, index: SplitIndex, videos: Path, aug: AugmentConfig) -> None:
        self.index, self.aug = index, aug
        classes = [c["id"] for c in index.manifest.classes]
        self.paths = [VideoIndex(videos).find(_row(ref.key, classes), AUDIOSET_NAME_TEMPLATES) for ref in index.samples]
        self.params: FeatureParams = index.manifest.features

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, i: int) -> dict[str, Any]:
        from preprocess.decode import decode_clip
        from preprocess.features import compute_logmel

        torch.set_num_threads(1)
        rng = np.random.default_rng(i)
        clip = decode_clip(self.paths[i], 0.0, self.params.segment_s, self.params)
        logmel = compute_logmel(clip.waveform, self.params).values[: self.aug.audio_frames]
        audio = torch.from_numpy((logmel - self.index.manifest.logmel.mean) / self.index.manifest.logmel.std)[None]
        return {
            "video": train_video(decode_frames(clip.frames), self.aug, rng),
            "audio": spec_augment(audio, self.aug, rng),
        }


def _row(key: str, classes: list[str]) -> Any:
    ytid, start_ms = key.rsplit("_", 1)
    return ClipRow(key=key, ytid=ytid, start_s=int(start_ms) / 1000, end_s=int(start_ms) / 1000 + 10.0, labels=(),
                   source="bench")  # fmt: skip


def naive_clips_per_s(index: SplitIndex, videos: Path, aug: AugmentConfig, cores: int, batch_size: int) -> float:
    """Clips/s of one shuffled epoch of `NaiveClips` over the mp4s in `videos`, `cores` workers."""
    loader = DataLoader(NaiveClips(index, videos, aug), batch_size=batch_size, num_workers=cores, shuffle=True)
    start, clips = time.perf_counter(), 0
    for batch in loader:
        clips += batch["video"].shape[0]
    return clips / (time.perf_counter() - start)


def compare_loaders(
    index: SplitIndex,
    shards: Path,
    videos: Path | None,
    perfile_dir: Path,
    batch_size: int,
    cores: int,
    epochs: int,
    rounds: int,
    dali: bool = True,
) -> tuple[dict[str, float], dict[str, list[float]]]:
    """(clips/s of each loader and the bound, with each alternating loader's {name}_first_batch_s and the torch
    loader's first_batch_s; CPU ms per clip of each run, by loader) over the split `index` (the folder `shards`),
    each loader `cores` workers or threads at `batch_size` for `epochs` epochs. torch, stream, torch_plain and
    perfile (a per-file copy kept in `perfile_dir`) alternate over `rounds` rounds, their medians kept; torch_gpu
    and dali_gpu where CUDA is, dali_cpu where DALI is installed and `dali`; naive where `videos` and ffmpeg are."""
    aug = AugmentConfig()
    results: dict[str, float] = {"bound": bound_clips_per_s(index, cores, repeats=epochs)}
    # The first loader of a process measured up to 20% faster than later ones: indexed and streamed alternate, and
    # each gives its median over the rounds.
    streamed = open_split(f"pipe:cat {shards.resolve()}/{MANIFEST_NAME}")
    plain = aug.replace(color_prob=0.0, color_drop_prob=0.0)  # the per-file baseline has no colour augmentation
    perfile = write_perfile_copy(index, perfile_dir)
    makers = {
        "torch": lambda: TorchLoader(index, True, batch_size, num_workers=cores, augment=aug),
        "stream": lambda: TorchLoader(streamed, True, batch_size, num_workers=cores, augment=aug),
        "torch_plain": lambda: TorchLoader(index, True, batch_size, num_workers=cores, augment=plain),
        "perfile": lambda: perfile_loader(index, perfile, plain, batch_size, cores),
    }
    runs: dict[str, list[tuple[float, float]]] = {name: [] for name in makers}
    cpu_ms: dict[str, list[float]] = {}
    for _ in range(rounds):
        for name, make in makers.items():
            runs[name].append(loader_clips_per_s(make, epochs, cpu_ms, name))
    for name, measured in runs.items():
        results[name], results[f"{name}_first_batch_s"] = (float(np.median(c)) for c in zip(*measured, strict=True))
    results["first_batch_s"] = results["torch_first_batch_s"]
    results["torch_u8"] = worker_stage_clips_per_s(index, cores, batch_size, aug, epochs)
    if torch.cuda.is_available():
        results["torch_gpu"], _ = loader_clips_per_s(
            lambda: TorchLoader(index, True, batch_size, num_workers=cores, augment=aug, device="cuda"), epochs
        )
    if dali_available() and dali:
        from pipelines.dali_loader import DaliLoader

        devices = ["cpu", "gpu"] if torch.cuda.is_available() else ["cpu"]
        for device in devices:
            results[f"dali_{device}"], _ = loader_clips_per_s(
                lambda d=device: DaliLoader(index, True, batch_size, device=d, num_threads=cores, augment=aug),
                epochs, cpu_ms, f"dali_{device}",
            )  # fmt: skip
    if videos and shutil.which("ffmpeg"):
        results["naive"] = naive_clips_per_s(index, videos, aug, cores, batch_size)
    return results, cpu_ms


def ratios(results: dict[str, float], cpu_ms: dict[str, list[float]]) -> dict[str, float]:
    """The figures of the goals from `compare_loaders`' results, in the order they are reported: each loader
    against the bound, the streamed against the indexed, against the naive and per-file loaders (clips/s, and CPU
    per clip), DALI against torch, the first batches and torch's clips/s; those of loaders not measured left out."""
    out = {
        "torch_vs_bound": results["torch"] / results["bound"],
        "torch_u8_vs_bound": results["torch_u8"] / results["bound"],
        "stream_vs_torch": results["stream"] / results["torch"],
    }
    if "torch_gpu" in results:
        out["torch_gpu_vs_bound"] = results["torch_gpu"] / results["bound"]
    if "naive" in results:
        out["torch_vs_naive"] = results["torch"] / results["naive"]
    out["torch_vs_perfile"] = results["torch_plain"] / results["perfile"]
    out["torch_vs_perfile_cpu"] = float(np.median(cpu_ms["perfile"]) / np.median(cpu_ms["torch_plain"]))
    for device in ("cpu", "gpu"):
        if f"dali_{device}" in results:
            out[f"dali_{device}_vs_torch"] = results[f"dali_{device}"] / results["torch"]
    out["first_batch_s"] = results["first_batch_s"]
    out["stream_first_batch_s"] = results["stream_first_batch_s"]
    out["torch_clips_per_s"] = results["torch"]
    return out
