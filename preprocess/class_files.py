"""Class lists of a labelled video collection (tools/shard_csv.py): read from a file, or collected from the labels
of its CSV, as the manifest's `{"index", "id", "name"}` entries; and the lookup of a label among them.

A class file is one name per line, or a CSV with one of the headers `index,id,name` (this project's),
`index,mid,display_name` (AudioSet's class_labels_indices.csv) or `id,key,...` (EPIC-KITCHENS-100's
verb and noun class files: `id` is the index, `key` the name). Bad input raises `DatasetError` naming file:line;
class ids and names, from a class file or from the CSV's labels, must be printable (`check_class_name`).
"""

from __future__ import annotations

import os
from collections.abc import Iterable
from typing import Any

from preprocess.datasets import (
    DatasetError,
    check_class_name,
    csv_rows,
    read_audioset_classes,
    read_class_list,
    read_lines,
)
from shards.manifest import MAX_CLASSES
from shards.text import excerpt

LABEL_TYPES = ("auto", "names", "indices")
_INDEXED_HEADERS = (("index", "id", "name"), ("index", "mid", "display_name"))
_EPIC_HEADER = ("id", "key")


def class_entry(index: int, class_id: str, name: str) -> dict[str, Any]:
    return {"index": index, "id": class_id, "name": name}


def read_class_file(path: str | os.PathLike) -> list[dict[str, Any]]:
    """The classes of `path` in index order (see the module docstring for the formats); a malformed row, an
    index out of order, a duplicate id or name, or no class at all -> DatasetError naming file:line."""
    # The header is recognised on the raw first line: a plain name list need not be valid CSV.
    first = next((line for _, line in read_lines(path) if line.strip()), "")
    header = [field.strip() for field in first.split(",")]
    if tuple(header) == _INDEXED_HEADERS[1]:
        return [class_entry(i, mid, name) for i, (mid, name) in enumerate(read_audioset_classes(path))]
    if tuple(header) == _INDEXED_HEADERS[0] or tuple(header[:2]) == _EPIC_HEADER:
        return _read_indexed(path, header)
    return [class_entry(i, name, name) for i, name in enumerate(read_class_list(path))]


def _read_indexed(path: str | os.PathLike, header: list[str]) -> list[dict[str, Any]]:
    """Rows `index,id,name` or EPIC's `id,key,...` (id is the index and the class id, key the name)."""
    epic = tuple(header[:2]) == _EPIC_HEADER
    classes: list[dict[str, Any]] = []
    source_of: dict[str, str] = {}
    for source, fields in list(csv_rows(path))[1:]:
        if len(fields) != len(header):
            raise DatasetError(f"{source}: expected {len(header)} columns {','.join(header)}, got {len(fields)}")
        index, class_id, name = (fields[0], fields[0], fields[1]) if epic else fields
        if index != str(len(classes)):
            raise DatasetError(f"{source}: index {excerpt(index, 40)} out of order, expected {len(classes)}")
        if len(classes) >= MAX_CLASSES:
            raise DatasetError(f"{source}: more than {MAX_CLASSES} classes")
        for what, value in (("id", class_id), ("name", name)):
            if not value:
                raise DatasetError(f"{source}: empty class {what}")
            if (what, value) in source_of:
                raise DatasetError(f"{source}: class {what} {excerpt(value)} already given at {source_of[what, value]}")
            check_class_name(value, f"class {what}", source)
            source_of[what, value] = source
        classes.append(class_entry(len(classes), class_id, name))
    if not classes:
        raise DatasetError(f"{os.fspath(path)}: no classes after the header")
    return classes


def is_index(text: str) -> bool:
    """Whether a label is written as a class index (ASCII digits, no sign)."""
    return text.isascii() and text.isdigit()


def choose_label_type(label_type: str, labels: Iterable[str], classes: list[dict[str, Any]] | None) -> str:
    """'names' or 'indices': as stated, or (auto) indices when every label is a number and no class in a given class
    file is named or identified by one (then a label '3' is that class, not index 3)."""
    if label_type not in LABEL_TYPES:
        raise DatasetError(f"--label-type must be one of {', '.join(LABEL_TYPES)}, got {excerpt(label_type)}")
    if label_type != "auto":
        return label_type
    numeric_classes = classes is not None and any(is_index(c["id"]) or is_index(c["name"]) for c in classes)
    return "indices" if all(is_index(label) for label in labels) and not numeric_classes else "names"


def index_labels(labels: tuple[str, ...], source: str) -> tuple[str, ...]:
    """Labels written as class indices, normalised ('007' is class 7); DatasetError naming `source` for any other."""
    if bad := next((label for label in labels if not is_index(label)), None):
        raise DatasetError(f"{source}: label {excerpt(bad)} is not a class index (--label-type indices)")
    return tuple(label.lstrip("0") or "0" for label in labels)


def collect_classes(rows: Iterable[tuple[str, tuple[str, ...]]], label_type: str, where: str) -> list[dict[str, Any]]:
    """The classes of a CSV without a class file, from its rows' (source, labels): the distinct label names sorted,
    or for indices 0..max (named by their number); DatasetError naming `where` when no row has a label, or the
    first line of a label that is no printable class name."""
    first_source: dict[str, str] = {}
    for source, labels in rows:
        for label in labels:
            first_source.setdefault(label, source)
    if not first_source:
        raise DatasetError(f"{where}: no row has a label")
    if label_type == "names":
        if len(first_source) > MAX_CLASSES:
            raise DatasetError(f"{where}: {len(first_source)} distinct labels: more than {MAX_CLASSES} classes")
        for label, source in first_source.items():
            check_class_name(label, "label", source)
        return [class_entry(i, name, name) for i, name in enumerate(sorted(first_source))]
    for label, source in first_source.items():
        if len(label) > 7 or int(label) >= MAX_CLASSES:
            raise DatasetError(f"{source}: class index {excerpt(label, 40)} is not below {MAX_CLASSES}")
    return [class_entry(i, str(i), str(i)) for i in range(max(int(label) for label in first_source) + 1)]


def label_lookup(classes: list[dict[str, Any]], label_type: str) -> dict[str, int]:
    """The class index of each way a label may be written: its index (indices), else its id or its name (an id wins
    over another class's name)."""
    if label_type == "indices":
        return {str(c["index"]): c["index"] for c in classes}
    lookup = {c["name"]: c["index"] for c in classes}
    lookup.update({c["id"]: c["index"] for c in classes})
    return lookup
