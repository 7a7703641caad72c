"""The one-way rule of the house: data flows `shards ← preprocess`, `shards ← pipelines ← mbt ← serve/experiments`,
and imports go the same way, never back. Every import of every module is read (those inside functions too, and
`importlib.import_module("...")` with a literal name); a back-arrow fails with the file, the line and the rule.
Tools are thin command lines over the packages: a tool that loads another tool (to reuse its code) fails too."""

from __future__ import annotations

import ast
import re
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]

# Which of the project's packages each may import. `tools/` are thin command lines over all of them; nothing imports
# `tools` or `tests` (and a tool loads no other tool: `tool_loads`).
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


# A path to a tool: "tools/x.py" (with any folder before it), or a bare "x.py" where x is a tool's name.
TOOL_PATH = re.compile(r"(?:.*/)?tools/\w+\.py|(?P<name>\w+)\.py")


def docstrings(tree: ast.AST) -> set[int]:
    """ids of the docstring constants of `tree`'s module, classes and functions (prose, not paths)."""
    found = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Module | ast.ClassDef | ast.FunctionDef | ast.AsyncFunctionDef) and node.body:
            first = node.body[0]
            if isinstance(first, ast.Expr) and isinstance(first.value, ast.Constant):
                found.add(id(first.value))
    return found


def tool_loads(root: Path) -> list[str]:
    """Every place under `root`/tools where a tool loads another file of tools/, as 'file:line: what': an import of
    a tool (`import bench_model`, `from tools.x import ...`), runpy, `spec_from_file_location`, or a string that
    is a path to a tool. Tests may load tools; tools may not."""
    tools = {path.stem for path in (root / "tools").glob("*.py")}
    problems = []
    for path in sorted((root / "tools").rglob("*.py")):
        tree = ast.parse(path.read_text(), str(path))
        where = f"{path.relative_to(root)}:"
        for line, name in imported_names(tree):
            top = name.split(".")[0]
            if top in tools | {"tools", "runpy"}:
                problems.append(f"{where}{line}: imports {name}")
        prose = docstrings(tree)
        for node in ast.walk(tree):
            call = getattr(node.func, "attr", getattr(node.func, "id", None)) if isinstance(node, ast.Call) else None
            if call in ("spec_from_file_location", "SourceFileLoader"):
                problems.append(f"{where}{node.lineno}: loads a file with {ast.unparse(node.func)}")
            elif isinstance(node, ast.Constant) and isinstance(node.value, str) and id(node) not in prose:
                match = TOOL_PATH.fullmatch(node.value)
                if match and (match["name"] is None or match["name"] in tools):
                    problems.append(f"{where}{node.lineno}: names the tool file {node.value!r}")
    return problems


def test_tools_load_no_other_tool() -> None:
    assert tool_loads(REPO) == []


@pytest.mark.parametrize(
    ("source", "offence"),
    [
        ("import importlib.util\nspec = importlib.util.spec_from_file_location('t', 'x')\n", "loads a file with"),
        ("import runpy\n", "imports runpy"),
        ("import importlib.machinery as m\nm.SourceFileLoader('t', 'x').load_module()\n", "loads a file with"),
        ("def f():\n    import bench_model\n", "imports bench_model"),
        ("from tools.bench_model import train_step\n", "imports tools.bench_model"),
        ("from pathlib import Path\nPath(__file__).with_name('bench_model.py')\n", "names the tool file"),
        ("SIBLING = 'tools/bench_model.py'\n", "names the tool file"),
    ],
)
def test_a_tool_loading_a_tool_is_named(tmp_path: Path, source: str, offence: str) -> None:
    (tmp_path / "tools").mkdir()
    (tmp_path / "tools" / "bench_model.py").write_text('"""Reads tools/other.py in its docstring: prose."""\n')
    (tmp_path / "tools" / "gpu_check.py").write_text(source)
    (problem,) = tool_loads(tmp_path)
    assert problem.startswith("tools/gpu_check.py:") and offence in problem


def test_tests_may_load_tools(tmp_path: Path) -> None:
    (tmp_path / "tools").mkdir()
    (tmp_path / "tools" / "gpu_check.py").write_text('"""Run as python tools/gpu_check.py."""\nNAME = "out.py"\n')
    (tmp_path / "tests").mkdir()
    (tmp_path / "tests" / "conftest.py").write_text("import runpy\nrunpy.run_path('tools/gpu_check.py')\n")
    assert tool_loads(tmp_path) == []
