"""Crash points for the crash-safety tests: `SANDBOXD_FAILPOINT=<name>` makes the process
kill itself (SIGKILL, like `kill -9`) when it reaches that point. Unset, a failpoint is one
comparison against None."""

from __future__ import annotations

import os
import signal

FAILPOINT_ENV = "SANDBOXD_FAILPOINT"
_ACTIVE = os.environ.get(FAILPOINT_ENV) or None


def failpoint(name: str) -> None:
    if name == _ACTIVE:
        os.kill(os.getpid(), signal.SIGKILL)
