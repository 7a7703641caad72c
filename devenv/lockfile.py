"""What `uv.lock` pins: package versions, and a hash-checked pip requirement that bootstraps uv itself.

Standard library only: `make` runs it before anything is installed, and the environment check runs it when the
installed packages may be broken.

    python -m devenv.lockfile requirement uv   # "uv==0.13.9 --hash=sha256:… …", for pip --require-hashes
"""

from __future__ import annotations

import argparse
import re
import sys
import tomllib
from pathlib import Path

LOCK_FILE = Path(__file__).resolve().parent.parent / "uv.lock"


class LockError(Exception):
    """uv.lock is missing, unreadable, or does not pin what was asked."""


def _normalize(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def read_lock(path: Path = LOCK_FILE) -> list[dict]:
    """The `[[package]]` tables of a uv lock file."""
    try:
        data = tomllib.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError as err:
        raise LockError(f"{path}: no lock file; run `make lock` in the project's folder") from err
    except (OSError, UnicodeDecodeError, tomllib.TOMLDecodeError) as err:
        raise LockError(f"{path}: not a readable uv lock file ({err}); restore it with `git checkout uv.lock`") from err
    packages = data.get("package")
    if not isinstance(packages, list) or not all(isinstance(p, dict) for p in packages):
        raise LockError(f"{path}: no [[package]] tables; restore it with `git checkout uv.lock`")
    return packages


def locked_versions(path: Path = LOCK_FILE) -> dict[str, set[str]]:
    """Normalized package name → the versions the lock pins for it (several where it forks by Python version)."""
    versions: dict[str, set[str]] = {}
    for package in read_lock(path):
        name, version = package.get("name"), package.get("version")
        if isinstance(name, str) and isinstance(version, str):
            versions.setdefault(_normalize(name), set()).add(version)
    return versions


def pip_requirement(name: str, path: Path = LOCK_FILE) -> str:
    """`name==version --hash=sha256:…` for every wheel the lock records of `name` (one version required)."""
    matches = [p for p in read_lock(path) if _normalize(str(p.get("name", ""))) == _normalize(name)]
    if len(matches) != 1:
        raise LockError(f"{path}: pins {len(matches)} versions of {name}, expected exactly one; run `make lock`")
    package = matches[0]
    hashes = [w["hash"] for w in package.get("wheels", []) if isinstance(w, dict) and "hash" in w]
    if not hashes:
        raise LockError(f"{path}: no wheel hashes for {name}; run `make lock`")
    return " ".join([f"{package['name']}=={package['version']}", *(f"--hash={h}" for h in hashes)])


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="Read what uv.lock pins.")
    sub = parser.add_subparsers(dest="command", required=True)
    requirement = sub.add_parser("requirement", help="a pip requirement line, with hashes, for one locked package")
    requirement.add_argument("name")
    parser.add_argument("--lock", type=Path, default=LOCK_FILE, help="the lock file (default: the project's uv.lock)")
    args = parser.parse_args(argv)
    try:
        print(pip_requirement(args.name, args.lock))
    except LockError as err:
        print(f"error: {err}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
