"""The one-way rule of the house: data flows `shards ← preprocess`, `shards ← pipelines ← mbt ← serve/experiments`,
and imports go the same way, never back. Every import of every module is read (those inside functions too, and
`importlib.import_module("...")` with a literal name); a back-arrow fails with the file, the line and the rule."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]

# Which of the project's packages each may import. `tools/` are thin command lines over all of them; nothing imports
# `tools` or `tests`.
ALLOWED: dict[str, frozenset[str]] = {
    "shards": frozenset(),
    "preprocess": frozenset({"shards"}),
    "pipelines": frozenset({"shards"}),
    "mbt": frozenset({"shards", "pipelines"}),
    "serve": frozenset({"shards", "pipelines", "mbt", "preprocess"}),
    "bench": frozenset({"shards", "pipelines", "mbt", "preprocess"}),
    "experiments": frozenset({"shards", "pipelines", "mbt", "preprocess", "serve"}),
    "devenv": frozenset(),  # read before anything is installed: the standard library only
    "tools": frozenset({"shards", "preprocess", "pipelines", "mbt", "serve", "bench", "experiments", "devenv"}),
}
PROJECT = frozenset(ALLOWED) | {"tests"}


def imported_names(tree: ast.AST) -> list[tuple[int, str]]:
    """(line, module name) of every import in `tree`: statements anywhere, and import_module calls with a literal."""
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found += [(node.lineno, alias.name) for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            found.append((node.lineno, node.module))
        elif (
            isinstance(node, ast.Call)
            and getattr(node.func, "attr", getattr(node.func, "id", None)) == "import_module"
            and node.args
            and isinstance(node.args[0], ast.Constant)
            and isinstance(node.args[0].value, str)
        ):
            found.append((node.lineno, node.args[0].value))
    return found


def layer_violations(root: Path) -> list[str]:
    """Every import under `root` that breaks ALLOWED, as 'file:line: package imports other (allowed: ...)'."""
    problems = []
    for package, allowed in ALLOWED.items():
        for path in sorted((root / package).rglob("*.py")):
            for line, name in imported_names(ast.parse(path.read_text(), str(path))):
                top = name.split(".")[0]
                if top in PROJECT and top != package and top not in allowed:
                    rule = ", ".join(sorted(allowed)) or "none of the project's packages"
                    problems.append(f"{path.relative_to(root)}:{line}: {package} imports {name} (allowed: {rule})")
    return problems


def test_imports_follow_the_data() -> None:
    assert layer_violations(REPO) == []


def test_every_package_has_a_rule() -> None:
    packages = {p.parent.name for p in REPO.glob("*/__init__.py")}
    assert packages <= set(ALLOWED), f"packages without a rule in ALLOWED: {sorted(packages - set(ALLOWED))}"


@pytest.mark.parametrize(
    ("package", "source", "offender"),
    [
        ("mbt", "from preprocess.datasets import ClipRow\n", "preprocess.datasets"),
        ("shards", "def f():\n    import pipelines.config\n", "pipelines.config"),
        ("pipelines", "import importlib\nimportlib.import_module('mbt.model')\n", "mbt.model"),
        ("devenv", "from mbt import model\n", "mbt"),
        ("serve", "from experiments.demo import VARIANTS\n", "experiments.demo"),
        ("tools", "from tests.conftest import REPO\n", "tests.conftest"),
    ],
)
def test_a_back_arrow_is_named(tmp_path: Path, package: str, source: str, offender: str) -> None:
    (tmp_path / package).mkdir()
    (tmp_path / package / "m.py").write_text(source)
    (problem,) = layer_violations(tmp_path)
    assert problem.startswith(f"{package}/m.py:") and f"{package} imports {offender}" in problem
