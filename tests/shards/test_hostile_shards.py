"""Shards, indexes and manifests from a shared bucket may be hostile: each case below is refused with a message naming
the file or key, and nothing else is lost (the other samples are read, the rest of the split intact)."""

from __future__ import annotations

import json
import os
import resource
import shutil
import subprocess
import sys
import time
import tracemalloc
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
from conftest import REPO
from loader_checks import SMALL_AUG, rewrite_split, rows_by_key

from pipelines import open_split
from pipelines.config import LoaderError
from pipelines.pipe import PipeURL
from pipelines.reading import SampleReader, shard_samples
from pipelines.sources import SplitIndex, StreamSplit
from pipelines.torch_loader import TorchLoader
from preprocess.verify import verify_split
from shards.manifest import MAX_MANIFEST_BYTES, load_manifest
from shards.schema import LABELS_DTYPE, LABELS_EXT, LOGMEL_DTYPE, LOGMEL_EXT, SchemaError, frame_ext
from shards.tar import iter_tar_samples
from shards.writer import ShardWriter


def damage_first(change: Callable[[dict[str, bytes]], dict[str, bytes]]) -> Callable[[dict[str, bytes]], dict]:
    """A rewrite that changes the first sample only."""
    done: list[bool] = []

    def rewrite(members: dict[str, bytes]) -> dict[str, bytes]:
        if done:
            return members
        done.append(True)
        return change(members)

    return rewrite


def first_key(split: Path) -> str:
    return next(iter_tar_samples(split / load_manifest(split).shards[0].name))[0]


def evaluation(split: Path, **kw) -> TorchLoader:
    return TorchLoader(open_split(split), False, 4, augment=SMALL_AUG, num_workers=0, **kw)


def read_all(loader: TorchLoader) -> dict:
    return rows_by_key(loader)


# Samples whose members lie: each is a named bad sample, skippable; the other samples are read.


def labels(*values: int) -> Callable[[dict[str, bytes]], dict[str, bytes]]:
    return lambda members: {**members, LABELS_EXT: np.array(values, LABELS_DTYPE).tobytes()}


def nan_logmel(members: dict[str, bytes]) -> dict[str, bytes]:
    values = np.frombuffer(members[LOGMEL_EXT], LOGMEL_DTYPE).copy()
    values[7], values[900] = np.nan, np.inf
    return {**members, LOGMEL_EXT: values.tobytes()}


def huge_jpeg(members: dict[str, bytes]) -> dict[str, bytes]:
    """frame00 with its frame header claiming 60000 x 60000 pixels (10 GB decoded)."""
    jpeg = bytearray(members[frame_ext(0)])
    sof = next(i for i in range(2, len(jpeg) - 1) if jpeg[i] == 0xFF and jpeg[i + 1] in (0xC0, 0xC1, 0xC2))
    jpeg[sof + 5 : sof + 9] = (60000).to_bytes(2, "big") * 2
    return {**members, frame_ext(0): bytes(jpeg)}


CASES = [
    ("label_minus_one", labels(-1), r"labels \[-1\] are not sorted distinct indices in 0\.\.11"),
    ("label_out_of_range", labels(3, 527), r"labels \[3, 527\] are not .* in 0\.\.11"),
    ("labels_odd_length", lambda m: {**m, LABELS_EXT: b"\x01\x00\x00"}, "has 3 bytes, not a whole number of int32"),
    ("labels_unsorted", labels(4, 2), "not sorted distinct"),
    ("logmel_nan", nan_logmel, "logmel.f16 holds 2 NaN or infinite values"),
    ("huge_jpeg", huge_jpeg, r"bad JPEG \(frames are 60000x60000 \(frame00\.jpg\)"),
]


@pytest.mark.slow
@pytest.mark.parametrize(("name", "change", "message"), CASES, ids=[c[0] for c in CASES])
def test_bad_sample_is_named_and_skippable(train_shards: Path, tmp_path: Path, name: str, change, message: str) -> None:
    split = rewrite_split(train_shards, tmp_path / name, damage_first(change))
    key = first_key(split)
    with pytest.raises(LoaderError, match=rf"shard-000000\.tar: sample {key}: .*{message}.*--skip-bad-samples"):
        read_all(evaluation(split))
    loader = evaluation(split, skip_bad_samples=True)
    rows = read_all(loader)
    assert {k for k, _ in rows} == {k for k, _ in read_all(evaluation(train_shards))} - {key}
    assert len(loader.skipped) == 1 and key in loader.skipped[0]
    report = verify_split(split, decode_jpeg=False)  # verify names it too, without decoding anything
    assert len(report.errors) == 1 and key in report.errors[0]


def test_single_label_split_with_several_labels_names_the_key(train_shards: Path, tmp_path: Path) -> None:
    split = rewrite_split(train_shards, tmp_path / "single", lambda m: m)
    data = json.loads((split / "manifest.json").read_text())
    data["multi_label"] = False
    (split / "manifest.json").write_text(json.dumps(data))
    with pytest.raises(LoaderError, match=r"sample \S+: labels \[.*\]: the split is single-label"):
        read_all(evaluation(split))


@pytest.mark.dali
@pytest.mark.parametrize("name", ["label_minus_one", "label_out_of_range", "logmel_nan"])
def test_dali_names_bad_samples_it_cannot_skip(train_shards: Path, tmp_path: Path, name: str) -> None:
    pytest.importorskip("nvidia.dali")
    from pipelines.dali_loader import DaliLoader

    change = next(c for n, c, _ in CASES if n == name)
    split = rewrite_split(train_shards, tmp_path / name, damage_first(change))
    key = first_key(split)
    with pytest.raises(LoaderError, match=rf"sample {key}: .*the DALI loader cannot skip bad samples"):
        list(DaliLoader(open_split(split), False, 3, augment=SMALL_AUG))


# Index files and manifests that lie.


def test_index_with_offsets_outside_the_shard(train_shards: Path, tmp_path: Path) -> None:
    split = Path(shutil.copytree(train_shards, tmp_path / "split"))
    index = split / "shard-000001.idx"
    lines = index.read_text().splitlines()
    fields = lines[1].split()
    fields[1] = str(10**12)
    index.write_text("\n".join([lines[0], " ".join(fields), *lines[2:]]) + "\n")
    with pytest.raises(LoaderError, match=rf"{index}:2: member .* lies outside shard-000001\.tar"):
        SplitIndex(split)


def rewrite_index(split: Path, change: Callable[[list[list[str]]], None]) -> tuple[Path, list[str]]:
    """shard-000000.idx of `split` with its sample lines (as lists of fields) changed in place by `change`; returns
    the index file and the keys of its samples."""
    index = split / "shard-000000.idx"
    header, *lines = index.read_text().splitlines()
    samples = [line.split() for line in lines]
    keys = [fields[3].split(".", 1)[0] for fields in samples]
    change(samples)
    index.write_text("\n".join([header, *(" ".join(fields) for fields in samples)]) + "\n")
    return index, keys


def swap_member(ext: str) -> Callable[[list[list[str]]], None]:
    """Swap the offsets and sizes of member `ext` of the first two samples: each entry in range, at another
    sample's bytes."""

    def change(samples: list[list[str]]) -> None:
        first, second = (fields.index(ext) for fields in samples[:2])
        samples[0][first + 1 : first + 3], samples[1][second + 1 : second + 3] = (
            samples[1][second + 1 : second + 3], samples[0][first + 1 : first + 3])  # fmt: skip

    return change


def into_payload(samples: list[list[str]]) -> None:
    """The first sample's log-mel entry moved one block into its own payload (a multiple of 512, inside the shard)."""
    at = samples[0].index(LOGMEL_EXT)
    samples[0][at + 1] = str(int(samples[0][at + 1]) + 512)


@pytest.mark.parametrize("ext", [LABELS_EXT, frame_ext(0)])
def test_index_pointing_at_another_samples_member(train_shards: Path, tmp_path: Path, ext: str) -> None:
    split = Path(shutil.copytree(train_shards, tmp_path / "split"))
    index, keys = rewrite_index(split, swap_member(ext))
    message = rf"{index}: sample {keys[0]}: {ext} at byte \d+ of shard-000000\.tar: the tar header before it is "
    with pytest.raises(LoaderError, match=message + rf"member '{keys[1]}\.{ext}', not {keys[0]}\.{ext}; .*re-run"):
        read_all(evaluation(split))
    loader = evaluation(split, skip_bad_samples=True)
    assert {k for k, _ in read_all(loader)} == {k for k, _ in read_all(evaluation(train_shards))} - set(keys)
    assert len(loader.skipped) == 2


def test_index_pointing_inside_a_payload(train_shards: Path, tmp_path: Path) -> None:
    split = Path(shutil.copytree(train_shards, tmp_path / "split"))
    index, keys = rewrite_index(split, into_payload)
    with pytest.raises(LoaderError, match=rf"{index}: sample {keys[0]}: {LOGMEL_EXT} .*: no tar header before it"):
        read_all(evaluation(split))


@pytest.mark.dali
def test_dali_refuses_an_index_pointing_at_another_samples_member(train_shards: Path, tmp_path: Path) -> None:
    pytest.importorskip("nvidia.dali")
    from pipelines.dali_loader import DaliLoader

    split = Path(shutil.copytree(train_shards, tmp_path / "split"))
    index, keys = rewrite_index(split, swap_member(LOGMEL_EXT))
    message = rf"{index}: sample {keys[0]}: {LOGMEL_EXT} .*member '{keys[1]}\.{LOGMEL_EXT}'.*cannot skip bad samples"
    with pytest.raises(LoaderError, match=message):
        list(DaliLoader(open_split(split), False, 3, augment=SMALL_AUG))
    assert len(list(DaliLoader(open_split(train_shards), False, 3, augment=SMALL_AUG))) == 3  # the sound split reads


def test_local_manifest_naming_files_outside_its_folder(train_shards: Path, tmp_path: Path) -> None:
    split = Path(shutil.copytree(train_shards, tmp_path / "split"))
    data = json.loads((split / "manifest.json").read_text())
    data["shards"][0]["name"] = "../../../etc/passwd"
    (split / "manifest.json").write_text(json.dumps(data))
    with pytest.raises(LoaderError, match=r"manifest\.json: shard name '\.\./\.\./\.\./etc/passwd' is not one"):
        SplitIndex(split)
    assert "passwd" in " ".join(verify_split(split).errors)


def test_streamed_manifest_cannot_run_a_command(train_shards: Path, tmp_path: Path) -> None:
    """A shard name in a bucket's manifest is never pasted into the pipe: command (it would run on every node)."""
    split = Path(shutil.copytree(train_shards, tmp_path / "split"))
    marker = tmp_path / "pwned"
    data = json.loads((split / "manifest.json").read_text())
    data["shards"][0]["name"] = f"x.tar; touch {marker}; echo shard-000000.tar"
    (split / "manifest.json").write_text(json.dumps(data))
    with pytest.raises(LoaderError, match=r"manifest\.json: shard name .* is not one the shard writer gives"):
        StreamSplit(f"pipe:cat {split}/manifest.json")
    assert not marker.exists()


def test_sibling_names_are_quoted_for_the_shell() -> None:
    url = PipeURL.parse("pipe:aws s3 cp s3://b/as/train/manifest.json -")
    assert url.sibling("shard-000001.tar") == "pipe:aws s3 cp s3://b/as/train/shard-000001.tar -"
    assert url.sibling("a b;c.tar") == "pipe:aws s3 cp s3://b/as/train/'a b;c.tar' -"


def test_a_stream_that_never_ends_is_stopped_past_the_manifests_bytes(train_shards: Path) -> None:
    shard = load_manifest(train_shards).shards[0]
    url = f"pipe:cat {train_shards}/{shard.name} /dev/zero"
    with pytest.raises(LoaderError, match=rf"bytes, the manifest says {shard.bytes} \(another file, or no end"):
        list(shard_samples(url, shard, retries=0))


# Open files: a split with more shards than the open-file limit.


def test_reader_keeps_at_most_max_open_shards_open(train_shards: Path) -> None:
    index = SplitIndex(train_shards)
    reader = SampleReader(index, max_open=2)
    before = len(os.listdir("/proc/self/fd"))
    for ref in index.samples:
        reader.read(ref, [LABELS_EXT])
        assert len(os.listdir("/proc/self/fd")) <= before + 2
    reader.close()
    assert len(os.listdir("/proc/self/fd")) == before


def one_sample_shards(source: Path, out: Path, count: int) -> Path:
    """`count` shards of one sample each, cycling through the samples of `source`."""
    manifest = load_manifest(source)
    samples = [s for shard in manifest.shards for s in iter_tar_samples(source / shard.name)]
    out.mkdir()
    infos = []
    for i in range(count):
        key, members = samples[i % len(samples)]
        with ShardWriter(out / f"shard-{i:06d}.tar") as writer:
            writer.add(f"{key}-{i}", [(f"{key}-{i}.{ext}", payload) for ext, payload in members.items()])
            infos.append(writer.close())
    manifest.shards = infos
    manifest.write(out)
    return out


@pytest.mark.slow
def test_more_shards_than_the_open_file_limit(train_shards: Path, tmp_path: Path) -> None:
    split = one_sample_shards(train_shards, tmp_path / "many", 300)
    limit = 200
    script = (
        "import resource, sys\n"
        f"resource.setrlimit(resource.RLIMIT_NOFILE, ({limit}, {limit}))\n"
        "from loader_checks import SMALL_AUG\n"
        "from pipelines import open_split\nfrom pipelines.torch_loader import TorchLoader\n"
        f"loader = TorchLoader(open_split({str(split)!r}), False, 8, augment=SMALL_AUG, num_workers=0)\n"
        "rows = sum(len(b['key']) for b in loader)\n"
        "print(rows)\n"
    )
    env = {**os.environ, "PYTHONPATH": f"{REPO / 'tests' / 'support'}{os.pathsep}{os.environ.get('PYTHONPATH', '')}"}
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, cwd=REPO, env=env)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert int(proc.stdout) == 300 * SMALL_AUG.num_test_clips
    assert resource.getrlimit(resource.RLIMIT_NOFILE)[0] >= limit  # the limit was lowered in the child only


def test_a_stalled_stream_is_given_up(monkeypatch: pytest.MonkeyPatch, train_shards: Path) -> None:
    monkeypatch.setattr("pipelines.pipe.STREAM_STALL_S", 1.0)
    shard = load_manifest(train_shards).shards[0]
    url = f"pipe:sleep 60; cat {train_shards}/{shard.name}"
    with pytest.raises(LoaderError, match="no data for 1 s"):
        list(shard_samples(url, shard, retries=0))


TRICKLE = """import sys, time
data = open(sys.argv[1], "rb").read()
for i in range(0, len(data), 1024):  # 1 KB every 50 ms: never a stall
    sys.stdout.buffer.write(data[i : i + 1024])
    sys.stdout.buffer.flush()
    time.sleep(0.05)
"""


@pytest.fixture
def one_second_deadline(monkeypatch: pytest.MonkeyPatch) -> None:
    """Streams may keep their reader waiting 1 s in all (at most; a rate no stream reaches)."""
    monkeypatch.setattr("pipelines.pipe.STREAM_DEADLINE_MIN_S", 1.0)
    monkeypatch.setenv("MBT_STREAM_MIN_BYTES_PER_S", "1e12")


def test_a_trickling_stream_is_given_up_at_its_deadline(
    one_second_deadline: None, train_shards: Path, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    script = tmp_path / "trickle.py"
    script.write_text(TRICKLE)
    shard = load_manifest(train_shards).shards[0]
    url = f"pipe:{sys.executable} {script} {train_shards}/{shard.name}"  # ~7 s for the whole shard
    started = time.monotonic()
    with pytest.raises(LoaderError, match=r"bytes after waiting 1 s in all for data, past the stream's deadline .*"
                                          r"MBT_STREAM_MIN_BYTES_PER_S(.|\n)*read 2 times"):  # fmt: skip
        list(shard_samples(url, shard, retries=1))
    assert time.monotonic() - started < 5
    assert "reading it again" in caplog.text  # the path of a stall: read again, then named


def test_only_waiting_for_data_counts_against_the_deadline(one_second_deadline: None, train_shards: Path) -> None:
    shard = load_manifest(train_shards).shards[0]
    samples = []
    for sample in shard_samples(f"pipe:cat {train_shards}/{shard.name}", shard, retries=0):
        samples.append(sample)
        time.sleep(0.7)  # a slow consumer: 1.4 s in all
    assert len(samples) == shard.num_samples == 2


def test_a_minimum_rate_that_is_not_a_number_is_named(monkeypatch: pytest.MonkeyPatch, train_shards: Path) -> None:
    monkeypatch.setenv("MBT_STREAM_MIN_BYTES_PER_S", "fast")
    shard = load_manifest(train_shards).shards[0]
    with pytest.raises(LoaderError, match="MBT_STREAM_MIN_BYTES_PER_S='fast' is not a positive number"):
        list(shard_samples(f"pipe:cat {train_shards}/{shard.name}", shard))


def test_manifest_with_nan_statistics_fails_verification(train_shards: Path, tmp_path: Path) -> None:
    split = Path(shutil.copytree(train_shards, tmp_path / "split"))
    data = json.loads((split / "manifest.json").read_text())
    data["logmel"]["sum"] = float("nan")
    (split / "manifest.json").write_text(json.dumps(data))  # Python writes NaN, as a poisoned job once did
    report = verify_split(split)
    assert not report.ok and "NaN is not a number JSON allows" in report.errors[0]
    with pytest.raises(LoaderError, match="NaN is not a number JSON allows"):
        SplitIndex(split)


def test_a_manifest_larger_than_its_bound_is_refused_before_it_is_read(train_shards: Path, tmp_path: Path) -> None:
    """Before: the whole file was read, then parsed (600 MB here, of a sparse file that takes no disk)."""
    split = Path(shutil.copytree(train_shards, tmp_path / "split"))
    tracemalloc.start()
    load_manifest(split)
    normal = tracemalloc.get_traced_memory()[1]
    tracemalloc.reset_peak()
    with open(split / "manifest.json", "r+b") as f:
        f.truncate(MAX_MANIFEST_BYTES + (64 << 20))
    try:
        too_large = rf"manifest\.json: cannot be read as a manifest \(larger than {MAX_MANIFEST_BYTES} bytes\)"
        with pytest.raises(SchemaError, match=too_large):
            load_manifest(split)
        hostile = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert hostile < 2 * normal, (hostile, normal)
    with pytest.raises(LoaderError, match="larger than"):
        SplitIndex(split)
