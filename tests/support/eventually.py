"""Waiting in tests without fixed sleeps: poll until a condition holds (or keeps holding).

A test never asserts how long something took; it waits up to a generous deadline for what
must happen, and fails with the last reading when it never did.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable
from datetime import UTC, datetime
from typing import TypeVar

T = TypeVar("T")

DEFAULT_TIMEOUT = 20.0
_POLL = 0.02


def _truthy(value: object) -> bool:
    return bool(value)


async def eventually(
    read: Callable[[], Awaitable[T]],
    check: Callable[[T], bool] = _truthy,
    *,
    timeout: float = DEFAULT_TIMEOUT,
    what: str = "condition",
) -> T:
    """Read until `check` holds and return that reading; AssertionError when it never did.
    A read that raises counts as "not yet" (e.g. a key not written yet)."""
    deadline = time.monotonic() + timeout
    last: object = None
    while True:
        try:
            value = await read()
        except Exception as exc:  # noqa: BLE001 - "not there yet" comes as many error types
            last = exc
        else:
            if check(value):
                return value
            last = value
        if time.monotonic() > deadline:
            raise AssertionError(f"{what} not met within {timeout:g}s; last reading: {last!r}")
        await asyncio.sleep(_POLL)


async def until(check: Callable[[], bool], *, timeout: float = DEFAULT_TIMEOUT, what: str = "condition") -> None:
    """Wait for a synchronous condition (e.g. a list filled by a subscription)."""

    async def read() -> bool:
        return check()

    await eventually(read, timeout=timeout, what=what)


async def past(moment: datetime, *, timeout: float = DEFAULT_TIMEOUT) -> None:
    """Wait until the wall clock is past `moment` (e.g. a session's `expires_at`): when a
    test needs time itself to pass, the moment is the condition, not a guessed sleep."""
    await until(lambda: datetime.now(UTC) > moment, timeout=timeout, what=f"the clock past {moment.isoformat()}")


async def holds(
    read: Callable[[], Awaitable[T]],
    check: Callable[[T], bool],
    *,
    seconds: float,
    what: str = "condition",
) -> T:
    """Assert that `check` keeps holding for `seconds` (e.g. "nothing is redelivered"):
    for a negative claim a test has to watch for a while; it reads all along, not once at
    the end, and fails at the first reading that breaks it."""
    deadline = time.monotonic() + seconds
    while True:
        value = await read()
        if not check(value):
            raise AssertionError(f"{what} broke: {value!r}")
        if time.monotonic() > deadline:
            return value
        await asyncio.sleep(_POLL * 5)
