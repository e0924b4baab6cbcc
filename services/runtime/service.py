"""The runtime's composition root: NATS, Docker, handlers, the command consumer and the
projector, wired once. Tests build it the same way with their own settings."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
from collections.abc import AsyncIterator
from dataclasses import dataclass
from datetime import datetime, timedelta

import msgspec
from nats.js import JetStreamContext

from services.runtime.capacity import UNLIMITED, NodeCapacity, auto_limit, is_live_state
from services.runtime.consumer import CommandConsumer
from services.runtime.docker_driver import ContainerDriver, DockerDriver, prepare_chats_root
from services.runtime.handlers import CommandHandlers, HandlerDeps, policy_from
from services.runtime.observe import ActiveSandboxes
from services.runtime.projector import Projector
from services.runtime.reconcile import NodeReconciler
from services.runtime.replay import replay
from shared.clock import Clock, SystemClock
from shared.config import Settings
from shared.errors import DockerUnavailable
from shared.event_store import EventStore
from shared.nats_connection import connect, nats_url
from shared.nats_roles import Role
from shared.poison import Quarantine
from shared.registry import Registry
from shared.service import StartupError
from shared.status_blocks import prometheus_endpoint, publish_periodically
from shared.subjects import COMMANDS_STREAM, EVENTS_STREAM, ConsumerName
from shared.telemetry import Telemetry, setup_telemetry
from shared.topology import attach_status_bucket, attach_topology

log = logging.getLogger(__name__)


class RuntimeStatus(msgspec.Struct):
    """What an operator reads with `nats kv get sandbox_status runtime.<node_id>.<pid>`."""

    node_id: str
    pid: int
    started_at: datetime
    last_seen: datetime
    in_flight: int
    active_sandboxes: int
    last_reconcile: str | None


@dataclass(frozen=True, slots=True)
class RuntimeHandle:
    handlers: CommandHandlers
    reconciler: NodeReconciler
    tasks: list[asyncio.Task[None]]


@contextlib.asynccontextmanager
async def running_runtime(  # noqa: PLR0915 - the composition root wires everything, once
    settings: Settings,
    *,
    driver: ContainerDriver | None = None,
    clock: Clock | None = None,
    telemetry: Telemetry | None = None,
) -> AsyncIterator[RuntimeHandle]:
    """Run the consumer, the projector and reconciliation until the block exits, then drain."""
    clock = clock or SystemClock()
    telemetry = telemetry or setup_telemetry("sandboxd-runtime", otlp_endpoint=settings.telemetry.otlp_endpoint)
    try:
        nc = await connect(settings.nats, name=f"sandboxd-runtime:{settings.runtime.node_id}", role=Role.RUNTIME)
    except Exception as exc:
        raise StartupError(f"cannot connect to NATS at {nats_url(settings.nats)}: {exc}") from exc
    owned: DockerDriver | None = None
    try:
        js = nc.jetstream(timeout=settings.nats.request_timeout_seconds)
        kv = await attach_topology(js, settings.streams)
        status_bucket = await attach_status_bucket(js, settings.streams)
        if driver is None:
            try:
                owned = DockerDriver.from_env(settings.runtime.docker_timeout_seconds, telemetry=telemetry)
                await owned.ping()
            except DockerUnavailable as exc:
                raise StartupError(f"{exc} (is dockerd running? see the README)") from exc
            driver = owned
            prepare_chats_root(settings.sandbox.chats_root)
        runtime_settings = settings.runtime
        quarantine = Quarantine(telemetry.metrics)
        store = EventStore(js, quarantine=quarantine)
        active = ActiveSandboxes(telemetry.metrics)
        policy = policy_from(runtime_settings.node_id, settings.sandbox, runtime_settings.claim_timeout_seconds)
        capacity = await node_capacity(settings, driver, owned)
        handlers = CommandHandlers(
            HandlerDeps(store, driver, clock, policy, settings.sandbox, telemetry, active, capacity)
        )
        consumer = CommandConsumer(
            js,
            handlers,
            max_in_flight=runtime_settings.max_in_flight,
            ack_wait_seconds=runtime_settings.ack_wait_seconds,
            max_deliveries=runtime_settings.max_deliveries,
            telemetry=telemetry,
        )
        registry = Registry(js, kv, quarantine=quarantine)
        projector = Projector(js, store, registry, telemetry=telemetry, quarantine=quarantine)
        if runtime_settings.replay_on_start:
            report = await replay(js, registry, projector, quarantine=quarantine)
            for kind in ("missing", "stale", "extra", "corrupt"):
                telemetry.metrics.set("sandbox.replay.drift", len(getattr(report, kind)), {"kind": kind})
        reconciler = NodeReconciler(
            store,
            registry,
            driver,
            clock,
            node_id=runtime_settings.node_id,
            claim_timeout=timedelta(seconds=runtime_settings.claim_timeout_seconds),
            confirmations=runtime_settings.reconcile_confirmations,
            stop_timeout_seconds=settings.sandbox.stop_timeout_seconds,
            telemetry=telemetry,
            active=active,
        )
        started_at = clock.now()

        def status() -> RuntimeStatus:
            last = reconciler.last_report
            return RuntimeStatus(
                node_id=runtime_settings.node_id,
                pid=os.getpid(),
                started_at=started_at,
                last_seen=clock.now(),
                in_flight=consumer.in_flight,
                active_sandboxes=active.value,
                last_reconcile=None if last is None else f"{last.containers} containers, {len(last.actions)} actions",
            )

        async def put_status(data: bytes) -> None:
            await status_bucket.put(f"runtime.{runtime_settings.node_id}.{os.getpid()}", data)
            await observe_consumer_lag(js, telemetry)

        stopping = asyncio.Event()
        tasks = [
            asyncio.create_task(consumer.run(stopping), name="commands"),
            asyncio.create_task(projector.run(stopping), name="projector"),
            asyncio.create_task(
                publish_periodically(put_status, status, settings.telemetry.status_interval_seconds, stopping),
                name="status",
            ),
        ]
        if runtime_settings.reconcile_enabled:
            tasks.append(
                asyncio.create_task(
                    reconciler.run(stopping, runtime_settings.reconcile_interval_seconds), name="reconciliation"
                )
            )
        log.info("runtime %s started", runtime_settings.node_id)
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


async def node_capacity(settings: Settings, driver: ContainerDriver, engine: DockerDriver | None) -> NodeCapacity:
    """`runtime.max_sessions`, or (0) as many sessions as the engine's memory holds at
    `sandbox.memory_limit` each; counted from this node's containers in Docker."""
    node = settings.runtime.node_id
    limit = settings.runtime.max_sessions
    if limit == 0:
        limit = auto_limit(await engine.memory_bytes(), settings.sandbox.memory_limit) if engine else UNLIMITED
        if limit != UNLIMITED:
            log.info(
                "capacity: %d sandboxes (the engine's memory / sandbox.memory_limit %s; set runtime.max_sessions "
                "to choose)",
                limit,
                settings.sandbox.memory_limit,
            )

    async def live_sessions() -> set[str]:
        return {c.session_id for c in await driver.list_managed(node) if is_live_state(c.state)}

    return NodeCapacity(limit, live_sessions)


async def observe_consumer_lag(js: JetStreamContext, telemetry: Telemetry) -> None:
    """Consumer lag as gauges: messages not yet delivered and delivered but unacknowledged."""
    for stream, consumer in ((COMMANDS_STREAM, ConsumerName.RUNTIME), (EVENTS_STREAM, ConsumerName.PROJECTOR)):
        with contextlib.suppress(Exception):
            info = await js.consumer_info(stream, consumer)
            telemetry.metrics.set("sandbox.consumer.pending", info.num_pending or 0, {"consumer": consumer})
            telemetry.metrics.set("sandbox.consumer.ack_pending", info.num_ack_pending or 0, {"consumer": consumer})


async def serve(settings: Settings, stopping: asyncio.Event) -> None:
    with prometheus_endpoint(settings.telemetry.metrics_host, settings.telemetry.runtime_metrics_port):
        await _serve(settings, stopping)


async def _serve(settings: Settings, stopping: asyncio.Event) -> None:
    async with running_runtime(settings) as runtime:
        stop = asyncio.create_task(stopping.wait())
        done, _ = await asyncio.wait([stop, *runtime.tasks], return_when=asyncio.FIRST_COMPLETED)
        stop.cancel()
        for task in done:
            if task is not stop and task.exception() is not None:
                raise StartupError(f"runtime loop {task.get_name()} died: {task.exception()}")
