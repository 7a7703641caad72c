"""Benchmark the loaders against the JPEG decode bound and a naive on-the-fly ffmpeg loader, in one run.

On the same shards and the same number of cores (--cores, default all), in training mode at --batch-size:
  bound      decoding the same JPEG frames with torchvision.io.decode_jpeg and nothing else (bytes preloaded),
             one process per core: no loader can beat it on CPU;
  torch      the PyTorch loader (pipelines.torch_loader), --cores workers, after its first batch: float32
             normalized video as the contract says, on the CPU (median of --rounds runs, alternating with stream);
  torch_u8   its workers alone: uint8 video, before the normalization a GPU consumer does on the GPU;
  stream     the PyTorch loader over the same shards as `pipe:cat` URLs (streamed front to back through a
             shuffle buffer, no index), --cores workers: what streaming from object storage costs on top;
  torch_gpu  the PyTorch loader delivering to the GPU (uint8 copied from pinned memory, normalized there);
  dali_cpu   the DALI loader on CPU (--cores threads), when nvidia-dali is installed;
  dali_gpu   the DALI loader on the GPU, when one is present;
  naive      what on-the-fly video datasets do: every clip's mp4 decoded by ffmpeg when it is loaded
             (same frames, log-mel, augmentation), --cores workers;
  torch_plain / perfile  the PyTorch loader without colour augmentation against the per-file baseline
             (`bench.perfile`: CAV-MAE's and AST's way: per-file JPEG frames through PIL and torchvision's
             transforms, a wav with kaldi fbank per sample), the same frames and output tensors, --cores workers each,
             alternating over --rounds (median): torch_vs_perfile = clips/s ratio (goal >= 3);
  first_batch_s  seconds from building the torch loader to its first batch.
Each loader's CPU ms per clip (its process and workers, `bench.loader`) is printed beside its clips/s.
Without --shards it makes its own: clips of natural content (a window panning over scikit-learn's sample
photographs, 10 s, 480x360 25 fps, H.264 + AAC) sharded by the offline stage, kept in --data between runs.
Goals on CPU: torch_vs_bound >= 0.8, torch_vs_naive >= 10, torch_vs_perfile >= 3, first_batch_s <= 3. The last line
is name=value pairs.
"""

from __future__ import annotations

import argparse
import multiprocessing
import os
import shutil
import sys
import tempfile
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
    make_loader: Any, epochs: int, cpu_ms: dict[str, float] | None = None, name: str = ""
) -> tuple[float, float]:
    """(clips/s after the first batch, seconds to the first batch) over `epochs` epochs of a fresh loader; its CPU ms
    per clip (process and workers) into `cpu_ms[name]`."""
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
    loader = DataLoader(NaiveClips(index, videos, aug), batch_size=batch_size, num_workers=cores, shuffle=True)
    start, clips = time.perf_counter(), 0
    for batch in loader:
        clips += batch["video"].shape[0]
    return clips / (time.perf_counter() - start)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--shards", type=Path, help="a split folder to read (default: make one in --data)")
    parser.add_argument("--videos", type=Path, help="the videos of --shards, for the naive loader")
    parser.add_argument("--data", type=Path, default=Path(tempfile.gettempdir(), "mbt-bench-pipeline"))
    parser.add_argument("--clips", type=int, default=64, help="clips to generate (default %(default)s)")
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--cores", type=int, default=len(os.sched_getaffinity(0)))
    parser.add_argument("--epochs", type=int, default=10, help="epochs of each loader (default %(default)s)")
    parser.add_argument(
        "--rounds", type=int, default=3, help="alternating runs of torch, stream, torch_plain and perfile (median)"
    )
    parser.add_argument("--no-dali", action="store_true", help="leave the DALI loaders out")
    args = parser.parse_args(argv)

    shards, videos = (args.shards, args.videos) if args.shards else make_shards(args.data, args.clips)
    index = SplitIndex(shards)
    aug = AugmentConfig()
    n, cores = len(index), args.cores
    results: dict[str, float] = {}
    results["bound"] = bound_clips_per_s(index, cores, repeats=args.epochs)
    # The first loader of a process measured up to 20% faster than later ones: indexed and streamed alternate, and
    # each gives its median over the rounds.
    streamed = open_split(f"pipe:cat {shards.resolve()}/{MANIFEST_NAME}")
    plain = aug.replace(color_prob=0.0, color_drop_prob=0.0)  # the per-file baseline has no colour augmentation
    perfile = write_perfile_copy(index, args.data / "perfile")
    makers = {
        "torch": lambda: TorchLoader(index, True, args.batch_size, num_workers=cores, augment=aug),
        "stream": lambda: TorchLoader(streamed, True, args.batch_size, num_workers=cores, augment=aug),
        "torch_plain": lambda: TorchLoader(index, True, args.batch_size, num_workers=cores, augment=plain),
        "perfile": lambda: perfile_loader(index, perfile, plain, args.batch_size, cores),
    }
    runs: dict[str, list[tuple[float, float]]] = {name: [] for name in makers}
    cpu_ms: dict[str, list[float]] = {}
    for _ in range(args.rounds):
        for name, make in makers.items():
            runs[name].append(loader_clips_per_s(make, args.epochs, cpu_ms, name))
    for name, measured in runs.items():
        results[name], results[f"{name}_first_batch_s"] = (float(np.median(c)) for c in zip(*measured, strict=True))
    results["first_batch_s"] = results["torch_first_batch_s"]
    results["torch_u8"] = worker_stage_clips_per_s(index, cores, args.batch_size, aug, args.epochs)
    if torch.cuda.is_available():
        results["torch_gpu"], _ = loader_clips_per_s(
            lambda: TorchLoader(index, True, args.batch_size, num_workers=cores, augment=aug, device="cuda"),
            args.epochs,
        )
    if dali_available() and not args.no_dali:
        from pipelines.dali_loader import DaliLoader

        devices = ["cpu", "gpu"] if torch.cuda.is_available() else ["cpu"]
        for device in devices:
            results[f"dali_{device}"], _ = loader_clips_per_s(
                lambda d=device: DaliLoader(index, True, args.batch_size, device=d, num_threads=cores, augment=aug),
                args.epochs, cpu_ms, f"dali_{device}",
            )  # fmt: skip
    if videos and shutil.which("ffmpeg"):
        results["naive"] = naive_clips_per_s(index, videos, aug, cores, args.batch_size)

    print(f"clips={n} batch={args.batch_size} cores={cores} epochs={args.epochs} shards={shards}")
    for name in ("bound", "torch", "torch_u8", "stream", "torch_gpu", "dali_cpu", "dali_gpu", "naive", "torch_plain",
                 "perfile"):  # fmt: skip
        if name in results:
            cpu = f"  {np.median(cpu_ms[name]):7.2f} CPU ms/clip" if name in cpu_ms else ""
            print(f"{name:>11}: {results[name]:8.1f} clips/s{cpu}")
    print(f"first batch (torch): {results['first_batch_s']:.2f} s, (stream): {results['stream_first_batch_s']:.2f} s")
    pairs = [
        f"torch_vs_bound={results['torch'] / results['bound']:.3f}",
        f"torch_u8_vs_bound={results['torch_u8'] / results['bound']:.3f}",
        f"stream_vs_torch={results['stream'] / results['torch']:.3f}",
    ]
    if "torch_gpu" in results:
        pairs.append(f"torch_gpu_vs_bound={results['torch_gpu'] / results['bound']:.3f}")
    if "naive" in results:
        pairs.append(f"torch_vs_naive={results['torch'] / results['naive']:.1f}")
    pairs.append(f"torch_vs_perfile={results['torch_plain'] / results['perfile']:.2f}")
    pairs.append(f"torch_vs_perfile_cpu={np.median(cpu_ms['perfile']) / np.median(cpu_ms['torch_plain']):.2f}")
    for device in ("cpu", "gpu"):
        if f"dali_{device}" in results:
            pairs.append(f"dali_{device}_vs_torch={results[f'dali_{device}'] / results['torch']:.3f}")
    pairs += [
        f"first_batch_s={results['first_batch_s']:.2f}",
        f"stream_first_batch_s={results['stream_first_batch_s']:.2f}",
        f"torch_clips_per_s={results['torch']:.1f}",
    ]
    print(" ".join(pairs))
    return 0


if __name__ == "__main__":
    sys.exit(main())
