"""Predict the classes of videos with a trained MBT: top-k class names with probabilities for each video.

    python tools/predict.py data/raw/demo/videos/clip.mp4 --model runs/demo/bottleneck
    python tools/predict.py videos/ segments.csv --model exported/demo --json out.json --embeddings emb.npz
    python tools/predict.py long.mp4 --model exported/demo --window-s 10 --hop-s 5 --out-dir timelines

Inputs: video files, folders (their video files) or segments CSVs (a header with video[,start,end]). --model: a
training checkpoint, a run folder (its latest checkpoint) or an exported model (tools/export_model.py). Each video is
decoded and featurized by the shard job's code and fed as the evaluation loaders feed it (4 synchronized test clips,
logits averaged). With --window-s, windows every --hop-s cover each whole file and a timeline CSV and PNG per video
go to --out-dir; a timeline ends where the content ends (a `warning:` line when that is before the end its header
claims). A video that cannot be predicted gets one `error:` line and the others go on; an output that cannot be
written (a full disk) stops it with one `error:` line. The exit status is 1 when any failed, 2 on a usage error.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
from pathlib import Path

from mbt.checkpoint import CheckpointFileError
from mbt.config import PRESETS
from mbt.embeddings import write_embeddings
from mbt.preset_feed import preset_feed
from preprocess.datasets import DatasetError
from preprocess.ffmpeg_run import FFMPEG_ENV, ToolMissingError, require_ffmpeg, use_ffmpeg
from serve.load import ExportError, Preprocessing, load_model
from serve.outputs import plot_timeline, record, timeline_path, top_lines, write_timeline_csv
from serve.predict import InputError, Predictor
from serve.segments import Segment, gather_segments
from shards.atomic import write_bytes_atomic


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("inputs", nargs="+", help="video files, folders of videos, segments CSVs")
    parser.add_argument("--model", required=True, help="checkpoint (.pt), run folder or exported model folder")
    parser.add_argument("--features-from", help="the training split (a checkpoint's run config names it otherwise)")
    parser.add_argument("--videos", type=Path, help="folder of the videos a segments CSV names (default: its folder)")
    parser.add_argument("--top-k", type=int, default=5, help="classes printed per video (at most the model's classes)")
    parser.add_argument("--json", type=Path, help="write every prediction (top-k, per-window logits) here")
    parser.add_argument("--embeddings", type=Path, help="write per-window tower and bottleneck embeddings (.npz)")
    parser.add_argument("--window-s", type=float, help="slide windows of this length over each whole file")
    parser.add_argument("--hop-s", type=float, help="seconds between windows (default: --window-s)")
    parser.add_argument("--out-dir", type=Path, default=Path("predictions"), help="timeline CSV and PNG folder")
    parser.add_argument("--batch-size", type=int, default=4, help="windows per forward (each of 4 test clips)")
    parser.add_argument("--device", default="cpu", choices=("cpu", "cuda"), help="where the model runs")
    parser.add_argument(
        "--preset", choices=PRESETS,
        help="feed the model as this preset does (scenic_as: a converted scenic checkpoint) instead of as it records",
    )  # fmt: skip
    parser.add_argument(
        "--ffmpeg", type=Path, help=f"the ffmpeg to run (default: ${FFMPEG_ENV[0]} or ${FFMPEG_ENV[1]}, else PATH's)"
    )
    args = parser.parse_args(argv)
    if args.top_k < 1 or args.batch_size < 1:
        parser.error("--top-k and --batch-size must be at least 1")
    if args.hop_s is not None and args.window_s is None:
        parser.error("--hop-s needs --window-s")
    for flag in ("window_s", "hop_s"):
        if (value := getattr(args, flag)) is not None and not 0 < value <= 3600:
            parser.error(f"--{flag.replace('_', '-')} must be in (0, 3600] seconds, got {value:g}")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        use_ffmpeg(args.ffmpeg)
        require_ffmpeg()
        model, prep = load_model(args.model, args.features_from)
        if args.preset:
            prep = dataclasses.replace(prep, augment=preset_feed(args.preset, model.cfg, prep.augment, str(args.model)))
        print(prep.found)
        predictor = Predictor(model, prep, args.device, args.window_s, args.hop_s, args.batch_size)
        segments = gather_segments(args.inputs, args.videos)
    except (CheckpointFileError, ExportError, DatasetError, ToolMissingError, ValueError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 1
    try:
        return predict_all(args, predictor, prep, segments)
    except OSError as err:  # an output that cannot be written (a full disk: DiskFullError names the file)
        print(f"error: {err}", file=sys.stderr)
        return 1


def predict_all(args: argparse.Namespace, predictor: Predictor, prep: Preprocessing, segments: list[Segment]) -> int:
    """Predict every segment, print its top classes and write the outputs asked for; the exit status."""
    names, multi, k = prep.class_names, prep.multi_label, min(args.top_k, len(prep.class_names))
    records, keys, embeddings, failed, taken = [], [], [], 0, set()
    embed, progress = args.embeddings is not None, sys.stderr.isatty()
    for segment in segments:
        try:
            prediction = predictor.predict(segment, embeddings=embed, progress=progress)
        except InputError as err:
            print(f"error: {err}", file=sys.stderr)
            failed += 1
            continue
        for warning in prediction.warnings:
            print(f"warning: {warning}", file=sys.stderr)
        print("\n".join(top_lines(prediction, k)))
        records.append(record(prediction, k))
        keys += [f"{prediction.name}@{start:g}" for start, _ in prediction.windows]
        embeddings += prediction.embeddings
        if args.window_s is not None:
            csv_path = write_timeline_csv(timeline_path(args.out_dir, prediction.name, taken), prediction)
            png_path = csv_path.with_name(csv_path.name.removesuffix(".csv") + ".png")
            title = Path(prediction.name).name  # the file's name: an absolute path crowds the figure
            plot_timeline(png_path, prediction.windows, prediction.probabilities, names, title)
            print(f"  timeline: {csv_path}, {png_path}")
    if args.json is not None:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        text = json.dumps({"classes": names, "multi_label": multi, "videos": records}, indent=1) + "\n"
        print(f"wrote {write_bytes_atomic(args.json, text.encode())}")
    if args.embeddings is not None and embeddings:
        print(f"wrote {write_embeddings(args.embeddings, keys, embeddings)}")
    if failed:
        print(f"{failed} of {len(segments)} video(s) could not be predicted", file=sys.stderr)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
