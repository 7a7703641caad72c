"""Verify a sharded split against its manifest: hashes, DALI indexes, schema, JPEG frames, counts, unique keys.

Prints each problem (file, sample key, what to do) on stderr and a one-line summary; exits 0 when the split is
sound, 1 on any problem, 2 on a usage error.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

from preprocess.verify import verify_split


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("folder", type=Path, help="split folder holding manifest.json and its shards")
    parser.add_argument(
        "--no-decode", action="store_true", help="do not decode the JPEG frames (faster; everything else is checked)"
    )
    parser.add_argument(
        "--workers", type=int, default=None, help="processes checking shards in parallel (default: all cores)"
    )
    args = parser.parse_args(argv)
    if args.workers is not None and args.workers < 1:
        parser.error(f"--workers must be at least 1, got {args.workers}")
    workers = args.workers or len(os.sched_getaffinity(0))
    report = verify_split(args.folder, decode_jpeg=not args.no_decode, workers=workers)
    for error in report.errors:
        print(error, file=sys.stderr)
    print(report.summary())
    return 0 if report.ok else 1


if __name__ == "__main__":
    sys.exit(main())
