"""The lookup of a clip's downloaded video file in a folder, by file name templates.

A name template is a str.format pattern over a clip's fields (its YouTube id, start and end in several units) with
glob wildcards around them; the folder is listed once and each clip's name is looked up in that list. A row that
names its file (`ClipRow.video_path`, a path inside the folder) is opened there, and only if it stays inside.
"""

import bisect
import fnmatch
import glob
import os
import re
import string
from collections.abc import Sequence
from pathlib import Path, PurePosixPath

from preprocess.datasets import ClipRow, DatasetError
from shards.text import excerpt, printable

AUDIOSET_NAME_TEMPLATES: tuple[str, ...] = (
    "{ytid}.*",
    "{ytid}_{start_s}.*",
    "{ytid}_{start_s}_{end_s}.*",
    "{ytid}_{start_ms}.*",
    "{ytid}_{start_ms}_{end_ms}.*",
    "{ytid}_{start:.3f}_{end:.3f}.*",
)
VGGSOUND_NAME_TEMPLATES: tuple[str, ...] = ("{ytid}_{start_s:06d}.*",)

TEMPLATE_FIELDS: tuple[str, ...] = ("ytid", "start", "end", "start_s", "end_s", "start_ms", "end_ms")
_MAX_FORMAT_WIDTH = 99  # a format spec's width/precision: '{ytid:>999999999}' would allocate a GB per row
_LITERAL_PREFIX_RE = re.compile(r"[^*?[]*")
# Messages (recorded in failures.csv) show a path or pattern whole up to PATH_MAX, its control characters escaped,
# and at most this many of the files that match a pattern.
_SHOWN_CHARS = 4096
_SHOWN_MATCHES = 10


class VideoIndex:
    """The file names of one folder, listed once, and the lookup of a clip's video file among them.

    A name template is a str.format pattern over the fields ytid; start, end (float seconds); start_s, end_s
    (whole seconds); start_ms, end_ms (integer milliseconds), with glob wildcards * ? [..] around the fields.
    Field values match literally (glob characters in an id are escaped).
    """

    def __init__(self, folder: str | os.PathLike) -> None:
        """Lists the regular files (or links to them) directly in `folder`; missing folder -> DatasetError.
        Links that loop or lead nowhere, folders, FIFOs and devices are left out: their clips are missing."""
        self.folder = Path(folder)
        try:
            with os.scandir(self.folder) as entries:
                self._names = sorted(entry.name for entry in entries if _is_file(entry))
        except OSError as e:
            raise DatasetError(f"video folder {os.fspath(folder)}: cannot list it ({e})") from e

    def _glob(self, pattern: str) -> list[str]:
        """The names matching `pattern`; scans only the names that start with its literal prefix."""
        prefix = _LITERAL_PREFIX_RE.match(pattern).group()  # the part before the first wildcard
        matches = []
        for i in range(bisect.bisect_left(self._names, prefix), len(self._names)):
            name = self._names[i]
            if not name.startswith(prefix):
                break
            if fnmatch.fnmatchcase(name, pattern):
                matches.append(name)
        return matches

    def find(self, row: ClipRow, templates: Sequence[str]) -> Path:
        """The one file of this folder that the first matching template gives for `row`.

        Templates are tried in order and the first that matches any file decides. No match ->
        FileNotFoundError naming the clip key and the patterns tried; several files for one template ->
        DatasetError naming them (pass --name-template); a bad template (unknown field, bad format spec) ->
        DatasetError listing the fields. A row with a `video_path` is `resolve_path(row)` instead.
        """
        if row.video_path is not None:
            return self.resolve_path(row)
        if not templates:
            raise DatasetError("no video name templates given; pass --name-template")
        fields = _template_fields(row)
        tried = []
        for template in templates:
            pattern = _format_template(template, fields)
            tried.append(pattern)
            matches = self._glob(pattern)
            if len(matches) > 1:
                more = f", … ({len(matches) - _SHOWN_MATCHES} more)" if len(matches) > _SHOWN_MATCHES else ""
                raise DatasetError(
                    f"clip {row.key}: {len(matches)} files in {self.folder} match {excerpt(pattern, _SHOWN_CHARS)}: "
                    f"{', '.join(printable(m, _SHOWN_CHARS) for m in matches[:_SHOWN_MATCHES])}{more}; pass "
                    "--name-template with a pattern that picks one"
                )
            if matches:
                return self.folder / matches[0]
        shown = ", ".join(printable(pattern, _SHOWN_CHARS) for pattern in tried)
        raise FileNotFoundError(f"clip {row.key}: no file in {self.folder} matches any of {shown}")

    def resolve_path(self, row: ClipRow) -> Path:
        """The file `row.video_path` names inside this folder, its links resolved (the path that is decoded).

        An absolute path, a '..' part, or a link on the way that leads out of the folder -> DatasetError (paths come
        from the CSV, which is data: it must not send the job to other files); no such file -> FileNotFoundError.
        """
        relative = PurePosixPath(row.video_path or "")
        video = printable(row.video_path or "", _SHOWN_CHARS)
        if relative.is_absolute() or ".." in relative.parts or not relative.parts:
            shown = excerpt(row.video_path, _SHOWN_CHARS)
            raise DatasetError(f"clip {row.key}: video {shown} is not a path inside {self.folder}")
        root = os.path.realpath(self.folder)
        real = os.path.realpath(os.path.join(root, relative))
        if os.path.commonpath([root, real]) != root:
            raise DatasetError(
                f"clip {row.key}: video {video} leads to {printable(real, _SHOWN_CHARS)}, outside the video folder "
                f"{self.folder}; "
                "put the file itself (not a link out of the folder) there"
            )
        if not os.path.exists(real):
            raise FileNotFoundError(f"clip {row.key}: no file {video} in {self.folder}")
        return Path(real)


def _is_file(entry: os.DirEntry) -> bool:
    try:
        return entry.is_file()
    except OSError:  # a symlink loop (ELOOP), an unreadable target: not a video we can read
        return False


def check_name_templates(templates: Sequence[str]) -> None:
    """DatasetError unless every template formats with the fields of VideoIndex (no attribute or index lookup,
    no nested field, no '/', widths up to 99): checked once before a job, not as each row fails to find its file."""
    if not templates:
        raise DatasetError("no video name templates given; pass --name-template")
    sample = ClipRow("x_0", "x", 0.0, 10.0, (), "check")
    for template in templates:
        try:
            parsed = list(string.Formatter().parse(template))
        except ValueError as e:
            raise _template_error(template, e) from e
        if "/" in template:
            raise _template_error(template, ValueError("a template matches file names in the folder, not paths"))
        for _, field, spec, _ in parsed:
            if field is None:
                continue
            if field not in TEMPLATE_FIELDS:
                raise _template_error(template, KeyError(field))
            if "{" in (spec or "") or any(int(n) > _MAX_FORMAT_WIDTH for n in re.findall(r"\d+", spec or "")):
                rule = f"no nested fields, widths <= {_MAX_FORMAT_WIDTH}"
                raise _template_error(template, ValueError(f"format spec {spec!r}: {rule}"))
        _format_template(template, _template_fields(sample))


def _template_fields(row: ClipRow) -> dict[str, object]:
    return {
        "ytid": glob.escape(row.ytid),
        "start": row.start_s,
        "end": row.end_s,
        "start_s": int(row.start_s),
        "end_s": int(row.end_s),
        "start_ms": round(row.start_s * 1000),
        "end_ms": round(row.end_s * 1000),
    }


def _template_error(template: str, e: Exception) -> DatasetError:
    return DatasetError(
        f"name template {template!r} does not format ({type(e).__name__}: {e}); "
        f"its fields can be {', '.join('{' + name + '}' for name in TEMPLATE_FIELDS)}"
    )


def _format_template(template: str, fields: dict[str, object]) -> str:
    """template.format(**fields); an unknown field or a bad format spec -> DatasetError listing the fields."""
    try:
        return template.format(**fields)
    except (KeyError, IndexError, AttributeError, ValueError, TypeError) as e:
        raise _template_error(template, e) from e
