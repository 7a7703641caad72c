"""Streamed splits (`pipe:` URLs): the stages alone (pipelines.pipe, .order, .reading), then the PyTorch loader over
the demo shards read through `pipe:cat` — evaluation equal to the indexed loader's, training epochs, resume, failing
commands and bad samples."""

from __future__ import annotations

import contextlib
import functools
import logging
import shutil
import threading
import time
from collections import Counter
from http.server import SimpleHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import numpy as np
import pytest
import torch
from loader_checks import SMALL_AUG, assert_same_batches, rows_by_key, stopped_and_resumed

from pipelines import build_loader
from pipelines.config import LoaderError
from pipelines.order import StreamUnit, shuffled, train_batches, train_units
from pipelines.pipe import PipeURL, as_pipe
from pipelines.reading import shard_samples
from pipelines.sources import SplitIndex, StreamSplit, is_stream_source, open_split, split_manifest
from pipelines.torch_loader import TorchLoader
from shards.manifest import load_manifest


def piped(folder, name="manifest.json") -> str:
    return f"pipe:cat {folder}/{name}"


def loader(source, train, batch_size=2, **kw) -> TorchLoader:
    kw.setdefault("augment", SMALL_AUG)
    kw.setdefault("num_workers", 0)
    return TorchLoader(open_split(source), train=train, batch_size=batch_size, **kw)


# The stages alone.


def test_pipe_url_names_its_file_and_siblings():
    url = PipeURL.parse("pipe:aws s3 cp s3://bucket/as/train/shard-000007.tar -")
    assert url.name == "shard-000007.tar"
    assert url.sibling("manifest.json") == "pipe:aws s3 cp s3://bucket/as/train/manifest.json -"
    quoted = PipeURL.parse("pipe:gsutil cat 'gs://b/x.tar/train/shard-000001.tar' | cat")
    assert quoted.name == "shard-000001.tar"
    assert quoted.sibling("a.json") == "pipe:gsutil cat 'gs://b/x.tar/train/a.json' | cat"
    assert PipeURL.parse("pipe:cat manifest.json").name == "manifest.json"
    with pytest.raises(LoaderError, match=r"must name the shard \(….tar\) or the split's manifest.json"):
        PipeURL.parse("pipe:aws s3 cp s3://bucket/as/train/ -")


def test_sources_are_either_streamed_or_local(train_shards):
    assert is_stream_source(piped(train_shards)) and is_stream_source([piped(train_shards)])
    assert not is_stream_source(str(train_shards)) and not is_stream_source(train_shards)
    with pytest.raises(LoaderError, match="not both"):
        is_stream_source([piped(train_shards), str(train_shards)])
    assert isinstance(open_split(str(train_shards)), SplitIndex)
    assert isinstance(open_split(piped(train_shards)), StreamSplit)


def test_shuffle_buffer_gives_every_item_once_in_a_seeded_order():
    items = list(range(50))
    out = list(shuffled(iter(items), 8, np.random.default_rng(0)))
    assert sorted(out) == items and out != items
    assert out == list(shuffled(iter(items), 8, np.random.default_rng(0)))
    assert list(shuffled(iter(items), 1, np.random.default_rng(0))) == items  # a buffer of one keeps the order


@pytest.mark.parametrize(("sizes", "readers"), [([512] * 10, 4), ([2, 2, 2, 2, 1], 8), ([3, 1], 5), ([100] * 3, 3)])
def test_units_cover_the_shards_once_and_feed_every_reader(sizes, readers):
    quotas = [max(sum(sizes) // readers, 1)] * readers
    dealt = train_units(sizes, quotas, seed=0, epoch=0)
    assert len(dealt) == readers and all(sum(u.size(sizes) for u in units) for units in dealt)
    parts = -(-readers // len(sizes))
    assert all(u.parts == parts for units in dealt for u in units)
    read = Counter((u.shard, i) for units in dealt for u in units for i in range(u.part, sizes[u.shard], u.parts))
    assert set(read) == {(s, i) for s, size in enumerate(sizes) for i in range(size)}
    with_samples = sum(StreamUnit(s, p, parts).size(sizes) > 0 for s in range(len(sizes)) for p in range(parts))
    if with_samples >= readers:
        assert set(read.values()) == {1}  # no sample is read by two readers
    assert any(train_units(sizes, quotas, seed=0, epoch=e) != dealt for e in range(1, 5))  # epochs deal anew


def test_units_follow_the_quotas():
    dealt = train_units([10] * 12, [60, 30, 30], seed=3, epoch=0)
    assert [sum(u.size([10] * 12) for u in units) for units in dealt] == [60, 30, 30]
    assert train_units([10] * 12, [60, 30, 0], seed=3, epoch=0)[2] == []  # no batches, no shards


# The loader over pipe:cat of the demo shards.


@pytest.mark.slow
@pytest.mark.parametrize("world_size", [1, 2, 3])
@pytest.mark.parametrize(("batch_size", "num_workers"), [(1, 0), (2, 2), (5, 2)])
def test_streamed_evaluation_equals_the_indexed_loader(eval_shards, train_shards, world_size, batch_size, num_workers):
    for folder in (eval_shards, train_shards):
        indexed, streamed = {}, {}
        for rank in range(world_size):
            kw = {"rank": rank, "world_size": world_size}
            indexed.update(rows_by_key(loader(folder, False, batch_size, **kw)))
            part = rows_by_key(loader(piped(folder), False, batch_size, num_workers=num_workers, **kw))
            assert not set(part) & set(streamed)
            streamed.update(part)
        assert set(streamed) == set(indexed)
        for ident, row in indexed.items():
            for name in ("video", "audio", "labels"):
                assert torch.equal(row[name], streamed[ident][name]), (ident, name)


@pytest.fixture
def http_server(eval_shards):
    """The evaluation split served over HTTP on the loopback address, for the test's length."""
    handler = functools.partial(SimpleHTTPRequestHandler, directory=str(eval_shards))
    handler.log_message = lambda *args: None  # type: ignore[method-assign]
    with ThreadingHTTPServer(("127.0.0.1", 0), handler) as server:
        thread = threading.Thread(target=server.serve_forever, daemon=True)
        thread.start()
        yield f"http://127.0.0.1:{server.server_address[1]}"
        server.shutdown()
        thread.join(timeout=10)


@pytest.mark.skipif(shutil.which("curl") is None, reason="http(s) URLs are streamed with curl")
def test_http_urls_are_streamed_with_curl(eval_shards, http_server):
    assert as_pipe(f"{http_server}/manifest.json") == f"pipe:curl -fsSL --retry 3 {http_server}/manifest.json"
    assert as_pipe("s3://b/x y/shard-000001.tar") == "pipe:aws s3 cp 's3://b/x y/shard-000001.tar' -"
    streamed = rows_by_key(loader(f"{http_server}/manifest.json", False, 2, num_workers=2))
    indexed = rows_by_key(loader(eval_shards, False, 2))
    assert set(streamed) == set(indexed)
    assert all(torch.equal(streamed[i]["video"], indexed[i]["video"]) for i in indexed)
    assert len(StreamSplit(f"{http_server}/shard-{{000000..000001}}.tar")) == 3
    with pytest.raises(LoaderError, match=r"/missing/manifest.json: the command exited with status 22: .*404"):
        StreamSplit(f"{http_server}/missing/manifest.json")


def test_brace_pattern_of_shard_urls(train_shards):
    split = StreamSplit(piped(train_shards, "shard-{000001..000002}.tar"))
    assert [url.rsplit("/", 1)[1] for url in split.urls] == ["shard-000001.tar", "shard-000002.tar"]
    assert len(split) == 4 and split.manifest.logmel == load_manifest(train_shards).logmel
    rows = rows_by_key(loader(split, False, 3))
    indexed = SplitIndex(str(train_shards / "shard-{000001..000002}.tar"))
    assert {k for k, _ in rows} == {s.key for s in indexed.samples}


def test_two_streamed_splits_are_one(train_shards, eval_shards):
    split = StreamSplit([piped(train_shards), piped(eval_shards)])
    assert len(split) == 12 and len(split.urls) == 7
    assert split.manifest.logmel == load_manifest(train_shards).logmel + load_manifest(eval_shards).logmel


@pytest.mark.slow
@pytest.mark.parametrize("world_size", [1, 2, 3, 4])
@pytest.mark.parametrize(("batch_size", "num_workers"), [(1, 0), (2, 2), (3, 1)])
def test_streamed_training_epochs(train_shards, world_size, batch_size, num_workers):
    expected = train_batches(9, batch_size, world_size)
    by_rank = []
    for rank in range(world_size):
        run = loader(piped(train_shards), True, batch_size, rank=rank, world_size=world_size, num_workers=num_workers)
        batches = list(run)
        assert len(run) == len(batches) == expected
        assert all(len(b["key"]) == batch_size and b["video"].shape[0] == batch_size for b in batches)
        by_rank.append({k for b in batches for k in b["key"]})
    for i, keys in enumerate(by_rank):
        assert not keys & set().union(*by_rank[i + 1 :]), "a sample was read by two ranks"


def test_streamed_training_is_seeded_and_reshuffles(train_shards):
    run = loader(piped(train_shards), True, batch_size=3)
    first, second = [b["key"] for b in run], [b["key"] for b in run]  # epochs 0 and 1
    keys = {s.key for s in SplitIndex(train_shards).samples}
    assert sorted(k for b in first for k in b) == sorted(keys)  # one reader whose quota is the split: all of it
    assert first != second and sorted(k for b in second for k in b) == sorted(keys)
    assert [b["key"] for b in loader(piped(train_shards), True, batch_size=3)] == first
    assert [b["key"] for b in loader(piped(train_shards), True, batch_size=3, seed=5)] != first


@pytest.mark.slow
@pytest.mark.parametrize("num_workers", [0, 2])
def test_streamed_resume_continues_the_stream(train_shards, num_workers):
    kw = {"batch_size": 1, "num_workers": num_workers}
    uninterrupted = list(loader(piped(train_shards), True, **kw))
    batches, state, _ = stopped_and_resumed(lambda: loader(piped(train_shards), True, **kw), 3)
    assert state == {"epoch": 0, "batches": 3, "readers": max(num_workers, 1)}
    assert_same_batches(batches, uninterrupted)


@pytest.mark.slow
def test_a_pass_left_half_way_does_not_disturb_the_next(train_shards):
    run = loader(piped(train_shards), True, batch_size=1, num_workers=2)
    stream = iter(run)
    for _ in range(2):
        next(stream)
    del stream  # as training does when an epoch's last batches are not needed (grad_accum)
    run.set_epoch(1)
    fresh = loader(piped(train_shards), True, batch_size=1, num_workers=2)
    fresh.set_epoch(1)
    assert [b["key"] for b in run] == [b["key"] for b in fresh]


def test_resume_with_other_readers_warns(train_shards, caplog):
    run = loader(piped(train_shards), True, batch_size=1)
    with caplog.at_level(logging.WARNING):
        run.load_state_dict({"epoch": 0, "batches": 2, "readers": 4})
    assert "read by 4 readers (ranks x workers), now by 1" in caplog.text
    assert len(list(run)) == 9 - 2


def test_dali_refuses_streams_and_auto_streams_with_torch(train_shards):
    with pytest.raises(LoaderError, match="DALI's webdataset reader reads local files only"):
        build_loader(open_split(piped(train_shards)), True, 2, loader="dali", augment=SMALL_AUG)
    assert isinstance(
        build_loader(open_split(piped(train_shards)), True, 2, loader="auto", augment=SMALL_AUG), TorchLoader
    )


def test_split_manifest_reads_streamed_and_local_splits(train_shards):
    assert split_manifest(piped(train_shards)) == load_manifest(train_shards)
    assert split_manifest(str(train_shards / "shard-{000000..000001}.tar")) == load_manifest(train_shards)


# Failures: each names the URL (or shard and key) and says what to do.


def test_manifest_command_that_fails(train_shards, tmp_path):
    failed = r"(?s)/nowhere/manifest.json: the command exited with status 1: .*No such.*read 3 times"
    with pytest.raises(LoaderError, match=failed):
        StreamSplit("pipe:cat /nowhere/manifest.json")
    with pytest.raises(LoaderError, match=r"\['shard-000099.tar'\] not in this manifest"):
        StreamSplit(piped(train_shards, "shard-000099.tar"))
    (tmp_path / "manifest.json").write_text("{")
    with pytest.raises(LoaderError, match="not valid JSON"):
        StreamSplit(piped(tmp_path))


def test_a_manifest_command_that_fails_once_is_run_again(train_shards, tmp_path, caplog):
    marker = tmp_path / "failed-once"
    flaky = f"pipe:if [ -e {marker} ]; then cat {train_shards}/manifest.json; else touch {marker}; exit 1; fi"
    with caplog.at_level(logging.WARNING):
        assert len(StreamSplit(flaky)) == 9
    assert "reading it again" in caplog.text


def test_cut_stream_is_read_again_then_named(eval_shards, caplog):
    shard = load_manifest(eval_shards).shards[0]
    url = f"pipe:head -c 30000 {eval_shards}/{shard.name}"
    with caplog.at_level(logging.WARNING), pytest.raises(LoaderError) as err:
        list(shard_samples(url, shard))
    assert str(err.value).startswith(f"{url}: cut short in member ") and "read 3 times" in str(err.value)
    assert caplog.text.count("reading it again") == 2


def test_a_failure_half_way_is_retried_without_repeating_samples(eval_shards, tmp_path):
    shard = load_manifest(eval_shards).shards[0]
    path = eval_shards / shard.name
    marker = tmp_path / "failed-once"
    size = path.stat().st_size
    # The first run gives the first sample and part of the second, then fails; the second run gives all of it.
    flaky = f"pipe:if [ -e {marker} ]; then cat {path}; else touch {marker}; head -c {size - 3000} {path}; exit 3; fi"
    got = [(i, key) for i, key, _ in shard_samples(flaky, shard)]
    assert got == [(i, key) for i, key, _ in shard_samples(piped(eval_shards, shard.name), shard)]
    assert marker.exists()


def test_another_file_behind_the_url_is_refused(eval_shards):
    shard = load_manifest(eval_shards).shards[0]
    url = f"pipe:cat {eval_shards}/{shard.name}; echo extra"
    with pytest.raises(LoaderError, match=r"bytes, the manifest says .*another file"):
        list(shard_samples(url, shard, retries=0))
    other = load_manifest(eval_shards).shards[1]
    with pytest.raises(LoaderError, match=r"1 samples, the manifest says 2"):
        list(shard_samples(f"pipe:cat {eval_shards}/{other.name}", shard, retries=0))


def test_streamed_corrupt_sample_names_shard_and_key_or_is_skipped(eval_shards, tmp_path):
    damaged = shutil.copytree(eval_shards, tmp_path / "eval")
    ref = SplitIndex(damaged).samples[0]
    offset, size = ref.members["frame03.jpg"]
    tar = damaged / "shard-000000.tar"
    data = bytearray(tar.read_bytes())
    data[offset : offset + size] = b"\0" * size
    tar.write_bytes(bytes(data))
    with pytest.raises(LoaderError, match=rf"shard-000000\.tar: sample {ref.key}: bad JPEG.*--skip-bad-samples"):
        list(loader(piped(damaged), False, num_workers=2))
    run = loader(piped(damaged), False, skip_bad_samples=True)
    assert {k for k, _ in rows_by_key(run)} == {s.key for s in SplitIndex(damaged).samples} - {ref.key}
    assert len(run.skipped) == 1 and ref.key in run.skipped[0]
    train_run = loader(piped(damaged), True, batch_size=3, skip_bad_samples=True)
    assert [len(b["key"]) for b in train_run] == [3]  # training: the stream's next sample takes its place


def _running(marker: str) -> list[str]:
    """Command lines of the processes that contain `marker`."""
    found = []
    for cmdline in Path("/proc").glob("[0-9]*/cmdline"):
        with contextlib.suppress(OSError):
            text = cmdline.read_bytes().replace(b"\0", b" ").decode(errors="replace")
            if marker in text:
                found.append(text)
    return found


def test_a_stream_left_half_way_stops_its_whole_command(eval_shards):
    shard = load_manifest(eval_shards).shards[0]
    marker = "sleep 31.4159"  # a second process of the command, as in 'aws s3 cp … - | zstd -d'
    url = f"pipe:{marker} & cat {eval_shards}/{shard.name}; wait"
    with contextlib.closing(shard_samples(url, shard)) as samples:
        assert next(samples)[0] == 0
        assert _running(marker)
    deadline = time.monotonic() + 10
    while _running(marker) and time.monotonic() < deadline:
        time.sleep(0.01)
    assert not _running(marker)
