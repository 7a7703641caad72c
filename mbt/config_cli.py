"""The training command line and its files: `--key value` flags and switches taken apart (`split_command_line`),
then a preset's tree with each `--config` file and the flags merged over it (`read_config`), where a file or the
command line that sets one of two tied keys alone sets both. The trees are read and built by `mbt.config_io`.
"""

from __future__ import annotations

import copy
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any, NamedTuple, TypeVar

from mbt.config_io import ConfigError, Limits, build, merge, read_yaml

T = TypeVar("T")


class CommandLine(NamedTuple):
    """A training command line taken apart: `--preset`, the `--config` files in order, the other settings as a
    nested tree of strings, and whether `--help` or `--print-config` was given."""

    preset: str | None
    files: list[Path]
    flags: dict[str, Any]
    help: bool = False
    print_config: bool = False


SWITCHES = {"-h": "help", "--help": "help", "--print-config": "print_config", "--print_config": "print_config"}


def split_command_line(args: Sequence[str]) -> CommandLine:
    """`args` as a CommandLine: `--key value` / `--key=value` settings ('-' in keys reads as '_') and the switches
    `--help` and `--print-config`, which take no value."""
    preset_name, files, flags, switches = None, [], {}, set()
    i = 0
    while i < len(args):
        token = args[i]
        if token in SWITCHES:
            switches.add(SWITCHES[token])
            i += 1
            continue
        if not token.startswith("--") or token == "--":
            raise ConfigError(f"unexpected argument {token!r}: settings are given as --key value")
        name, has_value, value = token[2:].partition("=")
        if not has_value:
            if i + 1 == len(args):
                raise ConfigError(f"{token} needs a value")
            i += 1
            value = args[i]
        i += 1
        key = name.replace("-", "_")
        if key == "preset":
            preset_name = value
        elif key == "config":
            files.append(Path(value))
        else:
            _set_dotted(flags, key, value)
    return CommandLine(preset_name, files, flags, "help" in switches, "print_config" in switches)


def _set_dotted(tree: dict[str, Any], key: str, value: str) -> None:
    """tree['model']['depth'] = value for key 'model.depth'."""
    *sections, leaf = key.split(".")
    node = tree
    for section in sections:
        child = node.get(section)
        if not isinstance(child, dict):
            child = node[section] = {}
        node = child
    node[leaf] = value


def read_config(
    cls: type[T],
    base: dict[str, Any],
    files: Sequence[Path],
    flags: Mapping[str, Any],
    limits: Limits,
    check: Callable[[T], list[str]] | None = None,
    tied: Sequence[tuple[str, str]] = (),
) -> T:
    """An instance of dataclass `cls`: the plain tree `base` with each YAML file of `files` merged over it in turn,
    then `flags`, its ints bounded by `limits`. Of each pair of dotted keys in `tied` (one quantity, two settings), a
    file or the command line that sets one alone sets both. ConfigError naming the file (or the command line) that
    brought an unknown key or a wrong value, or after which `check` (of values within their bounds) finds problems."""
    tree = base
    for path in files:
        tree = merge(tree, _tie(read_yaml(path), tied), str(path), cls)
        try:  # built after each file, so that a wrong value is blamed on the file that brought it
            problems = check(build(cls, tree, limits)) if check else []
        except ConfigError as err:
            raise ConfigError(f"--config {path}: {err}") from None
        if problems:
            raise ConfigError(f"--config {path}: {'; '.join(problems)}")
    return build(cls, merge(tree, _tie(flags, tied), "command line", cls), limits)


def _tie(overrides: Mapping[str, Any], tied: Sequence[tuple[str, str]]) -> Mapping[str, Any]:
    """`overrides` (a nested tree) with the other key of each `tied` pair set where it sets one key alone."""
    result = copy.deepcopy(dict(overrides))
    for pair in tied:
        given = [key for key in pair if _has_dotted(result, key)]
        if len(given) != 1:  # neither, or both: then validation refuses values that differ
            continue
        value: Any = result
        for part in given[0].split("."):
            value = value[part]
        *parents, leaf = pair[1 - pair.index(given[0])].split(".")
        section: Any = result
        for part in parents:
            section = section.setdefault(part, {}) if isinstance(section, dict) else None
        if isinstance(section, dict):  # else merge names the key that is not a section
            section[leaf] = value
    return result


def _has_dotted(tree: Mapping[str, Any], key: str) -> bool:
    for part in key.split("."):
        if not isinstance(tree, Mapping) or part not in tree:
            return False
        tree = tree[part]
    return True
