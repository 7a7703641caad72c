"""`shards.bounded`: what a zip, an `.npy` member or a safetensors header states is read alone and compared with the
bytes the file holds and a limit; real files pass and give their records, shapes and dtypes, and each way of stating
more than is held is refused with ContainerError naming the file."""

from __future__ import annotations

import os
import struct
import zipfile
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
import torch
from hostile_files import (
    CLAIM_BYTES,
    deflated_npz,
    npy_bytes,
    safetensors_bytes,
    stated_npz,
    stated_tensor_safetensors,
    with_deflated_record,
    write_zip,
)
from safetensors.torch import save_file

from shards import bounded
from shards.bounded import ContainerError, npz_arrays, regular_file_size, safetensors_header, zip_members

LIMIT = 1 << 30


def refused(call: Callable[[Path, int], object], path: Path, message: str) -> None:
    with pytest.raises(ContainerError) as err:
        call(path, LIMIT)
    assert str(err.value).startswith(f"{path}: ") and message in err.value.problem, err.value


def test_a_torch_checkpoint_is_stored_records_within_its_size(tmp_path: Path) -> None:
    path = tmp_path / "ckpt.pt"
    torch.save({"w": torch.zeros(1000), "b": torch.ones(3)}, path)
    members = zip_members(path, LIMIT)
    assert sum(m.file_size for m in members) <= path.stat().st_size
    assert {m.compress_type for m in members} == {zipfile.ZIP_STORED}
    refused(lambda p, _: zip_members(p, 100), path, f"{path.stat().st_size} bytes, more than 100; not read")


def test_deflated_records_are_refused_where_torch_writes_none_and_bounded_in_an_npz(tmp_path: Path) -> None:
    good = tmp_path / "good.pt"
    torch.save({"w": torch.zeros(10)}, good)
    refused(zip_members, with_deflated_record(good, tmp_path / "bomb.pt"), "is compressed (method 8); its records")
    np.savez_compressed(tmp_path / "weights.npz", w=np.random.default_rng(0).standard_normal(1000))
    assert npz_arrays(tmp_path / "weights.npz", LIMIT) == {"w": ((1000,), np.dtype("float64"))}
    refused(npz_arrays, deflated_npz(tmp_path / "bomb.npz"), f"its records state {CLAIM_BYTES} bytes once read")


def test_records_stating_more_than_they_take_or_too_many_or_long_names_are_refused(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    lying = write_zip(tmp_path / "lying.pt", [("a/data/0", b"abc", 1 << 20, zipfile.ZIP_STORED)])
    refused(zip_members, lying, "stored record 'a/data/0' states 1048576 bytes but takes 3")
    monkeypatch.setattr(bounded, "MAX_MEMBERS", 3)
    many = write_zip(tmp_path / "many.pt", [(f"a/data/{i}", b"", 0, zipfile.ZIP_STORED) for i in range(4)])
    refused(zip_members, many, "4 records, more than 3")
    long = write_zip(tmp_path / "long.pt", [("a" * 1025, b"", 0, zipfile.ZIP_STORED)])
    refused(zip_members, long, "a record name of 1025 characters, more than 1024")


def test_what_is_no_regular_zip_is_named(tmp_path: Path) -> None:
    (tmp_path / "noise.pt").write_bytes(os.urandom(4096))
    refused(zip_members, tmp_path / "noise.pt", "not a zip archive: ")
    os.mkfifo(tmp_path / "fifo.pt")  # read, it would block
    refused(zip_members, tmp_path / "fifo.pt", "not a regular file")
    refused(regular_file_size, tmp_path / "missing.pt", "cannot be read (No such file or directory)")


def test_npy_headers_must_state_exactly_their_bytes_and_no_objects(tmp_path: Path) -> None:
    refused(npz_arrays, stated_npz(tmp_path / "stated.npz"), "embedding/kernel.npy states shape (16, 16, 8, 262144)")
    with zipfile.ZipFile(tmp_path / "objects.npz", "w") as archive:
        archive.writestr("x.npy", npy_bytes((2,), b"\0" * 16, dtype="|O"))
    refused(npz_arrays, tmp_path / "objects.npz", "x.npy holds Python objects")
    with zipfile.ZipFile(tmp_path / "short.npz", "w") as archive:
        archive.writestr("x.npy", npy_bytes((4,), b"\0" * 15))
    refused(npz_arrays, tmp_path / "short.npz", "x.npy states shape (4,) of float32 but holds 15 bytes")


def test_a_safetensors_header_gives_names_dtypes_and_shapes(tmp_path: Path) -> None:
    path = tmp_path / "w.safetensors"
    save_file({"a": torch.zeros(2, 3), "b": torch.zeros(4, dtype=torch.int64), "c": torch.zeros(0)}, str(path))
    assert safetensors_header(path, LIMIT) == {"a": ("F32", (2, 3)), "b": ("I64", (4,)), "c": ("F32", (0,))}


@pytest.mark.parametrize(
    ("data", "message"),
    [
        (b"\x10\0\0", "3 bytes: no 8-byte header length"),
        (struct.pack("<Q", 1 << 40) + b"{}", "a header of 1099511627776 bytes, more than the file"),
        (struct.pack("<Q", 2) + b"[]", "its header is not a JSON object"),
        (struct.pack("<Q", 3) + b"{\"a", "Unterminated string"),
        (stated_tensor_safetensors(), "tensor 'pos_embed' of shape (536870912,) and dtype F32 states bytes"),
        (safetensors_bytes({"a": {"dtype": "F32", "shape": [2], "data_offsets": [0, 4]}}, b"\0" * 8), "bytes 0..4"),
        (safetensors_bytes({"a": {"dtype": "X9", "shape": [1], "data_offsets": [0, 1]}}, b"\0"), "not {dtype, shape"),
        (safetensors_bytes({"a": {"dtype": ["F32"], "shape": [1], "data_offsets": [0, 4]}}, b"\0" * 4), "not {dtype"),
        (safetensors_bytes({"a": {"dtype": "F32", "shape": [-1], "data_offsets": [0, 4]}}, b"\0" * 4), "not {dtype"),
        (safetensors_bytes({"a": {"dtype": "F32", "shape": [1.0], "data_offsets": [0, 4]}}, b"\0" * 4), "not {dtype"),
        (safetensors_bytes({"a": {"dtype": "F32", "shape": [1]}}, b"\0" * 4), "not {dtype, shape, data_offsets}"),
        (safetensors_bytes({"a": [1]}), "tensor 'a' is not {dtype, shape, data_offsets}"),
        (
            safetensors_bytes({
                "a": {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]},
                "b": {"dtype": "F32", "shape": [2], "data_offsets": [4, 12]},
            }, b"\0" * 12),
            "tensors 'a' and 'b' state overlapping bytes",
        ),
    ],
    ids=[
        "no-length", "length-past-end", "not-object", "not-json", "stated-2GiB", "span-past-end", "dtype", "dtype-list",
        "negative", "float-size", "no-offsets", "not-entry", "overlap",
    ],
)  # fmt: skip
def test_a_safetensors_header_stating_what_the_file_does_not_hold_is_refused(
    tmp_path: Path, data: bytes, message: str
) -> None:
    path = tmp_path / "w.safetensors"
    path.write_bytes(data)
    refused(safetensors_header, path, message)
