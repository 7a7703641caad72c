"""Run under torchrun by tests/pipelines/test_dist_loader.py: every rank reads one training epoch and the evaluation
split with the loader named on the command line (streamed through pipe:cat with --stream); rank 0 writes what each rank
saw as JSON."""

from __future__ import annotations

import argparse
import json

import torch.distributed as dist
from loader_checks import SMALL_AUG

from pipelines import build_loader, open_split


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("train_dir")
    parser.add_argument("eval_dir")
    parser.add_argument("out")
    parser.add_argument("--loader", default="torch")
    parser.add_argument("--stream", action="store_true", help="read the splits as pipe:cat URLs")
    args = parser.parse_args()
    if args.stream:
        args.train_dir, args.eval_dir = (f"pipe:cat {d}/manifest.json" for d in (args.train_dir, args.eval_dir))
    dist.init_process_group("gloo")
    kw = {"loader": args.loader, "augment": SMALL_AUG, "num_workers": 2}
    train = build_loader(open_split(args.train_dir), True, 2, **kw)
    train_keys = [b["key"] for b in train]
    evaluation = build_loader(open_split(args.eval_dir), False, 2, **kw)
    eval_rows = [[k, int(c)] for b in evaluation for k, c in zip(b["key"], b["clip_index"], strict=True)]
    seen = {"rank": dist.get_rank(), "batches": len(train), "train": train_keys, "eval": eval_rows}
    gathered: list = [None] * dist.get_world_size()
    dist.all_gather_object(gathered, seen)
    if dist.get_rank() == 0:
        with open(args.out, "w") as f:
            json.dump(gathered, f)
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
