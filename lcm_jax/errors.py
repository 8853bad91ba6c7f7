"""The errors a user can cause, and how the CLIs report them.

A ``UserError`` is a problem with what the user gave (a config value, a path, a file, the
data) or a run's outcome they must act on (divergence, a full disk). The CLIs print its
message without a traceback and exit 2; ``--verbose`` re-raises it. Anything else is a bug
and keeps its traceback. Each owner defines its subclass (``weights.WeightsError``,
``checkpoint.CheckpointMismatchError``, ``loop.NonFiniteError``, ...); this module depends on
nothing, so every module can import it.
"""
from __future__ import annotations

import signal
import sys
from typing import Callable


class UserError(Exception):
    """Reported by the CLIs as ``<prog>: error: <message>``, exit code 2."""


class ConfigError(UserError, ValueError):
    """A config value (or a combination of values) that cannot work."""


class Interrupted(Exception):
    """SIGINT or SIGTERM stopped a run after saving ``step``; a rerun resumes from it.
    The CLIs exit with 128 + the signal's number, as a shell reports a signalled job."""

    def __init__(self, signum: int, step: int):
        super().__init__(f"{signal.Signals(signum).name} received: saved step {step}; rerun the same "
                         "command to resume from it")
        self.signum, self.step = signum, step


def run_cli(prog: str, main: Callable[[], None], verbose: bool = False,
            hint: Callable[[UserError], str] = lambda e: "") -> None:
    """``main()``, with user errors and interruptions as one message on stderr and an exit code;
    ``hint(e)``: a line to add (e.g. the command that resumes). A missing file the user named
    (FileNotFoundError) counts as a user error."""
    try:
        main()
    except Interrupted as e:
        print(f"{prog}: {e}", file=sys.stderr)
        sys.exit(128 + e.signum)
    except (UserError, FileNotFoundError) as e:
        if verbose:
            raise
        extra = hint(e) if isinstance(e, UserError) else ""
        print(f"{prog}: error: {e}" + (f"\n{extra}" if extra else ""), file=sys.stderr)
        sys.exit(2)
