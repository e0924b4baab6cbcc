"""The runtime's composition root: NATS, Docker, handlers, the command consumer and the
projector, wired once. Tests build it the same way with their own settings."""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncIterator
from dataclasses import dataclass
from datetime import timedelta

from services.runtime.consumer import CommandConsumer
from services.runtime.docker_driver import ContainerDriver, DockerDriver
from services.runtime.handlers import CommandHandlers, HandlerDeps, policy_from
from services.runtime.projector import Projector
from services.runtime.reconcile import NodeReconciler
from services.runtime.replay import replay
from shared.clock import Clock, SystemClock
from shared.config import Settings
from shared.errors import DockerUnavailable
from shared.event_store import EventStore
from shared.nats_connection import connect, nats_url
from shared.registry import Registry
from shared.service import StartupError
from shared.topology import ensure_topology

log = logging.getLogger(__name__)


@dataclass(frozen=True, slots=True)
class RuntimeHandle:
    handlers: CommandHandlers
    reconciler: NodeReconciler
    tasks: list[asyncio.Task[None]]


@contextlib.asynccontextmanager
async def running_runtime(
    settings: Settings, *, driver: ContainerDriver | None = None, clock: Clock | None = None
) -> AsyncIterator[RuntimeHandle]:
    """Run the consumer and the projector until the block exits, then drain."""
    try:
        nc = await connect(settings.nats, name=f"sandboxd-runtime:{settings.runtime.node_id}")
    except Exception as exc:
        raise StartupError(f"cannot connect to NATS at {nats_url(settings.nats)}: {exc}") from exc
    owned: DockerDriver | None = None
    try:
        js = nc.jetstream(timeout=settings.nats.request_timeout_seconds)
        kv = await ensure_topology(js, settings.streams)
        if driver is None:
            try:
                owned = DockerDriver.from_env(settings.runtime.docker_timeout_seconds)
                await owned.ping()
            except DockerUnavailable as exc:
                raise StartupError(f"{exc} (is dockerd running? see the README)") from exc
            driver = owned
        store = EventStore(js)
        policy = policy_from(settings.runtime.node_id, settings.sandbox, settings.runtime.claim_timeout_seconds)
        handlers = CommandHandlers(HandlerDeps(store, driver, clock or SystemClock(), policy, settings.sandbox))
        consumer = CommandConsumer(
            js,
            handlers,
            max_in_flight=settings.runtime.max_in_flight,
            ack_wait_seconds=settings.runtime.ack_wait_seconds,
        )
        registry = Registry(js, kv)
        projector = Projector(js, store, registry)
        runtime_settings = settings.runtime
        if runtime_settings.replay_on_start:
            await replay(js, registry, projector)
        reconciler = NodeReconciler(
            store,
            registry,
            driver,
            clock or SystemClock(),
            node_id=runtime_settings.node_id,
            claim_timeout=timedelta(seconds=runtime_settings.claim_timeout_seconds),
            confirmations=runtime_settings.reconcile_confirmations,
            stop_timeout_seconds=settings.sandbox.stop_timeout_seconds,
        )
        stopping = asyncio.Event()
        tasks = [
            asyncio.create_task(consumer.run(stopping), name="commands"),
            asyncio.create_task(projector.run(stopping), name="projector"),
        ]
        if runtime_settings.reconcile_enabled:
            tasks.append(
                asyncio.create_task(
                    reconciler.run(stopping, runtime_settings.reconcile_interval_seconds), name="reconciliation"
                )
            )
        log.info("runtime %s started", settings.runtime.node_id)
        try:
            yield RuntimeHandle(handlers, reconciler, tasks)
        finally:
            stopping.set()
            await asyncio.gather(*tasks, return_exceptions=True)
    finally:
        if owned is not None:
            owned.close()
        with contextlib.suppress(Exception):
            await nc.drain()


async def serve(settings: Settings, stopping: asyncio.Event) -> None:
    async with running_runtime(settings) as runtime:
        stop = asyncio.create_task(stopping.wait())
        done, _ = await asyncio.wait([stop, *runtime.tasks], return_when=asyncio.FIRST_COMPLETED)
        stop.cancel()
        for task in done:
            if task is not stop and task.exception() is not None:
                raise StartupError(f"runtime loop {task.get_name()} died: {task.exception()}")
