"""The offline stage's cost for AudioSet-2M, its eval split and VGGSound: shard-job and verify_shards core-hours,
bytes and files written, shards, projected from measured rates with the shard tools' own defaults.

    python tools/offline_cost.py                           # project from the committed docs/offline_cost.json
    python tools/offline_cost.py --measure --write-readme  # measure here (minutes), record, README's table

--measure runs the shard job on photo-like 10 s clips at each frame rate and verify_shards on one core, and writes
the record (--record); --write-readme rewrites README.md's sizing table from the record. The arithmetic and the
measurement are `bench.offline_cost`'s, the tables `bench.offline_cost_table`'s.
"""

from __future__ import annotations

import argparse
import os
import shlex
import sys
import tempfile
from pathlib import Path

from bench.offline_cost import (
    REPO,
    RecordError,
    datasets,
    default_frame_rates,
    job_defaults,
    load_record,
    measure,
    project,
    write_record,
)
from bench.offline_cost_table import MarkerError, readme_table, report, with_table
from preprocess.ffmpeg_run import require_ffmpeg


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--record", type=Path, default=REPO / "docs" / "offline_cost.json",
                        help="the measured rates: read, or written by --measure (default %(default)s)")  # fmt: skip
    parser.add_argument("--measure", action="store_true", help="measure the rates here and write --record first")
    parser.add_argument("--write-readme", action="store_true", help="rewrite README.md's sizing table from --record")
    parser.add_argument("--readme", type=Path, default=REPO / "README.md", help="default %(default)s")
    parser.add_argument("--data", type=Path, default=Path(tempfile.gettempdir(), "mbt-bench-clips"),
                        help="where the clips are kept between runs (default %(default)s)")  # fmt: skip
    parser.add_argument("--fps", default=",".join(f"{r:g}" for r in default_frame_rates()),
                        help="frame rates to measure (default %(default)s: the job's, scenic's)")  # fmt: skip
    parser.add_argument("--clips", type=int, default=16, help="clips the job shards (default %(default)s)")
    parser.add_argument("--workers", type=int, default=len(os.sched_getaffinity(0)), help="default: all cores")
    parser.add_argument("--repeats", type=int, default=3, help="job runs per rate; the fastest counts (default 3)")
    parser.add_argument("--verify-clips", type=int, default=48, help="clips verify_shards reads (default 48)")
    args = parser.parse_args(argv)
    try:
        if args.measure:
            require_ffmpeg()
            command = shlex.join(
                [str(Path(__file__).resolve().relative_to(REPO)), *(sys.argv[1:] if argv is None else argv)]
            )
            rates = tuple(float(r) for r in args.fps.split(","))
            record = measure(args.data, rates, args.clips, args.workers, args.repeats, args.verify_clips, command)
            write_record(record, args.record)
        record = load_record(args.record)
        shard_size = job_defaults()[0]
        costs = project(record, datasets(), shard_size)
        print(report(record, costs, shard_size), end="")
        if args.write_readme:
            args.readme.write_text(
                with_table(args.readme.read_text(), readme_table(record, costs, shard_size), args.readme)
            )
            print(f"wrote the sizing table in {args.readme}")
    except (RecordError, MarkerError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
