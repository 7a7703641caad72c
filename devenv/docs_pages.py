"""The commands a Markdown page shows, as `make docs-check` runs them (devenv.docs_check).

A fenced ```bash block is cut into commands: a line with its `\\` continuations or its here-document (comment and
blank lines left out). A fenced ```python block is one command, the whole program. Blocks of the languages in SHOWN
are examples of output or input and are not run; any other fence, one without a language included, is refused, so
that no command can hide in a block the check does not read.

An HTML comment right before a block (blank lines between allowed) directs the check; readers do not see it:

    <!-- docs-check
    setup: CMD          a hidden command run before the block: what a reader already has (a dataset, a run)
    sub: OLD => NEW     replaced in every command of the block (sizes for a 2-core CPU machine); must match one
    nodes: N            every command of the block runs N times at once with NODE_RANK=0..N-1 (nodes on localhost)
    skip: REASON        the block is not run; REASON is a key of SKIP_REASONS, printed in the summary
    skip: REASON when TEXT      only the block's commands that hold TEXT are not run
    # a line that starts with # is a note to reviewers
    -->

or on one line, `<!-- docs-check setup: CMD -->`. Standard library only.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field

RUN = ("bash", "python")
SHOWN = ("text", "csv", "yaml", "json")
SKIP_REASONS = {
    "cuda": "needs a CUDA GPU (tools/gpu_check.py runs the GPU paths on a GPU machine)",
    "suite": "a check itself (make test, test-fast, lint, docs-check): CI runs `make test` on a clean clone "
    "(.ci/run); run here, it would repeat the suite or this check inside itself",
    "long": "minutes of training on this machine: its pieces run here at small sizes and in tests/experiments",
    "scenic-weights": "needs scenic's released weights: the stand-in (tests/data/scenic_mbt_tiny) has 32 mel bins, "
    "shards have 128; tests/mbt/test_convert_scenic.py checks the converted model's logits against scenic's",
}
HEREDOC = re.compile(r"<<-?\s*['\"]?(\w+)['\"]?")
FENCE = re.compile(r"^(\s*)(`{3,}|~{3,})\s*([^`\s]*)")
MAX_NODES = 4


class PageError(ValueError):
    """A page the check cannot run as written: the message starts with page:line."""


@dataclass
class Directives:
    """What an HTML comment asks of the block after it."""

    line: int
    setup: list[str] = field(default_factory=list)
    subs: list[tuple[str, str]] = field(default_factory=list)
    nodes: int = 1
    skips: list[tuple[str, str]] = field(default_factory=list)  # (reason, text a skipped command holds; "": all)


@dataclass(frozen=True)
class Command:
    """One command of a page: its text after the block's substitutions, and how to run it."""

    page: str
    line: int
    text: str
    language: str  # bash: a shell command line; python: a program fed to `python -`
    setup: tuple[str, ...] = ()  # hidden commands run just before this one (the block's first)
    nodes: int = 1
    skip: str | None = None


def parse_directives(page: str, line: int, body: str) -> Directives:
    """The directives of one `<!-- docs-check ... -->` comment body; PageError naming page:line otherwise."""
    found = Directives(line)
    for offset, raw in enumerate(body.splitlines()):
        text = raw.strip()
        if not text or text.startswith("#"):  # a note to reviewers
            continue
        where = f"{page}:{line + offset}"
        key, sep, value = text.partition(":")
        key, value = key.strip(), value.strip()
        if not sep or not value:
            raise PageError(f"{where}: a docs-check directive is 'KEY: VALUE', got {text!r}")
        if key == "setup":
            found.setup.append(value)
        elif key == "sub":
            old, arrow, new = value.partition(" => ")
            if not arrow or not old.strip():
                raise PageError(f"{where}: sub is 'OLD => NEW', got {value!r}")
            found.subs.append((old.strip(), new.strip()))
        elif key == "nodes":
            if not value.isdigit() or not 2 <= int(value) <= MAX_NODES:
                raise PageError(f"{where}: nodes is a count from 2 to {MAX_NODES}, got {value!r}")
            found.nodes = int(value)
        elif key == "skip":
            reason, _, holding = value.partition(" when ")
            if reason not in SKIP_REASONS:
                raise PageError(f"{where}: skip reason {reason!r} is not one of {', '.join(SKIP_REASONS)}")
            found.skips.append((reason, holding.strip()))
        else:
            raise PageError(f"{where}: unknown docs-check directive {key!r} (setup, sub, nodes, skip)")
    return found


def bash_commands(body: list[str], first_line: int) -> list[tuple[int, str]]:
    """(line, command) of a bash block's lines: continuation lines and a here-document's lines joined to their
    command as written, comment lines dropped."""
    commands: list[tuple[int, str]] = []
    pending: list[str] = []
    start, heredoc_end = first_line, None
    for offset, raw in enumerate(body):
        if not pending and (not raw.strip() or raw.lstrip().startswith("#")):
            continue
        if not pending:
            start = first_line + offset
        pending.append(raw)
        if heredoc_end is None and (marker := HEREDOC.search(raw)):
            heredoc_end = marker.group(1)
            continue
        if heredoc_end is not None and raw.strip() != heredoc_end:
            continue
        if heredoc_end is None and raw.rstrip().endswith("\\"):
            continue
        commands.append((start, "\n".join(pending)))
        pending, heredoc_end = [], None
    if pending:
        commands.append((start, "\n".join(pending)))
    return commands


def block_commands(
    page: str, fence_line: int, language: str, body: list[str], rules: Directives | None
) -> list[Command]:
    """The commands of one runnable block, with its directives applied; a substitution that matches nothing is a
    PageError (the page changed under it)."""
    rules = rules or Directives(fence_line)
    found = [(fence_line + 1, "\n".join(body))] if language == "python" else bash_commands(body, fence_line + 1)
    if not found:
        raise PageError(f"{page}:{fence_line}: a ```{language} block with nothing to run")
    for old in [old for old, _ in rules.subs] + [holding for _, holding in rules.skips if holding]:
        if not any(old in text for _, text in found):
            raise PageError(f"{page}:{rules.line}: {old!r} matches no command of the block at line {fence_line}")
    commands: list[Command] = []
    setup = tuple(rules.setup)  # before the block's first command that runs
    for line, text in found:
        skip = next((reason for reason, holding in rules.skips if holding in text), None)
        for old, new in [] if skip else rules.subs:  # a skipped command is reported as the page shows it
            text = text.replace(old, new)
        commands.append(Command(page, line, text, language, () if skip else setup, rules.nodes, skip))
        setup = setup if skip else ()
    return commands


def _comment(lines: list[str], start: int) -> tuple[str, int]:
    """The body of the docs-check comment opening at lines[start], and the index of its last line."""
    end = start
    while "-->" not in lines[end]:
        end += 1
        if end == len(lines):
            raise IndexError
    text = "\n".join(lines[start : end + 1])
    return text.split("docs-check", 1)[1].rsplit("-->", 1)[0], end


def page_commands(page: str, text: str) -> list[Command]:
    """Every command of a page in order; PageError (page:line) for a fence or a directive the check cannot use."""
    lines = text.splitlines()
    commands: list[Command] = []
    rules: Directives | None = None
    index = 0
    while index < len(lines):
        line = lines[index]
        if line.lstrip().startswith("<!--") and "docs-check" in line:
            if rules is not None:
                raise PageError(f"{page}:{index + 1}: two docs-check comments before one block")
            try:
                body, end = _comment(lines, index)
            except IndexError:
                raise PageError(f"{page}:{index + 1}: a docs-check comment without its '-->'") from None
            rules = parse_directives(page, index + 1, body)
            index = end + 1
            continue
        fence = FENCE.match(line)
        if fence is None:
            if line.strip() and rules is not None:
                raise PageError(f"{page}:{rules.line}: a docs-check comment must come right before a runnable block")
            index += 1
            continue
        indent, marks, language = fence.groups()
        close = index + 1
        while close < len(lines) and not lines[close].strip().startswith(marks):
            close += 1
        if close == len(lines):
            raise PageError(f"{page}:{index + 1}: a fence that is never closed")
        body = [raw[len(indent) :] if raw.startswith(indent) else raw.lstrip() for raw in lines[index + 1 : close]]
        if language in RUN:
            commands += block_commands(page, index + 1, language, body, rules)
        elif language in SHOWN:
            if rules is not None:
                raise PageError(f"{page}:{rules.line}: docs-check directives before a ```{language} block (not run)")
        else:
            shown = language or "(none)"
            raise PageError(
                f"{page}:{index + 1}: fence language {shown}: write ```bash or ```python (run) or "
                f"```{' / ```'.join(SHOWN)} (not run)"
            )
        rules = None
        index = close + 1
    if rules is not None:
        raise PageError(f"{page}:{rules.line}: a docs-check comment with no block after it")
    return commands
