"""Running one ffmpeg command fenced in, for a decode of a file from the open web.

The input is opened here and must be a regular file (ffmpeg would block on a FIFO and read a device forever); ffmpeg
reads that open file as `/dev/fd/N`. ffmpeg runs in its own process group, killed at a deadline and when its parent
dies; every file it writes (frames, audio, its log) is capped in size by RLIMIT_FSIZE, its memory by RLIMIT_AS. What
goes wrong is a DecodeError whose `reason` is a short code for reports.
"""

from __future__ import annotations

import contextlib
import ctypes
import functools
import os
import re
import resource
import shutil
import signal
import stat
import subprocess
import time
from collections.abc import Callable


class DecodeError(RuntimeError):
    """A clip could not be decoded; `reason` is a short code for reports, the message quotes ffmpeg."""

    def __init__(self, reason: str, message: str) -> None:
        super().__init__(message)
        self.reason = reason


class ToolMissingError(RuntimeError):
    """ffmpeg is not installed."""


LOG_KEEP_BYTES = 1 << 20  # ffmpeg's log is read as its first and last MiB
_PR_SET_PDEATHSIG = 1
_LIBC = ctypes.CDLL(None, use_errno=True)  # loaded here: a forked child must not dlopen
_LEVEL_RE = re.compile(r"^(?:\[[^\]]* @ 0x[0-9a-f]+\] )?\[(panic|fatal|error)\] (.*)")


# The environment variables that name the ffmpeg to run, first set first (a cluster module's or conda's ffmpeg off
# PATH; FFMPEG_BINARY is imageio's and moviepy's name). devenv.envcheck reads the same (a test keeps them equal).
FFMPEG_ENV = ("MBT_FFMPEG", "FFMPEG_BINARY")


def ffmpeg_binary() -> str:
    """The ffmpeg every decode and probe runs: the first of FFMPEG_ENV that is set, else `ffmpeg` on PATH."""
    return next((os.environ[name] for name in FFMPEG_ENV if os.environ.get(name)), "ffmpeg")


def use_ffmpeg(path: str | os.PathLike | None) -> None:
    """Run the ffmpeg at `path` from now on, in this process and the workers it starts (`--ffmpeg`); None: as
    before."""
    if path is not None:
        os.environ[FFMPEG_ENV[0]] = os.fspath(path)


def require_ffmpeg() -> None:
    """Raise ToolMissingError saying what to install or set when the ffmpeg to run (`ffmpeg_binary`) is not an
    executable."""
    binary = ffmpeg_binary()
    if shutil.which(binary) is not None:
        return
    named = next((name for name in FFMPEG_ENV if os.environ.get(name)), None)
    if named is not None:
        raise ToolMissingError(f"ffmpeg not found: {named}={binary} (or --ffmpeg) is not an executable file")
    raise ToolMissingError(
        "ffmpeg not found on PATH; install it (Debian/Ubuntu: apt-get install -y ffmpeg) or point --ffmpeg (or "
        f"{FFMPEG_ENV[0]}) at one"
    )


def die_with_parent(parent_pid: int) -> None:
    """Have the kernel SIGKILL this process when its parent dies (Linux PR_SET_PDEATHSIG), even by SIGKILL."""
    if _LIBC.prctl(_PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0) != 0:
        raise OSError(ctypes.get_errno(), "prctl(PR_SET_PDEATHSIG) failed")
    if os.getppid() != parent_pid:  # the parent died before the prctl took effect
        os.kill(os.getpid(), signal.SIGKILL)


def _child_setup(parent_pid: int, max_file_bytes: int, max_memory_bytes: int) -> Callable[[], None]:
    def setup() -> None:
        die_with_parent(parent_pid)
        _set_limits(0, max_file_bytes, max_memory_bytes)

    return setup


def _set_limits(pid: int, max_file_bytes: int, max_memory_bytes: int) -> None:
    """Cap the size of every file process `pid` (0: this one) writes, and its memory."""
    resource.prlimit(pid, resource.RLIMIT_FSIZE, (max_file_bytes, max_file_bytes))
    resource.prlimit(pid, resource.RLIMIT_AS, (max_memory_bytes, max_memory_bytes))


@functools.cache
def _pdeathsig_wrapper() -> tuple[str, ...]:
    """util-linux's `setpriv --pdeathsig KILL --` where it exists (2.33+): ffmpeg then dies with its parent without a
    preexec_fn, which forces a full fork of the torch-sized worker (measured: 37 ms per run, against 2 ms)."""
    setpriv = shutil.which("setpriv")
    if setpriv is None:
        return ()
    wrapper = (setpriv, "--pdeathsig", "KILL", "--")
    try:
        works = subprocess.run([*wrapper, "true"], capture_output=True, timeout=10).returncode == 0
    except (OSError, subprocess.TimeoutExpired):
        works = False
    return wrapper if works else ()


def error_lines(stderr: str, n: int = 3) -> str:
    """ffmpeg's last `n` error messages (or its last lines when it logged none), on one line."""
    lines = [line.strip() for line in stderr.splitlines() if line.strip()]
    errors = [m[2] if (m := _LEVEL_RE.search(line)) else None for line in lines]
    picked = [e for e in errors if e] or lines
    return " | ".join(picked[-n:]) or "no message from ffmpeg"


def _read_log(path: str) -> str:
    """ffmpeg's log: all of it, or its first and last LOG_KEEP_BYTES when longer (the report, the last errors)."""
    with open(path, "rb") as f:
        head = f.read(LOG_KEEP_BYTES)
        size = f.seek(0, os.SEEK_END)
        tail = b""
        if size > len(head):
            f.seek(max(size - LOG_KEEP_BYTES, len(head)))
            tail = b"\n" + f.read(LOG_KEEP_BYTES)
    return (head + tail).decode(errors="replace")


def run_ffmpeg(
    cmd: list[str],
    log_path: str,
    deadline: float,
    timeout_s: float,
    max_file_bytes: int,
    max_memory_bytes: int,
    input_fd: int,
) -> tuple[int, str]:
    """Run `cmd` with its log in `log_path` until it exits or the deadline: (exit status, log). Raises DecodeError
    'timeout', 'too_large' or 'unreadable' (killed by a signal); ffmpeg's process group is killed on every way out."""
    wrapper = _pdeathsig_wrapper()
    with open(log_path, "wb") as log:
        proc = subprocess.Popen(
            [*wrapper, *cmd],
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=log,
            start_new_session=True,
            pass_fds=(input_fd,),
            preexec_fn=None if wrapper else _child_setup(os.getpid(), max_file_bytes, max_memory_bytes),
        )
    try:
        if wrapper:  # set from here: ffmpeg has not read its input yet
            with contextlib.suppress(ProcessLookupError):
                _set_limits(proc.pid, max_file_bytes, max_memory_bytes)
        returncode = proc.wait(timeout=max(deadline - time.monotonic(), 0.0))
    except subprocess.TimeoutExpired:
        message = f"ffmpeg did not finish within {timeout_s:g} s (--decode-timeout); killed"
        raise DecodeError("timeout", message) from None
    finally:
        if proc.returncode is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
    stderr = _read_log(log_path)
    if returncode == -signal.SIGXFSZ:
        message = f"ffmpeg wrote a file over {max_file_bytes} bytes (frames, audio or log); killed"
        raise DecodeError("too_large", message)
    if returncode < 0:
        raise DecodeError("unreadable", f"ffmpeg killed by signal {-returncode}: {error_lines(stderr)}")
    return returncode, stderr


def open_regular_file(path: str | os.PathLike) -> int:
    """`path` opened for reading (the caller closes it); DecodeError unless it is a regular file: ffmpeg would
    block on a FIFO and read a device forever. The check is on the open file, so it cannot be swapped after it."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC)  # O_NONBLOCK: opening a FIFO returns at once
    except FileNotFoundError:
        raise DecodeError("missing_file", f"{os.fspath(path)} does not exist (a dangling link?)") from None
    except OSError as err:
        raise DecodeError("unreadable", f"{os.fspath(path)}: {err.strerror}") from None
    if not stat.S_ISREG(os.fstat(fd).st_mode):
        os.close(fd)
        raise DecodeError("not_a_file", f"{os.fspath(path)} is not a regular file (a FIFO, device or folder)")
    return fd
