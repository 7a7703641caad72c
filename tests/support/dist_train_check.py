"""Run under torchrun by tests/mbt/test_train_dist.py: `mbt.train.main(flags)`, exactly what `-m mbt.train flags` runs,
recording on each rank the clip ids it trained on and, at the end, a digest of its model's parameters, written to
RECORD_DIR/rank-R.json:

    torchrun ... tests/support/dist_train_check.py RECORD_DIR [mbt.train flags ...]

With MBT_TEST_CRASH_MARKER=PATH set, rank MBT_TEST_CRASH_RANK (default 1) SIGKILLs itself once, at its first step
after a checkpoint exists, having created PATH (so that torchrun's restarted workers train on). With
MBT_TEST_FILL_DISK=FOLDER (a tmpfs, `full_disk.FullDisk`) rank 0 fills that disk just before it saves the checkpoint
of step MBT_TEST_FILL_AT_STEP.
"""

from __future__ import annotations

import hashlib
import json
import os
import signal
import sys
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from full_disk import FullDisk

import mbt.step
import mbt.train
from mbt.checkpoint import latest_checkpoint
from mbt.config import load_config

CRASH_MARKER = "MBT_TEST_CRASH_MARKER"
CRASH_RANK = "MBT_TEST_CRASH_RANK"
FILL_DISK, FILL_AT_STEP = "MBT_TEST_FILL_DISK", "MBT_TEST_FILL_AT_STEP"


def param_digest(state: Mapping[str, torch.Tensor]) -> str:
    """sha256 over the names and exact bytes of a state dict's tensors, in name order."""
    digest = hashlib.sha256()
    for name in sorted(state):
        digest.update(name.encode())
        digest.update(state[name].detach().cpu().contiguous().numpy().tobytes())
    return digest.hexdigest()


def main() -> int:
    record_dir, argv = Path(sys.argv[1]), sys.argv[2:]
    rank = int(os.environ["RANK"])
    run_dir = Path(load_config(argv).out_dir)
    marker = os.environ.get(CRASH_MARKER)
    crash = marker is not None and rank == int(os.environ.get(CRASH_RANK, "1")) and not Path(marker).exists()
    models: list[torch.nn.Module] = []
    keys: list[list[str]] = []
    mixup = mbt.step.mixup

    class RecordingMBT(mbt.train.MBT):
        def __init__(self, *args: Any, **kwargs: Any) -> None:
            super().__init__(*args, **kwargs)
            models.append(self)

    def recording_mixup(data: dict[str, Any], *args: Any) -> dict[str, Any]:
        if crash and latest_checkpoint(run_dir) is not None:
            Path(marker).touch()
            os.kill(os.getpid(), signal.SIGKILL)
        keys.append(list(data["key"]))
        return mixup(data, *args)

    save = mbt.train.save_checkpoint

    def filling_save(run_dir: Path, step: int, *args: Any, **keywords: Any) -> Path:
        if step == int(os.environ[FILL_AT_STEP]):
            FullDisk(Path(os.environ[FILL_DISK])).fill()
        return save(run_dir, step, *args, **keywords)

    mbt.train.MBT = RecordingMBT
    mbt.step.mixup = recording_mixup
    if rank == 0 and FILL_DISK in os.environ:
        mbt.train.save_checkpoint = filling_save
    code = mbt.train.main(argv)
    record = {
        "rank": rank, "world_size": int(os.environ["WORLD_SIZE"]), "exit": code, "exited_at": time.time(),
        "keys": keys, "digest": param_digest(models[0].state_dict()),
    }  # fmt: skip
    record_dir.mkdir(parents=True, exist_ok=True)
    (record_dir / f"rank-{rank}.json").write_text(json.dumps(record))
    return code


if __name__ == "__main__":
    sys.exit(main())
