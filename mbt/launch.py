"""`python -m mbt.launch [torchrun's options] -m mbt.train ...`: torchrun (`torch.distributed.run`: the same options,
the same processes), except for what it prints when a run stops.

torchrun's agent answers Ctrl-C or SIGTERM by passing the signal on to the ranks, waiting for them, and then raising
it as an exception of its own (a 30-line traceback, exit status 1, whatever the ranks did); a rank that fails becomes
a ChildFailedError (a traceback and a table). Here the ranks say why they stopped (`mbt.train`: one line on rank 0,
or its error), and the launcher exits with the shell's status for the signal (130 for SIGINT, 143 for SIGTERM) or
with the failed rank's, after one line naming it.
"""

from __future__ import annotations

import logging
import re
import sys
from collections.abc import Sequence

from torch.distributed.elastic.multiprocessing.api import SignalException
from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
from torch.distributed.run import main as torchrun

# The agent's lines as it passes a signal on ("Received 2 death signal", "Sending process N closing signal SIGINT"):
# the ranks' own line says it; the agent's other warnings are kept.
_PASSING_ON = re.compile(r"death signal|closing signal")
_AGENT_LOGGERS = ("torch.distributed.elastic.agent.server.api", "torch.distributed.elastic.multiprocessing.api")


def _not_passing_on(record: logging.LogRecord) -> bool:
    return not _PASSING_ON.search(record.getMessage())


def main(argv: Sequence[str] | None = None) -> int:
    """torchrun with `argv` (default: this command's arguments); the exit status the ranks' stop deserves."""
    for name in _AGENT_LOGGERS:
        logging.getLogger(name).addFilter(_not_passing_on)
    try:
        torchrun(list(sys.argv[1:] if argv is None else argv))
    except SignalException as err:
        return 128 + int(err.sigval)
    except ChildFailedError as err:
        rank, failure = err.get_first_failure()
        code = failure.exitcode
        how = f"was killed by {failure.signal_name()}" if code < 0 else f"exited with status {code}"
        print(f"mbt.launch: rank {rank} {how} (its own lines say why)", file=sys.stderr)
        return 128 - code if code < 0 else min(max(code, 1), 255)
    return 0


if __name__ == "__main__":
    sys.exit(main())
