"""Write a split's manifest.json once every part of a partitioned shard job is done, or say which parts are missing.

The part that finishes last does this by itself; run this by hand after resuming a failed array task elsewhere,
or to see how far a split is: `python tools/merge_manifests.py data/shards/audioset/unbalanced_train`.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from preprocess.job_merge import merge
from preprocess.job_state import JobError, read_partition

SHOWN_PARTS = 20  # a 1,000-part job just started waits for 999


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("folder", type=Path, help="the output folder of the shard job (--out)")
    args = parser.parse_args(argv)
    try:
        manifest, pending = merge(args.folder)
        num_jobs = read_partition(args.folder) or 1
    except JobError as err:
        print(f"error: {err}", file=sys.stderr)
        return 1
    if manifest is not None:
        print(f"{args.folder}: manifest written: {manifest.num_samples} samples in {len(manifest.shards)} shards, "
              f"{len(manifest.failures)} failures")  # fmt: skip
        return 0
    parts = pending.parts(num_jobs)
    more = f", … ({len(parts) - SHOWN_PARTS} more)" if len(parts) > SHOWN_PARTS else ""
    print(
        f"{args.folder}: {pending.count} shards not done, of parts [{', '.join(map(str, parts[:SHOWN_PARTS]))}{more}] "
        f"(job indices of {num_jobs}); "
        "rerun those parts with the same arguments (they resume), then this",
        file=sys.stderr,
    )
    return 1


if __name__ == "__main__":
    sys.exit(main())
