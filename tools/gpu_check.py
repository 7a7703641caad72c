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
The parts are `bench.gpu_check`'s.

  bash .gpu/unpack_dali.sh && PYTHONPATH=. python3 tools/gpu_check.py --out "$OUT/gpu_check"
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys
import tempfile
import time
from pathlib import Path

import torch

from bench.gpu_check import (
    BACKENDS,
    DRY,
    PARTS,
    REAL,
    REPO,
    Budget,
    Check,
    last_line,
    make_split,
    run_part,
    summary_markdown,
)
from bench.model import avoid_inductor_tiling_crash
from bench.timing import device_name, peak_tflops


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
    parser.add_argument("--parts", default=",".join(PARTS), help="parts to run, in order")
    parser.add_argument("--tests", nargs="*", help="test paths of the tests part (default: the files with GPU tests)")
    args = parser.parse_args(argv)
    mode = DRY if args.dry_run else REAL
    args.clips, args.batch = args.clips or mode.clips, args.batch or mode.batch
    args.workers = args.workers or mode.workers
    args.compile = (not args.dry_run) if args.compile is None else args.compile
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    budget = Budget(args.budget_s)
    if args.compile:
        avoid_inductor_tiling_crash()
    mode = dataclasses.replace(
        DRY if args.dry_run else REAL, clips=args.clips, batch=args.batch, workers=args.workers,
        dali_threads=args.dali_threads, compile=args.compile,
    )  # fmt: skip
    device = torch.device("cpu" if args.dry_run or not torch.cuda.is_available() else "cuda")
    data = Path(args.data or tempfile.mkdtemp(prefix="gpu_check_"))
    split, split_part = make_split(data / "train", mode)
    parts = {"split": split_part}
    print(f"split: {args.clips} clips in {split_part['seconds']:.1f} s; budget left {budget.left():.0f} s")
    check = Check(
        split, mode, device, budget, peak=peak_tflops(torch.cuda.get_device_name()) if device.type == "cuda" else None,
        dry_run=args.dry_run, sdpa=None if args.sdpa in ("fastest", "auto") else args.sdpa,
        sdpa_fastest=args.sdpa == "fastest", tests=args.tests,
    )  # fmt: skip
    for part in args.parts.split(","):
        parts[part] = run_part(check, part)
        if "seconds" in parts[part]:
            print(f"{part}: {parts[part]['seconds']:.1f} s; budget left {budget.left():.0f} s", flush=True)
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
