"""The warm pool: containers started ahead of any chat, so that a create is answered by
attaching the chat's directory to one of them (a bind mount on the host, see slots.py)
instead of a `docker create` + `start`.

A warm container is made for a session to come: its name and session label are those of the
session that will claim it (a fresh uuid). A create takes one (`take`), claims the chat with
that session id (the `provisioning` event), then attaches the chat (`claim`); a claim that
loses its append hands the id back (`give_back`). So a warm container is never shared: its
id goes to one claim, and the slot's marker, created exclusively, guards the host side. A
claimed container never returns to the pool: it is the session's, stopped and removed as any.

Each runtime instance keeps `sandbox.warm_pool_size` warm containers of its own (labelled
with its instance id), refilled in the background a few at a time. Warm containers of an
instance that is gone (a crash, a restart: instance ids are per process) are removed, not
adopted: two instances could otherwise hand the same one out. On a clean stop an instance
removes its own. Reconciliation and the death watch leave unclaimed warm containers to the
pool; a claimed one's chat comes from its slot's marker.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

from services.runtime.containers import ContainerIdentity, ContainerSpec, warm_spec
from services.runtime.docker_driver import ObservedContainer
from shared.config import SandboxSettings
from shared.errors import DockerUnavailable, InfrastructureError
from shared.ids import random_uuid
from shared.instances import InstanceLiveness, Liveness
from shared.telemetry import Telemetry
from shared.telemetry import disabled as telemetry_disabled

log = logging.getLogger(__name__)

_FILL_AT_ONCE = 4
_CHECK_SECONDS = 10.0
_RETRY_SECONDS = 2.0
# A slot without a container is released once this old (one being made has none yet).
_SLOT_GRACE_SECONDS = 120.0
# A taken warm container whose claim has not attached it this long after the take: its claim's
# append failed without landing (NATS gone), or its command is being resumed by another path.
_TAKEN_GRACE_SECONDS = 120.0


class WarmEngine(Protocol):
    """What the pool needs of the container engine (DockerDriver)."""

    async def ensure_running(self, spec: ContainerSpec) -> str: ...

    async def attach_warm(self, spec: ContainerSpec) -> None: ...

    async def remove(self, identity: ContainerIdentity, stop_timeout_seconds: int, ref: str | None = None) -> None: ...

    async def list_managed(self, node_id: str) -> list[ObservedContainer]: ...


class Slots(Protocol):
    """What the pool needs of the host's slot directories (SlotMounts)."""

    def make(self, session_id: str) -> Path: ...

    def stale(self, present: set[str], older_than: float) -> set[str]: ...

    def release(self, session_id: str) -> None: ...

    def retire(self) -> bool: ...

    def chat_of(self, session_id: str) -> str | None: ...


@dataclass(frozen=True, slots=True)
class Warm:
    session_id: str
    container_id: str


class WarmPool:
    def __init__(
        self,
        driver: WarmEngine,
        slots: Slots,
        settings: SandboxSettings,
        *,
        node_id: str,
        instances: InstanceLiveness,
        size: int,
        telemetry: Telemetry | None = None,
        new_id: Callable[[], str] = random_uuid,
        now: Callable[[], float] = time.monotonic,
    ) -> None:
        self._driver = driver
        self._slots = slots
        self._settings = settings
        self._node_id = node_id
        self._instances = instances
        self.size = size
        self._telemetry = telemetry or telemetry_disabled()
        self._new_id = new_id
        self._now = now
        self._ready: deque[Warm] = deque()
        self._taken: dict[str, tuple[Warm, float]] = {}  # handed to a claim, not attached yet; when
        self._filling = 0
        self._wake = asyncio.Event()
        self._metrics = self._telemetry.metrics

    @property
    def ready(self) -> int:
        return len(self._ready)

    # ------------------------------------------------------------------ claims

    def take(self) -> str | None:
        """A warm container's session id for a new session, or None (a cold create then)."""
        if not self._ready:
            self._metrics.increment("sandbox.pool.take.total", {"result": "empty"})
            return None
        warm = self._ready.popleft()
        self._taken[warm.session_id] = (warm, self._now())
        self._publish()
        self._wake.set()
        return warm.session_id

    def give_back(self, session_id: str) -> None:
        """A taken id whose claim did not land: ready again (nothing was attached)."""
        taken = self._taken.pop(session_id, None)
        if taken is not None:
            self._ready.appendleft(taken[0])
            self._publish()

    def holds(self, session_id: str) -> bool:
        return session_id in self._taken

    async def claim(self, spec: ContainerSpec) -> str:
        """Attach the chat of `spec` (a session's spec, for a taken id) to its warm container;
        the container's id. Raises as a start would; the container is then the session's to
        remove."""
        taken = self._taken.pop(spec.identity.session_id, None)
        if taken is None:  # given up on by `check` meanwhile: the container by name, or a new one
            return await self._driver.ensure_running(spec)
        try:
            await self._driver.attach_warm(spec)
        except Exception:
            self._metrics.increment("sandbox.pool.take.total", {"result": "failed"})
            raise
        self._metrics.increment("sandbox.pool.take.total", {"result": "warm"})
        return taken[0].container_id

    # ------------------------------------------------------------------ upkeep

    async def run(self, stopping: asyncio.Event) -> None:
        """Keep `size` warm containers until stopped (and look after them every few
        seconds); then remove the unclaimed ones."""
        try:
            await self.check()
            next_check = time.monotonic() + _CHECK_SECONDS
            while not stopping.is_set():
                if time.monotonic() >= next_check:
                    await self.check()
                    next_check = time.monotonic() + _CHECK_SECONDS
                missing = self.size - len(self._ready) - self._filling
                if missing > 0:
                    await self._fill(min(missing, _FILL_AT_ONCE))
                    continue
                self._wake.clear()
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(_first(stopping, self._wake), max(next_check - time.monotonic(), 0.01))
        finally:
            await self._drain()
            await asyncio.to_thread(self._slots.retire)

    async def _fill(self, count: int) -> None:
        self._filling += count
        try:
            made = await asyncio.gather(*(self._make() for _ in range(count)), return_exceptions=True)
        finally:
            self._filling -= count
        failures = [m for m in made if isinstance(m, BaseException)]
        for warm in made:
            if isinstance(warm, Warm):
                self._ready.append(warm)
        self._publish()
        if failures:
            log.warning("warm pool: %d of %d containers could not be made: %s", len(failures), count, failures[0])
            await asyncio.sleep(_RETRY_SECONDS)

    async def _make(self) -> Warm:
        session_id = self._new_id()
        slot = await asyncio.to_thread(self._slots.make, session_id)
        spec = warm_spec(session_id, self._node_id, self._instances.instance_id, slot, self._settings)
        try:
            container_id = await self._driver.ensure_running(spec)
        except BaseException:
            await self._remove(session_id)
            raise
        self._metrics.increment("sandbox.pool.made.total")
        return Warm(session_id, container_id)

    async def _remove(self, session_id: str) -> None:
        identity = ContainerIdentity("", session_id, self._node_id)
        try:
            await self._driver.remove(identity, 0)
        except (InfrastructureError, DockerUnavailable):
            log.warning("warm pool: could not remove the container of session %s", session_id, exc_info=True)

    async def check(self) -> None:
        """Upkeep: drop ready containers that are no longer running, remove warm containers
        of instances that are gone and taken ones no claim attached, release slots whose
        container is gone."""
        try:
            containers = await self._driver.list_managed(self._node_id)
        except DockerUnavailable as exc:
            log.warning("warm pool: cannot list containers: %s", exc)
            return
        seen = {c.session_id: c for c in containers}
        for warm in list(self._ready):
            found = seen.get(warm.session_id)
            if (found is None or found.state != "running") and warm in self._ready:
                self._ready.remove(warm)
                log.warning(
                    "warm pool: container of session %s is %s; replaced", warm.session_id, found and found.state
                )
                await self._remove(warm.session_id)
        self._publish()
        await self._forget_stale_takes(seen)
        for c in containers:
            if await self._abandoned(c):
                log.info("warm pool: removing %s, left warm by instance %s", c.name, c.pool_owner)
                await self._remove(c.session_id)
        for session_id in await asyncio.to_thread(self._slots.stale, set(seen), _SLOT_GRACE_SECONDS):
            await asyncio.to_thread(self._slots.release, session_id)

    async def _forget_stale_takes(self, seen: dict[str, ObservedContainer]) -> None:
        """A take whose claim never attached its container within the grace: the claim's
        append failed without landing (its command, redelivered, claimed another), or landed
        and is being resumed, which finds the container by name (or makes a cold one). Either
        way the pool lets go of it, and removes it while no chat is attached."""
        cutoff = self._now() - _TAKEN_GRACE_SECONDS
        for session_id, (_, taken_at) in list(self._taken.items()):
            if taken_at > cutoff:
                continue
            del self._taken[session_id]
            found = seen.get(session_id)
            # The marker is read again: a resumed claim may have attached it since the listing.
            if (
                found is not None
                and found.unclaimed_warm
                and not await asyncio.to_thread(self._slots.chat_of, session_id)
            ):
                log.warning("warm pool: container of session %s was taken but never claimed; removed", session_id)
                await self._remove(session_id)

    async def _abandoned(self, c: ObservedContainer) -> bool:
        if not c.unclaimed_warm or c.pool_owner == self._instances.instance_id:
            return False
        return not c.pool_owner or await self._instances.liveness(c.pool_owner) == Liveness.DEAD

    async def _drain(self) -> None:
        ready, self._ready = list(self._ready), deque()
        await asyncio.gather(*(self._remove(w.session_id) for w in ready))
        self._publish()

    def _publish(self) -> None:
        self._metrics.set("sandbox.pool.ready", len(self._ready))


async def _first(*events: asyncio.Event) -> None:
    waits = [asyncio.ensure_future(e.wait()) for e in events]
    try:
        await asyncio.wait(waits, return_when=asyncio.FIRST_COMPLETED)
    finally:
        for w in waits:
            w.cancel()
