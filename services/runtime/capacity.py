"""Per-node capacity: how many live sessions this Docker host may hold.

The count is the engine's own (this node's managed containers that are not exited or dead)
plus the sessions this runtime has admitted whose containers do not exist yet; both are
sets of session ids, so a container that has just started is not counted twice. Admission
is serialised inside a runtime, so a burst of creates cannot overshoot; several runtimes of
one node each admit on their own and may overshoot by the creates they start at the same
moment.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import sys
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass

from docker.utils import parse_bytes

log = logging.getLogger(__name__)

UNLIMITED = sys.maxsize
_GONE_STATES = frozenset({"exited", "dead"})


def auto_limit(memory_bytes: int, memory_limit: str) -> int:
    """Sessions whose memory limits fit in the engine's memory (at least one)."""
    per_session = int(parse_bytes(memory_limit))
    return max(memory_bytes // per_session, 1) if per_session > 0 else UNLIMITED


def is_live_state(state: str) -> bool:
    return state not in _GONE_STATES


@dataclass(frozen=True, slots=True)
class CapacityExceeded:
    live: int
    limit: int

    @property
    def detail(self) -> str:
        return f"this node runs {self.live} of at most {self.limit} sandboxes (runtime.max_sessions); try again later"


class NodeCapacity:
    def __init__(self, limit: int, live_sessions: Callable[[], Awaitable[set[str]]]) -> None:
        self.limit = limit
        self._live_sessions = live_sessions
        self._admitted: set[str] = set()
        self._lock = asyncio.Lock()

    @contextlib.asynccontextmanager
    async def admit(self, session_id: str) -> AsyncIterator[CapacityExceeded | None]:
        """Hold a place for a new session while its container is made; None when admitted."""
        if self.limit == UNLIMITED:
            yield None
            return
        async with self._lock:
            live = await self._live_sessions() | self._admitted
            refused = CapacityExceeded(len(live), self.limit) if len(live) >= self.limit else None
            if refused is None:
                self._admitted.add(session_id)
        try:
            yield refused
        finally:
            self._admitted.discard(session_id)


def unlimited() -> NodeCapacity:
    async def nothing() -> set[str]:
        return set()

    return NodeCapacity(UNLIMITED, nothing)
