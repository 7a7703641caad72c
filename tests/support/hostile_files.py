"""Model files that state far more than they hold, each made in a moment and a few MB at most: a zip record that
deflates to gigabytes, a tensor that views one stored number as billions, `.npy` and safetensors headers stating
shapes their bytes do not hold, msgpack lists stated millions long one inside another, a ViT `.npz` whose blocks are
named but not stored. Each states gigabytes (most CLAIM_BYTES), more than a process that loads a model file is in all
(about 0.9 GB), so a loader that allocates what it is told shows in that process's peak memory."""

from __future__ import annotations

import io
import json
import struct
import zipfile
import zlib
from pathlib import Path

import numpy as np
import torch

CLAIM_BYTES = 2 << 30
_BLOCK = 16 << 20


def deflated_zeros(size: int = CLAIM_BYTES) -> bytes:
    """A raw deflate stream of `size` zero bytes (a multiple of 16 MiB), about 1/1000 of that: one block of zeros
    compressed once and repeated (each ends in a full flush, which makes blocks independent)."""
    block = zlib.compressobj(9, zlib.DEFLATED, -15)
    piece = block.compress(bytes(_BLOCK)) + block.flush(zlib.Z_FULL_FLUSH)
    return piece * (size // _BLOCK) + zlib.compressobj(9, zlib.DEFLATED, -15).flush()


def write_zip(path: Path, records: list[tuple[str, bytes, int, int]]) -> Path:
    """A zip of `records` (name, bytes as stored, size it states once read, zipfile.ZIP_STORED or ZIP_DEFLATED),
    written field by field so that it states what it is told to (its CRCs are 0: readers check them only after
    reading a record whole)."""
    local, central = io.BytesIO(), io.BytesIO()
    for name, data, size, method in records:
        offset, encoded = local.tell(), name.encode()
        local.write(struct.pack("<4s5H3L2H", b"PK\x03\x04", 20, 0, method, 0, 33, 0, len(data), size, len(encoded), 0))
        local.write(encoded + data)
        central.write(struct.pack("<4s6H3L5H2L", b"PK\x01\x02", 20, 20, 0, method, 0, 33, 0, len(data), size,
                                  len(encoded), 0, 0, 0, 0, 0, offset) + encoded)  # fmt: skip
    end = struct.pack("<4s4H2LH", b"PK\x05\x06", 0, 0, len(records), len(records), central.tell(), local.tell(), 0)
    path.write_bytes(local.getvalue() + central.getvalue() + end)
    return path


def with_deflated_record(good: Path, out: Path) -> Path:
    """The zip `good` (a torch checkpoint, an `.npz`) with its first tensor or array record replaced by one of
    CLAIM_BYTES of zeros, deflated."""
    with zipfile.ZipFile(good) as archive:
        records = [(m.filename, archive.read(m), m.file_size, zipfile.ZIP_STORED) for m in archive.infolist()]
    first = next(i for i, (name, *_) in enumerate(records) if "/data/" in name or name.endswith(".npy"))
    records[first] = (records[first][0], deflated_zeros(), CLAIM_BYTES, zipfile.ZIP_DEFLATED)
    return write_zip(out, records)


def repeated_tensor() -> torch.Tensor:
    """One stored float viewed as CLAIM_BYTES elements (stride 0): what `torch.save` stores in 4 bytes."""
    return torch.zeros(1).expand(CLAIM_BYTES)


def npy_bytes(shape: tuple[int, ...], data: bytes, dtype: str = "<f4") -> bytes:
    """A `.npy` whose header states `shape` of `dtype`, followed by `data` (whatever its size)."""
    out = io.BytesIO()
    np.lib.format.write_array_header_1_0(out, {"descr": dtype, "fortran_order": False, "shape": shape})
    return out.getvalue() + data


def safetensors_bytes(header: dict, data: bytes = b"") -> bytes:
    """A safetensors file of `header` (as JSON) followed by `data`."""
    text = json.dumps(header).encode()
    return struct.pack("<Q", len(text)) + text + data


def stated_tensor_safetensors() -> bytes:
    """A safetensors file stating one float32 tensor of CLAIM_BYTES that it does not hold."""
    stated = {"dtype": "F32", "shape": [CLAIM_BYTES // 4], "data_offsets": [0, CLAIM_BYTES]}
    return safetensors_bytes({"pos_embed": stated})


def nested_msgpack_lists(size: int = 16 << 20) -> bytes:
    """`size` bytes of msgpack: array headers each stating `size` / 2 items (msgpack's own bound is the file's
    size), one inside another."""
    header = b"\xdd" + struct.pack(">I", size // 2)
    return (header * (size // len(header)))[:size]


def deflated_npz(path: Path) -> Path:
    """An `.npz` of one array record deflated from CLAIM_BYTES of zeros (about 2 MB)."""
    return write_zip(path, [("weights.npy", deflated_zeros(), CLAIM_BYTES, zipfile.ZIP_DEFLATED)])


def stated_npz(path: Path) -> Path:
    """An `.npz` whose patch kernel's `.npy` header states CLAIM_BYTES of float32 and holds none of them."""
    with zipfile.ZipFile(path, "w") as archive:
        archive.writestr("embedding/kernel.npy", npy_bytes((16, 16, 8, CLAIM_BYTES // 4 // 2048), b""))
    return path


def deep_vit_npz(path: Path, width: int = 512, depth: int = 128) -> Path:
    """A vision_transformer `.npz` whose block 0 states a ViT of `width` (stored: about 6 MB at 512) and whose
    `depth` blocks are named by one LayerNorm scale each: a ViT of depth x 12 width² parameters (400 million, 1.6 GB,
    at 512 x 128) built from it would hold far more than the archive."""
    block, attention, mlp = "Transformer/encoderblock_{}/", "MultiHeadDotProductAttention_1/", "MlpBlock_3/"
    arrays = {
        "embedding/kernel": np.zeros((16, 16, 3, width), np.float32),
        "embedding/bias": np.zeros(width, np.float32),
        "cls": np.zeros((1, 1, width), np.float32),
        "Transformer/posembed_input/pos_embedding": np.zeros((1, 5, width), np.float32),
        block.format(0) + attention + "query/kernel": np.zeros((width, 8, width // 8), np.float32),
        block.format(0) + mlp + "Dense_0/kernel": np.zeros((width, 4 * width), np.float32),
    }
    arrays |= {block.format(i) + "LayerNorm_0/scale": np.zeros(1, np.float32) for i in range(depth)}
    np.savez(path, **arrays)
    return path
