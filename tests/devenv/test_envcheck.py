"""The environment check (devenv.envcheck) and the lock reader (devenv.lockfile), on simulated broken environments.

Broken packages are simulated with stand-ins earlier on PYTHONPATH (a module that fails as the real failure does,
with installed metadata of the bad version), or a bare venv: the real .venv is never touched.
"""

from __future__ import annotations

import subprocess
import sys
import tomllib
from pathlib import Path

import pytest
from conftest import REPO

from devenv import envcheck, lockfile

TORCH = next(c for c in envcheck.COMPONENTS if c.name == "torch")
TORCHAUDIO = next(c for c in envcheck.COMPONENTS if c.name == "torchaudio")
TIMM = next(c for c in envcheck.COMPONENTS if c.name == "timm")


def stand_in(root: Path, name: str, version: str, body: str) -> None:
    """An installed-looking package `name` at `version` whose import runs `body`."""
    (root / name).mkdir(parents=True)
    (root / name / "__init__.py").write_text(body)
    info = root / f"{name}-{version}.dist-info"
    info.mkdir()
    (info / "METADATA").write_text(f"Metadata-Version: 2.1\nName: {name}\nVersion: {version}\n")


ABI_ERROR = (
    "raise OSError('/venv/lib/python3.11/site-packages/torchaudio/lib/libtorchaudio.so: undefined symbol: "
    "torch_exception_get_what_without_backtrace')\n"
)


def test_lock_pins_the_gpu_machines_torch_trio() -> None:
    versions = lockfile.locked_versions()
    assert versions["torch"] == {"2.11.0"}
    assert versions["torchaudio"] == {"2.11.0"}
    assert versions["torchvision"] == {"0.26.0"}


def test_lock_has_hashes_for_every_package_from_the_registry() -> None:
    for package in tomllib.loads((REPO / "uv.lock").read_text())["package"]:
        if "registry" not in package["source"]:
            continue  # the project itself
        files = package.get("wheels", []) + ([package["sdist"]] if "sdist" in package else [])
        assert files and all(f["hash"].startswith("sha256:") for f in files), package["name"]


def test_uv_bootstrap_requirement_carries_hashes() -> None:
    line = lockfile.pip_requirement("uv")
    version = next(iter(lockfile.locked_versions()["uv"]))
    assert line.startswith(f"uv=={version} --hash=sha256:")


def test_lock_errors_name_the_file(tmp_path: Path) -> None:
    bad = tmp_path / "uv.lock"
    bad.write_text("this is = not [toml")
    with pytest.raises(lockfile.LockError, match=r"uv\.lock: not a readable uv lock file"):
        lockfile.locked_versions(bad)
    with pytest.raises(lockfile.LockError, match="no lock file"):
        lockfile.locked_versions(tmp_path / "missing.lock")
    with pytest.raises(lockfile.LockError, match="pins 0 versions of nonexistent"):
        lockfile.pip_requirement("nonexistent")


def test_compatible_trio() -> None:
    assert envcheck.compatible_trio("2.11.0") == {"torchaudio": "2.11.0", "torchvision": "0.26.0"}
    assert envcheck.compatible_trio("2.9.1+cu128") == {"torchaudio": "2.9.1", "torchvision": "0.24.1"}


@pytest.mark.slow
def test_all_well_is_one_line_per_component() -> None:
    proc = subprocess.run([sys.executable, "-m", "devenv.envcheck"], capture_output=True, text=True, cwd=REPO)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    lines = proc.stdout.splitlines()
    names = ["python", *(c.name for c in envcheck.COMPONENTS), "ffmpeg", "ffprobe"]
    assert len(lines) == len(names)
    for line, name in zip(lines, names, strict=True):
        assert line.startswith(f"ok   {name}"), line


@pytest.mark.slow
def test_abi_mismatch_names_package_versions_and_fix(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """torchaudio 2.11.1 beside torch 2.11.0, as a fresh install got it: named here, with the command that fixes it."""
    stand_in(tmp_path, "torchaudio", "2.11.1", ABI_ERROR)
    monkeypatch.setenv("PYTHONPATH", str(tmp_path))
    monkeypatch.setattr(envcheck, "COMPONENTS", (TORCH, TORCHAUDIO))

    assert envcheck.main([]) == 1
    out = capsys.readouterr()
    assert "ok   torch 2.11.0" in out.out
    assert "FAIL torchaudio 2.11.1: uv.lock pins 2.11.0" in out.out
    assert "environment check failed: torchaudio" in out.err

    assert envcheck.main(["--no-lock"]) == 1  # a pip user without the lock: the import failure itself
    out = capsys.readouterr().out
    assert "FAIL torchaudio 2.11.1: does not load beside torch 2.11.0 (needs torchaudio 2.11.0; OSError:" in out
    assert "undefined symbol: torch_exception_get_what_without_backtrace" in out
    assert f"fix: {sys.executable} -m pip install 'torchaudio==2.11.0'" in out


def test_fix_in_the_project_venv_is_make_sync() -> None:
    fixes = envcheck.Fixes(str(REPO / ".venv" / "bin" / "python"), {"torchaudio": {"2.11.0"}})
    if not fixes.project_venv:
        pytest.skip("the suite is not running in the project's .venv")
    assert fixes.package("torchaudio", "2.11.0") == "make sync"
    assert fixes.package("torchaudio", "2.11.0", broken=True) == "make sync REINSTALL=torchaudio"


def test_broken_package_at_the_locked_version_is_reinstalled(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    timm_version = next(iter(lockfile.locked_versions()["timm"]))
    stand_in(tmp_path, "timm", timm_version, "raise ImportError('cannot import name Block (damaged install)')\n")
    monkeypatch.setenv("PYTHONPATH", str(tmp_path))
    monkeypatch.setattr(envcheck, "COMPONENTS", (TIMM,))
    assert envcheck.main(["--no-lock"]) == 1
    out = capsys.readouterr().out
    assert f"FAIL timm {timm_version}: fails to load (ImportError: cannot import name Block (damaged install))" in out
    assert f"pip install --force-reinstall 'timm=={timm_version}'" in out


def test_a_crashing_import_is_named_and_the_rest_still_checked(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    stand_in(tmp_path, "webdataset", "1.0.2", "import os\nos.abort()\n")
    stand_in(tmp_path, "einops", "0.8.2", "")
    components = (
        envcheck.Component("webdataset", "webdataset"),
        envcheck.Component("einops", "einops", "print('fine')"),
    )
    monkeypatch.setenv("PYTHONPATH", str(tmp_path))
    monkeypatch.setattr(envcheck, "COMPONENTS", components)
    assert envcheck.main(["--no-lock"]) == 1
    out = capsys.readouterr().out
    assert "FAIL webdataset 1.0.2: fails to load (the import crashed the interpreter" in out
    assert "ok   einops 0.8.2 (fine)" in out


def test_missing_packages_in_a_bare_venv(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """A venv without the project's packages (the wrong interpreter, or set-up never ran)."""
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(tmp_path / "venv")], check=True)
    python = str(tmp_path / "venv" / "bin" / "python")
    assert envcheck.main(["--python", python]) == 1
    out = capsys.readouterr().out
    assert "FAIL torch: not installed (ModuleNotFoundError: No module named 'torch')" in out
    assert f"fix: {python} -m pip install 'torch==2.11.0'" in out
    assert "ok   nvidia-dali-cuda130" not in out  # locked, so expected
    assert out.splitlines()[0].startswith("ok   python 3.")


def test_missing_ffmpeg(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("PATH", "/nonexistent")
    for name in envcheck.FFMPEG_ENV:
        monkeypatch.delenv(name, raising=False)
    results = envcheck.check_ffmpeg()
    assert [r.ok for r in results] == [False, False]
    assert results[0].line == "ffmpeg: not found on PATH"
    assert results[0].fix.endswith("apt-get install -y ffmpeg")
