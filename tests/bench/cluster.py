"""BENCH ONLY: sandboxd on a 3-node nats-server 2.14 cluster (streams and buckets with 3
replicas), as a section of `just bench` or alone: `uv run python -m tests.bench.cluster`.

- Control-plane throughput: creates+stops per second through 1, 2 and 4 runtime processes
  (the bench-only BenchNullDriver: no Docker), each beside the raw JetStream publish_async
  rate into an R3 stream on the same cluster, and as ratios to one runtime.
- Failover: creates over HTTP without pause (BENCH_FAILOVER_WORKERS clients, default 4, each
  a new chat every time; an API and a null-driver runtime as processes); the leader of
  SANDBOX_COMMANDS is killed -9; the figure is the time from the kill to the end of the first
  create sent after it that answered 201 (median of BENCH_FAILOVER_ROUNDS, default 5). Also:
  the answers that were not 201 meanwhile, the longest wait of a create in flight at the
  kill, and the time the restarted server took to be current again in both streams and the
  registry bucket.

Sizes: BENCH_CP (commands per kind, default 2000), BENCH_FAILOVER_ROUNDS. Nothing is
asserted: tests/integration/test_nats_cluster.py judges the behaviour.
"""

from __future__ import annotations

import asyncio
import json
import os
import statistics
import tempfile
import time
import uuid
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import httpx
import msgspec
from nats.js import JetStreamContext

from shared.config import StreamSettings
from shared.subjects import COMMANDS_STREAM, EVENTS_STREAM, SESSIONS_BUCKET
from shared.topology import STATUS, ensure_bucket, ensure_topology
from tests.bench.harness import TOKEN, Report, control_plane, dist, new_report, raw_publish
from tests.support.nats_cluster import NatsCluster, is_current, nats_cluster, stream_leader
from tests.support.processes import api_base, make_sandbox_dirs, sandboxd_env, spawn, stop, until_ready

REPLICATED = (COMMANDS_STREAM, EVENTS_STREAM, f"KV_{SESSIONS_BUCKET}")
RUNTIMES = (1, 2, 4)


def _int(name: str, default: int) -> int:
    return int(os.environ.get(name, default))


@dataclass(frozen=True, slots=True)
class Create:
    started: float  # monotonic
    ended: float
    status: int  # 0: no HTTP answer


class Creates:
    """HTTP creates without pause, a new chat each time, every answer recorded."""

    def __init__(self, base: str, workers: int) -> None:
        self.base = base
        self.calls: list[Create] = []
        self._stopping = asyncio.Event()
        self._tasks = [asyncio.create_task(self._worker()) for _ in range(workers)]

    async def stop(self) -> None:
        self._stopping.set()
        await asyncio.gather(*self._tasks)

    def created(self, *, sent_after: float = 0.0) -> list[Create]:
        return [c for c in self.calls if c.status == 201 and c.started >= sent_after]

    async def _worker(self) -> None:
        async with httpx.AsyncClient(base_url=self.base, headers={"X-API-Token": TOKEN}, timeout=120) as http:
            while not self._stopping.is_set():
                started = time.monotonic()
                try:
                    status = (await http.post("/api/v1/sandboxes", json={"chat_id": str(uuid.uuid4())})).status_code
                except httpx.HTTPError:
                    status = 0
                self.calls.append(Create(started, time.monotonic(), status))
                if status != 201:
                    await asyncio.sleep(0.02)


async def _wait(check: Any, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not await check():
        if time.monotonic() > deadline:
            raise TimeoutError(what)
        await asyncio.sleep(0.02)


async def one_failover(cluster: NatsCluster, js: JetStreamContext, base: str, workers: int) -> dict[str, float]:
    load = Creates(base, workers)
    try:

        async def warm() -> bool:
            return len(load.created()) >= 4 * workers

        await _wait(warm, 60, "creates before the kill")
        victim = await stream_leader(js, COMMANDS_STREAM)
        assert victim is not None
        cluster.kill(cluster.index(victim))
        killed = time.monotonic()

        async def created_again() -> bool:
            return bool(load.created(sent_after=killed))

        await _wait(created_again, 120, "a create after the kill")
    finally:
        await load.stop()
    first = min(c.ended for c in load.created(sent_after=killed)) - killed
    across = [c for c in load.calls if c.started < killed < c.ended]
    refused = [c for c in load.calls if c.ended > killed and c.status != 201]
    cluster.restart(cluster.index(victim))
    back = time.monotonic()
    for stream in REPLICATED:

        async def current(stream: str = stream) -> bool:
            try:
                return await is_current(js, stream, victim)
            except Exception:  # noqa: BLE001 - not answering yet is "not yet"
                return False

        await _wait(current, 120, f"{victim} current in {stream}")
    return {
        "first_create_s": first,
        "not_201_meanwhile": len(refused),
        "in_flight_at_kill": len(across),
        "in_flight_longest_s": max((c.ended - killed for c in across), default=0.0),
        "rejoined_s": time.monotonic() - back,
    }


async def failover(report: Report, cluster: NatsCluster, js: JetStreamContext, root: Path, rounds: int) -> None:
    workers = _int("BENCH_FAILOVER_WORKERS", 4)
    env = sandboxd_env(
        cluster.url,
        root,
        "bench-failover",
        TOKEN,
        SANDBOXD_STREAMS_REPLICAS="3",
        SANDBOXD_TELEMETRY_RUNTIME_METRICS_PORT="0",
        SANDBOXD_TELEMETRY_LOG_LEVEL="WARNING",
    )
    runtime = spawn("tests.bench.runtime_main", env, root / "failover-runtime.log")
    api = spawn("services.api", env, root / "failover-api.log")
    runs: list[dict[str, float]] = []
    try:
        await until_ready(api_base(api))
        for i in range(rounds):
            figures = await one_failover(cluster, js, api_base(api), workers)
            runs.append(figures)
            print(f"    failover {i + 1}: " + ", ".join(f"{k}={v:.2f}" for k, v in figures.items()), flush=True)
    finally:
        stop(api)
        stop(runtime)
    first = [r["first_create_s"] for r in runs]
    rejoined = [r["rejoined_s"] for r in runs]
    report.figures["cluster"]["failover"] = {
        "rounds": runs,
        "workers": workers,
        "first_create_s": dist(first),
        "rejoined_s": dist(rejoined),
    }
    report.row(
        f"failover: kill -9 -> next create 201, median of {rounds}",
        f"{statistics.median(first):.2f} s",
        "",
        "",
        f"(min {min(first):.2f}, max {max(first):.2f})",
    )
    report.row(
        "failover: answers other than 201 meanwhile (median)",
        f"{statistics.median(r['not_201_meanwhile'] for r in runs):.0f}",
    )
    report.row(
        "failover: longest create in flight at the kill (median)",
        f"{statistics.median(r['in_flight_longest_s'] for r in runs):.2f} s",
    )
    report.row("failover: restarted server current again (median)", f"{statistics.median(rejoined):.2f} s")


async def cluster_section(report: Report, root: Path) -> None:
    """The cluster's figures into `report` (its own 3-node cluster under `root`)."""
    count = _int("BENCH_CP", 2000)
    root.mkdir(parents=True, exist_ok=True)
    make_sandbox_dirs(root)
    with nats_cluster(root / "nats-cluster") as cluster:
        nc = await cluster.connect()
        try:
            js = nc.jetstream(timeout=5)
            await cluster.ready(js)
            streams = StreamSettings(replicas=3)
            await ensure_topology(js, streams)
            await ensure_bucket(js, STATUS, streams)
            rates = {n: (await control_plane(report, cluster.url, root, n, count)).per_s for n in RUNTIMES}
            raw = await raw_publish(cluster.url, 20000, replicas=3)
            raw_async, raw_sequential = raw.async_per_s, raw.sequential_per_s
            report.figures["cluster"] = {
                "servers": len(cluster.servers),
                "replicas": 3,
                "commands": 2 * count,
                "runtimes_per_s": {str(n): rate for n, rate in rates.items()},
                "scaling_vs_one": {str(n): rate / rates[1] for n, rate in rates.items()},
                "raw_publish_async_per_s": raw_async,
                "raw_publish_sequential_per_s": raw_sequential,
            }
            for n, rate in rates.items():
                report.row(
                    f"3-node cluster: creates+stops/s, {n} runtime{'s' if n > 1 else ''} (x{rate / rates[1]:.2f})",
                    f"{rate:,.0f}",
                    f"{raw_async:,.0f}",
                    f"{rate / raw_async:.3f}",
                )
            report.row("  floor: R3 publish+ack, sequential", "", f"{raw_sequential:,.0f}/s")
            await failover(report, cluster, js, root, _int("BENCH_FAILOVER_ROUNDS", 5))
        finally:
            await nc.close()


async def main() -> None:
    report = new_report()
    with tempfile.TemporaryDirectory(prefix="sandboxd-bench-cluster-") as tmp:
        await cluster_section(report, Path(tmp))
    out = Path(os.environ.get("BENCH_OUT", "bench-results")) / f"cluster-{datetime.now(UTC):%Y%m%dT%H%M%SZ}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(msgspec.to_builtins(report.figures), indent=2) + "\n")
    print(f"\nresults written to {out}")


if __name__ == "__main__":
    asyncio.run(main())
