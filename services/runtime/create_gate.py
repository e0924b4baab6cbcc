"""At most `limit` container creates in the engine at once; a session's create goes before
a warm pool refill that waits with it.

A Docker engine makes only so many containers a second whatever the concurrency (~8/s on a
2-core host); creates beyond that only queue inside it, and every other call waits behind
them there. Stops above all: with 8 creates in the engine a stop + remove took ~600 ms
against ~80 ms alone, so sessions outlived their expiry by up to a second (p99) while new
ones were being made. Held here instead, creates keep the engine just as busy (a burst of 48
made 7.8-8.4/s uncapped, 8.4-9.0/s at 4) and a stop, a pause or an inspect goes straight in
(expiry lateness p99 848-1,098 ms uncapped, 624-904 ms at 4; tests/bench/harness.py
`expiry`, runs taken in turn).
"""

from __future__ import annotations

import asyncio
import contextlib
from collections import deque
from collections.abc import AsyncIterator


class CreateGate:
    def __init__(self, limit: int) -> None:
        if limit < 1:
            raise ValueError(f"a create gate needs a limit of at least 1, not {limit}")
        self._limit = limit
        self._running = 0
        self._sessions: deque[asyncio.Future[None]] = deque()
        self._refills: deque[asyncio.Future[None]] = deque()

    @property
    def running(self) -> int:
        return self._running

    @property
    def waiting(self) -> int:
        return sum(not f.done() for f in self._sessions) + sum(not f.done() for f in self._refills)

    @contextlib.asynccontextmanager
    async def turn(self, *, refill: bool = False) -> AsyncIterator[None]:
        """Hold one of the `limit` places while the block runs (a pool refill: after every
        session's create that is waiting)."""
        await self._enter(refill=refill)
        try:
            yield
        finally:
            self._leave()

    async def _enter(self, *, refill: bool) -> None:
        ahead = self.waiting if refill else sum(not f.done() for f in self._sessions)
        if self._running < self._limit and ahead == 0:
            self._running += 1
            return
        place: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        (self._refills if refill else self._sessions).append(place)
        try:
            await place
        except asyncio.CancelledError:
            if place.done() and not place.cancelled():  # given the place as it was cancelled
                self._leave()
            raise

    def _leave(self) -> None:
        self._running -= 1
        for queue in (self._sessions, self._refills):
            while queue:
                place = queue.popleft()
                if not place.done():
                    self._running += 1
                    place.set_result(None)
                    return
