"""The rule for numbers read from data. Manifests, index files, state files, CSVs, checkpoints, exports, configs and
videos come from shared buckets and the open web, and a file of a few KB can claim 10^8 rows or a duration of years:
every size, count, duration or dimension read from a file is checked against (a) a stated limit (a named constant
beside its reader, saying why that much) and (b) what the file, or its folder, itself holds, **before** anything is
allocated or planned from it. A refusal is the project's own error naming the file and what to do, in one line.
"""

from __future__ import annotations


def is_count(value: object, least: int = 0, most: float = 10**9) -> bool:
    """Whether `value` is an int (not a bool) in `least..most`: the check (a) of a count read from data."""
    return isinstance(value, int) and not isinstance(value, bool) and least <= value <= most
