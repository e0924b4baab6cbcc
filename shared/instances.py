"""Runtime instances and their liveness: `sandbox_instances`, one heartbeat per running
runtime process (key `<instance_id>`, a UUID chosen at start).

A claim (`provisioning` / `stopping`) names the instance that made it. A runtime that meets
another instance's claim reads that instance's heartbeat (one KV get) and judges it: a
heartbeat older than `runtime.instance_dead_after_seconds`, or none at all (deleted when the
instance stopped cleanly, or expired from the bucket), means the instance is dead and its
claim is taken over at once instead of after the claim timeout. A heartbeat that cannot be
read leaves the liveness unknown, and the claim timeout decides as before.

The judgment compares the heartbeat's time with the reader's clock, so the runtimes' clocks
must agree to well within `instance_dead_after_seconds` (as they must for the claim timeout
and expiries already). A live instance judged dead by mistake (a long pause) only loses its
claims: every append names the sequence it was decided from, and a container whose claim was
taken over is removed.
"""

from __future__ import annotations

import asyncio
import contextlib
import enum
import logging
import os
import uuid
from collections.abc import AsyncIterator, Callable
from datetime import datetime, timedelta
from typing import Protocol

from nats.js.errors import KeyNotFoundError
from nats.js.kv import KeyValue

from shared.clock import Clock
from shared.contracts import InstanceHeartbeat, decode_heartbeat, encode
from shared.errors import NatsUnavailable
from shared.event_store import with_nats_retry
from shared.poison import DECODE_ERRORS, PoisonSource, Quarantine

log = logging.getLogger(__name__)
# How long a clean stop spends telling peers it is leaving.
_LEAVE_SECONDS = 2.0

# Heartbeats per `instance_dead_after_seconds`: four can be missed before peers give up.
BEATS_PER_DEADLINE = 5


class Liveness(enum.StrEnum):
    """What a runtime knows of the instance that made a claim."""

    ALIVE = "alive"  # its heartbeat is fresh (or it is this very instance)
    DEAD = "dead"  # its heartbeat is gone or older than runtime.instance_dead_after_seconds
    UNKNOWN = "unknown"  # the claim names no instance, or its heartbeat could not be read


def judge(beat: InstanceHeartbeat | None, now: datetime, dead_after: timedelta) -> Liveness:
    """Pure: an instance's liveness from its heartbeat (None: it has none) at `now` by the
    reader's clock. A heartbeat from the future (clock skew) is fresh."""
    if beat is None:
        return Liveness.DEAD
    return Liveness.ALIVE if now - beat.beat_at < dead_after else Liveness.DEAD


class InstanceLiveness(Protocol):
    """What the command handlers need: their own instance id, and the liveness of another."""

    @property
    def instance_id(self) -> str: ...

    async def liveness(self, instance_id: str) -> Liveness: ...


class Unmonitored:
    """An instance that knows nothing of its peers (unit tests, tools): every other
    instance's liveness is unknown, so only the claim timeout frees their claims."""

    def __init__(self, instance_id: str | None = None) -> None:
        self._instance_id = instance_id or str(uuid.uuid4())

    @property
    def instance_id(self) -> str:
        return self._instance_id

    async def liveness(self, instance_id: str) -> Liveness:  # noqa: ARG002 - the protocol's signature
        return Liveness.UNKNOWN


class Instances:
    """This instance's heartbeat in `sandbox_instances`, and its reading of its peers'."""

    def __init__(
        self,
        kv: KeyValue,
        clock: Clock,
        *,
        node_id: str,
        dead_after: timedelta,
        instance_id: str | None = None,
        quarantine: Quarantine | None = None,
    ) -> None:
        self._kv = kv
        self._clock = clock
        self._dead_after = dead_after
        self._quarantine = quarantine or Quarantine()
        self._instance_id = instance_id or str(uuid.uuid4())
        self._node_id = node_id
        self._started_at = clock.now()

    @property
    def instance_id(self) -> str:
        return self._instance_id

    @property
    def interval(self) -> float:
        return self._dead_after.total_seconds() / BEATS_PER_DEADLINE

    async def liveness(self, instance_id: str) -> Liveness:
        if instance_id == self._instance_id:
            return Liveness.ALIVE

        async def get() -> bytes | None:
            try:
                return (await self._kv.get(instance_id)).value
            except KeyNotFoundError:  # never written, deleted (KeyDeletedError) or expired
                return None

        try:
            data = await with_nats_retry(get, what=f"heartbeat of instance {instance_id}")
        except NatsUnavailable as exc:
            log.warning("liveness of instance %s unknown: %s", instance_id, exc)
            return Liveness.UNKNOWN
        if not data:
            return judge(None, self._clock.now(), self._dead_after)
        try:
            beat = decode_heartbeat(data)
        except DECODE_ERRORS as exc:
            self._quarantine.report(PoisonSource.HEARTBEAT, instance_id, 0, f"does not decode: {exc}")
            return Liveness.UNKNOWN
        if beat.instance_id != instance_id:
            self._quarantine.report(PoisonSource.HEARTBEAT, instance_id, 0, "it names another instance")
            return Liveness.UNKNOWN
        return judge(beat, self._clock.now(), self._dead_after)

    async def beat(self) -> None:
        heartbeat = InstanceHeartbeat(
            instance_id=self._instance_id,
            node_id=self._node_id,
            pid=os.getpid(),
            started_at=self._started_at,
            beat_at=self._clock.now(),
        )
        await with_nats_retry(lambda: self._kv.put(self._instance_id, encode(heartbeat)), what="heartbeat")

    async def leave(self) -> None:
        """Delete the heartbeat: peers take this instance's claims over at once."""
        try:
            # Bounded: with NATS gone a stop must not wait out every retry (peers then wait for
            # the heartbeat to age).
            await asyncio.wait_for(
                with_nats_retry(lambda: self._kv.delete(self._instance_id), what="heartbeat delete"), _LEAVE_SECONDS
            )
        except Exception as exc:  # noqa: BLE001 - peers then wait for the heartbeat to age instead
            log.warning("heartbeat of instance %s not deleted: %s", self._instance_id, exc)

    @contextlib.asynccontextmanager
    async def heartbeating(self, connected: Callable[[], bool] = lambda: True) -> AsyncIterator[Instances]:
        """Beat once (before anything can be claimed), keep beating until the block exits,
        then delete the heartbeat — unless NATS is not `connected` then: peers judge the
        instance dead once its heartbeat ages, and the stop does not wait for a write that
        cannot happen. Enter it before the loops that claim, so that it outlives their drain."""
        await self.beat()
        stopping = asyncio.Event()
        task = asyncio.create_task(self._beat_until(stopping), name="heartbeat")
        log.info("runtime instance %s is alive", self._instance_id)
        try:
            yield self
        finally:
            # A beat in flight is cancelled, not waited for: leave() deletes the heartbeat
            # anyway, and with NATS gone its retries would hold the stop for many seconds.
            stopping.set()
            task.cancel()
            await asyncio.gather(task, return_exceptions=True)
            if connected():
                await self.leave()
            else:
                log.warning("heartbeat of instance %s not deleted: NATS is not connected", self._instance_id)

    async def _beat_until(self, stopping: asyncio.Event) -> None:
        while not stopping.is_set():
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stopping.wait(), self.interval)
            if stopping.is_set():
                return
            try:
                await self.beat()
            except Exception as exc:  # noqa: BLE001 - a missed beat only risks losing our claims
                log.warning("heartbeat of instance %s not written: %s", self._instance_id, exc)
