"""Reading and writing configs: a frozen dataclass of nested sections (such as `mbt.config.TrainConfig`) from plain
trees and YAML files, each value read as its field's type and bounded as it is read (the command line's flags and
`--config` files: `mbt.config_cli`).

YAML is read without tags that construct objects (a `!!python/...` tag is an error) and with each key at most
once; ints are bounded by the caller's limits, floats must be finite, strings hold no NUL. Every error is a
ConfigError that names the key and where it came from (a file, the command line).
"""

from __future__ import annotations

import contextlib
import dataclasses
import difflib
import math
import reprlib
import types
import typing
from collections.abc import Mapping
from pathlib import Path
from typing import Any, TypeVar

import yaml

from shards.atomic import write_bytes_atomic

T = TypeVar("T")
_TRUE = ("true", "1", "yes", "on")
_FALSE = ("false", "0", "no", "off")
_NONE = ("none", "null")
MAX_CONFIG_BYTES = 1 << 20
Limits = Mapping[str, tuple[int, int, str]]  # dotted key → (least, most, what the value counts)


class ConfigError(ValueError):
    """A configuration key or value is wrong; the message names it and says what to change."""


def keys_help(cls: type, values: Mapping[str, Any]) -> list[str]:
    """One line per leaf of dataclass `cls`: `--key (type) value`, the value from the plain tree `values`."""
    lines = []
    for key, hint in leaf_fields(cls):
        value: Any = values
        for part in key.split("."):
            value = value[part]
        shown = ",".join(map(str, value)) if isinstance(value, list) else value
        lines.append(f"  --{key} ({_type_name(hint)}) {shown}")
    return lines


def plain(value: Any) -> Any:
    """`value` as nested plain values: dicts for dataclasses, lists for tuples (YAML- and `weights_only`-safe)."""
    if dataclasses.is_dataclass(value):
        return {f.name: plain(getattr(value, f.name)) for f in dataclasses.fields(value)}
    if isinstance(value, tuple):
        return [plain(v) for v in value]
    return value


def write_yaml(data: Mapping[str, Any], path: str | Path) -> Path:
    """Write the plain tree `data` as YAML to `path` (atomically; parent folders made), keys in order."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    return write_bytes_atomic(path, yaml.safe_dump(dict(data), sort_keys=False).encode())


def leaf_fields(cls: type, prefix: str = "") -> list[tuple[str, Any]]:
    """(dotted key, type hint) of every non-dataclass field of `cls`, nested sections flattened."""
    hints = typing.get_type_hints(cls)
    leaves = []
    for f in dataclasses.fields(cls):
        hint = hints[f.name]
        if dataclasses.is_dataclass(hint):
            leaves += leaf_fields(hint, f"{prefix}{f.name}.")
        else:
            leaves.append((prefix + f.name, hint))
    return leaves


def value_problems(obj: Any, limits: Limits) -> list[str]:
    """`leaf_problem` of every leaf of the dataclass instance `obj`."""
    problems = []
    for key, _ in leaf_fields(type(obj)):
        value = obj
        for part in key.split("."):
            value = getattr(value, part)
        if problem := leaf_problem(key, value, limits):
            problems.append(problem)
    return problems


def leaf_problem(key: str, value: Any, limits: Limits) -> str | None:
    """What is wrong with `value` as `key` on its own: an int outside its `limits`, a float that is not finite, a
    string with a NUL."""
    if key in limits and isinstance(value, int):
        least, most, what = limits[key]
        if not least <= value <= most:
            return f"--{key} must be in {least}..{most} ({what}), got {value}"
    items = value if isinstance(value, tuple) else (value,)
    if any(isinstance(item, float) and not math.isfinite(item) for item in items):
        return f"--{key} must be a finite number, got {value}"
    if isinstance(value, str) and "\0" in value:  # no path or URL holds one; os calls would raise on it
        return f"--{key} holds a NUL character: {_short(value)}"
    return None


class _ConfigLoader(yaml.SafeLoader):
    """PyYAML's safe loader (plain values only: a `!!python/...` tag is an error), refusing a key given twice."""

    def construct_mapping(self, node: yaml.MappingNode, deep: bool = False) -> dict[Any, Any]:
        seen = set()
        for key_node, _ in node.value:
            if key_node.tag == "tag:yaml.org,2002:merge":  # `<<: *base` may be overridden, as YAML intends
                continue
            key = self.construct_object(key_node, deep=deep)
            with contextlib.suppress(TypeError):  # an unhashable key: the safe loader's own error names it
                if key in seen:
                    raise yaml.constructor.ConstructorError(
                        None, None, f"key {key!r} is given twice: keep one", key_node.start_mark
                    )
                seen.add(key)
        return super().construct_mapping(node, deep=deep)


def read_yaml(path: Path) -> Mapping[str, Any]:
    """The mapping of a config file; ConfigError naming it if it is not a UTF-8 YAML mapping of at most
    MAX_CONFIG_BYTES."""
    if path.is_dir():
        raise ConfigError(f"--config {path}: a folder, not a file; give its YAML file (a run's is config.yaml)")
    try:
        with path.open("rb") as f:
            raw = f.read(MAX_CONFIG_BYTES + 1)
    except FileNotFoundError:
        raise ConfigError(f"--config {path}: no such file") from None
    except OSError as err:
        raise ConfigError(f"--config {path}: cannot be read ({err.strerror})") from None
    if len(raw) > MAX_CONFIG_BYTES:
        raise ConfigError(f"--config {path}: larger than {MAX_CONFIG_BYTES} bytes; a config is a short YAML mapping")
    try:
        text = raw.decode("utf-8-sig")
    except UnicodeDecodeError as err:
        raise ConfigError(f"--config {path}: not UTF-8 text (byte {err.start}); save it as UTF-8") from None
    try:
        data = yaml.load(text, Loader=_ConfigLoader)  # a SafeLoader: constructs plain values only
    except yaml.YAMLError as err:
        raise ConfigError(f"--config {path}: not valid YAML ({' '.join(str(err).split())})") from None
    except RecursionError:
        raise ConfigError(f"--config {path}: nested too deeply to be a config") from None
    if data is None:
        return {}
    if not isinstance(data, Mapping):
        raise ConfigError(f"--config {path}: expected a mapping of config keys, got a {type(data).__name__}")
    return data


def merge(
    base: dict[str, Any], overrides: Mapping[str, Any], source: str, cls: type, prefix: str = ""
) -> dict[str, Any]:
    """`base` (a full plain tree of dataclass `cls`) with `overrides` applied; ConfigError naming `source` on
    unknown keys, with the closest keys of `cls`."""
    merged = dict(base)
    for key, value in overrides.items():
        dotted = f"{prefix}{key}"
        if key not in base:
            keys = [key for key, _ in leaf_fields(cls)]
            close = difflib.get_close_matches(dotted, keys, n=3, cutoff=0.6)
            hint = f"did you mean {', '.join(close)}?" if close else "run with --help for the list of keys"
            raise ConfigError(f"{source}: unknown key {dotted!r}; {hint}")
        if isinstance(base[key], dict):
            if not isinstance(value, Mapping):
                raise ConfigError(
                    f"{source}: {dotted!r} is a section: give a mapping of its keys in YAML, or --{dotted}.KEY value"
                )
            merged[key] = merge(base[key], value, source, cls, f"{dotted}.")
        else:
            merged[key] = value
    return merged


def build(cls: type[T], tree: Mapping[str, Any], limits: Limits, prefix: str = "") -> T:
    """An instance of dataclass `cls` from a full plain tree, each value read as its field's type and bounded by
    `limits`."""
    hints = typing.get_type_hints(cls)
    values = {}
    for f in dataclasses.fields(cls):
        hint, value = hints[f.name], tree[f.name]
        key = prefix + f.name
        if dataclasses.is_dataclass(hint):
            values[f.name] = build(hint, value, limits, f"{key}.")
            continue
        values[f.name] = _coerce(key, value, hint)
        if problem := leaf_problem(key, values[f.name], limits):  # before the dataclass: MBTConfig divides by num_heads
            raise ConfigError(problem)
    try:
        return cls(**values)
    except ValueError as err:
        section = prefix.rstrip(".")
        raise ConfigError(f"invalid {section} settings: {err}; change them with --{section}.KEY") from err


def _coerce(key: str, value: Any, hint: Any) -> Any:
    """`value` (from YAML, a flag's string or a stored dict) as type `hint`; ConfigError naming `key` if it is not."""
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if origin in (typing.Union, types.UnionType):
        if value is None or (isinstance(value, str) and value.lower() in _NONE):
            return None
        (inner,) = (a for a in args if a is not type(None))
        return _coerce(key, value, inner)
    if origin is tuple:
        items = value.split(",") if isinstance(value, str) else value
        if isinstance(items, list | tuple):
            item_types = args[:1] * len(items) if args[-1:] == (...,) else args
            if len(items) == len(item_types):
                return tuple(
                    _coerce(f"{key}[{i}]", v, t) for i, (v, t) in enumerate(zip(items, item_types, strict=True))
                )
    elif hint is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.lower() in _TRUE + _FALSE:
            return value.lower() in _TRUE
        if isinstance(value, int) and value in (0, 1):
            return bool(value)
    elif hint in (int, float) and not isinstance(value, bool):
        number = None
        with contextlib.suppress(ValueError, OverflowError):  # not a number: the error below says what was expected
            if isinstance(value, int) or (hint is float and isinstance(value, float)):
                number = hint(value)
            elif isinstance(value, str):
                number = hint(value.strip())
        if number is not None and (hint is int or math.isfinite(number)):
            return number
    elif hint is str and isinstance(value, str):
        return value
    finite = " (a finite number)" if hint is float else ""
    raise ConfigError(f"{key}: expected {_type_name(hint)}{finite}, got {_short(value)}")


def _short(value: Any) -> str:
    """repr of `value`, cut short: a YAML alias bomb must not be printed in full."""
    short = reprlib.Repr()
    short.maxlevel, short.maxstring, short.maxother = 3, 80, 80
    return short.repr(value)


def _type_name(hint: Any) -> str:
    if typing.get_origin(hint) in (typing.Union, types.UnionType):
        return " or ".join(_type_name(a) for a in typing.get_args(hint))
    if typing.get_origin(hint) is tuple:
        return "comma list " + ",".join("..." if a is ... else a.__name__ for a in typing.get_args(hint))
    return "none" if hint is type(None) else hint.__name__
