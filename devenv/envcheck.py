"""Environment check: does everything the project runs on load and work, at the versions uv.lock pins?

    python -m devenv.envcheck            # one line per component; exit 1 naming the broken package and its fix

Each Python component is imported, and used once, in a fresh interpreter of its own (with a time limit), so that a
library that fails to load (an ABI mismatch such as torchaudio 2.11.1 beside torch 2.11.0, a missing shared object,
a crash) is named here rather than deep in a traceback, and cannot take the check down with it. Standard library
only: it runs when the packages it checks are broken.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

from devenv.lockfile import LOCK_FILE, LockError, locked_versions

PROBE_TIMEOUT_S = 120.0
MIN_PYTHON = (3, 11)


@dataclass(frozen=True)
class Component:
    """A Python distribution to import and exercise; `probe` is code run after the import, printing a detail."""

    name: str  # distribution name, as uv.lock spells it
    module: str
    probe: str = "print('')"
    optional: bool = False


COMPONENTS = (
    Component(
        "torch",
        "torch",
        "x = torch.ones(4) @ torch.ones(4); assert x.item() == 4\n"
        "print(f'CUDA {torch.version.cuda}, {torch.cuda.device_count()} GPU(s)' if torch.cuda.is_available()"
        " else 'CPU; no CUDA device')",
    ),
    Component(
        "torchaudio",
        "torchaudio",
        "import torch, torchaudio.compliance.kaldi as kaldi\n"
        "f = kaldi.fbank(torch.zeros(1, 16000) + 1e-3, num_mel_bins=128, htk_compat=True, dither=0.0,"
        " sample_frequency=16000)\n"
        "assert tuple(f.shape) == (98, 128), f.shape\nprint('kaldi fbank ok')",
    ),
    Component(
        "torchvision",
        "torchvision",
        "import torch\nfrom torchvision.io import decode_jpeg, encode_jpeg\n"
        "img = decode_jpeg(encode_jpeg(torch.zeros(3, 16, 16, dtype=torch.uint8)))\n"
        "assert tuple(img.shape) == (3, 16, 16)\nprint('JPEG decode ok')",
    ),
    Component("timm", "timm", "from timm.models.vision_transformer import Block, PatchEmbed\nprint('')"),
    Component("webdataset", "webdataset"),
    Component(
        "nvidia-dali-cuda130",
        "nvidia.dali",
        "from nvidia.dali import fn, pipeline_def\nprint('')",
        optional=True,
    ),
)

# Run in the checked interpreter, over the components in order (one interpreter: the imports build on each other):
# version from the installed metadata, then the import and the probe; one JSON line per component.
_PROBE = """
import contextlib, importlib, importlib.metadata, io, json, sys
for name, module, probe in json.loads(sys.argv[1]):
    out = {"name": name, "version": None, "detail": "", "error": None, "missing": False}
    try:
        out["version"] = importlib.metadata.version(name)
    except importlib.metadata.PackageNotFoundError:
        pass
    print("@@START@@" + json.dumps(out), flush=True)
    try:
        scope = {module.split(".")[0]: importlib.import_module(module)}
        buf = io.StringIO()
        with contextlib.redirect_stdout(buf):
            exec(probe, scope)
        out["detail"] = buf.getvalue().strip()
    except BaseException as err:
        out["error"] = f"{type(err).__name__}: {err}".strip()
        out["missing"] = isinstance(err, ModuleNotFoundError) and (err.name or "").split(".")[0] == module.split(".")[0]
    print("@@PROBE@@" + json.dumps(out), flush=True)
"""


@dataclass
class Result:
    component: str
    ok: bool
    line: str  # version and what was seen, or what is wrong
    fix: str = ""


def run_probes(python: str, components: tuple[Component, ...]) -> list[dict]:
    """Each component's probe result. A component that kills or hangs the interpreter is recorded as such and
    the ones after it are probed in a new interpreter."""
    results: dict[str, dict] = {}
    pending = list(components)
    while pending:
        spec = json.dumps([[c.name, c.module, c.probe] for c in pending])
        try:
            proc = subprocess.run(
                [python, "-c", _PROBE, spec],
                capture_output=True,
                text=True,
                timeout=PROBE_TIMEOUT_S * len(pending),
                start_new_session=True,
            )
            stdout, failure = proc.stdout, (proc.stderr.strip().splitlines() or [f"exit status {proc.returncode}"])[-1]
            failure = f"the import crashed the interpreter ({failure})"
        except subprocess.TimeoutExpired as err:
            stdout = err.stdout.decode() if isinstance(err.stdout, bytes) else (err.stdout or "")
            failure = f"importing it took over {PROBE_TIMEOUT_S * len(pending):.0f} s"
        except OSError as err:
            return [{"name": c.name, "version": None, "error": f"{python} does not run ({err})"} for c in components]
        started = None
        for line in stdout.splitlines():
            if line.startswith("@@START@@"):
                started = json.loads(line[len("@@START@@") :])
            elif line.startswith("@@PROBE@@"):
                result = json.loads(line[len("@@PROBE@@") :])
                results[result["name"]] = result
                started = None
        if started is not None:  # died inside this component's import or probe
            results[started["name"]] = {**started, "error": failure}
        elif len(results) < len(components) and not any(c.name in results for c in pending):
            for c in pending:  # died before the first component (python itself is broken)
                results[c.name] = {"name": c.name, "version": None, "error": failure, "missing": False}
        pending = [c for c in pending if c.name not in results]
    return [results[c.name] for c in components]


def compatible_trio(torch_version: str) -> dict[str, str]:
    """The torchaudio and torchvision releases built for a torch release (torchaudio X.Y.Z ↔ torchvision 0.(Y+15).Z)."""
    match = re.match(r"(\d+)\.(\d+)\.(\d+)", torch_version)
    if not match:
        return {}
    major, minor, patch = (int(g) for g in match.groups())
    return {"torchaudio": f"{major}.{minor}.{patch}", "torchvision": f"0.{minor + 15}.{patch}"}


class Fixes:
    """The one command that fixes a package: re-sync from the lock in the project's venv, pip elsewhere."""

    def __init__(self, python: str, lock: dict[str, set[str]] | None) -> None:
        self.lock = lock
        venv_bin = Path(python).parent
        self.project_venv = (
            lock is not None and (venv_bin / "uv").exists() and (venv_bin.parent / "pyvenv.cfg").exists()
        )
        self.python = python

    def package(self, name: str, version: str | None = None, broken: bool = False) -> str:
        if self.project_venv:
            if broken:  # right version, damaged files
                return f"make sync REINSTALL={name}"
            return "make sync"
        pinned = f"{name}=={version}" if version else name
        force = " --force-reinstall" if broken else ""
        return f"{self.python} -m pip install{force} '{pinned}'"


def check_package(
    component: Component,
    lock: dict[str, set[str]] | None,
    fixes: Fixes,
    probe: dict,
    installed_torch: str | None,
) -> Result:
    """One line for a component: its version and what the probe saw, or what is wrong and the fix."""
    version = probe.get("version")
    wanted = sorted(lock.get(component.name, set())) if lock is not None else []
    label = f"{component.name} {version}" if version else component.name
    if probe.get("missing") or (version is None and probe.get("error")):
        if component.optional and not wanted:
            return Result(component.name, True, f"{component.name}: not installed (optional)")
        want = wanted[0] if len(wanted) == 1 else None
        return Result(
            component.name,
            False,
            f"{component.name}: not installed ({probe.get('error')})",
            fixes.package(component.name, want),
        )
    if wanted and version not in wanted:
        return Result(
            component.name,
            False,
            f"{label}: uv.lock pins {' or '.join(wanted)}",
            fixes.package(component.name, wanted[0]),
        )
    error = probe.get("error")
    if error:
        if component.name in ("torchaudio", "torchvision") and installed_torch:
            expected = compatible_trio(installed_torch).get(component.name)
            if expected and expected != version:
                return Result(
                    component.name,
                    False,
                    f"{label}: does not load beside torch {installed_torch} (needs {component.name} "
                    f"{expected}; {error})",
                    fixes.package(component.name, expected),
                )
            error = f"{error} (with torch {installed_torch})"
        return Result(
            component.name,
            False,
            f"{label}: fails to load ({error})",
            fixes.package(component.name, version, broken=True),
        )
    detail = f" ({probe['detail']})" if probe.get("detail") else ""
    return Result(component.name, True, f"{label}{detail}")


# The variables that name the ffmpeg to run, as preprocess.ffmpeg_run.FFMPEG_ENV (devenv imports nothing of the
# project; a test keeps the two equal).
FFMPEG_ENV = ("MBT_FFMPEG", "FFMPEG_BINARY")


def check_ffmpeg() -> list[Result]:
    """ffmpeg and ffprobe, and the version each reports: the ffmpeg the project runs (the first of FFMPEG_ENV set,
    else PATH's) and the ffprobe beside a named one (else PATH's)."""
    root = hasattr(os, "geteuid") and os.geteuid() == 0
    fix = "apt-get install -y ffmpeg" if root else "sudo apt-get install -y ffmpeg"
    named = next((name for name in FFMPEG_ENV if os.environ.get(name)), None)
    results = []
    for tool in ("ffmpeg", "ffprobe"):
        given = os.environ[named] if named else tool
        if named and tool == "ffprobe":
            given = str(Path(given).with_name("ffprobe")) if os.sep in given else tool
        path = shutil.which(given)
        if path is None:
            where = "not found on PATH" if given == tool else f"{given} is not an executable"
            results.append(Result(tool, False, f"{tool}: {where}" + (f" ({named})" if named else ""), fix))
            continue
        try:
            proc = subprocess.run([path, "-hide_banner", "-version"], capture_output=True, text=True, timeout=30)
            first = (proc.stdout.splitlines() or [""])[0]
        except (OSError, subprocess.TimeoutExpired) as err:
            results.append(Result(tool, False, f"{tool}: {path} does not run ({err})", fix))
            continue
        match = re.match(rf"{tool} version (\S+)", first)
        if proc.returncode != 0 or not match:
            results.append(Result(tool, False, f"{tool}: {path} does not run ({first or proc.returncode})", fix))
            continue
        results.append(Result(tool, True, f"{tool} {match.group(1)} ({path})"))
    return results


def check_python(python: str) -> Result:
    try:
        out = subprocess.run(
            [python, "-c", "import sys; print(*sys.version_info[:3])"], capture_output=True, text=True, timeout=30
        )
        version = tuple(int(v) for v in out.stdout.split())
    except (OSError, ValueError, subprocess.TimeoutExpired) as err:
        return Result("python", False, f"python: {python} does not run ({err})", "make setup")
    text = ".".join(map(str, version))
    if version[:2] < MIN_PYTHON:
        need = ".".join(map(str, MIN_PYTHON))
        return Result(
            "python",
            False,
            f"python {text}: the project needs {need} or newer",
            f"rm -rf .venv && make setup PYTHON=python{need}",
        )
    return Result("python", True, f"python {text} ({python})")


def run_checks(
    python: str = sys.executable, lock_path: Path | None = LOCK_FILE, components: tuple[Component, ...] | None = None
) -> list[Result]:
    """Every component's result, in a fixed order: the interpreter, the Python packages (default: COMPONENTS),
    ffmpeg and ffprobe."""
    components = COMPONENTS if components is None else components
    results = [check_python(python)]
    lock = None
    if lock_path is not None and lock_path.exists():
        try:
            lock = locked_versions(lock_path)
        except LockError as err:
            results.append(Result("uv.lock", False, f"uv.lock: {err}", "git checkout uv.lock"))
    fixes = Fixes(python, lock)
    probes = run_probes(python, components)
    torch_version = next((p["version"] for p in probes if p["name"] == "torch" and not p.get("error")), None)
    results += [check_package(c, lock, fixes, p, torch_version) for c, p in zip(components, probes, strict=True)]
    return results + check_ffmpeg()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--python", default=sys.executable, help="the interpreter to check (default: this one)")
    parser.add_argument("--lock", type=Path, default=LOCK_FILE, help="versions to expect (default: uv.lock)")
    parser.add_argument("--no-lock", action="store_true", help="do not compare versions with a lock file")
    args = parser.parse_args(argv)
    results = run_checks(args.python, None if args.no_lock else args.lock)
    for result in results:
        print(f"{'ok  ' if result.ok else 'FAIL'} {result.line}")
        if not result.ok and result.fix:
            print(f"     fix: {result.fix}")
    failed = [r.component for r in results if not r.ok]
    if failed:
        print(f"environment check failed: {', '.join(failed)}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
