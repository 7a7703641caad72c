"""Shard an AudioSet split: segment CSV + downloaded clips → WebDataset shards under data/shards/audioset/<split>/."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from preprocess.cli import add_job_arguments, check_limit, run_tool, spec_options
from preprocess.datasets import audioset_row_parser, read_audioset_classes, split_name_from_segments
from preprocess.job import JobSpec
from preprocess.rows import CsvRows
from preprocess.videos import AUDIOSET_NAME_TEMPLATES
from shards.layout import split_dir


def build_spec(args: argparse.Namespace) -> JobSpec:
    classes = read_audioset_classes(args.labels)
    parse_row = audioset_row_parser([mid for mid, _ in classes], args.drop_unknown_labels)
    split = split_name_from_segments(args.segments)
    return JobSpec(
        dataset="audioset",
        split=split,
        rows=CsvRows(args.segments, parse_row, skip_comments=True, limit=check_limit(args.limit)),
        classes=[{"index": i, "id": mid, "name": name} for i, (mid, name) in enumerate(classes)],
        multi_label=True,
        videos_dir=args.videos,
        out_dir=args.out or split_dir("audioset", split),
        name_templates=args.name_template or AUDIOSET_NAME_TEMPLATES,
        inputs={"segments": Path(args.segments).name, "labels": Path(args.labels).name, "limit": args.limit},
        **spec_options(args),
    )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--segments", type=Path, required=True, help="segment CSV, e.g. balanced_train_segments.csv")
    parser.add_argument("--labels", type=Path, required=True, help="class_labels_indices.csv")
    parser.add_argument(
        "--drop-unknown-labels", action="store_true", help="drop label MIDs missing from --labels instead of failing"
    )
    add_job_arguments(parser)
    return run_tool(build_spec, parser.parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
