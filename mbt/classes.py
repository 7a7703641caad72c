"""The classes a model is trained on: read from a split's manifest, recorded in checkpoints, compared between splits.

A record is plain data, `{"classes": [{"index": i, "id": str, "name": str}, ...], "multi_label": bool}`, so that
a checkpoint holding it still loads with `torch.load(weights_only=True)`. Two splits or a split and a checkpoint
fit each other only when their records are equal: the same ids and names in the same order, the same label kind.
Names and ids are shown to people (printed, plotted, written to CSVs): one holding a control character is refused.
"""

from __future__ import annotations

from typing import Any

from shards.manifest import MAX_CLASSES, Manifest
from shards.text import excerpt, name_problem, printable


class ClassListError(ValueError):
    """A manifest's or checkpoint's class list is not a list of {index, id, name}; the message names where."""


def class_record(manifest: Manifest, where: str) -> dict[str, Any]:
    """The record of the split whose manifest is `manifest` (read from `where`, which errors name)."""
    return {"classes": _class_list(manifest.classes, where), "multi_label": bool(manifest.multi_label)}


def checked_record(record: Any, where: str) -> dict[str, Any]:
    """`record` (as a checkpoint stores it) if it is one, else ClassListError naming `where`."""
    if not isinstance(record, dict) or set(record) != {"classes", "multi_label"}:
        raise ClassListError(f"{where}: its class record is not a mapping of 'classes' and 'multi_label'")
    if not isinstance(record["multi_label"], bool):
        raise ClassListError(f"{where}: its class record's multi_label is not true or false")
    return {"classes": _class_list(record["classes"], where), "multi_label": record["multi_label"]}


def record_difference(old: dict[str, Any], new: dict[str, Any], old_name: str, new_name: str) -> str | None:
    """How the records `old` (of `old_name`) and `new` differ, first difference only; None when they are equal."""
    if old["multi_label"] != new["multi_label"]:
        kinds = {True: "multi-label", False: "single-label"}
        return f"{old_name} is {kinds[old['multi_label']]}, {new_name} {kinds[new['multi_label']]}"
    for a, b in zip(old["classes"], new["classes"], strict=False):
        if a != b:
            return (
                f"class {a['index']} is {excerpt(a['name'])} ({printable(a['id'])}) in {old_name} but "
                f"{excerpt(b['name'])} ({printable(b['id'])}) in {new_name}"
            )
    if len(old["classes"]) != len(new["classes"]):
        return f"{old_name} has {len(old['classes'])} classes, {new_name} {len(new['classes'])}"
    return None


def _class_list(classes: Any, where: str) -> list[dict[str, Any]]:
    if not isinstance(classes, list) or not 1 <= len(classes) <= MAX_CLASSES:
        raise ClassListError(f"{where}: the class list is not a list of 1..{MAX_CLASSES} classes")
    out = []
    for i, entry in enumerate(classes):
        if not (
            isinstance(entry, dict)
            and entry.get("index", i) == i
            and isinstance(entry.get("id"), str)
            and isinstance(entry.get("name"), str)
        ):
            raise ClassListError(
                f"{where}: class {i} is not a mapping of index {i}, a string id and a string name: "
                f"{excerpt(entry, 200)}"
            )
        for field in ("id", "name"):
            if problem := name_problem(entry[field]):
                raise ClassListError(
                    f"{where}: class {i}'s {field} {excerpt(entry[field])} {problem}; fix the class list at its source "
                    "(the class file the split was sharded from) and make this file again"
                )
        out.append({"index": i, "id": entry["id"], "name": entry["name"]})
    return out
