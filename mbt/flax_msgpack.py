"""Flax's msgpack serialization (`flax.serialization.to_bytes`, `flax.training.checkpoints`) read without jax or flax.

The file is a msgpack map of maps with string keys; each array is an ExtType (code 1; 3 for a numpy scalar) whose
data is msgpack of (shape, dtype name, C-order bytes); flax splits arrays over 2**30 bytes into
`{'__msgpack_chunked_array__': True, 'shape': {'0': …}, 'chunks': {'0': array, …}}` maps. The bytes are untrusted
(a checkpoint from the internet): nothing is unpickled, only plain dtypes are read, an array's bytes must be exactly
what its shape and dtype declare (numpy then views them: every array is bytes the file holds, so together they are
at most the file's size), and the file is bounded by MAX_FILE_BYTES. msgpack allocates a list of the length an
array header states before reading its items (`dd ff ff ff ff`: 4 billion), so lists are bounded by MAX_LIST_ITEMS
(flax writes sequences as maps; a list is an array record's (shape, dtype, bytes) or its shape) and maps by
MAX_MAP_ITEMS.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import msgpack
import numpy as np

MAX_FILE_BYTES = 16 << 30  # a scenic MBT-B training state (parameters and momentum) is about 1.4 GB
DTYPES = ("float32", "float16", "float64", "bfloat16", "int8", "int16", "int32", "int64", "uint8", "uint16", "uint32",
          "uint64", "bool")  # fmt: skip
EXT_NDARRAY, EXT_NPSCALAR = 1, 3
CHUNKED = "__msgpack_chunked_array__"
MAX_DEPTH = 64  # maps within maps: a training state nests about 10 deep
MAX_LIST_ITEMS = 64  # numpy's most axes, a shape's length
MAX_MAP_ITEMS = 1 << 20  # keys of one map: a layer's parameters, a tree's blocks, a chunked array's chunks
UNPACK_LIMITS = {"max_array_len": MAX_LIST_ITEMS, "max_map_len": MAX_MAP_ITEMS}


class FlaxMsgpackError(ValueError):
    """A file that is not flax msgpack of plain arrays; the message names the file and what is wrong."""


def _array(data: bytes) -> np.ndarray:
    """The array of one ndarray ExtType's data; ValueError unless it is (shape, plain dtype, exactly its bytes)."""
    item = msgpack.unpackb(data, raw=True, **UNPACK_LIMITS)
    if not isinstance(item, list | tuple) or len(item) != 3:
        raise ValueError("an array record is not (shape, dtype, bytes)")
    shape, name, buffer = item
    name = name.decode("ascii", "replace") if isinstance(name, bytes) else name
    if not isinstance(shape, list | tuple) or not all(isinstance(n, int) and n >= 0 for n in shape):
        raise ValueError(f"an array's shape {shape!r:.80} is not a list of sizes")
    if name not in DTYPES or not isinstance(buffer, bytes):
        raise ValueError(f"an array of dtype {name!r:.40} (plain numeric dtypes only: {', '.join(DTYPES)})")
    dtype = np.dtype("uint16" if name == "bfloat16" else name)
    if math.prod(shape) * dtype.itemsize != len(buffer):
        raise ValueError(f"an array of shape {tuple(shape)} and dtype {name} holds {len(buffer)} bytes")
    array = np.frombuffer(buffer, dtype).reshape(shape)
    if name == "bfloat16":  # the upper half of a float32
        array = (array.astype(np.uint32) << 16).view(np.float32)
    return array


def _ext_hook(code: int, data: bytes) -> Any:
    if code == EXT_NDARRAY:
        return _array(data)
    if code == EXT_NPSCALAR:
        return _array(data)[()]
    return msgpack.ExtType(code, data)  # complex numbers and unknown types: left for the caller to refuse


def _unchunk(node: dict[str, Any], where: str) -> np.ndarray:
    shape, chunks = node.get("shape"), node.get("chunks")
    if not isinstance(shape, dict) or not isinstance(chunks, dict):
        raise ValueError(f"{where}: a chunked array without 'shape' and 'chunks' maps")
    sizes = [shape.get(str(i)) for i in range(len(shape))]
    parts = [chunks.get(str(i)) for i in range(len(chunks))]
    if not all(isinstance(n, int) and n >= 0 for n in sizes) or not all(isinstance(p, np.ndarray) for p in parts):
        raise ValueError(f"{where}: a chunked array whose shape or chunks are not numbered sizes and arrays")
    if not parts or len({p.dtype for p in parts}) != 1 or sum(p.size for p in parts) != math.prod(sizes):
        raise ValueError(f"{where}: chunks that do not make one array of shape {tuple(sizes)}")
    return np.concatenate([p.reshape(-1) for p in parts]).reshape(sizes)


def _restore(node: Any, where: str, depth: int = 0) -> Any:
    """`node` with its chunked arrays joined (flax's `_unchunk_array_leaves_in_place`); ValueError for a map key
    that is not a string or maps nested deeper than MAX_DEPTH."""
    if not isinstance(node, dict):
        return node
    if depth > MAX_DEPTH:
        raise ValueError(f"{where}: maps nested more than {MAX_DEPTH} deep")
    if not all(isinstance(key, str) for key in node):
        raise ValueError(f"{where or 'the top level'}: a map key that is not a string")
    if CHUNKED in node:
        return _unchunk(node, where or "the top level")
    return {key: _restore(value, f"{where}/{key}" if where else key, depth + 1) for key, value in node.items()}


def read_flax_msgpack(path: str | Path) -> dict[str, Any]:
    """The nested dict of numpy arrays (and plain values) in a flax msgpack file; FlaxMsgpackError naming the file
    when it is missing, larger than MAX_FILE_BYTES, not msgpack, not a map, or holds an array that is not plain."""
    path = Path(path)
    if path.is_dir():
        raise FlaxMsgpackError(
            f"{path}: a folder, not a flax msgpack file (an orbax checkpoint folder is not read; give the "
            "checkpoint file itself, e.g. .../checkpoint_N)"
        )
    if not path.is_file():
        raise FlaxMsgpackError(f"{path}: no such file")
    size = path.stat().st_size
    if size > MAX_FILE_BYTES:
        raise FlaxMsgpackError(f"{path}: {size} bytes, more than a scenic checkpoint's ({MAX_FILE_BYTES}); not read")
    try:
        tree = msgpack.unpackb(path.read_bytes(), ext_hook=_ext_hook, raw=False, strict_map_key=True, **UNPACK_LIMITS)
        if not isinstance(tree, dict):
            raise ValueError(f"it holds a {type(tree).__name__}, not a map of parameters")
        return _restore(tree, "")
    except (ValueError, TypeError, msgpack.UnpackException) as err:  # msgpack's errors subclass ValueError
        summary = " ".join(str(err).split())[:300] or type(err).__name__
        raise FlaxMsgpackError(f"{path}: not a flax msgpack checkpoint ({summary})") from None
