"""The loaders under torchrun with gloo on CPU: 2 processes on one node (indexed, streamed through pipe:cat, DALI), and
2 "nodes" on localhost."""

from __future__ import annotations

import json
import socket
import subprocess
import sys
from pathlib import Path

import pytest

from pipelines.sources import SplitIndex

pytestmark = pytest.mark.slow  # torchrun: processes and rendezvous, tens of seconds each

SCRIPT = Path(__file__).parents[1] / "support" / "dist_loader_main.py"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def torchrun(*args: str) -> list[str]:
    return [sys.executable, "-m", "torch.distributed.run", *args]


def check_ranks(result: Path, train_dir: Path, eval_dir: Path) -> None:
    ranks = json.loads(result.read_text())
    assert [r["rank"] for r in ranks] == [0, 1]
    assert ranks[0]["batches"] == ranks[1]["batches"] == len(ranks[0]["train"]) == len(ranks[1]["train"])
    train_keys = [k for r in ranks for batch in r["train"] for k in batch]
    assert len(train_keys) == len(set(train_keys)), "a training sample was read by both ranks"
    rows = [tuple(row) for r in ranks for row in r["eval"]]
    expected = {(s.key, c) for s in SplitIndex(eval_dir).samples for c in range(4)}
    assert len(rows) == len(set(rows)) and set(rows) == expected


@pytest.mark.parametrize("loader", ["torch", "stream", pytest.param("dali", marks=pytest.mark.dali)])
def test_two_processes_one_node(train_shards, eval_shards, tmp_path, loader):
    if loader == "dali":
        pytest.importorskip("nvidia.dali")
    out = tmp_path / "seen.json"
    flags = ["--stream"] if loader == "stream" else ["--loader", loader]
    cmd = torchrun("--standalone", "--nproc_per_node=2", str(SCRIPT), str(train_shards), str(eval_shards), str(out),
                   *flags)  # fmt: skip
    run = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr[-3000:]
    check_ranks(out, train_shards, eval_shards)


def test_two_nodes_on_localhost(train_shards, eval_shards, tmp_path):
    out = tmp_path / "seen.json"
    port = free_port()

    def node(rank: int) -> subprocess.Popen:
        cmd = torchrun("--nnodes=2", "--nproc_per_node=1", f"--node_rank={rank}", "--rdzv_backend=c10d",
                       f"--rdzv_endpoint=127.0.0.1:{port}", "--rdzv_id=loader-test", str(SCRIPT), str(train_shards),
                       str(eval_shards), str(out))  # fmt: skip
        return subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)

    nodes = [node(0), node(1)]
    for node in nodes:
        output, _ = node.communicate(timeout=300)
        assert node.returncode == 0, output[-3000:]
    check_ranks(out, train_shards, eval_shards)
