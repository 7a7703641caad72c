"""Shard a VGGSound split: vggsound.csv + downloaded clips → WebDataset shards under data/shards/vggsound/<split>/."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from preprocess.cli import add_job_arguments, check_limit, run_tool, spec_options
from preprocess.datasets import read_class_list
from preprocess.job import JobSpec
from preprocess.rows import CsvRows
from preprocess.vggsound import check_split, vggsound_classes, vggsound_row_parser, vggsound_split_filter
from preprocess.videos import VGGSOUND_NAME_TEMPLATES
from shards.layout import split_dir


def build_spec(args: argparse.Namespace) -> JobSpec:
    keep = vggsound_split_filter(check_split(args.split))
    classes = read_class_list(args.classes) if args.classes else vggsound_classes(args.csv)
    rows = CsvRows(args.csv, vggsound_row_parser(classes), limit=check_limit(args.limit), keep=keep)
    return JobSpec(
        dataset="vggsound",
        split=args.split,
        rows=rows,
        classes=[{"index": i, "id": name, "name": name} for i, name in enumerate(classes)],
        multi_label=False,
        videos_dir=args.videos,
        out_dir=args.out or split_dir("vggsound", args.split),
        name_templates=args.name_template or VGGSOUND_NAME_TEMPLATES,
        inputs={"csv": Path(args.csv).name, "classes": args.classes and Path(args.classes).name, "limit": args.limit},
        **spec_options(args),
    )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--csv", type=Path, required=True, help="vggsound.csv (no header: YTID,start,label,split)")
    parser.add_argument("--split", choices=["train", "test"], required=True, help="rows of this split")
    parser.add_argument(
        "--classes", type=Path, help="class list, one name per line (default: sorted labels of the CSV)"
    )
    add_job_arguments(parser)
    return run_tool(build_spec, parser.parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
