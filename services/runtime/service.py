"""The runtime's composition root: NATS, Docker, handlers, the command consumer and the
projector, wired once. Start-up I/O runs under one exit stack, so whatever was started is
undone in reverse order (loops stopped, Docker closed, NATS drained) however the block ends.
Tests build it the same way with their own settings."""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import logging
import os
from collections.abc import AsyncIterator, Awaitable, Callable, Coroutine
from dataclasses import dataclass
from datetime import datetime, timedelta
from pathlib import PurePosixPath
from typing import Any

import msgspec
from nats.js import JetStreamContext
from nats.js.errors import NotFoundError
from nats.js.kv import KeyValue

from services.runtime.capacity import UNLIMITED, NodeCapacity, auto_limit, is_live_state
from services.runtime.consumer import CommandConsumer
from services.runtime.containers import warm_layout_blocker
from services.runtime.deaths import DeathAwareLog, DeathWatch
from services.runtime.docker_driver import ContainerDriver, DockerDriver, prepare_chats_root
from services.runtime.handlers import CommandHandlers, HandlerDeps, policy_from
from services.runtime.nodes import NodeLog, NodeWatch
from services.runtime.observe import ActiveSandboxes
from services.runtime.oci import AUTO, RuntimeChoice, choose_runtime
from services.runtime.pool import WarmPool
from services.runtime.projector import Projector
from services.runtime.reconcile import NodeReconciler
from services.runtime.replay import replay
from services.runtime.slots import SlotMounts
from shared.clock import Clock, SystemClock
from shared.config import Settings
from shared.errors import DockerUnavailable
from shared.event_store import EventStore
from shared.handled import HandledCommands
from shared.instances import BEATS_PER_DEADLINE, InstanceLiveness, Instances
from shared.nats_connection import service_connection
from shared.nats_roles import Role
from shared.nodes import NodeDirectory
from shared.poison import Quarantine
from shared.registry import Registry
from shared.service import StartupError
from shared.status_blocks import prometheus_endpoint, publish_periodically
from shared.subjects import (
    COMMAND_SUBJECTS,
    COMMANDS_STREAM,
    EVENTS_STREAM,
    NODE_COMMANDS_STREAM,
    ConsumerName,
    node_commands_of,
    node_consumer,
)
from shared.telemetry import Telemetry, setup_telemetry
from shared.topology import HANDLED, INSTANCES, STATUS, attach_bucket, attach_node_queues, attach_topology

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
    warm_ready: int = 0  # warm containers ready to be claimed (sandbox.warm_pool_size)
    # The OCI runtime this node's sandboxes run under (sandbox.oci_runtime resolved; null:
    # the engine's default) and why; why the warm pool is off, when it is.
    oci_runtime: str | None = None
    oci_runtime_why: str = ""
    warm_pool_off: str | None = None


@dataclass(frozen=True, slots=True)
class RuntimeHandle:
    handlers: CommandHandlers
    reconciler: NodeReconciler
    tasks: list[asyncio.Task[None]]
    deaths: DeathWatch | None = None  # None: no engine events to follow (or switched off)
    nodes: NodeWatch | None = None
    pool: WarmPool | None = None  # None: no engine with slots
    oci_runtime: RuntimeChoice | None = None  # what sandboxes run under, and why


@dataclass(frozen=True, slots=True)
class _Runtime:
    """The runtime's object graph, built from settings and its connected parts."""

    quarantine: Quarantine
    registry: Registry
    handlers: CommandHandlers
    consumer: CommandConsumer
    projector: Projector
    reconciler: NodeReconciler
    active: ActiveSandboxes
    deaths: DeathWatch | None
    nodes: NodeWatch
    node_queue: CommandConsumer  # this node's queue: commands other runtimes forwarded here
    pool: WarmPool | None  # None: no engine with slots (then every create is cold)


@contextlib.asynccontextmanager
async def running_runtime(
    settings: Settings,
    *,
    driver: ContainerDriver | None = None,
    clock: Clock | None = None,
    telemetry: Telemetry | None = None,
) -> AsyncIterator[RuntimeHandle]:
    """Run the consumer, the projector and reconciliation until the block exits, then drain."""
    clock = clock or SystemClock()
    telemetry = telemetry or setup_telemetry("sandboxd-runtime", otlp_endpoint=settings.telemetry.otlp_endpoint)
    async with contextlib.AsyncExitStack() as stack:
        name = f"sandboxd-runtime:{settings.runtime.node_id}"
        nc = await stack.enter_async_context(service_connection(settings.nats, name, role=Role.RUNTIME))
        js = nc.jetstream(timeout=settings.nats.request_timeout_seconds)
        kv = await attach_topology(js, settings.streams)
        await attach_node_queues(js, settings.streams)
        status_bucket = await attach_bucket(js, STATUS, settings.streams)
        handled_bucket = await attach_bucket(js, HANDLED, settings.streams)
        dead_after = timedelta(seconds=settings.runtime.instance_dead_after_seconds)
        instances_bucket = await attach_bucket(js, INSTANCES, settings.streams)
        instances = Instances(instances_bucket, clock, node_id=settings.runtime.node_id, dead_after=dead_after)
        directory = NodeDirectory(
            instances_bucket,
            nc,
            clock,
            here=settings.runtime.node_id,
            instance_id=instances.instance_id,
            fresh_for=dead_after,
            dead_after=timedelta(seconds=settings.runtime.node_dead_after_seconds),
        )
        engine: DockerDriver | None = None
        if driver is None:
            driver = engine = await _docker(stack, settings, telemetry)
        settings, choice = await _resolve_runtime(settings, engine)
        capacity = await node_capacity(settings, driver, engine)
        runtime = _wire(
            settings,
            js,
            kv,
            handled_bucket,
            driver=driver,
            capacity=capacity,
            clock=clock,
            telemetry=telemetry,
            instances=instances,
            directory=directory,
        )
        if settings.runtime.replay_on_start:
            await _replay(js, runtime, telemetry)

        # Entered before the loops start, so the heartbeat outlives their drain.
        def connected() -> bool:
            return nc.is_connected

        await stack.enter_async_context(instances.heartbeating(connected))
        await runtime.nodes.start()  # this node's beat, before any placement reads it
        stack.push_async_callback(_leave_node, runtime.nodes, connected)  # after the loops below have stopped
        writer = _status_writer(settings, js, status_bucket, telemetry)
        tasks = _start_tasks(stack, settings, runtime, writer, clock, choice=choice)
        log.info("runtime %s started", settings.runtime.node_id)
        yield RuntimeHandle(
            runtime.handlers, runtime.reconciler, tasks, runtime.deaths, runtime.nodes, runtime.pool, choice
        )


async def _resolve_runtime(settings: Settings, engine: DockerDriver | None) -> tuple[Settings, RuntimeChoice]:
    """`sandbox.oci_runtime` resolved against the engine (an explicit runtime it lacks raises
    RuntimeUnavailable, a ConfigError), and the warm pool switched off where it cannot work;
    the settings the runtime then uses, and the choice. Logged: which runtime and why."""
    sandbox = settings.sandbox
    choice = choose_runtime(sandbox.oci_runtime, None if engine is None else await engine.info())
    if choice.warm_pool_blocker is None and (layout := warm_layout_blocker(sandbox)) is not None:
        choice = dataclasses.replace(choice, warm_pool_blocker=layout)
    pool_size = sandbox.warm_pool_size
    log.info("OCI runtime: %s (%s)", choice.name or "the engine's default", choice.why)
    if choice.warm_pool_blocker is not None and pool_size:
        # Warm containers left by an earlier instance that could pool are still removed: the
        # pool runs with size 0.
        log.warning(
            "warm pool off (sandbox.warm_pool_size %d ignored), every create is cold: %s",
            pool_size,
            choice.warm_pool_blocker,
        )
        pool_size = 0
    resolved = msgspec.structs.replace(sandbox, oci_runtime=choice.name or AUTO, warm_pool_size=pool_size)
    return msgspec.structs.replace(settings, sandbox=resolved), choice


async def _docker(stack: contextlib.AsyncExitStack, settings: Settings, telemetry: Telemetry) -> DockerDriver:
    """The local Docker engine, answering, closed with the stack; the chats root prepared."""
    slots = SlotMounts(settings.sandbox.slots_root, PurePosixPath(settings.sandbox.chat_mount_path).name)
    why: str | None = "sandbox.warm_pool_size is 0 and no warm container is left"
    if settings.sandbox.warm_pool_size or await asyncio.to_thread(slots.in_use):
        why = await asyncio.to_thread(slots.prepare)
        if why is not None:
            log.warning("warm pool off, every create is cold: %s", why)
    try:
        engine = DockerDriver.from_env(
            settings.runtime.docker_timeout_seconds,
            telemetry=telemetry,
            slots=slots if why is None else None,
            max_concurrent_creates=settings.runtime.max_concurrent_creates,
        )
        stack.callback(engine.close)
        await engine.ping()
    except DockerUnavailable as exc:
        raise StartupError(f"{exc} (is dockerd running? see the README)") from exc
    prepare_chats_root(settings.sandbox.chats_root)
    return engine


def _wire(
    settings: Settings,
    js: JetStreamContext,
    kv: KeyValue,
    handled_bucket: KeyValue,
    *,
    driver: ContainerDriver,
    capacity: NodeCapacity,
    clock: Clock,
    telemetry: Telemetry,
    instances: InstanceLiveness,
    directory: NodeDirectory,
) -> _Runtime:
    """Plain wiring: no I/O."""
    runtime = settings.runtime
    quarantine = Quarantine(telemetry.metrics)
    registry = Registry(js, kv, quarantine=quarantine)
    store = EventStore(js, quarantine=quarantine)
    active = ActiveSandboxes(telemetry.metrics)
    policy = policy_from(runtime.node_id, settings.sandbox, runtime.claim_timeout_seconds)
    handled = HandledCommands(js, handled_bucket, quarantine)
    deaths = None
    if isinstance(driver, DockerDriver) and runtime.death_watch_enabled:  # an engine with events to follow
        deaths = DeathWatch(
            store,
            driver,
            clock,
            node_id=runtime.node_id,
            stop_timeout_seconds=settings.sandbox.stop_timeout_seconds,
            park_seconds=runtime.claim_timeout_seconds,
            telemetry=telemetry,
            active=active,
        )
    # The handlers never decide on a container the engine said is dead.
    handler_log = DeathAwareLog(store, deaths) if deaths is not None else store
    pool = None
    if isinstance(driver, DockerDriver) and driver.slots is not None:
        pool = WarmPool(
            driver,
            driver.slots,
            settings.sandbox,
            node_id=runtime.node_id,
            instances=instances,
            size=settings.sandbox.warm_pool_size,
            telemetry=telemetry,
        )
    handlers = CommandHandlers(
        HandlerDeps(
            handler_log,
            driver,
            clock,
            policy,
            settings.sandbox,
            telemetry,
            active,
            capacity,
            handled=handled,
            instances=instances,
            nodes=directory,
            pool=pool if pool is not None and pool.size else None,
        )
    )

    def queue_consumer(
        durable: str = ConsumerName.RUNTIME, stream: str = COMMANDS_STREAM, filter_subject: str = COMMAND_SUBJECTS
    ) -> CommandConsumer:
        return CommandConsumer(
            js,
            handlers,
            max_in_flight=runtime.max_in_flight,
            ack_wait_seconds=runtime.ack_wait_seconds,
            max_deliveries=runtime.max_deliveries,
            durable=durable,
            stream=stream,
            filter_subject=filter_subject,
            telemetry=telemetry,
        )

    def node_queue(node_id: str) -> CommandConsumer:
        return queue_consumer(node_consumer(node_id), NODE_COMMANDS_STREAM, node_commands_of(node_id))

    consumer = queue_consumer()
    projector = Projector(js, store, registry, telemetry=telemetry, quarantine=quarantine)
    reconciler = NodeReconciler(
        store,
        registry,
        driver,
        clock,
        node_id=runtime.node_id,
        claim_timeout=timedelta(seconds=runtime.claim_timeout_seconds),
        confirmations=runtime.reconcile_confirmations,
        stop_timeout_seconds=settings.sandbox.stop_timeout_seconds,
        telemetry=telemetry,
        active=active,
    )
    if deaths is not None and runtime.reconcile_enabled:
        deaths.reconcile_after_reconnect(reconciler.run_once)
    nodes = NodeWatch(
        directory,
        capacity=capacity,
        nodes=NodeLog(js, quarantine),
        store=store,
        registry=registry,
        clock=clock,
        fence=reconciler.fence,
        consume_queue=lambda node, stop: node_queue(node).run(stop),
        queue_pending=lambda node: queue_pending(js, node),
        telemetry=telemetry,
    )
    return _Runtime(
        quarantine,
        registry,
        handlers,
        consumer,
        projector,
        reconciler,
        active,
        deaths,
        nodes,
        node_queue(runtime.node_id),
        pool,
    )


async def _replay(js: JetStreamContext, runtime: _Runtime, telemetry: Telemetry) -> None:
    report = await replay(js, runtime.registry, runtime.projector, quarantine=runtime.quarantine)
    for kind in ("missing", "stale", "extra", "corrupt"):
        telemetry.metrics.set("sandbox.replay.drift", len(getattr(report, kind)), {"kind": kind})


StatusWriter = Callable[[bytes], Awaitable[None]]


def _status_writer(settings: Settings, js: JetStreamContext, bucket: KeyValue, telemetry: Telemetry) -> StatusWriter:
    async def put_status(data: bytes) -> None:
        await bucket.put(f"runtime.{settings.runtime.node_id}.{os.getpid()}", data)
        await observe_consumer_lag(js, telemetry, settings.runtime.node_id)

    return put_status


async def _leave_node(nodes: NodeWatch, connected: Callable[[], bool]) -> None:
    """Mark the node draining on the way out, unless NATS is gone (its beat then ages)."""
    if connected():
        await nodes.leave()
    else:
        log.warning("node beat not marked draining: NATS is not connected")


def _start_tasks(
    stack: contextlib.AsyncExitStack,
    settings: Settings,
    runtime: _Runtime,
    put_status: StatusWriter,
    clock: Clock,
    *,
    choice: RuntimeChoice,
) -> list[asyncio.Task[None]]:
    """The runtime's loops, stopped (and awaited) when the stack unwinds."""
    started_at = clock.now()

    def status() -> RuntimeStatus:
        last = runtime.reconciler.last_report
        return RuntimeStatus(
            node_id=settings.runtime.node_id,
            pid=os.getpid(),
            started_at=started_at,
            last_seen=clock.now(),
            in_flight=runtime.consumer.in_flight,
            active_sandboxes=runtime.active.value,
            last_reconcile=None if last is None else f"{last.containers} containers, {len(last.actions)} actions",
            warm_ready=0 if runtime.pool is None else runtime.pool.ready,
            oci_runtime=choice.name,
            oci_runtime_why=choice.why,
            warm_pool_off=choice.warm_pool_blocker,
        )

    stopping = asyncio.Event()
    loops: dict[str, Coroutine[Any, Any, None]] = {
        "commands": runtime.consumer.run(stopping),
        "node commands": runtime.node_queue.run(stopping),
        "nodes": runtime.nodes.run(stopping, settings.runtime.instance_dead_after_seconds / BEATS_PER_DEADLINE),
        "projector": runtime.projector.run(stopping),
        "status": publish_periodically(put_status, status, settings.telemetry.status_interval_seconds, stopping),
    }
    if settings.runtime.reconcile_enabled:
        loops["reconciliation"] = runtime.reconciler.run(stopping, settings.runtime.reconcile_interval_seconds)
    if runtime.deaths is not None:
        loops["deaths"] = runtime.deaths.run(stopping)
    if runtime.pool is not None:  # with size 0 it only removes warm containers left behind
        loops["warm pool"] = runtime.pool.run(stopping)
    tasks = [asyncio.create_task(loop, name=name) for name, loop in loops.items()]

    async def stop() -> None:
        stopping.set()
        await asyncio.gather(*tasks, return_exceptions=True)

    stack.push_async_callback(stop)
    return tasks


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
        return {
            c.session_id for c in await driver.list_managed(node) if is_live_state(c.state) and not c.unclaimed_warm
        }

    return NodeCapacity(limit, live_sessions)


async def queue_pending(js: JetStreamContext, node_id: str) -> int:
    """Commands in a node's queue not yet acknowledged (0 when it has no queue)."""
    try:
        info = await js.consumer_info(NODE_COMMANDS_STREAM, node_consumer(node_id))
    except NotFoundError:
        return 0
    return (info.num_pending or 0) + (info.num_ack_pending or 0)


async def observe_consumer_lag(js: JetStreamContext, telemetry: Telemetry, node_id: str) -> None:
    """Consumer lag as gauges: messages not yet delivered and delivered but unacknowledged
    (the shared queue, the projector's, and this node's queue)."""
    for stream, consumer in (
        (COMMANDS_STREAM, str(ConsumerName.RUNTIME)),
        (EVENTS_STREAM, str(ConsumerName.PROJECTOR)),
        (NODE_COMMANDS_STREAM, node_consumer(node_id)),
    ):
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
