"""The parts of the GPU check (`tools/gpu_check.py`), each a function of one `Check` that returns its figures: the
split, the GPU tests, DALI GPU against DALI CPU, each loader alone, the model under each SDPA backend, training fed by
synthetic tensors and by each loader (`bench.train`), and the compiled model; a time budget skips a part with a
note, and a failing part is reported without stopping the others. Sizes come from a `Mode`: `REAL` on the GPU,
`DRY` for the dry run on the CPU."""

from __future__ import annotations

import itertools
import json
import subprocess
import sys
import time
import traceback
from collections.abc import Callable
from dataclasses import dataclass, replace
from functools import partial
from pathlib import Path
from typing import Any

import torch

from bench.loader import cuda_sync, measure_loader
from bench.model import multi_hot_labels, train_step
from bench.photo_split import write_photo_split
from bench.timing import time_rounds
from bench.train import add_mfu, loader_vs_synthetic, model_config, recipe_train_step, start_feeds, synthetic_batch
from mbt.config import SDPA_BACKENDS
from mbt.flops import count_flops, example_inputs, size_config
from mbt.model import MBT
from mbt.step import sdpa_context
from pipelines import dali_available, open_split
from pipelines.config import AugmentConfig
from shards.schema import FeatureParams

REPO = Path(__file__).resolve().parents[1]
# tests/pipelines/test_dali_loader.py: the evaluation test's bound (DALI CPU vs the torch loader), the GPU test's video
# bound
VIDEO_MAX_DIFF, VIDEO_GPU_MAX_DIFF, VIDEO_MEAN_DIFF, AUDIO_ATOL = 2 / 127.5, 8 / 127.5, 0.01, 1e-5
BACKENDS = tuple(name for name in SDPA_BACKENDS if name != "auto")  # flash, cudnn, efficient, math
PARTS = ("tests", "equal", "loaders", "sdpa", "train", "compile")
# seconds a part needs at least (real run): skipped with a note below that
MIN_SECONDS = {"tests": 60, "equal": 10, "loaders": 60, "sdpa": 20, "train": 90, "compile": 60}


@dataclass(frozen=True)
class Mode:
    """The sizes of a check: the split (`clips` of `features`), the model (`size` over `frames` crops of `crop` px
    and `audio_frames` log-mel frames, `batch` clips), each loader's `loader_s` seconds, training's `warmup` steps
    and `blocks` rounds of `steps` steps, the PyTorch loader's `workers` and DALI's `dali_threads`, and whether
    training is compiled."""

    clips: int
    features: FeatureParams
    size: str
    frames: int
    crop: int
    audio_frames: int
    batch: int
    loader_s: float
    steps: int
    warmup: int
    blocks: int
    workers: int
    dali_threads: int = 2
    compile: bool = False


REAL = Mode(clips=2048, features=FeatureParams(), size="base", frames=8, crop=224, audio_frames=800, batch=32,
            loader_s=15.0, steps=10, warmup=3, blocks=3, workers=15, compile=True)  # fmt: skip
DRY = Mode(clips=24, features=FeatureParams(num_frames=4, short_side_px=64, segment_s=2.0), size="tiny", frames=2,
           crop=48, audio_frames=128, batch=2, loader_s=1.0, steps=1, warmup=1, blocks=1, workers=1)  # fmt: skip


class Budget:
    """Seconds left of the run's time budget; a part that needs more than is left is skipped with a note."""

    def __init__(self, seconds: float) -> None:
        self.deadline = time.monotonic() + seconds

    def left(self) -> float:
        return self.deadline - time.monotonic()


@dataclass
class Check:
    """One check: its split, sizes, device (with its dense bf16 peak, None on the CPU) and budget; the SDPA backend
    training uses (None: PyTorch's choice), which the sdpa part sets to the fastest with `sdpa_fastest`; the test
    paths of the tests part (None: the files with GPU tests)."""

    split: Any
    mode: Mode
    device: torch.device
    budget: Budget
    peak: float | None = None
    dry_run: bool = False
    sdpa: str | None = None
    sdpa_fastest: bool = False
    tests: list[str] | None = None


def make_split(folder: Path, mode: Mode) -> tuple[Any, dict[str, Any]]:
    """(the opened split, the split part's figures) of `mode.clips` photo clips written into `folder`."""
    start = time.perf_counter()
    split = open_split(write_photo_split(folder, mode.clips, mode.features, shard_size=256))
    return split, {"clips": mode.clips, "seconds": time.perf_counter() - start, "folder": str(folder)}


def augment_for(mode: Mode) -> AugmentConfig:
    """The recipe's augmentation at the check's crop, frames and log-mel length."""
    return AugmentConfig(
        crop_px=mode.crop, frames_used=mode.frames, audio_frames=mode.audio_frames,
        eval_short_side_px=min(256, mode.features.short_side_px),
    )  # fmt: skip


def loader_kinds(device: torch.device) -> dict[str, Callable[..., Any]]:
    """{name: make(split, train, batch, augment, threads)} of the loaders to measure on `device`."""
    from pipelines.torch_loader import TorchLoader

    kinds: dict[str, Callable[..., Any]] = {}
    if dali_available():
        from pipelines.dali_loader import DaliLoader

        dali_device = "gpu" if device.type == "cuda" else "cpu"
        kinds["dali"] = lambda s, train, b, aug, threads: DaliLoader(
            s, train, b, device=dali_device, num_threads=threads, augment=aug
        )
    kinds["torch"] = lambda s, train, b, aug, threads: TorchLoader(
        s, train, b, num_workers=threads, device=device, augment=aug
    )
    return kinds


def part_tests(check: Check) -> dict[str, Any]:
    """pytest -m gpu over the test files that hold GPU tests (or `check.tests`), within what the budget leaves."""
    paths = check.tests or [str(p) for p in sorted((REPO / "tests").rglob("test_*.py")) if "mark.gpu" in p.read_text()]
    command = [sys.executable, "-m", "pytest", "-q", "-m", "gpu", "-p", "no:cacheprovider", *paths]
    try:
        timeout = max(check.budget.left() - 240, 30)
        run = subprocess.run(command, cwd=REPO, capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired:
        return {"note": "timed out"}
    lines = [line for line in run.stdout.splitlines() if line.strip()]
    return {"returncode": run.returncode, "summary": lines[-1] if lines else run.stderr[-500:]}


def part_equal(check: Check) -> dict[str, Any]:
    """DALI GPU vs DALI CPU evaluation batches (on the CPU: DALI CPU vs the PyTorch loader), first 4 batches."""
    if not dali_available():
        return {"note": "DALI not installed"}
    from pipelines.dali_loader import DaliLoader
    from pipelines.torch_loader import TorchLoader

    aug, split = augment_for(check.mode), check.split
    reference = DaliLoader(split, False, 4, device="cpu", augment=aug)
    if check.device.type == "cuda":
        candidate, bound = DaliLoader(split, False, 4, device="gpu", augment=aug), VIDEO_GPU_MAX_DIFF
    else:
        candidate, bound = TorchLoader(split, False, 4, num_workers=0, augment=aug), VIDEO_MAX_DIFF
    video, audio = [], []
    for want, got in itertools.islice(zip(reference, candidate, strict=False), 4):
        assert want["key"] == got["key"], (want["key"], got["key"])
        video.append((got["video"].float().cpu() - want["video"]).abs())
        audio.append((got["audio"].cpu() - want["audio"]).abs().max())
    diffs = torch.cat([v.flatten() for v in video])
    result = {"video_max": float(diffs.max()), "video_mean": float(diffs.mean()), "audio_max": float(max(audio))}
    result["within_tolerance"] = (
        result["video_max"] <= bound and result["video_mean"] <= VIDEO_MEAN_DIFF and result["audio_max"] <= AUDIO_ATOL
    )
    result["video_max_bound"] = bound
    return result


def part_loaders(check: Check) -> dict[str, Any]:
    """Each loader alone (`measure_loader` over `mode.loader_s` seconds): DALI at training and evaluation settings,
    the PyTorch loader at training settings; clips/s and CPU per clip, with its threads or workers."""
    mode = check.mode
    aug, batch, kinds, results = augment_for(mode), mode.batch, loader_kinds(check.device), {}
    runs = [("torch_train", "torch", True, batch, mode.workers)]
    if "dali" in kinds:
        runs = [("dali_train", "dali", True, batch, mode.dali_threads), ("dali_eval", "dali", False, max(batch // 4, 1),
                mode.dali_threads), *runs]  # fmt: skip
    for name, kind, train, size, threads in runs:
        make = partial(kinds[kind], check.split, train, size, aug, threads)
        rate = measure_loader(make, seconds=mode.loader_s, sync=cuda_sync())
        results[name] = {**rate.to_dict(), "threads_or_workers": threads}
    return results


def in_context(backend: str | None, call: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
    """`call(*args, **kwargs)` with SDPA restricted to `backend` (None or "auto": PyTorch's own choice)."""
    with sdpa_context(backend):
        return call(*args, **kwargs)


def model_steps(check: Check, backends: list[str], compiled: bool) -> dict[str, Any]:
    """Median ms per step of the model alone (`bench.model.train_step`) under each SDPA backend, interleaved; a
    backend that fails is reported with its error, the fastest named."""
    mode, device = check.mode, check.device
    cfg = size_config(mode.size, num_frames=mode.frames, img_size=mode.crop, audio_frames=mode.audio_frames)
    batch, results = mode.batch, {}
    inputs = example_inputs(cfg, batch, device)
    labels = multi_hot_labels(batch, cfg.num_classes, device)
    calls = {}
    for backend in backends:
        model = MBT(cfg).to(device).train()
        model = torch.compile(model) if compiled else model
        step = partial(train_step, model, inputs, labels, device.type == "cuda")
        try:
            in_context(backend, step)  # compiled (if it is) under the backend
        except RuntimeError as err:
            results[backend] = {"error": str(err).splitlines()[0][:200]}
            continue
        calls[backend] = partial(in_context, backend, step)
    times = time_rounds(calls, mode.steps, mode.warmup, rotate=True, device=device) if calls else {}
    gflops = count_flops(cfg)["train_gflops"] if check.peak else None  # seconds on the CPU: only where MFU is wanted
    for backend, seconds in times.items():
        ms = sorted(seconds)[len(seconds) // 2] * 1e3
        results[backend] = {"ms": ms, "clips_per_s": batch * 1e3 / ms}
        if gflops and check.peak:
            results[backend]["mfu"] = results[backend]["clips_per_s"] * gflops / 1e3 / check.peak
    if times:
        results["fastest"] = min(times, key=lambda b: results[b]["ms"])
    return results


def part_train(check: Check, mode: Mode) -> dict[str, Any]:
    """Training fed by synthetic tensors and by each loader, as tools/bench_train.py measures it (`bench.train`)."""
    device, split, manifest = check.device, check.split, check.split.manifest
    model_cfg = model_config(mode.size, manifest, mode.frames, mode.crop, mode.audio_frames)
    aug, batch, sdpa = augment_for(mode), mode.batch, check.sdpa or "auto"
    step = recipe_train_step(
        model_cfg, aug, batch, manifest.multi_label, 64, device, compile=mode.compile, sdpa_backend=sdpa
    )  # under the training backend
    synthetic = synthetic_batch(model_cfg, batch, manifest.multi_label, device)
    gflops = count_flops(model_cfg)["train_gflops"] if check.peak else None
    results: dict[str, Any] = {"sdpa": sdpa, "compile": mode.compile, "batch": batch}
    for kind, make in loader_kinds(device).items():
        threads = mode.dali_threads if kind == "dali" else mode.workers
        feeds = start_feeds(make(split, True, batch, aug, threads), synthetic)
        measured = loader_vs_synthetic(step, feeds, mode.steps, mode.warmup, mode.blocks, device)
        results[kind] = add_mfu(measured, gflops, check.peak) if gflops and check.peak else measured
        del feeds
    return results


def train_or_eager(check: Check) -> dict[str, Any]:
    """`part_train`; compiled training that fails is run again eagerly (GPU time is too short for a second run)."""
    try:
        return part_train(check, check.mode)
    except Exception as err:
        if not check.mode.compile:
            raise
        eager = part_train(check, replace(check.mode, compile=False))
        return {**eager, "compile_error": f"{type(err).__name__}: {err}"}


PART_RUNS: dict[str, Callable[[Check], dict[str, Any]]] = {
    "tests": part_tests,
    "equal": part_equal,
    "loaders": part_loaders,
    "sdpa": lambda check: model_steps(check, list(BACKENDS), compiled=False),
    "train": train_or_eager,
    "compile": lambda check: model_steps(check, ["auto", *([check.sdpa] if check.sdpa else [])], compiled=True),
}


def run_part(check: Check, part: str) -> dict[str, Any]:
    """The figures of `part` (one of PARTS) with its seconds, or its error and traceback where it fails; a note
    instead where it is left out: compile in a dry run, any part when less of the budget is left than it needs (a
    dry run needs none). After the sdpa part, training takes the fastest backend where `check.sdpa_fastest`."""
    if part == "compile" and check.dry_run:
        return {"note": "dry run: compile left out (minutes on the CPU)"}
    left = check.budget.left()
    if left < (0 if check.dry_run else MIN_SECONDS[part]):
        return {"note": f"skipped: {left:.0f} s of the budget left, the part needs ~{MIN_SECONDS[part]} s"}
    started = time.perf_counter()
    try:
        result = PART_RUNS[part](check)
    except Exception as err:  # a failing part is reported, the others still run
        result = {"error": f"{type(err).__name__}: {err}", "traceback": traceback.format_exc()[-2000:]}
    result["seconds"] = time.perf_counter() - started
    if part == "sdpa" and check.sdpa_fastest and "fastest" in result:
        check.sdpa = result["fastest"]
    return result


def summary_markdown(results: dict[str, Any]) -> str:
    """The results as a short markdown report: each part's figures, its note when it was skipped or failed."""
    lines = [f"# GPU check ({results['device']}, {results['when']})", "", f"Command: `{results['command']}`", ""]
    for part, value in results["parts"].items():
        lines += [f"## {part}", "", "```", json.dumps(value, indent=1, default=str)[:4000], "```", ""]
    lines += ["Last line: `" + results["last_line"] + "`", ""]
    return "\n".join(lines)


def last_line(parts: dict[str, Any]) -> str:
    """name=value pairs of the goals' figures."""
    pairs: dict[str, Any] = {}
    loaders, train, sdpa = parts.get("loaders", {}), parts.get("train", {}), parts.get("sdpa", {})
    for name in ("dali_train", "dali_eval", "torch_train"):
        if isinstance(loaders.get(name), dict):
            pairs[f"{name}_clips_s"] = loaders[name]["clips_per_s"]
            pairs[f"{name}_cores"] = loaders[name]["cores_busy"]
    for kind in ("dali", "torch"):
        if isinstance(train.get(kind), dict):
            pairs[f"{kind}_loader_vs_synthetic"] = train[kind]["loader_vs_synthetic"]
            if "real_mfu" in train[kind]:
                pairs[f"{kind}_train_mfu"] = train[kind]["real_mfu"]
    if "fastest" in sdpa:
        pairs["fastest_sdpa"] = sdpa["fastest"]
    if "within_tolerance" in parts.get("equal", {}):
        pairs["gpu_equals_cpu"] = parts["equal"]["within_tolerance"]
    return " ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in pairs.items())
