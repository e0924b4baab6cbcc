"""Crash points for the crash-safety tests: `SANDBOXD_FAILPOINT=<name>` makes the process
kill itself (SIGKILL, like `kill -9`) when it reaches that point, and
`SANDBOXD_FAILPOINT=<name>:hang` makes every command that reaches it stop there for good
while the process lives on (heartbeats, other commands), so that a test can kill it with
work in flight. Unset, a failpoint is one comparison against None."""

from __future__ import annotations

import asyncio
import os
import signal

FAILPOINT_ENV = "SANDBOXD_FAILPOINT"
HANG = "hang"
_ACTIVE = os.environ.get(FAILPOINT_ENV) or None


def failpoint(name: str) -> None:
    if name == _ACTIVE:
        os.kill(os.getpid(), signal.SIGKILL)


async def hang_point(name: str) -> None:
    if f"{name}:{HANG}" == _ACTIVE:
        await asyncio.Event().wait()
