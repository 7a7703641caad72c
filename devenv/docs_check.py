"""`make docs-check`: run every command README.md and docs/*.md show, so that none can go stale.

    python -m devenv.docs_check                   # every page; one line per command, a summary, exit 1 on a failure
    python -m devenv.docs_check docs/serving.md   # some pages; --list prints the commands without running them

Each page runs in a scratch folder of its own that looks like a fresh checkout to its commands: links to the
repository's files, `.venv` linked to the environment this runs in, no data/ or runs/. The commands run in order
(devenv.docs_pages cuts them out of the page), each in bash, sharing the page's shell state: exported variables and
the working directory carry from one command to the next. The environment's bin/ is taken off PATH, as on a fresh
machine: the README's set-up has a reader type `source .venv/bin/activate`, and docs/ pages run after exactly that
line. The project is imported from the repository under test (PYTHONPATH). `aws`, `gsutil`, `curl` and `sbatch` are
stand-ins (devenv.docs_standin): nothing reaches the network or a cluster. Standard library only.
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import io
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor, as_completed
from dataclasses import dataclass
from pathlib import Path
from typing import TextIO

from devenv.docs_pages import SKIP_REASONS, Command, PageError, page_commands

REPO = Path(__file__).resolve().parents[1]
PRELUDE = "source .venv/bin/activate"
NOT_CHECKED_OUT = {".git", ".venv", "data", "runs", "build", "__pycache__", ".pytest_cache", ".ruff_cache"}
STANDINS = ("aws", "gsutil", "curl", "sbatch")
TIMEOUT_S = 600.0
TAIL_LINES = 30
JOBS = 2  # pages at once: most commands hold one core, and no two pages share a fixed port


@dataclass(frozen=True)
class Result:
    """How one command (or set-up line) went."""

    command: Command
    status: str  # ok, skip, FAIL, setup
    seconds: float
    output: str = ""


def pages_of(repo: Path) -> list[Path]:
    """README.md, then docs/*.md by name."""
    return [repo / "README.md", *sorted((repo / "docs").glob("*.md"))]


def make_checkout(repo: Path, venv: Path, folder: Path) -> None:
    """`folder` as a fresh checkout of `repo` looks: its files linked, `.venv` linked to `venv`, stand-ins ready."""
    folder.mkdir(parents=True)
    for entry in sorted(repo.iterdir()):
        if entry.name not in NOT_CHECKED_OUT and not entry.name.endswith(".egg-info"):
            (folder / entry.name).symlink_to(entry)
    (folder / ".venv").symlink_to(venv)
    bin_dir = folder / ".docs-check" / "bin"
    bin_dir.mkdir(parents=True)
    (folder / "buckets").mkdir()
    for tool in STANDINS:
        script = bin_dir / tool
        script.write_text(f'#!/bin/sh\nexec "{sys.executable}" "{REPO / "devenv" / "docs_standin.py"}" {tool} "$@"\n')
        script.chmod(0o755)


def command_env(repo: Path, venv: Path, folder: Path) -> dict[str, str]:
    """The environment a page starts from: a fresh machine's PATH (no environment active) with the stand-ins first,
    the repository under test importable."""
    env = {key: value for key, value in os.environ.items() if key not in ("VIRTUAL_ENV", "PYTHONHOME")}
    venv_bin = {str(venv / "bin"), str(venv.resolve() / "bin")}
    path = [entry for entry in env.get("PATH", "").split(os.pathsep) if entry and entry not in venv_bin]
    env["PATH"] = os.pathsep.join([str(folder / ".docs-check" / "bin"), *path])
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(repo), env.get("PYTHONPATH", "")]))
    env["DOCS_CHECK_BUCKETS"] = str(folder / "buckets")
    return env


def shell_script(command: Command, text: str, state: Path, rank: int) -> str:
    """bash that restores the page's state, runs `text` as node `rank` and, on rank 0, records the state it leaves
    (NODE_RANK is a node's own, not the page's)."""
    if command.language == "python":
        text = f"python - <<'__DOCS_CHECK_PY__'\n{text}\n__DOCS_CHECK_PY__"
    node = f"export NODE_RANK={rank}\n" if command.nodes > 1 else ""
    record = f'unset NODE_RANK; export -p > "{state}.env"; pwd > "{state}.cwd"' if rank == 0 else ":"
    return (
        f'if [ -f "{state}.env" ]; then . "{state}.env"; cd "$(cat "{state}.cwd")"; fi\n'
        f"{node}{text}\n__docs_check_rc=$?\n{record}\nexit $__docs_check_rc\n"
    )


def run_shell(command: Command, text: str, folder: Path, env: dict[str, str], timeout_s: float) -> tuple[int, str]:
    """Run `text` as `command` says (`nodes` copies at once, NODE_RANK set); (worst exit status, output)."""
    state = folder / ".docs-check" / "state"
    logs, procs = [], []
    for rank in range(command.nodes):
        log = (folder / ".docs-check" / f"rank{rank}.log").open("w+b")
        script = shell_script(command, text, state, rank)
        bash = ["bash", "--noprofile", "--norc", "-c", script]
        options = {"stdout": log, "stderr": subprocess.STDOUT, "stdin": subprocess.DEVNULL, "start_new_session": True}
        procs.append(subprocess.Popen(bash, cwd=folder, env=env, **options))
        logs.append(log)
    deadline = time.monotonic() + timeout_s
    codes = []
    for proc in procs:
        try:
            codes.append(proc.wait(timeout=max(1.0, deadline - time.monotonic())))
        except subprocess.TimeoutExpired:
            codes.append(124)
    for proc in procs:  # what a command left running (a timed-out one, a background server) ends with it
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
    output = []
    for rank, log in enumerate(logs):
        log.seek(0)
        text_out = log.read().decode(errors="replace").replace("\r", "\n")
        log.close()
        output.append(f"[NODE_RANK={rank}]\n{text_out}" if command.nodes > 1 else text_out)
    code = next((c for c in codes if c), 0)
    if code == 124:
        output.append(f"(killed after {timeout_s:.0f} s)")
    return code, "\n".join(output)


def tail(output: str, lines: int = TAIL_LINES) -> str:
    """The last non-empty lines of a command's output, indented for the report."""
    kept = [line for line in output.splitlines() if line.strip()][-lines:]
    return "\n".join(f"    | {line}" for line in kept)


def first_line(text: str, width: int = 90) -> str:
    """A command as the report names it: its first line, cut to `width`."""
    line = text.strip().splitlines()[0].rstrip("\\ ")
    return line if len(line) <= width else line[: width - 3] + "..."


def run_page(
    page: str, commands: list[Command], repo: Path, venv: Path, folder: Path, timeout_s: float, out: TextIO
) -> list[Result]:
    """Run a page's commands in a fresh checkout at `folder`, writing one line each to `out`; stop at the first
    failure."""
    make_checkout(repo, venv, folder)
    say = functools.partial(print, file=out, flush=True)
    env = command_env(repo, venv, folder)
    results: list[Result] = []
    prelude: tuple[str, ...] = () if page == "README.md" else (PRELUDE,)  # before the first command that runs
    for command in commands:
        where = f"{command.page}:{command.line}"
        if command.skip:
            results.append(Result(command, "skip", 0.0))
            say(f"{where:<28}  {'':>6}  skip  {first_line(command.text)}  [{command.skip}]")
            continue
        lines, prelude = prelude + command.setup, ()
        for line in lines:
            hidden = Command(command.page, command.line, line, "bash")
            start = time.monotonic()
            code, output = run_shell(hidden, line, folder, env, timeout_s)
            results.append(Result(hidden, "setup" if code == 0 else "FAIL", time.monotonic() - start, output))
            say(f"{where:<28}  {results[-1].seconds:5.1f}s  {results[-1].status:<4}  {first_line(line)}")
            if code:
                say(f"  set-up line for {where} exited {code}:\n    $ {line}\n{tail(output)}")
                return results
        start = time.monotonic()
        code, output = run_shell(command, command.text, folder, env, timeout_s)
        status = "ok" if code == 0 else "FAIL"
        results.append(Result(command, status, time.monotonic() - start, output))
        say(f"{where:<28}  {results[-1].seconds:5.1f}s  {status:<4}  {first_line(command.text)}")
        if code:
            shown = command.text.replace("\n", "\n      ")
            say(f"  {where} exited {code}:\n    $ {shown}\n{tail(output)}")
            return results
    return results


def run_pages(
    commands: dict[str, list[Command]], repo: Path, venv: Path, scratch: Path, timeout_s: float, jobs: int
) -> list[Result]:
    """Every page's results, `jobs` pages at once (each in its own checkout under `scratch`); a page's lines are
    printed together when it ends (as it goes with one job)."""

    def page(index: int, name: str) -> tuple[list[Result], str]:
        out = sys.stdout if jobs == 1 else io.StringIO()
        results = run_page(name, commands[name], repo, venv, scratch / f"{index:02d}", timeout_s, out)
        return results, "" if out is sys.stdout else out.getvalue()

    results: list[Result] = []
    with ThreadPoolExecutor(jobs) as pool:
        for done in as_completed([pool.submit(page, i, name) for i, name in enumerate(commands)]):
            page_results, printed = done.result()
            print(printed, end="", flush=True)
            results += page_results
    return results


def summary(results: list[Result], seconds: float) -> str:
    """The closing lines: counts, time, every skip with its reason, every failure with its page and line."""
    count = {status: sum(r.status == status for r in results) for status in ("ok", "skip", "FAIL", "setup")}
    lines = [
        f"docs-check: {count['ok']} commands ran, {count['skip']} skipped, {count['FAIL']} failed "
        f"({count['setup']} set-up lines) in {seconds:.0f} s"
    ]
    lines += [
        f"  skipped {r.command.page}:{r.command.line}: {first_line(r.command.text, 60)}: {SKIP_REASONS[r.command.skip]}"
        for r in results
        if r.status == "skip" and r.command.skip
    ]
    failed = [r for r in results if r.status == "FAIL"]
    lines += [f"  FAILED  {r.command.page}:{r.command.line}: {first_line(r.command.text)}" for r in failed]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m devenv.docs_check", description=__doc__.split("\n\n")[0])
    parser.add_argument("pages", nargs="*", type=Path, help="pages to check (default: README.md and docs/*.md)")
    parser.add_argument("--repo", type=Path, default=REPO, help="the checkout whose pages run (default: this one)")
    parser.add_argument("--venv", type=Path, default=Path(sys.prefix), help="linked as .venv (default: this one)")
    parser.add_argument("--list", action="store_true", help="print the commands, run nothing")
    parser.add_argument("--keep", action="store_true", help="keep the scratch folders")
    parser.add_argument("--timeout", type=float, default=TIMEOUT_S, help="seconds per command (default 600)")
    parser.add_argument("--jobs", type=int, default=JOBS, help=f"pages run at once (default {JOBS})")
    args = parser.parse_args(argv)
    repo = args.repo.resolve()
    paths = [p.resolve() for p in args.pages] or pages_of(repo)
    try:
        plan = [(path.relative_to(repo).as_posix(), path.read_text(encoding="utf-8")) for path in paths]
        commands = {name: page_commands(name, text) for name, text in plan}
        readme = page_commands("README.md", (repo / "README.md").read_text(encoding="utf-8"))
    except (PageError, OSError, ValueError) as error:
        print(f"docs-check: {error}", file=sys.stderr)
        return 2
    if not any(c.text.strip() == PRELUDE for c in readme):
        print(f"docs-check: README.md no longer shows `{PRELUDE}`, the line docs/ pages run after", file=sys.stderr)
        return 2
    if args.list:
        for command in (c for page in commands.values() for c in page):
            skip = f"  [skip: {command.skip}]" if command.skip else ""
            print(f"{command.page}:{command.line}: {command.text}{skip}")
        return 0
    scratch = Path(tempfile.mkdtemp(prefix="docs-check-"))
    start = time.monotonic()
    results: list[Result] = []
    try:
        results = run_pages(commands, repo, args.venv.absolute(), scratch, args.timeout, max(1, args.jobs))
    finally:
        if args.keep:
            print(f"docs-check: scratch folders kept in {scratch}")
        else:
            shutil.rmtree(scratch, ignore_errors=True)
    print(summary(results, time.monotonic() - start))
    return 1 if any(r.status == "FAIL" for r in results) else 0


if __name__ == "__main__":
    sys.exit(main())
