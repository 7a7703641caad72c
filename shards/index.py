"""The `.idx` file beside each shard: DALI's wds2idx format (`v1.2 N`, then per sample `ext data_offset size name`
for each member), written from the offsets while a shard is written, computed from a tar, and parsed strictly (an
index file from a shared bucket places every member inside its shard, or is refused naming its line). An entry
inside the shard may still point at another member: readers check the tar header before its payload
(`member_header_problem`) before they use the payload. A parsed index is a `SampleTable` (numpy arrays); a plain
file (as the writer and wds2idx write them) is checked with whole-file operations, any other line by line.
"""

from __future__ import annotations

import os
import re
from collections.abc import Iterable
from pathlib import Path

import numpy as np

from shards.manifest import ShardInfo
from shards.sample_table import SampleTable
from shards.schema import SchemaError, split_member_name
from shards.tar import TarReadError, parse_header, tar_members
from shards.text import excerpt

# DALI's index files (tools/wds2idx.py in DALI) start with this version tag.
WDS_INDEX_VERSION = "v1.2"


class IndexFileError(SchemaError):
    """An index file that is missing, not wds2idx text, or places a member outside its shard."""


def format_index(samples: Iterable[list[tuple[str, int, int, str]]]) -> str:
    """wds2idx text for samples given as lists of (ext, data_offset, size, name)."""
    rows = [" ".join(f"{ext} {offset} {size} {name}" for ext, offset, size, name in sample) for sample in samples]
    return f"{WDS_INDEX_VERSION} {len(rows)}\n" + "".join(row + "\n" for row in rows)


def index_from_tar(path: Path) -> str:
    """wds2idx text computed by reading the tar at `path` (regular files only, grouped by consecutive key);
    TarReadError if it is not a sound tar."""
    samples: list[list[tuple[str, int, int, str]]] = []
    last_key = None
    with open(path, "rb") as f:
        for member in tar_members(f, os.fstat(f.fileno()).st_size, exts=frozenset()):
            entry = (member.ext, member.offset, member.size, f"{member.key}.{member.ext}")
            if member.key != last_key:
                samples.append([entry])
                last_key = member.key
            else:
                samples[-1].append(entry)
    return format_index(samples)


# The length of a ustar header's name field: a longer name (pax, GNU) is there cut to its first 100 bytes.
_NAME_FIELD_BYTES = 100


def member_header_problem(header: bytes, name: str, size: int) -> str | None:
    """Why `header`, the 512 bytes before an index entry's payload, is not the tar header of that entry (a regular
    file named `name`, `{key}.{ext}`, of `size` bytes, with a valid checksum), or None when it is. A name longer than
    the header's field (its pax or GNU record lies further back) is checked on the 100 bytes the field holds."""
    try:
        kind, header_size, header_name = parse_header(header, 0)
    except TarReadError:
        return "no tar header before it (the offset is not a member's)"
    expected = name.encode()
    long_name = len(header_name) == _NAME_FIELD_BYTES and expected.startswith(header_name)
    if header_name != expected and not long_name:
        shown = header_name[:_NAME_FIELD_BYTES].decode(errors="backslashreplace")
        return f"the tar header before it is member {shown!r}, not {name}"
    if kind not in (b"0", b"\0"):
        return f"the tar header before it is of type {kind!r}, not a regular file"
    if header_size != size:
        return f"the tar header before it says {header_size} bytes, the index {size}"
    return None


# An index line's member: `ext offset size name` (ext as the schema splits names; offsets and sizes in decimal).
_MAX_EXT_CHARS, _MAX_DIGITS = 64, 15
_EXT_RE = re.compile(rf"^[A-Za-z0-9_.\-]{{1,{_MAX_EXT_CHARS}}}$")
_DECIMAL_RE = re.compile(rf"^[0-9]{{1,{_MAX_DIGITS}}}$")
# Index files hold about 100 bytes per member; anything far larger than that is not one.
_INDEX_BYTES_PER_SAMPLE = 64 * 1024


def parse_index(path: Path, shard: ShardInfo) -> SampleTable:
    """The samples listed by the wds2idx index file of `shard` (`v1.2 N`, then `ext offset size name ...` per
    sample), checked: every member lies inside the shard's bytes, names are `{key}.{ext}` of one key per line;
    IndexFileError naming the file and line otherwise."""
    redo = "re-run the shard job to rewrite it (or DALI's wds2idx)"
    try:
        size = path.stat().st_size
        if size > _INDEX_BYTES_PER_SAMPLE * (shard.num_samples + 1):
            raise IndexFileError(f"{path}: {size} bytes, far more than an index of {shard.num_samples} samples; {redo}")
        data = path.read_bytes()
        lines = data.decode("ascii").splitlines()
    except FileNotFoundError:
        raise IndexFileError(
            f"{path}: index file missing for shard {shard.name}; re-run the shard job, or write it with "
            f"DALI's `wds2idx {shard.name} {path.name}`"
        ) from None
    except (OSError, UnicodeDecodeError) as err:
        raise IndexFileError(f"{path}: cannot be read as an index file ({err}); {redo}") from None
    header = lines[0].split() if lines else []
    if len(header) != 2 or header[0] != WDS_INDEX_VERSION or not _DECIMAL_RE.fullmatch(header[1]):
        raise IndexFileError(f"{path}: not a {WDS_INDEX_VERSION} wds2idx index file; {redo}")
    table = plain_index_table(data, shard.bytes)
    if table is None:
        table = _checked_lines(path, lines[1:], shard, redo)
    if len(table) != int(header[1]):
        raise IndexFileError(f"{path}: header says {header[1]} samples, {len(table)} listed; {redo}")
    return table


def _checked_lines(path: Path, lines: list[str], shard: ShardInfo, redo: str) -> SampleTable:
    """The table of an index file's sample lines, checked line by line: IndexFileError naming the file, the line
    and the first member that is malformed or lies outside the shard."""
    keys, ext_names, offsets, sizes, counts = [], [], [], [], []
    for line_no, line in enumerate(lines, start=2):
        fields = line.split()
        if not fields or len(fields) % 4:
            raise IndexFileError(f"{path}:{line_no}: malformed index line; {redo}")
        seen = set()
        key = split_member_name(fields[3])[0]
        for i in range(0, len(fields), 4):
            ext, offset, size_text, name = fields[i : i + 4]
            ok = _EXT_RE.fullmatch(ext) and _DECIMAL_RE.fullmatch(offset) and _DECIMAL_RE.fullmatch(size_text)
            if not ok or name != f"{key}.{ext}" or ext in seen:
                raise IndexFileError(
                    f"{path}:{line_no}: malformed member {excerpt(' '.join(fields[i : i + 4]))}; {redo}"
                )
            start, length = int(offset), int(size_text)
            if start < 512 or start + length > shard.bytes:
                raise IndexFileError(
                    f"{path}:{line_no}: member {excerpt(name)} at bytes {start}..{start + length} lies outside "
                    f"{shard.name} ({shard.bytes} bytes); {redo}"
                )
            seen.add(ext)
            ext_names.append(ext.encode())
            offsets.append(start)
            sizes.append(length)
        keys.append(key.encode())
        counts.append(len(fields) // 4)
    return SampleTable.of_shard(
        keys, ext_names, np.array(offsets, dtype=np.int64), np.array(sizes, dtype=np.int64), np.array(counts)
    )


# The bytes of an index whose lines the fast path reads: the extension class, digits, the dot and the two separators
# (no '/': a key is then all of a name before its first dot).
_PLAIN_BYTES = bytes(sorted(set(b"abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789_.- \n")))


def plain_index_table(data: bytes, shard_bytes: int) -> SampleTable | None:
    """The table of the index file `data` (its header already checked) when every check of `_checked_lines` passes
    on it and its text is plain (extension characters, one space or newline between fields, no empty line), checked
    with whole-file operations; None otherwise, for the line-by-line parse to give its answer or its error."""
    if data.translate(None, _PLAIN_BYTES) or b"\n" not in data:
        return None
    body = data[data.index(b"\n") + 1 :].removesuffix(b"\n")
    text = np.frombuffer(body, dtype=np.uint8)
    seps = np.flatnonzero((text == ord(" ")) | (text == ord("\n")))
    # Fields one separator apart: then the lines are those splitlines gives, and their fields those split gives.
    if not len(text) or (len(seps) and (seps[0] == 0 or seps[-1] == len(text) - 1 or np.any(np.diff(seps) == 1))):
        return None
    fields_per_line = np.diff(np.append(np.flatnonzero(text[seps] == ord("\n")) + 1, len(seps) + 1), prepend=0)
    if np.any(fields_per_line % 4):
        return None
    lengths = np.diff(seps, prepend=-1, append=len(text)).reshape(-1, 4) - 1  # a member's ext, offset, size, name
    if np.any(lengths[:, 0] > _MAX_EXT_CHARS) or np.any(lengths[:, 1:3] > _MAX_DIGITS):
        return None
    fields = body.split()
    ext_names, offsets, sizes, names = fields[0::4], fields[1::4], fields[2::4], fields[3::4]
    if not b"".join(offsets + sizes).isdigit():
        return None
    starts = np.fromiter(map(int, offsets), dtype=np.int64, count=len(offsets))
    member_bytes = np.fromiter(map(int, sizes), dtype=np.int64, count=len(sizes))
    if np.any(starts < 512) or np.any(starts + member_bytes > shard_bytes):
        return None
    counts = fields_per_line // 4
    keys = [names[i].partition(b".")[0] for i in (np.cumsum(counts) - counts).tolist()]
    member_keys = [key for key, count in zip(keys, counts.tolist(), strict=True) for _ in range(count)]
    if names != list(map(b".".join, zip(member_keys, ext_names, strict=True))):
        return None
    table = SampleTable.of_shard(keys, ext_names, starts, member_bytes, counts)
    line_and_ext = np.sort(np.repeat(np.arange(len(keys)), counts) * len(table.exts) + table.member_ext)
    if np.any(np.diff(line_and_ext) == 0):
        return None  # an extension twice in one line
    return table
