"""The GPU check: one prepared run that proves the GPU path and measures it, writing a results folder.

On the GPU machine (after `.gpu/unpack_dali.sh` installed DALI), in about 6 minutes (--budget-s), each part skipped
with a note once the budget is spent, in this order:
  split      a realistic split of --clips clips (20 JPEG frames of 342x256 panning over photographs, log-mels)
             written straight through the shard writer (`bench.photo_split`): seconds, no video decoded;
  tests      the tests marked `gpu` (pytest -m gpu);
  equal      DALI GPU evaluation batches against DALI CPU ones on the same samples (max / mean |diff|, against the
             tolerance of tests/pipelines/test_dali_loader.py's evaluation test);
  loaders    each loader alone (`bench.loader.measure_loader`): DALI `mixed` at training and evaluation settings
             (--dali-threads CPU threads), the PyTorch loader with --workers workers delivering to the GPU: clips/s
             and CPU core-seconds per clip (process and workers' CPU time over wall time);
  sdpa       the model alone (`bench.model.train_step`: forward, loss, backward), eager, under each SDPA backend
             (flash, cuDNN, efficient, math: torch.nn.attention.sdpa_kernel), interleaved: the fastest is named;
  train      MBT training in bf16 (tools/bench_train.py's measurement, `bench.train`: `mbt.step.TrainStep`,
             torch.compile'd with --compile) fed by synthetic tensors and by each loader: clips/s, MFU,
             loader_vs_synthetic;
  compile    the model alone compiled, with the default SDPA choice and with the fastest backend.
--dry-run: the same parts on the CPU in seconds (tiny model, DALI on the CPU, a split of 24 small clips; the
equality check compares DALI CPU with the PyTorch loader; compile left out), so that tests/bench/test_gpu_check.py keeps
the script working. Results: <out>/results.json and <out>/summary.md; the last line printed is name=value pairs.

  bash .gpu/unpack_dali.sh && PYTHONPATH=. python3 tools/gpu_check.py --out "$OUT/gpu_check"
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import subprocess
import sys
import tempfile
import time
import traceback
from collections.abc import Callable
from functools import partial
from pathlib import Path
from typing import Any

import torch

from bench.loader import cuda_sync, measure_loader
from bench.model import avoid_inductor_tiling_crash, multi_hot_labels, train_step
from bench.photo_split import write_photo_split
from bench.timing import device_name, peak_tflops, time_rounds
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
REAL = {"clips": 2048, "features": FeatureParams(), "size": "base", "frames": 8, "crop": 224, "audio_frames": 800,
        "batch": 32, "loader_s": 15.0, "steps": 10, "warmup": 3, "blocks": 3, "workers": 15}  # fmt: skip
DRY = {"clips": 24, "features": FeatureParams(num_frames=4, short_side_px=64, segment_s=2.0), "size": "tiny",
       "frames": 2, "crop": 48, "audio_frames": 128, "batch": 2, "loader_s": 1.0, "steps": 1, "warmup": 1,
       "blocks": 1, "workers": 1}  # fmt: skip


class Budget:
    """Seconds left of the run's time budget; a part that needs more than is left is skipped with a note."""

    def __init__(self, seconds: float) -> None:
        self.deadline = time.monotonic() + seconds

    def left(self) -> float:
        return self.deadline - time.monotonic()


def augment_for(mode: dict[str, Any]) -> AugmentConfig:
    """The recipe's augmentation at the check's crop, frames and log-mel length."""
    return AugmentConfig(
        crop_px=mode["crop"], frames_used=mode["frames"], audio_frames=mode["audio_frames"],
        eval_short_side_px=min(256, mode["features"].short_side_px),
    )  # fmt: skip


def loader_kinds(device: torch.device) -> dict[str, Callable[..., Any]]:
    """{name: make(split, train, batch, augment)} of the loaders to measure on `device`."""
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


def part_tests(args: argparse.Namespace, budget: Budget) -> dict[str, Any]:
    """pytest -m gpu over the test files that hold GPU tests (or --tests), within what the budget leaves."""
    paths = args.tests or [str(p) for p in sorted((REPO / "tests").glob("test_*.py")) if "mark.gpu" in p.read_text()]
    command = [sys.executable, "-m", "pytest", "-q", "-m", "gpu", "-p", "no:cacheprovider", *paths]
    try:
        run = subprocess.run(command, cwd=REPO, capture_output=True, text=True, timeout=max(budget.left() - 240, 30))
    except subprocess.TimeoutExpired:
        return {"note": "timed out"}
    lines = [line for line in run.stdout.splitlines() if line.strip()]
    return {"returncode": run.returncode, "summary": lines[-1] if lines else run.stderr[-500:]}


def part_equal(split: Any, mode: dict[str, Any], device: torch.device) -> dict[str, Any]:
    """DALI GPU vs DALI CPU evaluation batches (on the CPU: DALI CPU vs the PyTorch loader), first 4 batches."""
    from pipelines.dali_loader import DaliLoader
    from pipelines.torch_loader import TorchLoader

    aug = augment_for(mode)
    reference = DaliLoader(split, False, 4, device="cpu", augment=aug)
    if device.type == "cuda":
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


def part_loaders(split: Any, mode: dict[str, Any], args: argparse.Namespace, device: torch.device) -> dict[str, Any]:
    aug, batch, kinds, results = augment_for(mode), mode["batch"], loader_kinds(device), {}
    runs = [("torch_train", "torch", True, batch, args.workers)]
    if "dali" in kinds:
        runs = [("dali_train", "dali", True, batch, args.dali_threads), ("dali_eval", "dali", False, max(batch // 4, 1),
                args.dali_threads), *runs]  # fmt: skip
    for name, kind, train, size, threads in runs:
        make = partial(kinds[kind], split, train, size, aug, threads)
        rate = measure_loader(make, seconds=mode["loader_s"], sync=cuda_sync())
        results[name] = {**rate.to_dict(), "threads_or_workers": threads}
    return results


def model_steps(
    mode: dict[str, Any], device: torch.device, backends: list[str], compiled: bool, peak: float | None
) -> dict[str, Any]:
    """Median ms per step of the model alone (`bench.model.train_step`) under each SDPA backend, interleaved."""
    cfg = size_config(mode["size"], num_frames=mode["frames"], img_size=mode["crop"], audio_frames=mode["audio_frames"])
    batch, results = mode["batch"], {}
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
    times = time_rounds(calls, mode["steps"], mode["warmup"], rotate=True, device=device) if calls else {}
    gflops = count_flops(cfg)["train_gflops"] if peak else None  # seconds on the CPU: only where MFU is wanted
    for backend, seconds in times.items():
        ms = sorted(seconds)[len(seconds) // 2] * 1e3
        results[backend] = {"ms": ms, "clips_per_s": batch * 1e3 / ms}
        if gflops and peak:
            results[backend]["mfu"] = results[backend]["clips_per_s"] * gflops / 1e3 / peak
    if times:
        results["fastest"] = min(times, key=lambda b: results[b]["ms"])
    return results


def in_context(backend: str | None, call: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
    """`call(*args, **kwargs)` with SDPA restricted to `backend` (None or "auto": PyTorch's own choice)."""
    with sdpa_context(backend):
        return call(*args, **kwargs)


def part_train(split: Any, mode: dict[str, Any], args: argparse.Namespace, device: torch.device, sdpa: str | None,
               peak: float | None) -> dict[str, Any]:  # fmt: skip
    """Training fed by synthetic tensors and by each loader, as tools/bench_train.py measures it (`bench.train`)."""
    manifest = split.manifest
    model_cfg = model_config(mode["size"], manifest, mode["frames"], mode["crop"], mode["audio_frames"])
    aug, batch = augment_for(mode), mode["batch"]
    step = recipe_train_step(
        model_cfg, aug, batch, manifest.multi_label, 64, device, compile=args.compile, sdpa_backend=sdpa or "auto"
    )  # under the training backend
    synthetic = synthetic_batch(model_cfg, batch, manifest.multi_label, device)
    gflops = count_flops(model_cfg)["train_gflops"] if peak else None
    results: dict[str, Any] = {"sdpa": sdpa or "auto", "compile": args.compile, "batch": batch}
    for kind, make in loader_kinds(device).items():
        threads = args.dali_threads if kind == "dali" else args.workers
        feeds = start_feeds(make(split, True, batch, aug, threads), synthetic)
        measured = loader_vs_synthetic(step, feeds, mode["steps"], mode["warmup"], mode["blocks"], device)
        results[kind] = add_mfu(measured, gflops, peak) if gflops and peak else measured
        del feeds
    return results


def train_or_eager(split: Any, mode: dict[str, Any], args: argparse.Namespace, device: torch.device,
                   sdpa: str | None, peak: float | None) -> dict[str, Any]:  # fmt: skip
    """`part_train`; compiled training that fails is run again eagerly (GPU time is too short for a second run)."""
    try:
        return part_train(split, mode, args, device, sdpa, peak)
    except Exception as err:
        if not args.compile:
            raise
        args.compile = False
        return {**part_train(split, mode, args, device, sdpa, peak), "compile_error": f"{type(err).__name__}: {err}"}


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, default=REPO / "runs" / "gpu_check", help="results folder")
    parser.add_argument("--data", type=Path, help="where the split is written (default: a temporary folder)")
    parser.add_argument("--dry-run", action="store_true", help="tiny model on the CPU, DALI CPU, a few clips")
    parser.add_argument("--budget-s", type=float, default=360.0, help="time budget in seconds (default %(default)s)")
    parser.add_argument("--clips", type=int, help="clips in the split (default: 2048; dry run 24)")
    parser.add_argument("--batch", type=int, help="training batch (default: 32; dry run 2)")
    parser.add_argument("--workers", type=int, help="PyTorch loader workers (default: 15; dry run 1)")
    parser.add_argument("--dali-threads", type=int, default=2, help="DALI CPU threads (default %(default)s)")
    parser.add_argument("--compile", action=argparse.BooleanOptionalAction, help="compile training (default: on GPU)")
    parser.add_argument(
        "--sdpa", choices=("fastest", "auto", *BACKENDS), default="fastest",
        help="SDPA backend for training: the fastest measured (default), PyTorch's choice, or one",
    )  # fmt: skip
    parser.add_argument("--parts", default="tests,equal,loaders,sdpa,train,compile", help="parts to run, in order")
    parser.add_argument("--tests", nargs="*", help="test paths of the tests part (default: the files with GPU tests)")
    args = parser.parse_args(argv)
    mode = DRY if args.dry_run else REAL
    args.clips, args.batch = args.clips or mode["clips"], args.batch or mode["batch"]
    args.workers = args.workers or mode["workers"]
    args.compile = (not args.dry_run) if args.compile is None else args.compile
    return args


# seconds a part needs at least (real run): skipped with a note below that
MIN_SECONDS = {"tests": 60, "equal": 10, "loaders": 60, "sdpa": 20, "train": 90, "compile": 60}


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


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    budget = Budget(args.budget_s)
    if args.compile:
        avoid_inductor_tiling_crash()
    mode = {**(DRY if args.dry_run else REAL), "clips": args.clips, "batch": args.batch}
    device = torch.device("cpu" if args.dry_run or not torch.cuda.is_available() else "cuda")
    peak = peak_tflops(torch.cuda.get_device_name()) if device.type == "cuda" else None
    scale = 1.0 if not args.dry_run else 0.0  # the dry run runs every part, however little time is left
    parts: dict[str, Any] = {}
    data = Path(args.data or tempfile.mkdtemp(prefix="gpu_check_"))
    start = time.perf_counter()
    split = open_split(write_photo_split(data / "train", args.clips, mode["features"], shard_size=256))
    parts["split"] = {"clips": args.clips, "seconds": time.perf_counter() - start, "folder": str(data / "train")}
    print(f"split: {args.clips} clips in {parts['split']['seconds']:.1f} s; budget left {budget.left():.0f} s")
    sdpa = None if args.sdpa in ("fastest", "auto") else args.sdpa
    steps: dict[str, Callable[[], Any]] = {
        "tests": lambda: part_tests(args, budget),
        "equal": lambda: part_equal(split, mode, device) if dali_available() else {"note": "DALI not installed"},
        "loaders": lambda: part_loaders(split, mode, args, device),
        "sdpa": lambda: model_steps(mode, device, list(BACKENDS), compiled=False, peak=peak),
        "train": lambda: train_or_eager(split, mode, args, device, sdpa, peak),
        "compile": lambda: model_steps(mode, device, ["auto", *([sdpa] if sdpa else [])], compiled=True, peak=peak),
    }
    for part in args.parts.split(","):
        if part == "compile" and args.dry_run:
            parts[part] = {"note": "dry run: compile left out (minutes on the CPU)"}
            continue
        if budget.left() < MIN_SECONDS[part] * scale:
            parts[part] = {
                "note": f"skipped: {budget.left():.0f} s of the budget left, the part needs ~{MIN_SECONDS[part]} s"
            }
            continue
        started = time.perf_counter()
        try:
            parts[part] = steps[part]()
        except Exception as err:  # a failing part is reported, the others still run
            parts[part] = {"error": f"{type(err).__name__}: {err}", "traceback": traceback.format_exc()[-2000:]}
        parts[part]["seconds"] = time.perf_counter() - started
        if part == "sdpa" and args.sdpa == "fastest" and "fastest" in parts[part]:
            sdpa = parts[part]["fastest"]
        print(f"{part}: {time.perf_counter() - started:.1f} s; budget left {budget.left():.0f} s", flush=True)
    results = {
        "device": device_name(device), "when": time.strftime("%Y-%m-%d %H:%M:%S"), "dry_run": args.dry_run,
        "command": " ".join([Path(sys.argv[0]).name, *(argv if argv is not None else sys.argv[1:])]),
        "parts": parts, "last_line": last_line(parts), "cpu_cores": len(os.sched_getaffinity(0)),
    }  # fmt: skip
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "results.json").write_text(json.dumps(results, indent=1, default=str) + "\n")
    (args.out / "summary.md").write_text(summary_markdown(results))
    print(f"results in {args.out}")
    print(results["last_line"])
    return 0


if __name__ == "__main__":
    sys.exit(main())
