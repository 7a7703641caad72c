"""How every stage that grows with the split scales to AudioSet-2M: time and peak memory at several split sizes on
synthetic metadata (no video, nothing decoded), each stage's growth exponent, a PNG, and verify_shards' hours per TB.

    python tools/bench_scale.py                          # 10k, 100k, 1M, 2M clips (about 10 minutes, 2 GB of disk)
    python tools/bench_scale.py --sizes 1k,4k --no-verify   # a quick look
"""

from __future__ import annotations

import argparse
import shutil
import sys
import tempfile
from pathlib import Path

from bench.scale import SIZES, STAGES, exponents, fmt_size, measure, plot, prepare, verify_rate

GOAL_EXPONENT = 1.1


def parse_sizes(text: str) -> list[int]:
    """'10k,100k,1M' -> [10000, 100000, 1000000]."""
    units = {"k": 1_000, "M": 1_000_000}
    return [int(float(t[:-1]) * units[t[-1]]) if t[-1] in units else int(t) for t in text.split(",") if t]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes", type=parse_sizes, default=list(SIZES), help="split sizes (default 10k,100k,1M,2M)")
    parser.add_argument("--stages", default=",".join(STAGES), help=f"stages to run (default {','.join(STAGES)})")
    parser.add_argument("--plot", type=Path, default=Path("runs/bench_scale.png"), help="the PNG written")
    parser.add_argument(
        "--frames", type=int, default=1, help="frame members per synthetic sample (default 1; the shard job writes 20)"
    )
    parser.add_argument("--scratch", type=Path, default=None, help="folder for the synthetic data (default: a temp)")
    parser.add_argument("--no-verify", action="store_true", help="skip verify_shards' rate")
    args = parser.parse_args(argv)
    stages = tuple(s for s in args.stages.split(",") if s)
    if unknown := set(stages) - set(STAGES):
        parser.error(f"unknown stages {sorted(unknown)}; they are {','.join(STAGES)}")
    scratch = Path(tempfile.mkdtemp(prefix="bench_scale_", dir=args.scratch))
    runs = []
    try:
        print(f"{'stage':<15} {'clips':>6} {'seconds':>8} {'peak MB':>8} {'stage MB':>9}")
        for size in args.sizes:
            folder = scratch / fmt_size(size)
            prepare(folder, size, stages, args.frames)
            for stage in stages:
                run = measure(stage, folder, size)
                runs.append(run)
                print(f"{stage:<15} {fmt_size(size):>6} {run.seconds:>8.3f} {run.peak_mb:>8.0f} {run.stage_mb:>9.1f}")
            shutil.rmtree(folder)
        print(f"growth exponents (log-log slope vs clips; goal <= {GOAL_EXPONENT}):")
        for stage, (time_exp, mem_exp) in exponents(runs).items():
            flag = "" if max(time_exp, mem_exp) <= GOAL_EXPONENT else "  <- faster than linear"
            print(f"  {stage:<9} time {time_exp:5.2f}  memory {mem_exp:5.2f}{flag}")
        args.plot.parent.mkdir(parents=True, exist_ok=True)
        print(f"plot: {plot(runs, args.plot)}")
        if not args.no_verify:
            rate = verify_rate(scratch)
            print(
                f"verify_shards: {rate['bytes_per_s'] / 1e6:.0f} MB/s on one core ({rate['mb_per_clip']:.2f} MB per "
                f"clip) -> {rate['core_hours_per_tb']:.1f} core-hours per TB"
            )
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
