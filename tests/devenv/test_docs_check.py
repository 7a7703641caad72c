"""The docs check (devenv.docs_check over devenv.docs_pages): which commands a page holds, that they run in order in a
checkout of their own with what the hidden directives give them, and how a failure, a skip and a page the check
cannot run are reported. The pages here are small and their commands plain shell; a fake environment stands in for
.venv (its activate script only marks that it ran)."""

from __future__ import annotations

import re
import shlex
from pathlib import Path

import pytest
from conftest import REPO

from devenv import docs_check
from devenv.docs_pages import PageError, page_commands

PRELUDE_BLOCK = "```bash\nsource .venv/bin/activate\n```\n"


def checkout(tmp_path: Path, readme: str, **docs: str) -> list[str]:
    """A repository holding README.md (after the set-up block) and docs/<name>.md, and a fake environment; the
    arguments that point the check at both."""
    repo, venv = tmp_path / "repo", tmp_path / "venv"
    (repo / "docs").mkdir(parents=True)
    (venv / "bin").mkdir(parents=True)
    (venv / "bin" / "activate").write_text("export ACTIVATED=yes\n")
    (repo / "README.md").write_text(PRELUDE_BLOCK + readme)
    for name, text in docs.items():
        (repo / "docs" / f"{name}.md").write_text(text)
    return ["--repo", str(repo), "--venv", str(venv)]


def check(args: list[str], capsys: pytest.CaptureFixture[str]) -> tuple[int, str]:
    code = docs_check.main(args)
    return code, capsys.readouterr().out


def test_a_failing_command_is_named_with_page_line_and_output(tmp_path, capsys) -> None:
    args = checkout(tmp_path, "text\n\n```bash\ntrue\necho 'the tail' && false\necho never > ran\n```\n")
    code, out = check(args, capsys)
    assert code == 1
    assert "README.md:8 exited 1" in out and "| the tail" in out and "FAILED  README.md:8" in out
    assert "1 failed" in out and "echo never" not in out  # the page stops at its first failure


def test_the_setup_comment_runs_before_its_block_and_is_not_a_command(tmp_path, capsys) -> None:
    page = "<!-- docs-check\nsetup: mkdir -p data && echo clip > data/given\n-->\n```bash\ntest -s data/given\n```\n"
    code, out = check(checkout(tmp_path, page), capsys)
    assert code == 0, out
    assert "setup  mkdir -p data" in out and "2 commands ran" in out and "(1 set-up lines)" in out


def test_a_substitution_applies_to_every_command_of_its_block(tmp_path, capsys) -> None:
    page = "<!-- docs-check sub: --nproc_per_node=8 => --nproc_per_node=2 -->\n```bash\n" + (
        'test "$(echo run --nproc_per_node=8)" = "run --nproc_per_node=2"\necho --nproc_per_node=8 | grep -q =2\n```\n'
    )
    code, out = check(checkout(tmp_path, page), capsys)
    assert code == 0, out
    (first, second) = page_commands("README.md", PRELUDE_BLOCK + page)[1:]
    assert "=8" not in first.text + second.text


@pytest.mark.parametrize(
    ("page", "message"),
    [
        ("<!-- docs-check teardown: rm -r x -->\n```bash\ntrue\n```\n", "README.md:1: unknown docs-check directive"),
        ("<!-- docs-check sub: 8 GPUs => 2 -->\n```bash\ntrue\n```\n", "README.md:1: '8 GPUs' matches no command"),
        ("<!-- docs-check skip: slow -->\n```bash\ntrue\n```\n", "README.md:1: skip reason 'slow' is not one of"),
        ("<!-- docs-check nodes: 64 -->\n```bash\ntrue\n```\n", "README.md:1: nodes is a count from 2"),
        ("<!-- docs-check setup: true -->\nprose\n```bash\ntrue\n```\n", "README.md:1: a docs-check comment must"),
        ("<!-- docs-check setup: true -->\n```text\nout\n```\n", "README.md:1: docs-check directives before"),
        ("text\n\n```\nmake demo\n```\n", "README.md:3: fence language (none)"),
        ("```console\n$ make demo\n```\n", "README.md:1: fence language console"),
        ("```bash\ntrue\n", "README.md:1: a fence that is never closed"),
    ],
)
def test_a_page_the_check_cannot_run_is_refused(page: str, message: str) -> None:
    with pytest.raises(PageError, match="^" + message.replace("(", r"\(").replace(")", r"\)")):
        page_commands("README.md", page)


def test_a_refused_page_runs_nothing(tmp_path, capsys) -> None:
    args = checkout(tmp_path, "```bash\ntouch ran\n```\n<!-- docs-check frobnicate: x -->\n```bash\ntrue\n```\n")
    assert docs_check.main(args) == 2
    assert "README.md:7: unknown docs-check directive 'frobnicate'" in capsys.readouterr().err
    assert not list(tmp_path.glob("**/ran"))


def test_commands_share_the_shell_state_and_docs_pages_start_activated(tmp_path, capsys) -> None:
    readme = '```bash\nmkdir -p sub && cd sub\nexport LEVEL=deep\ntest "$LEVEL" = deep && test "${PWD##*/}" = sub\n'
    readme += "```\n"
    docs = "<!-- docs-check skip: long -->\n```bash\nmake demo\n```\n"  # the activation runs before the first run
    docs += '```bash\ntest "$ACTIVATED" = yes\ntest -L README.md && test ! -e data\n```\n'
    code, out = check(checkout(tmp_path, readme, page=docs), capsys)
    assert code == 0, out
    assert "docs/page.md:6" in out and "6 commands ran, 1 skipped" in out


def test_the_readme_must_show_the_line_docs_pages_run_after(tmp_path, capsys) -> None:
    args = checkout(tmp_path, "")
    (Path(args[1]) / "README.md").write_text("```bash\nls\n```\n")
    assert docs_check.main(args) == 2
    assert "no longer shows `source .venv/bin/activate`" in capsys.readouterr().err


def test_nodes_run_at_once_and_skips_are_listed_with_their_reason(tmp_path, capsys) -> None:
    page = (
        "<!-- docs-check nodes: 2 -->\n```bash\ntouch rank$NODE_RANK; while [ ! -f rank0 ] || [ ! -f rank1 ]; do "
        'sleep 0.1; done\n```\n\n```bash\ntest -f rank0 && test -f rank1 && test -z "$NODE_RANK"\n```\n\n'
        "<!-- docs-check skip: cuda when --device cuda -->\n```bash\npython x.py --device cuda\ntrue\n```\n"
    )
    code, out = check(checkout(tmp_path, page), capsys)
    assert code == 0, out
    assert "4 commands ran, 1 skipped" in out
    assert "skipped README.md:15: python x.py --device cuda: needs a CUDA GPU" in out


def test_object_stores_and_slurm_are_served_by_stand_ins(tmp_path, capsys) -> None:
    page = (
        "<!-- docs-check\nsetup: mkdir -p buckets/my-bucket/a && echo shard > buckets/my-bucket/a/s.tar\n"
        "setup: printf '#!/bin/bash\\n#SBATCH --array=0-2\\ntouch task$SLURM_ARRAY_TASK_ID\\n' > job.sbatch\n-->\n"
        '```bash\ntest "$(aws s3 cp s3://my-bucket/a/s.tar -)" = shard\n'
        "gsutil cat gs://my-bucket/a/s.tar | grep -q sh\n"
        "curl -fsSL -O https://my-bucket/a/s.tar && test -s s.tar\nsbatch job.sbatch && ls task0 task1 task2\n"
        "sbatch --array=5 job.sbatch && ls task5\n! aws s3 cp s3://my-bucket/missing.tar -\n```\n"
    )
    code, out = check(checkout(tmp_path, page), capsys)
    assert code == 0, out
    assert "7 commands ran" in out


def test_the_repositorys_own_pages_parse() -> None:
    """Every page's fences and directives are ones the check can run (what `make docs-check` then runs)."""
    pages = docs_check.pages_of(REPO)
    commands = [page_commands(path.relative_to(REPO).as_posix(), path.read_text(encoding="utf-8")) for path in pages]
    assert commands[0] and any(c.text == docs_check.PRELUDE for c in commands[0])  # README.md


def test_a_page_starts_without_the_environment_on_path(tmp_path) -> None:
    """As on a fresh machine: `torchrun` and the venv's `python` are found only after `source .venv/bin/activate`."""
    venv = tmp_path / "venv"
    env = docs_check.command_env(REPO, venv, tmp_path / "page")
    env_path = env["PATH"].split(":")
    assert str(venv / "bin") not in env_path and env_path[0] == str(tmp_path / "page" / ".docs-check" / "bin")
    assert env["PYTHONPATH"].split(":")[0] == str(REPO) and "VIRTUAL_ENV" not in env


@pytest.mark.parametrize("jobs", ["1", "2"])
def test_pages_run_at_once_each_printed_whole(tmp_path, capsys, jobs: str) -> None:
    slow = "```bash\necho slow-a\nsleep 0.5\necho slow-b\n```\n"
    fast = "```bash\necho fast-a\necho fast-b\n```\n"
    code, out = check([*checkout(tmp_path, "", a=slow, b=fast), "--jobs", jobs], capsys)
    assert code == 0, out
    lines = [line.split()[0] for line in out.splitlines() if line.startswith("docs/")]
    ran = [line.split()[0] for line in out.splitlines() if line.startswith("docs/") and " ok " in line]
    assert sorted(ran) == ["docs/a.md:2", "docs/a.md:3", "docs/a.md:4", "docs/b.md:2", "docs/b.md:3"]
    pages = [line.split(":")[0] for line in lines]
    assert pages in (sorted(pages), sorted(pages, reverse=True))  # a page's lines together, not interleaved
    assert "6 commands ran" in out


def test_the_pages_shard_the_demo_data_as_the_makefile_does() -> None:
    """A page's command that shards data/shards/demo gives the Makefile's flags: a shard job refuses a folder made
    with other arguments, so `make demo` after the quickstart (or the other way round) would stop."""
    makefile = (REPO / "Makefile").read_text()
    recipe = shlex.split(re.search(r"define demo_split\n(.*?)\nendef", makefile, re.S).group(1).replace("\\\n", " "))
    seconds = re.search(r"^DEMO_SECONDS \?= (\S+)$", makefile, re.M).group(1)
    flags = ("--segment-seconds", "--short-side", "--shard-size")
    wanted = {f: recipe[recipe.index(f) + 1].replace("$(DEMO_SECONDS)", seconds) for f in flags}
    found = 0
    for path in docs_check.pages_of(REPO):
        for command in page_commands(path.relative_to(REPO).as_posix(), path.read_text(encoding="utf-8")):
            if command.language != "bash" or "tools/shard_audioset.py" not in command.text:
                continue
            words = shlex.split(command.text.replace("\\\n", " "))
            if "--out" in words and words[words.index("--out") + 1].startswith("data/shards/demo/"):
                found += 1
                given = {f: words[words.index(f) + 1] if f in words else None for f in flags}
                assert given == wanted, f"{command.page}:{command.line}"
    assert found >= 2  # the quickstart's two splits
