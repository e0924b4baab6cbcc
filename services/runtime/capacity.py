"""Per-node capacity: how many live sessions this Docker host may hold.

The count is the union of three sets of session ids: this node's managed containers that
the engine lists (not exited or dead), the sessions this runtime has admitted whose
containers are being made, and those admitted since the listing was taken. The listing is
refreshed at most every `max_age` seconds (one `docker ps` at a time, never under the
admission itself), so a burst of creates costs no Docker round trip each and cannot
overshoot within a runtime; several runtimes of one node each admit on their own and may
overshoot by the creates they admit at the same instant. Admission never fails on the
engine: if it cannot list, the last listing stands and the create itself reports the
engine's state.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import sys
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass

from docker.utils import parse_bytes

from shared.errors import DockerUnavailable

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
    def __init__(
        self,
        limit: int,
        live_sessions: Callable[[], Awaitable[set[str]]],
        *,
        max_age: float = 1.0,
        monotonic: Callable[[], float] = time.monotonic,
    ) -> None:
        self.limit = limit
        self._live_sessions = live_sessions
        self._max_age = max_age
        self._now = monotonic
        self._listed: set[str] = set()
        self._listed_at = -max_age - 1.0
        self._admitted: set[str] = set()
        self._since_listing: dict[str, float] = {}  # admitted session -> when its admission ended
        self._listing = asyncio.Lock()

    @contextlib.asynccontextmanager
    async def admit(self, session_id: str) -> AsyncIterator[CapacityExceeded | None]:
        """Hold a place for a new session while its container is made; None when admitted."""
        if self.limit == UNLIMITED:
            yield None
            return
        await self._refresh()
        # No await from the count to the admission: concurrent admissions cannot both take
        # the last place.
        live = self._listed | self._admitted | set(self._since_listing)
        if len(live) >= self.limit:
            yield CapacityExceeded(len(live), self.limit)
            return
        self._admitted.add(session_id)
        try:
            yield None
        finally:
            self._admitted.discard(session_id)
            self._since_listing[session_id] = self._now()

    async def snapshot(self) -> tuple[int, int]:
        """(live sessions, limit) for the node's beat: the listing refreshed when due."""
        await self._refresh()
        return len(self._listed | self._admitted | set(self._since_listing)), self.limit

    def removed(self, session_id: str) -> None:
        """The session's container is gone: its place is free before the next listing."""
        self._listed.discard(session_id)
        self._since_listing.pop(session_id, None)

    async def _refresh(self) -> None:
        if self._now() - self._listed_at < self._max_age:
            return
        async with self._listing:
            if self._now() - self._listed_at < self._max_age:
                return  # another admission refreshed it meanwhile
            began = self._now()
            try:
                listed = await self._live_sessions()
            except DockerUnavailable as exc:
                log.debug("capacity: cannot list containers (%s); keeping the last listing", exc)
                return
            self._listed, self._listed_at = listed, began
            # What was admitted before this listing began is in it (or failed to start).
            self._since_listing = {s: t for s, t in self._since_listing.items() if t >= began}


def unlimited() -> NodeCapacity:
    async def nothing() -> set[str]:
        return set()

    return NodeCapacity(UNLIMITED, nothing)
