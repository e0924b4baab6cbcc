"""`just bench`: sandboxd measured against its floors on this machine, in one run.

Every figure is printed beside its floor (the same work done without sandboxd, where there
is one) and their ratio, and the whole run is written as JSON. The processes under test run
as separate OS processes (API, runtime, reaper) against a real nats-server 2.14 and the real
Docker engine; the control-plane throughput and memory sections use the bench-only
BenchNullDriver so that only NATS, event sourcing and our code are measured; the cluster
section (tests/bench/cluster.py) repeats the control plane with 1, 2 and 4 runtimes on a
3-node cluster and measures failover. No figure is asserted: this reports, the test suite
judges behaviour.

Sizes can be lowered for a quick look: BENCH_COLD=30 BENCH_REPLAY_CHATS=100000
BENCH_REPLAY_EVENTS_PER_CHAT=10 BENCH_EXPIRY=200 BENCH_MEMORY_SESSIONS=10000 BENCH_CP=2000
BENCH_LAG_SESSIONS=10000 BENCH_FAILOVER_ROUNDS=5. The control-plane section (throughput and
projector lag, tests/bench/control_plane.py) also runs alone without Docker.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import platform
import statistics
import tempfile
import time
import uuid
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import docker
import httpx
import msgspec
import nats
from docker.types import Mount
from nats.aio.client import Client
from nats.aio.msg import Msg
from nats.js.api import DeliverPolicy, StreamConfig
from nats.js.errors import NoKeysError, NotFoundError

from services.runtime.image import ensure_sandbox_image
from services.runtime.projector import Projector
from services.runtime.replay import replay
from shared.config import SandboxSettings, StreamSettings
from shared.contracts import OUTCOME_TYPES, SandboxRunning, SandboxStopped, SessionRecord, SessionStatus, encode
from shared.event_store import EventStore
from shared.nodes import NODE_KEY_PREFIX
from shared.registry import Registry
from shared.subjects import INSTANCES_BUCKET, command_subject
from shared.topology import ensure_topology
from tests.support.nats_server import free_port, nats_server
from tests.support.processes import make_sandbox_dirs, sandboxd_env, spawn, stop, until_ready

IMAGE = "sandboxd-sandbox:latest"
TOKEN = "bench-" + uuid.uuid4().hex
OUTCOMES = {t.__struct_config__.tag for t in OUTCOME_TYPES}


def _int(name: str, default: int) -> int:
    return int(os.environ.get(name, default))


def pct(values: list[float], p: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(p * (len(ordered) - 1)))]


def dist(values: list[float]) -> dict[str, float]:
    return {
        "n": len(values),
        "p50": statistics.median(values),
        "p95": pct(values, 0.95),
        "p99": pct(values, 0.99),
        "max": max(values),
    }


@dataclass
class Report:
    figures: dict[str, Any] = field(default_factory=dict)
    rows: list[tuple[str, str, str, str, str]] = field(default_factory=list)

    def row(self, what: str, ours: str, floor: str = "", ratio: str = "", target: str = "") -> None:
        self.rows.append((what, ours, floor, ratio, target))
        print(f"  {what:<52} {ours:>22} {floor:>22} {ratio:>8}  {target}", flush=True)


# --------------------------------------------------------------------------- helpers


def new_report() -> Report:
    """A report that knows the machine, its table's header printed."""
    report = Report()
    report.figures["machine"] = {
        "cpus": os.cpu_count(),
        "python": platform.python_version(),
        "at": datetime.now(UTC).isoformat(),
    }
    print(f"  {'figure':<52} {'sandboxd':>22} {'floor':>22} {'ratio':>8}  target", flush=True)
    return report


class Outcomes:
    """Outcome events by causation id, from an ordered stream consumer (stored events only)."""

    def __init__(self) -> None:
        self.by_command: dict[str, tuple[dict[str, Any], float]] = {}
        self.events: list[tuple[dict[str, Any], float]] = []
        self.count = 0

    async def on_msg(self, msg: Msg) -> None:
        now = time.perf_counter()
        event = json.loads(msg.data)
        self.events.append((event, now))
        if event["type"] in OUTCOMES and event.get("causation_id"):
            self.by_command[event["causation_id"]] = (event, now)
            self.count += 1

    async def wait(self, command_id: str, timeout: float = 60.0) -> tuple[dict[str, Any], float]:
        deadline = time.monotonic() + timeout
        while command_id not in self.by_command:
            if time.monotonic() > deadline:
                raise TimeoutError(f"no outcome for {command_id}")
            await asyncio.sleep(0.0005)
        return self.by_command[command_id]

    async def wait_count(self, count: int, timeout: float = 300.0) -> None:
        deadline = time.monotonic() + timeout
        while self.count < count:
            if time.monotonic() > deadline:
                raise TimeoutError(f"{self.count} of {count} outcomes")
            await asyncio.sleep(0.005)


async def subscribe_outcomes(nc: Client) -> Outcomes:
    outcomes = Outcomes()
    await nc.jetstream().subscribe(
        "sandbox.events.>",
        cb=outcomes.on_msg,
        ordered_consumer=True,
        deliver_policy=DeliverPolicy.NEW,
        pending_msgs_limit=-1,
        pending_bytes_limit=-1,
    )
    return outcomes


def rss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return float("nan")


async def timed(call: Callable[[], Awaitable[Any]]) -> tuple[float, Any]:
    started = time.perf_counter()
    result = await call()
    return (time.perf_counter() - started) * 1000.0, result


# --------------------------------------------------------------------------- sections


def bare_run(client: docker.DockerClient, root: Path, runtime: str | None = None) -> Any:
    """A session's container made the plain way with docker-py (the floor of a create): the
    same image, options, user and mounts, under `runtime` (None: the engine's default)."""
    chat = root / "chats" / f"bare-{uuid.uuid4()}"
    chat.mkdir(parents=True)
    return client.containers.run(
        IMAGE,
        ["sleep", "infinity"],
        detach=True,
        name=f"bench-bare-{uuid.uuid4()}",
        labels={"sandboxd.bench": "bare"},
        runtime=runtime,
        network_mode="none",
        cap_drop=["ALL"],
        security_opt=["no-new-privileges:true"],
        init=True,
        read_only=True,
        tmpfs={"/tmp": "rw,noexec,nosuid,size=64m"},
        pids_limit=SandboxSettings().pids_limit,
        mem_limit="512m",
        nano_cpus=10**9,
        user="10001:10001",
        working_dir="/workspace/chat",
        mounts=[
            Mount("/workspace/chat", str(chat), type="bind"),
            Mount("/opt/dependencies", str(root / "deps"), type="bind", read_only=True),
            Mount("/opt/lambda-tools", str(root / "tools"), type="bind", read_only=True),
        ],
    )


async def cold_create(report: Report, http: httpx.AsyncClient, client: docker.DockerClient, root: Path, n: int) -> None:
    bare: list[float] = []
    ours: list[float] = []
    for _ in range(n):
        ms, container = await timed(lambda: asyncio.to_thread(bare_run, client, root))
        bare.append(ms)
        await asyncio.to_thread(container.remove, force=True)
        body = {"chat_id": str(uuid.uuid4())}

        async def create(body: dict[str, str] = body) -> httpx.Response:
            return await http.post("/api/v1/sandboxes", json=body)

        ms, response = await timed(create)
        if response.status_code != 201:
            raise RuntimeError(f"create failed: {response.text}")
        ours.append(ms)
        await http.delete(f"/api/v1/sandboxes/{body['chat_id']}")
    b, o = dist(bare), dist(ours)
    report.figures["cold_create"] = {
        "bare_docker_py_ms": b,
        "http_create_ms": o,
        "ratio_of_medians": o["p50"] / b["p50"],
    }
    report.row(
        "cold create p50 (HTTP vs docker-py run)",
        f"{o['p50']:.1f} ms",
        f"{b['p50']:.1f} ms",
        f"{o['p50'] / b['p50']:.3f}",
        "<= 1.10",
    )
    report.row("cold create p95", f"{o['p95']:.1f} ms", f"{b['p95']:.1f} ms", f"{o['p95'] / b['p95']:.3f}")
    report.row("cold create p99", f"{o['p99']:.1f} ms", f"{b['p99']:.1f} ms", f"{o['p99'] / b['p99']:.3f}")


async def reuse(report: Report, base: str) -> None:
    chat = str(uuid.uuid4())
    headers = {"X-API-Token": TOKEN}
    limits = httpx.Limits(max_connections=64, max_keepalive_connections=64)
    async with httpx.AsyncClient(base_url=base, headers=headers, timeout=30, limits=limits) as http:
        await http.post("/api/v1/sandboxes", json={"chat_id": chat})
        results: dict[str, Any] = {}
        for concurrency, per_worker in ((1, 600), (32, 60)):
            latencies: list[float] = []

            async def worker(per_worker: int = per_worker, latencies: list[float] = latencies) -> None:
                for _ in range(per_worker):
                    ms, response = await timed(lambda: http.post("/api/v1/sandboxes", json={"chat_id": chat}))
                    if response.status_code != 200:
                        raise RuntimeError(response.text)
                    latencies.append(ms)

            started = time.perf_counter()
            await asyncio.gather(*(worker() for _ in range(concurrency)))
            rps = len(latencies) / (time.perf_counter() - started)
            d = dist(latencies)
            results[f"c{concurrency}"] = {**d, "requests_per_s": rps}
            report.row(
                f"reuse over HTTP, concurrency {concurrency}: p50 / p99",
                f"{d['p50']:.2f} / {d['p99']:.2f} ms",
                "",
                "",
                "p50 <= 3, p99 <= 15 ms",
            )
            report.row(
                f"reuse over HTTP, concurrency {concurrency}: requests/s",
                f"{rps:,.0f}",
                "",
                "",
                ">= 2,000 at c32" if concurrency > 1 else "",
            )
        # The floor: the same client against the API's cheapest endpoint (no NATS at all).
        floor: list[float] = []
        for _ in range(300):
            ms, _ = await timed(lambda: http.get("/api/v1/health"))
            floor.append(ms)
        results["health_floor_ms"] = dist(floor)
        report.row(
            "  floor: GET /health, same client (p50)",
            "",
            f"{statistics.median(floor):.2f} ms",
            f"{results['c1']['p50'] / statistics.median(floor):.2f}",
        )
        report.figures["reuse_http"] = results


async def over_nats(report: Report, nc: Client, outcomes: Outcomes, n: int) -> None:
    js = nc.jetstream()
    create_ms: list[float] = []
    stop_ms: list[float] = []
    for _ in range(n):
        chat = str(uuid.uuid4())
        for kind, sink in (("create", create_ms), ("stop", stop_ms)):
            command_id = str(uuid.uuid4())
            started = time.perf_counter()
            body = json.dumps({"command_id": command_id, "chat_id": chat}).encode()
            await js.publish(command_subject(kind, chat), body, headers={"Nats-Msg-Id": command_id})
            _, at = await outcomes.wait(command_id)
            sink.append((at - started) * 1000.0)
    c, s = dist(create_ms), dist(stop_ms)
    report.figures["over_nats"] = {"create_ms": c, "stop_ms": s}
    cold = report.figures["cold_create"]["bare_docker_py_ms"]["p50"]
    report.row(
        "NATS publish -> outcome, create p50 / p95",
        f"{c['p50']:.1f} / {c['p95']:.1f} ms",
        f"{cold:.1f} ms",
        f"{c['p50'] / cold:.3f}",
    )
    report.row("NATS publish -> outcome, stop p50 / p95", f"{s['p50']:.1f} / {s['p95']:.1f} ms")


async def expiry(report: Report, nc: Client, outcomes: Outcomes, n: int) -> None:
    js = nc.jetstream()
    expires: dict[str, datetime] = {}
    batch = 8
    for start in range(0, n, batch):
        ids = []
        for _ in range(min(batch, n - start)):
            chat, command_id = str(uuid.uuid4()), str(uuid.uuid4())
            body = json.dumps({"command_id": command_id, "chat_id": chat, "ttl_seconds": 5}).encode()
            await js.publish(command_subject("create", chat), body, headers={"Nats-Msg-Id": command_id})
            ids.append(command_id)
        for command_id in ids:
            event, _ = await outcomes.wait(command_id)
            session = event["session"]
            expires[session["session_id"]] = datetime.fromisoformat(session["expires_at"])
    deadline = time.monotonic() + 120
    claims: dict[str, float] = {}
    stops: dict[str, float] = {}
    while time.monotonic() < deadline and len(stops) < n:
        for event, _ in outcomes.events:
            sid = event.get("session_id")
            if sid in expires and event.get("reason") == "expired":
                lateness = (datetime.fromisoformat(event["occurred_at"]) - expires[sid]).total_seconds() * 1000.0
                (claims if event["type"] == "stopping" else stops if event["type"] == "stopped" else {})[sid] = lateness
        await asyncio.sleep(0.2)
    c, s = dist(list(claims.values())), dist(list(stops.values()))
    report.figures["expiry_lateness"] = {"stopping_claim_ms": c, "stopped_ms": s, "sessions": n}
    report.row(f"expiry lateness, {n} sessions: stop claimed p50 / p99", f"{c['p50']:.1f} / {c['p99']:.1f} ms")
    report.row(
        "expiry lateness: container gone (stopped) p50 / p99",
        f"{s['p50']:.1f} / {s['p99']:.1f} ms",
        "",
        "",
        "p99 <= 1000 ms",
    )
    report.row("expiry lateness: worst", f"{s['max']:.1f} ms")


def cpu_seconds(pid: int) -> float:
    """User and system CPU seconds process `pid` has used so far (Linux /proc)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


@dataclass(frozen=True)
class Throughput:
    """Creates+stops per second, and the CPU each command cost the runtimes (all of them)
    and the nats-server (None when not measured, e.g. a cluster)."""

    per_s: float
    runtime_cpu_ms: float
    server_cpu_ms: float | None


async def control_plane(
    report: Report,
    nats_url: str,
    root: Path,
    runtimes: int,
    count: int,
    server_pid: int | None = None,
) -> Throughput:
    env = sandboxd_env(
        nats_url,
        root,
        f"bench-null-{runtimes}",
        TOKEN,
        SANDBOXD_TELEMETRY_RUNTIME_METRICS_PORT="0",
        SANDBOXD_RUNTIME_MAX_IN_FLIGHT="256",
        SANDBOXD_TELEMETRY_LOG_LEVEL="WARNING",
    )
    procs = [
        spawn("tests.bench.runtime_main", env, root / f"bench-runtime-{runtimes}-{i}.log") for i in range(runtimes)
    ]
    nc = await nats.connect(servers=nats_url.split(","))
    try:
        js = nc.jetstream()
        outcomes = await subscribe_outcomes(nc)
        await runtimes_alive(nc, f"bench-null-{runtimes}", runtimes)
        await asyncio.sleep(0.5)  # their consumers attach right after the first heartbeat
        chats = [str(uuid.uuid4()) for _ in range(count)]
        runtime_cpu = sum(cpu_seconds(p.pid) for p in procs)
        server_cpu = cpu_seconds(server_pid) if server_pid is not None else 0.0
        started = time.perf_counter()
        for kind in ("create", "stop"):
            for i, chat in enumerate(chats):
                command_id = str(uuid.uuid4())
                body = json.dumps({"command_id": command_id, "chat_id": chat}).encode()
                _ = await js.publish_async(command_subject(kind, chat), body, headers={"Nats-Msg-Id": command_id})
                if i % 500 == 0:
                    await js.publish_async_completed()
            await js.publish_async_completed()
            await outcomes.wait_count(count if kind == "create" else 2 * count)
        elapsed = time.perf_counter() - started
        runtime_cpu = sum(cpu_seconds(p.pid) for p in procs) - runtime_cpu
        server_cpu = cpu_seconds(server_pid) - server_cpu if server_pid is not None else 0.0
    finally:
        await nc.close()
        stop(*procs)
    commands = 2 * count
    return Throughput(
        per_s=commands / elapsed,
        runtime_cpu_ms=runtime_cpu * 1000 / commands,
        server_cpu_ms=server_cpu * 1000 / commands if server_pid is not None else None,
    )


async def runtimes_alive(nc: Client, node_id: str, count: int, timeout: float = 120.0) -> None:
    """Until `count` runtimes of `node_id` heartbeat in `sandbox_instances` (start-up done)."""
    js = nc.jetstream()
    deadline = time.monotonic() + timeout
    while True:
        alive = 0
        with contextlib.suppress(NoKeysError, NotFoundError):  # none yet, or one gone meanwhile
            kv = await js.key_value(INSTANCES_BUCKET)
            for key in await kv.keys():
                if key.startswith(NODE_KEY_PREFIX):  # a node's beat, not an instance
                    continue
                entry = await kv.get(key)
                if entry.value and json.loads(entry.value).get("node_id") == node_id:
                    alive += 1
        if alive >= count:
            return
        if time.monotonic() > deadline:
            raise TimeoutError(f"{alive} of {count} runtimes of {node_id} alive")
        await asyncio.sleep(0.1)


@dataclass(frozen=True)
class RawPublish:
    """JetStream publish+ack rates, and the CPU each message cost this (the publishing)
    process and the nats-server (None when not measured)."""

    async_per_s: float
    sequential_per_s: float
    client_cpu_ms: float
    server_cpu_ms: float | None


async def raw_publish(nats_url: str, count: int, replicas: int = 1, server_pid: int | None = None) -> RawPublish:
    """JetStream publish+ack rates (publish_async in windows of 500, then sequential) into a
    stream of `replicas` replicas: the floor of the control plane on that server or cluster.
    The CPU figures are those of the publish_async part."""
    nc = await nats.connect(servers=nats_url.split(","))
    js = nc.jetstream()
    await js.add_stream(StreamConfig(name="BENCH_RAW", subjects=["bench.raw.>"], num_replicas=replicas))
    payload = b"x" * 600
    client_cpu = time.process_time()
    server_cpu = cpu_seconds(server_pid) if server_pid is not None else 0.0
    started = time.perf_counter()
    for i in range(count):
        _ = await js.publish_async(f"bench.raw.{i % 1000}", payload)
        if i % 500 == 0:
            await js.publish_async_completed()
    await js.publish_async_completed()
    async_rate = count / (time.perf_counter() - started)
    client_cpu = time.process_time() - client_cpu
    server_cpu = cpu_seconds(server_pid) - server_cpu if server_pid is not None else 0.0
    started = time.perf_counter()
    for i in range(2000):
        await js.publish(f"bench.raw.{i % 1000}", payload)
    sequential_rate = 2000 / (time.perf_counter() - started)
    await js.delete_stream("BENCH_RAW")
    await nc.close()
    return RawPublish(
        async_per_s=async_rate,
        sequential_per_s=sequential_rate,
        client_cpu_ms=client_cpu * 1000 / count,
        server_cpu_ms=server_cpu * 1000 / count if server_pid is not None else None,
    )


async def memory(report: Report, nats_url: str, root: Path, sessions: int) -> None:
    env = sandboxd_env(
        nats_url,
        root,
        "bench-mem",
        TOKEN,
        SANDBOXD_TELEMETRY_RUNTIME_METRICS_PORT="0",
        SANDBOXD_TELEMETRY_REAPER_METRICS_PORT="0",
        SANDBOXD_TELEMETRY_LOG_LEVEL="WARNING",
        SANDBOXD_RUNTIME_MAX_IN_FLIGHT="256",
        SANDBOXD_HTTP_PORT=str(free_port()),
    )
    base = f"http://127.0.0.1:{env['SANDBOXD_HTTP_PORT']}"
    procs = {
        "runtime": spawn("tests.bench.runtime_main", env, root / "mem-runtime.log"),
        "reaper": spawn("services.reaper", env, root / "mem-reaper.log"),
        "api": spawn("services.api", env, root / "mem-api.log"),
    }
    nc = await nats.connect(nats_url)
    try:
        await until_ready(base)
        idle = {name: rss_mb(p.pid) for name, p in procs.items()}
        js = nc.jetstream()
        outcomes = await subscribe_outcomes(nc)
        await asyncio.sleep(1.0)
        for i in range(sessions):
            chat, command_id = str(uuid.uuid4()), str(uuid.uuid4())
            body = json.dumps({"command_id": command_id, "chat_id": chat, "ttl_seconds": 3600}).encode()
            _ = await js.publish_async(command_subject("create", chat), body, headers={"Nats-Msg-Id": command_id})
            if i % 500 == 0:
                await js.publish_async_completed()
        await js.publish_async_completed()
        await outcomes.wait_count(sessions)
        async with httpx.AsyncClient(base_url=base, headers={"X-API-Token": TOKEN}, timeout=120) as http:
            listed = (await http.get("/api/v1/sandboxes")).json()["count"]
        await asyncio.sleep(3.0)  # the reaper's watch has every record
        loaded = {name: rss_mb(p.pid) for name, p in procs.items()}
    finally:
        await nc.close()
        for proc in procs.values():
            stop(proc)
    report.figures["memory_mb"] = {"idle": idle, "with_sessions": loaded, "sessions": sessions, "listed": listed}
    for name in ("runtime", "reaper", "api"):
        target = "<= 100 MB" if name == "runtime" else ""
        report.row(
            f"RSS {name}, {sessions:,} live sessions (idle)",
            f"{loaded[name]:.0f} MB",
            f"({idle[name]:.0f} MB)",
            "",
            target,
        )


async def replay_bench(report: Report, chats: int, per_chat: int) -> None:
    with tempfile.TemporaryDirectory() as tmp, nats_server(Path(tmp)) as server:
        nc = await nats.connect(server.url)
        js = nc.jetstream(timeout=60)
        kv = await ensure_topology(js, StreamSettings())
        now = datetime.now(UTC)
        written = 0
        started = time.perf_counter()
        for c in range(chats):
            chat = str(uuid.uuid4())
            for e in range(per_chat):
                live = e == per_chat - 1 and c % 2 == 0
                record = SessionRecord(
                    session_id=str(uuid.uuid4()),
                    chat_id=chat,
                    node_id="n",
                    container_id="c",
                    image=IMAGE,
                    status=SessionStatus.RUNNING if live else SessionStatus.STOPPED,
                    created_at=now,
                    expires_at=now + timedelta(hours=1),
                    updated_at=now,
                )
                cls = SandboxRunning if live else SandboxStopped
                event = cls(
                    event_id=str(uuid.uuid4()),
                    chat_id=chat,
                    session_id=record.session_id,
                    causation_id=None,
                    occurred_at=now,
                    node_id="n",
                    session=record,
                )
                _ = await js.publish_async(f"sandbox.events.{chat}", encode(event))
                written += 1
                if written % 5000 == 0:
                    await js.publish_async_completed()
        await js.publish_async_completed()
        write_seconds = time.perf_counter() - started
        registry = Registry(js, kv)
        projector = Projector(js, EventStore(js), registry)
        cold = await replay(js, registry, projector)
        warm = await replay(js, registry, projector)
        await nc.close()
    report.figures["replay"] = {
        "chats": chats,
        "events": written,
        "write_seconds": write_seconds,
        "rebuild_seconds": cold.seconds,
        "repaired": cold.repaired,
        "noop_seconds": warm.seconds,
    }
    report.row(
        f"replay {chats:,} chats / {written:,} events into an empty bucket", f"{cold.seconds:.2f} s", "", "", "<= 10 s"
    )
    report.row("replay again, nothing to repair", f"{warm.seconds:.2f} s")
    report.row("  floor: writing those events (publish_async)", "", f"{write_seconds:.2f} s")


# --------------------------------------------------------------------------- the run


async def main() -> None:
    report = new_report()
    client = docker.from_env()
    ensure_sandbox_image(client, IMAGE)
    with tempfile.TemporaryDirectory(prefix="sandboxd-bench-") as tmp, nats_server(Path(tmp) / "nats") as server:
        root = Path(tmp)
        make_sandbox_dirs(root)
        port = free_port()
        env = sandboxd_env(
            server.url,
            root,
            "bench-docker",
            TOKEN,
            SANDBOXD_HTTP_PORT=str(port),
            SANDBOXD_TELEMETRY_RUNTIME_METRICS_PORT="0",
            SANDBOXD_TELEMETRY_REAPER_METRICS_PORT="0",
            SANDBOXD_TELEMETRY_LOG_LEVEL="WARNING",
            SANDBOXD_REAPER_TICK_SECONDS="1",
            # The expiry section keeps BENCH_EXPIRY tiny busybox sandboxes alive at once, more
            # than the default capacity (engine memory / memory_limit) admits.
            SANDBOXD_RUNTIME_MAX_SESSIONS="1000",
        )
        procs = [spawn(m, env, root / f"{m}.log") for m in ("services.runtime", "services.reaper", "services.api")]
        base = f"http://127.0.0.1:{port}"
        nc = await nats.connect(server.url)
        try:
            await until_ready(base)
            outcomes = await subscribe_outcomes(nc)
            async with httpx.AsyncClient(base_url=base, headers={"X-API-Token": TOKEN}, timeout=60) as http:
                await http.post("/api/v1/sandboxes", json={"chat_id": str(uuid.uuid4()), "ttl_seconds": 600})  # warm-up
                await cold_create(report, http, client, root, _int("BENCH_COLD", 30))
            await reuse(report, base)
            from tests.bench.reuse_http import reuse_section  # noqa: PLC0415 - it imports this module

            async with httpx.AsyncClient(base_url=base, headers={"X-API-Token": TOKEN}, timeout=60) as http:
                chats = [str(uuid.uuid4()) for _ in range(32)]
                for chat in chats:
                    await http.post("/api/v1/sandboxes", json={"chat_id": chat, "ttl_seconds": 3600})
            await reuse_section(report, base, root, TOKEN, chats, server.url)
            await over_nats(report, nc, outcomes, _int("BENCH_NATS", 30))
            await expiry(report, nc, outcomes, _int("BENCH_EXPIRY", 200))
        finally:
            await nc.close()
            for proc in procs:
                stop(proc)
            for container in client.containers.list(all=True, filters={"label": "sandboxd.node_id=bench-docker"}):
                container.remove(force=True)
        from tests.bench.control_plane import control_plane_section  # noqa: PLC0415 - it imports this module

        await control_plane_section(report, server.url, root, server.process.pid if server.process else None)
        from tests.bench.cluster import cluster_section  # noqa: PLC0415 - it imports this module

        await cluster_section(report, root / "cluster")
        from tests.bench.warm_pool import warm_pool_section  # noqa: PLC0415 - it imports this module

        await warm_pool_section(report, root / "warm")
        from tests.bench.gvisor import gvisor_section  # noqa: PLC0415 - it imports this module

        await gvisor_section(report, root / "gvisor")
        await memory(report, server.url, root, _int("BENCH_MEMORY_SESSIONS", 10000))
    await replay_bench(report, _int("BENCH_REPLAY_CHATS", 100000), _int("BENCH_REPLAY_EVENTS_PER_CHAT", 10))
    out = Path(os.environ.get("BENCH_OUT", "bench-results")) / f"bench-{datetime.now(UTC):%Y%m%dT%H%M%SZ}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(msgspec.to_builtins(report.figures), indent=2) + "\n")
    print(f"\nresults written to {out}")


if __name__ == "__main__":
    asyncio.run(main())
