"""What a container file declares, checked against the file itself and a limit before a library allocates from it.

Model files come in containers whose headers state sizes: a zip archive (torch's `.pt`, numpy's `.npz`) states each
record's size once read, a `.npy` member its shape and dtype, a safetensors header each tensor's shape, dtype and
byte span. A 1 MB file can state a terabyte, and torch, numpy and safetensors allocate what is stated before they
find out. Here the statements are read alone (a zip's central directory, the first bytes of each `.npy` member, the
JSON header of a safetensors file: nothing else is decompressed or read) and compared with the bytes the file holds,
so that loading it afterwards allocates no more than the file's size (deflated `.npz`: MAX_DEFLATE_RATIO times it).
Each check raises ContainerError naming the file and what it states.
"""

from __future__ import annotations

import itertools
import json
import math
import os
import stat
import struct
import zipfile
from pathlib import Path

import numpy as np

MAX_MEMBERS = 100_000  # records in one archive: an MBT-L training checkpoint with AdamW moments has about 2,000
MAX_NAME_CHARS = 1_024  # a record's name: torch's 'step-1/data/123', a ViT's '.../MultiHeadDotProductAttention_1/...'
# Trained float weights deflate to about 90% of their size (zero-initialised heads further): an .npz whose arrays
# would take 4 times its size or more holds something other than weights.
MAX_DEFLATE_RATIO = 4
MAX_NPY_HEADER_BYTES = 10_000  # numpy's own bound on a .npy header (np.lib.format's max_header_size)
MAX_SAFETENSORS_HEADER_BYTES = 16 << 20  # names, shapes and offsets: a ViT-g's take about 100 KB, an MBT-L's 80 KB
MAX_NDIM = 64  # numpy's most axes
SAFETENSORS_ITEM_BYTES = {
    "F64": 8, "F32": 4, "F16": 2, "BF16": 2, "F8_E4M3": 1, "F8_E5M2": 1, "I64": 8, "I32": 4, "I16": 2, "I8": 1,
    "U64": 8, "U32": 4, "U16": 2, "U8": 1, "BOOL": 1,
}  # fmt: skip


class ContainerError(ValueError):
    """A container file that is not one, or states more than it holds or than its limit: `problem` says what, and
    the message names the file."""

    def __init__(self, path: str | Path, problem: str) -> None:
        super().__init__(f"{path}: {problem}")
        self.path, self.problem = path, problem


def regular_file_size(path: str | Path, max_bytes: int) -> int:
    """The size of the regular file `path`; ContainerError when it cannot be read, is not a regular file (a FIFO
    would block, a device never end) or holds more than `max_bytes`."""
    try:
        info = os.stat(path)
    except OSError as err:
        raise ContainerError(path, f"cannot be read ({err.strerror})") from None
    if not stat.S_ISREG(info.st_mode):
        raise ContainerError(path, "not a regular file")
    if info.st_size > max_bytes:
        raise ContainerError(path, f"{info.st_size} bytes, more than {max_bytes}; not read")
    return info.st_size


def zip_members(path: str | Path, max_bytes: int, *, deflated: bool = False) -> list[zipfile.ZipInfo]:
    """The records of the zip archive `path`, read from its central directory alone, once it is known that reading
    them allocates no more than the file holds: at most MAX_MEMBERS records with names of at most MAX_NAME_CHARS,
    each stored as it is (`deflated`: or deflated), together at most `max_bytes` once read, and no more than the
    file's size (deflated: MAX_DEFLATE_RATIO times it). ContainerError otherwise."""
    size = regular_file_size(path, max_bytes)
    try:
        with zipfile.ZipFile(path) as archive:
            members = archive.infolist()
    except (zipfile.BadZipFile, zipfile.LargeZipFile, ValueError, OSError, EOFError) as err:
        raise ContainerError(path, f"not a zip archive: {_summary(err)}") from None
    if len(members) > MAX_MEMBERS:
        raise ContainerError(path, f"{len(members)} records, more than {MAX_MEMBERS}")
    if long := next((m.filename for m in members if len(m.filename) > MAX_NAME_CHARS), None):
        raise ContainerError(path, f"a record name of {len(long)} characters, more than {MAX_NAME_CHARS}")
    methods = (zipfile.ZIP_STORED, zipfile.ZIP_DEFLATED) if deflated else (zipfile.ZIP_STORED,)
    for member in members:
        if member.compress_type not in methods:
            how = "stored or deflated" if deflated else "stored uncompressed, as torch writes them"
            raise ContainerError(path, f"record {member.filename!r:.80} is compressed (method "
                                       f"{member.compress_type}); its records must be {how}")  # fmt: skip
        if member.compress_type == zipfile.ZIP_STORED and member.file_size != member.compress_size:
            raise ContainerError(path, f"stored record {member.filename!r:.80} states {member.file_size} bytes "
                                       f"but takes {member.compress_size}")  # fmt: skip
    stored = sum(m.compress_size for m in members)
    declared = sum(m.file_size for m in members)
    most = min(max_bytes, size * (MAX_DEFLATE_RATIO if deflated else 1))
    if stored > size or declared > most:
        raise ContainerError(path, f"its records state {declared} bytes once read ({stored} in the archive), more "
                                   f"than the {size}-byte file can hold (at most {most})")  # fmt: skip
    return members


def npz_arrays(path: str | Path, max_bytes: int) -> dict[str, tuple[tuple[int, ...], np.dtype]]:
    """{name: (shape, dtype)} of the arrays of the `.npz` at `path` (`zip_members`, stored or deflated), read from
    the `.npy` headers alone, once each header's shape x dtype is exactly the bytes its member holds (so `np.load`
    allocates no more than the archive states) and no array holds Python objects. ContainerError otherwise."""
    readers = {(1, 0): np.lib.format.read_array_header_1_0, (2, 0): np.lib.format.read_array_header_2_0}
    arrays = {}
    members = zip_members(path, max_bytes, deflated=True)
    try:
        with zipfile.ZipFile(path) as archive:
            for member in members:
                if not member.filename.endswith(".npy"):
                    continue
                with archive.open(member) as stream:
                    version = np.lib.format.read_magic(stream)
                    if version not in readers:
                        raise ValueError(f"{member.filename} is a .npy of version {version}")
                    shape, _, dtype = readers[version](stream, max_header_size=MAX_NPY_HEADER_BYTES)
                    data_bytes = member.file_size - stream.tell()
                if dtype.hasobject:
                    raise ValueError(f"{member.filename} holds Python objects, not numbers")
                if len(shape) > MAX_NDIM or math.prod(shape) * dtype.itemsize != data_bytes:
                    raise ValueError(f"{member.filename} states shape {shape} of {dtype} but holds {data_bytes} bytes")
                arrays[member.filename.removesuffix(".npy")] = (shape, dtype)
    except (zipfile.BadZipFile, ValueError, OSError, EOFError) as err:
        raise ContainerError(path, _summary(err)) from None
    return arrays


def safetensors_header(path: str | Path, max_bytes: int) -> dict[str, tuple[str, tuple[int, ...]]]:
    """{name: (dtype, shape)} of the tensors of the safetensors file `path`, read from its header alone, once the
    header is at most MAX_SAFETENSORS_HEADER_BYTES of JSON within the file, and each tensor's byte span lies within
    the data that follows it, spans do not overlap, and each is exactly its shape x dtype (so loading allocates no
    more than the file's size). ContainerError otherwise."""
    size = regular_file_size(path, max_bytes)
    try:
        with open(path, "rb") as f:
            prefix = f.read(8)
            if len(prefix) < 8:
                raise ValueError(f"{size} bytes: no 8-byte header length")
            (length,) = struct.unpack("<Q", prefix)
            if length > min(MAX_SAFETENSORS_HEADER_BYTES, size - 8):
                raise ValueError(f"a header of {length} bytes, more than the file or {MAX_SAFETENSORS_HEADER_BYTES}")
            header = json.loads(f.read(length))
        return _tensor_spans(header, size - 8 - length)
    except (OSError, ValueError, RecursionError) as err:  # UnicodeDecodeError and JSONDecodeError are ValueErrors
        raise ContainerError(path, _summary(err)) from None


def _tensor_spans(header: object, data_bytes: int) -> dict[str, tuple[str, tuple[int, ...]]]:
    """{name: (dtype, shape)} of a parsed safetensors header over `data_bytes` of tensor data; ValueError naming the
    first entry that is not {dtype, shape, data_offsets} within the data, of exactly its shape x dtype bytes."""
    if not isinstance(header, dict):
        raise ValueError("its header is not a JSON object")
    tensors, spans = {}, []
    for name, entry in header.items():
        if name == "__metadata__":
            continue
        fields = entry if isinstance(entry, dict) else {}
        dtype, shape, offsets = fields.get("dtype"), fields.get("shape"), fields.get("data_offsets")
        if not (isinstance(dtype, str) and dtype in SAFETENSORS_ITEM_BYTES and isinstance(shape, list)
                and len(shape) <= MAX_NDIM and isinstance(offsets, list) and len(offsets) == 2
                and all(_is_count(n) for n in shape + offsets)):  # fmt: skip
            raise ValueError(f"tensor {name!r:.80} is not {{dtype, shape, data_offsets}} of this format")
        begin, end = offsets
        if not begin <= end <= data_bytes or end - begin != math.prod(shape) * SAFETENSORS_ITEM_BYTES[dtype]:
            raise ValueError(f"tensor {name!r:.80} of shape {tuple(shape)} and dtype {dtype} states bytes "
                             f"{begin}..{end} of the {data_bytes} that follow the header")  # fmt: skip
        tensors[name] = (dtype, tuple(shape))
        spans.append((begin, end, name))
    for (_, end, first), (begin, _, second) in itertools.pairwise(sorted(spans)):
        if begin < end:
            raise ValueError(f"tensors {first!r:.80} and {second!r:.80} state overlapping bytes")
    return tensors


def _is_count(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= 0


def _summary(err: BaseException) -> str:
    """A library's error message on one line, or its type."""
    return " ".join(str(err).split())[:300] or type(err).__name__
