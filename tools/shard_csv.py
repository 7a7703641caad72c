"""Shard your own labelled videos: a CSV with a header + the videos → WebDataset shards under
data/shards/<dataset>/<split>/, read by training and evaluation like AudioSet's and VGGSound's.

Each CSV row is one sample: a video, an optional segment of it, its label or labels, an optional split. With start/end
columns each file is a whole video and each row a segment of it (decoded from its start, cut/padded to
--segment-seconds); without them each file is one sample from its beginning (--full-videos follows from the CSV).
With --name-template the video column holds ids, looked up in --videos as the built-in tools do ({ytid} is the id),
e.g. --name-template '{ytid}.MP4'.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from preprocess.class_files import LABEL_TYPES
from preprocess.cli import add_job_arguments, check_limit, run_tool, spec_options
from preprocess.custom_csv import CustomCsvRows
from preprocess.custom_fields import PATH_COLUMN_TEMPLATES, CsvLayout, folder_name
from preprocess.datasets import split_name_from_segments
from preprocess.job import JobSpec
from shards.layout import split_dir


def build_spec(args: argparse.Namespace) -> JobSpec:
    layout = CsvLayout(
        video_column=args.video_column,
        label_column=args.label_column,
        start_column=args.start_column,
        end_column=args.end_column,
        split_column=args.split_column,
        key_column=args.key_column,
        split=args.split,
        label_separator=args.label_separator,
        multi_label=args.multi_label,
        label_type=args.label_type,
        by_id=args.name_template is not None,
        classes_file=args.classes,
        drop_unknown_labels=args.drop_unknown_labels,
        segment_s=args.segment_seconds,
    )
    split = args.split or split_name_from_segments(args.csv)
    folder_name(args.dataset, "--dataset")
    rows = CustomCsvRows(args.csv, layout, limit=check_limit(args.limit))  # one pass; the job parses its own rows
    plan = rows.plan
    print(f"{args.csv}: {plan.describe(plan.lines.size)}")
    options = spec_options(args)
    options["full_videos"] = plan.has_times  # a row's segment is a part of a whole video: seek to its start
    return JobSpec(
        dataset=args.dataset,
        split=split,
        rows=rows,
        classes=plan.classes,
        multi_label=plan.multi_label,
        videos_dir=args.videos,
        out_dir=args.out or split_dir(args.dataset, split),
        name_templates=args.name_template or PATH_COLUMN_TEMPLATES,
        inputs={
            "csv": Path(args.csv).name,
            "classes": args.classes and Path(args.classes).name,
            "limit": args.limit,
            "label_type": plan.label_type,
            "csv_layout": layout.reading(),
        },
        **options,
    )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    csv = parser.add_argument_group("the CSV")
    csv.add_argument("--csv", type=Path, required=True, help="UTF-8 CSV whose first line names its columns")
    csv.add_argument(
        "--video-column",
        default="video",
        help="column of the video: a path relative to --videos (subfolders allowed; no '..', no absolute path, no "
        "link out of the folder), or with --name-template an id looked up in --videos (default %(default)s)",
    )
    csv.add_argument(
        "--start-column",
        help="column of the segment start, seconds (12.5) or HH:MM:SS.ff (default: 'start' if the header has it; "
        "without start/end columns each file is one sample from its beginning)",
    )
    csv.add_argument("--end-column", help="column of the segment end, as the start (default: 'end' if present)")
    csv.add_argument(
        "--label-column",
        default="label",
        help="column of the label(s): class names or indices, several separated by --label-separator "
        "(default %(default)s)",
    )
    csv.add_argument("--label-separator", default=";", help="separator of several labels in one cell (default ';')")
    csv.add_argument(
        "--split-column", help="column naming each row's split (default: 'split' if present; then --split is needed)"
    )
    csv.add_argument("--split", help="shard the rows of this split (default output split name: the CSV's stem)")
    csv.add_argument(
        "--key-column",
        help="build sample keys from this column (sanitised to letters, digits, '_', '-'; default: the video's "
        "stem and the start in ms, e.g. P01_01_1089)",
    )
    labels = parser.add_argument_group("classes and labels")
    labels.add_argument(
        "--classes",
        type=Path,
        help="class file: one name per line, or a CSV 'index,id,name' (also AudioSet's class_labels_indices.csv "
        "and EPIC-KITCHENS' verb/noun class files); default: the sorted distinct labels of all rows (all splits)",
    )
    labels.add_argument(
        "--label-type",
        choices=LABEL_TYPES,
        default="auto",
        help="labels are class names (or ids), or class indices (default: indices when every label is a number)",
    )
    mode = labels.add_mutually_exclusive_group()
    mode.add_argument(
        "--multi-label",
        dest="multi_label",
        action="store_true",
        default=None,
        help="any number of labels per row, none included (default: detected: several labels on any row)",
    )
    mode.add_argument("--single-label", dest="multi_label", action="store_false", help="exactly one label per row")
    labels.add_argument(
        "--drop-unknown-labels",
        action="store_true",
        help="drop labels missing from --classes instead of failing (a single-label row left without one is dropped)",
    )
    parser.add_argument(
        "--dataset", default="custom", help="dataset name in the manifest and default output folder (default custom)"
    )
    add_job_arguments(parser)
    return run_tool(build_spec, parser.parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
