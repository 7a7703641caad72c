"""The compact sample table: on the demo's real shards it gives the SampleRefs that reading the tars gives; the
whole-file index parse (`plain_index_table`) takes the writer's indexes, and `parse_index` gives the same samples or
the same error with it as with the line-by-line parse alone, on mutated indexes.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import shards.index
from pipelines.sources import SplitIndex
from shards.index import IndexFileError, parse_index, plain_index_table
from shards.manifest import ShardInfo, load_manifest
from shards.sample_table import SampleRef, SampleTable
from shards.tar import tar_members
from shards.writer import ShardWriter

PROPERTY = settings(max_examples=300, deadline=2000, suppress_health_check=[HealthCheck.function_scoped_fixture])


def refs_from_tars(folder: Path) -> list[SampleRef]:
    """Every sample of the split in `folder`, read from its tars (not its indexes), in shard order."""
    refs: list[SampleRef] = []
    for number, shard in enumerate(load_manifest(folder).shards):
        with open(folder / shard.name, "rb") as f:
            for member in tar_members(f, os.fstat(f.fileno()).st_size, exts=frozenset()):
                if not refs or refs[-1].key != member.key or refs[-1].shard != number:
                    refs.append(SampleRef(shard=number, key=member.key, members={}))
                refs[-1].members[member.ext] = (member.offset, member.size)
    return refs


def table_items(table: SampleTable) -> list[SampleRef]:
    return [table[i] for i in range(len(table))]


@pytest.mark.parametrize("fixture", ["train_shards", "eval_shards"])
def test_split_index_gives_the_tars_samples(fixture: str, request: pytest.FixtureRequest) -> None:
    folder = request.getfixturevalue(fixture)
    index = SplitIndex(folder)
    expected = refs_from_tars(folder)
    assert len(index.samples) == len(index) == len(expected) > 2
    assert list(index.samples) == table_items(index.samples) == expected
    assert index.samples[-1] == expected[-1]
    shards = len(load_manifest(folder).shards)  # 4-byte offsets, sizes, key ends and first members, 1-byte ext ids
    per_sample = sum(9 * len(ref.members) + 8 + len(ref.key) for ref in expected)
    assert index.samples.nbytes == per_sample + 8 + 8 * (shards + 1)
    with pytest.raises(IndexError):
        index.samples[len(expected)]


@pytest.mark.parametrize("fixture", ["train_shards", "eval_shards"])
def test_whole_file_and_line_parse_agree_on_real_indexes(
    fixture: str, request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch
) -> None:
    folder = request.getfixturevalue(fixture)
    for shard in load_manifest(folder).shards:
        path = folder / shard.index_name
        fast = plain_index_table(path.read_bytes(), shard.bytes)
        assert fast is not None  # the writer's indexes take the whole-file path
        assert line_parse(path, shard, monkeypatch) == table_items(fast)


def test_tables_concatenate_in_shard_order() -> None:
    one = SampleTable.of_shard([b"a", b"bb"], [b"jpg", b"cls", b"jpg"], np.array([512, 1024, 2048]),
                               np.array([10, 4, 20]), np.array([2, 1]))  # fmt: skip
    empty = SampleTable.of_shard([], [], np.zeros(0, np.int64), np.zeros(0, np.int64), np.zeros(0, np.int64))
    two = SampleTable.of_shard([b"c"], [b"cls"], np.array([5 << 32]), np.array([7]), np.array([1]))
    table = SampleTable.concat([one, empty, two])
    assert table_items(table) == [
        SampleRef(0, "a", {"jpg": (512, 10), "cls": (1024, 4)}),
        SampleRef(0, "bb", {"jpg": (2048, 20)}),
        SampleRef(2, "c", {"cls": (5 << 32, 7)}),
    ]
    assert table.exts == ("jpg", "cls") and table.member_ext.dtype == np.uint8
    assert table.member_offset.dtype == np.int64 and table.member_size.dtype == np.uint32  # past 4 GiB: 8 bytes
    assert len(SampleTable.concat([])) == 0


@pytest.fixture
def shard(tmp_path: Path) -> tuple[Path, ShardInfo]:
    with ShardWriter(tmp_path / "shard-000000.tar") as writer:
        for key in ("a", "b-1", "-c_2"):
            writer.add(
                key, [(f"{key}.frame00.jpg", b"\xff\xd8" + bytes(600) + b"\xff\xd9"), (f"{key}.labels.i32", b"1234")]
            )
        info = writer.close()
    return tmp_path, info


def parsed(path: Path, info: ShardInfo) -> list[SampleRef] | str:
    """The samples `parse_index` gives, or its error message."""
    try:
        return table_items(parse_index(path, info))
    except IndexFileError as err:
        return str(err)


def line_parse(path: Path, info: ShardInfo, monkeypatch: pytest.MonkeyPatch) -> list[SampleRef] | str:
    """`parsed` with the whole-file path turned off (every index line by line, as before the whole-file path)."""
    with monkeypatch.context() as patched:
        patched.setattr(shards.index, "plain_index_table", lambda data, shard_bytes: None)
        return parsed(path, info)


@PROPERTY
@given(st.data())
def test_whole_file_parse_accepts_only_what_the_line_parse_accepts(
    shard: tuple[Path, ShardInfo],
    tmp_path_factory: pytest.TempPathFactory,
    monkeypatch: pytest.MonkeyPatch,
    data: st.DataObject,
) -> None:
    folder, info = shard
    text = bytearray((folder / info.index_name).read_bytes())
    for _ in range(data.draw(st.integers(1, 4))):
        at = data.draw(st.integers(0, len(text)))
        edit = data.draw(st.sampled_from(["put", "insert", "delete"]))
        char = data.draw(st.sampled_from(b"0123456789 -._\n\t\r/av"))
        if edit == "put" and at < len(text):
            text[at] = char
        elif edit == "insert":
            text.insert(at, char)
        else:
            del text[at : at + 1]
    path = tmp_path_factory.mktemp("idx") / info.index_name
    path.write_bytes(bytes(text))
    assert parsed(path, info) == line_parse(path, info, monkeypatch)


@pytest.mark.parametrize(
    "edit",
    [
        lambda t: t.replace(b"labels.i32 2048 4 a.labels.i32", b"frame00.jpg 2048 4 a.frame00.jpg"),  # ext twice
        lambda t: t.replace(b" 2048 ", b" 0000000000002048 ", 1),  # 16 digits
        lambda t: t.replace(b"labels.i32", b"l" * 65, 2),  # a 65-character extension
        lambda t: t.replace(b" 2048 ", b"  2048 ", 1),  # two spaces
        lambda t: t.replace(b" ", b"\t"),  # tabs: the line parse takes them
        lambda t: t.replace(b"\n", b"\r\n"),  # CRLF: so does it
        lambda t: t + b"\n",  # an empty last line
    ],
)
def test_unplain_indexes_go_line_by_line(
    shard: tuple[Path, ShardInfo], monkeypatch: pytest.MonkeyPatch, edit: Callable[[bytes], bytes]
) -> None:
    folder, info = shard
    path = folder / info.index_name
    text = edit(path.read_bytes())
    assert text != path.read_bytes()
    path.write_bytes(text)
    assert plain_index_table(text, info.bytes) is None
    assert parsed(path, info) == line_parse(path, info, monkeypatch)
