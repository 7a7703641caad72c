"""Stand-ins for `aws`, `gsutil`, `curl` and `sbatch` on the PATH of `make docs-check` (devenv.docs_check), so that
the pages' commands for object storage and clusters run on one machine without a network:

    aws s3 cp [--recursive] [--quiet] SRC DST      gsutil cat URL      gsutil cp [-r] SRC DST
    curl [-f] [-s] [-S] [-L] [--retry N] [-O | -o FILE] URL
    sbatch [--array=SPEC] SCRIPT [ARGS]           the array's tasks run one after another, here, one core each

s3://B/K, gs://B/K and http(s)://H/P are the files $DOCS_CHECK_BUCKETS/B/K and $DOCS_CHECK_BUCKETS/H/P; "-" is
standard input or output. Standard library only.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

URL = re.compile(r"^(s3|gs|https?)://([^/]+)/(.*)$")


def local(name: str) -> Path | None:
    """The file behind an object-store or web URL, or None for a local path."""
    match = URL.match(name)
    if match is None:
        return None
    return Path(os.environ["DOCS_CHECK_BUCKETS"]) / match.group(2) / match.group(3)


def copy(source: str, target: str, recursive: bool) -> int:
    """cp between URLs, local paths and '-' (stdin/stdout); 1 with a message when the source does not exist."""
    src = local(source) or Path(source)
    if source != "-" and not src.exists():
        print(f"stand-in: {source}: no such object", file=sys.stderr)
        return 1
    dst = local(target) or Path(target)
    if target == "-":
        with src.open("rb") as stream:
            shutil.copyfileobj(stream, sys.stdout.buffer)
        return 0
    if source != "-" and src.is_dir():
        if not recursive:
            print(f"stand-in: {source} is a prefix: add --recursive", file=sys.stderr)
            return 1
        shutil.copytree(src, dst, dirs_exist_ok=True)
        return 0
    if dst.is_dir() or target.endswith("/"):
        dst = dst / src.name
    dst.parent.mkdir(parents=True, exist_ok=True)
    if source == "-":
        dst.write_bytes(sys.stdin.buffer.read())
    else:
        shutil.copyfile(src, dst)
    return 0


def aws(args: list[str]) -> int:
    """`aws s3 cp`: the one aws command the pages use."""
    paths = [arg for arg in args[2:] if not arg.startswith("--")]
    if args[:2] != ["s3", "cp"] or len(paths) != 2:
        print(f"stand-in aws: only 'aws s3 cp SRC DST' is served, got {args}", file=sys.stderr)
        return 2
    return copy(paths[0], paths[1], "--recursive" in args)


def gsutil(args: list[str]) -> int:
    """`gsutil cat URL` and `gsutil cp [-r] SRC DST`."""
    if len(args) == 2 and args[0] == "cat":
        return copy(args[1], "-", False)
    paths = [arg for arg in args[1:] if not arg.startswith("-")]
    if args[:1] == ["cp"] and len(paths) == 2:
        return copy(paths[0], paths[1], "-r" in args)
    print(f"stand-in gsutil: only cat and cp are served, got {args}", file=sys.stderr)
    return 2


def curl(args: list[str]) -> int:
    """curl URL to standard output, to its own name (-O) or to a file (-o FILE); exit 22 when missing, as -f."""
    urls = [arg for arg in args if URL.match(arg)]
    output = args[args.index("-o") + 1] if "-o" in args else None
    if len(urls) != 1:
        print(f"stand-in curl: one http(s) URL expected, got {args}", file=sys.stderr)
        return 2
    if "-O" in args:
        output = urls[0].rsplit("/", 1)[1]
    return 22 if copy(urls[0], output or "-", False) else 0


def array_tasks(spec: str) -> list[int]:
    """The task ids of an --array spec: '0-99', '17,42', '0-3,8'."""
    tasks: list[int] = []
    for part in spec.split("%")[0].split(","):
        first, _, last = part.partition("-")
        tasks += range(int(first), int(last or first) + 1)
    return tasks


def sbatch(args: list[str]) -> int:
    """Run a job array's tasks one after another with SLURM's array variables; 1 when any task failed."""
    flags = [arg for arg in args if arg.startswith("--array=")]
    script = next(arg for arg in args if not arg.startswith("--"))
    rest = args[args.index(script) + 1 :]
    spec = flags[-1].split("=", 1)[1] if flags else ""
    if not spec:
        found = re.search(r"^#SBATCH --array=(\S+)", Path(script).read_text(), re.MULTILINE)
        spec = found.group(1) if found else "0"
    tasks = array_tasks(spec)
    print("Submitted batch job 1 (stand-in: its tasks run here, one after another)", flush=True)
    failed = 0
    for task in tasks:
        env = dict(os.environ, SLURM_JOB_ID="1", SLURM_ARRAY_JOB_ID="1", SLURM_CPUS_PER_TASK="1")
        env.update(SLURM_ARRAY_TASK_ID=str(task), SLURM_ARRAY_TASK_COUNT=str(len(tasks)))
        env.update(SLURM_ARRAY_TASK_MIN=str(min(tasks)), SLURM_ARRAY_TASK_MAX=str(max(tasks)))
        failed += subprocess.run(["bash", script, *rest], env=env).returncode != 0
    return 1 if failed else 0


TOOLS = {"aws": aws, "gsutil": gsutil, "curl": curl, "sbatch": sbatch}

if __name__ == "__main__":
    sys.exit(TOOLS[sys.argv[1]](sys.argv[2:]))
