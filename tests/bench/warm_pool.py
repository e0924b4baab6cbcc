"""The warm pool measured against the Docker floor, in one run (part of `just bench`; alone:
`uv run python -m tests.bench.warm_pool`).

- warm create: a create through HTTP (API, runtime and reaper as processes, a full pool)
  beside a bare docker-py `containers.run` of the same container, interleaved; after each
  pair the sessions are stopped and the pool is full again before the next, so neither
  measurement shares the engine with the pool's refill;
- burst: 100 creates at concurrency 32 through HTTP from a pool of at least 100, beside 100
  bare docker-py runs on 32 threads (the floor: Docker's own create rate here).

- pause and resume: `POST /sandboxes/{chat}/pause` and `/resume` beside a bare docker-py
  `pause()` / `unpause()` of a container of the same kind, interleaved.

No figure is asserted. Sizes: BENCH_WARM (pairs, 30), BENCH_BURST (100), BENCH_BURST_CONCURRENCY (32),
BENCH_PAUSE (pairs, 30).
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import tempfile
import time
import uuid
from pathlib import Path

import docker
import httpx

from services.runtime.image import ensure_sandbox_image
from tests.bench.harness import IMAGE, TOKEN, Report, _int, bare_run, dist, new_report, timed
from tests.support.nats_server import nats_server
from tests.support.processes import Child, make_sandbox_dirs, metric_total, sandboxd_env, spawn, stop, until_ready

NODE = "bench-warm"


async def pool_full(runtime: Child, size: int, timeout: float = 300.0) -> float:
    """Seconds until the runtime reports `size` warm containers ready."""
    started = time.monotonic()
    while time.monotonic() - started < timeout:
        if await metric_total(runtime, "sandbox_pool_ready") >= size:
            return time.monotonic() - started
        await asyncio.sleep(0.2)
    raise TimeoutError(f"the warm pool did not reach {size} within {timeout:g}s")


async def create(http: httpx.AsyncClient, chat: str) -> httpx.Response:
    answer = await http.post("/api/v1/sandboxes", json={"chat_id": chat})
    if answer.status_code != 201:
        raise RuntimeError(f"create failed: {answer.status_code} {answer.text}")
    return answer


def remove_bare(client: docker.DockerClient) -> None:
    for c in client.containers.list(all=True, filters={"label": "sandboxd.bench=bare"}):
        c.remove(force=True)


async def warm_creates(
    report: Report, http: httpx.AsyncClient, client: docker.DockerClient, runtime: Child, root: Path, size: int, n: int
) -> None:
    bare: list[float] = []
    ours: list[float] = []
    warm = 0
    for _ in range(n):
        await pool_full(runtime, size)
        ms, container = await timed(lambda: asyncio.to_thread(bare_run, client, root))
        bare.append(ms)
        await asyncio.to_thread(container.remove, force=True)
        chat = str(uuid.uuid4())
        ms, answer = await timed(lambda chat=chat: create(http, chat))  # type: ignore[misc]
        ours.append(ms)
        inspected = await asyncio.to_thread(client.api.inspect_container, answer.json()["container_id"])
        warm += inspected["Config"]["Labels"].get("sandboxd.pool") == "true"
        await http.delete(f"/api/v1/sandboxes/{chat}")
    b, o = dist(bare), dist(ours)
    report.figures["warm_create"] = {
        "bare_docker_py_ms": b,
        "http_create_ms": o,
        "ratio_of_medians": o["p50"] / b["p50"],
        "served_warm": warm,
        "pairs": n,
    }
    report.row(
        f"warm create p50 (HTTP, pool {size}, vs docker-py run; {warm}/{n} warm)",
        f"{o['p50']:.1f} ms",
        f"{b['p50']:.1f} ms",
        f"{o['p50'] / b['p50']:.3f}",
        "<= 0.15",
    )
    report.row("warm create p95", f"{o['p95']:.1f} ms", f"{b['p95']:.1f} ms", f"{o['p95'] / b['p95']:.3f}")


async def burst(
    report: Report,
    http: httpx.AsyncClient,
    client: docker.DockerClient,
    runtime: Child,
    root: Path,
    size: int,
    count: int,
    concurrency: int,
) -> None:
    # The floor: Docker's own rate at this concurrency.
    started = time.perf_counter()
    with concurrent.futures.ThreadPoolExecutor(concurrency) as threads:
        list(threads.map(lambda _: bare_run(client, root), range(count)))
    floor_seconds = time.perf_counter() - started
    await asyncio.to_thread(remove_bare, client)

    await pool_full(runtime, size)
    chats = [str(uuid.uuid4()) for _ in range(count)]
    gate = asyncio.Semaphore(concurrency)
    latencies: list[float] = []

    async def one(chat: str) -> httpx.Response:
        async with gate:
            ms, answer = await timed(lambda: create(http, chat))
            latencies.append(ms)
            return answer  # type: ignore[no-any-return]

    started = time.perf_counter()
    answers = await asyncio.gather(*(one(c) for c in chats))
    ours_seconds = time.perf_counter() - started
    warm = 0
    for answer in answers:
        inspected = await asyncio.to_thread(client.api.inspect_container, answer.json()["container_id"])
        warm += inspected["Config"]["Labels"].get("sandboxd.pool") == "true"
    floor_rate, ours_rate = count / floor_seconds, count / ours_seconds
    lat = dist(latencies)
    report.figures["warm_burst"] = {
        "creates": count,
        "concurrency": concurrency,
        "pool_size": size,
        "served_warm": warm,
        "bare_docker_py_per_s": floor_rate,
        "http_per_s": ours_rate,
        "ratio": ours_rate / floor_rate,
        "http_create_ms": lat,
    }
    report.row(
        f"{count} creates at concurrency {concurrency}, pool {size} ({warm} warm), creates/s",
        f"{ours_rate:,.1f}",
        f"{floor_rate:,.1f}",
        f"{ours_rate / floor_rate:.2f}",
        ">= 5",
    )
    report.row("  its create latency p50 / p95 (ms)", f"{lat['p50']:.1f} / {lat['p95']:.1f}")
    await asyncio.gather(*(http.delete(f"/api/v1/sandboxes/{c}") for c in chats))


async def pause_resume(
    report: Report, http: httpx.AsyncClient, client: docker.DockerClient, root: Path, n: int
) -> None:
    bare_container = await asyncio.to_thread(bare_run, client, root)
    chat = str(uuid.uuid4())
    await create(http, chat)
    timings: dict[str, list[float]] = {"bare_pause": [], "bare_unpause": [], "pause": [], "resume": []}

    async def call(path: str) -> httpx.Response:
        answer = await http.post(f"/api/v1/sandboxes/{chat}/{path}")
        if answer.status_code != 200:
            raise RuntimeError(f"{path} failed: {answer.status_code} {answer.text}")
        return answer

    for _ in range(n):
        ms, _ = await timed(lambda: asyncio.to_thread(bare_container.pause))
        timings["bare_pause"].append(ms)
        ms, _ = await timed(lambda: asyncio.to_thread(bare_container.unpause))
        timings["bare_unpause"].append(ms)
        ms, _ = await timed(lambda: call("pause"))
        timings["pause"].append(ms)
        ms, _ = await timed(lambda: call("resume"))
        timings["resume"].append(ms)
    await asyncio.to_thread(bare_container.remove, force=True)
    await http.delete(f"/api/v1/sandboxes/{chat}")
    d = {k: dist(v) for k, v in timings.items()}
    report.figures["pause_resume"] = {f"{k}_ms": v for k, v in d.items()}
    for ours, floor in (("pause", "bare_pause"), ("resume", "bare_unpause")):
        o, b = d[ours]["p50"], d[floor]["p50"]
        report.row(
            f"{ours} p50 (HTTP vs docker-py {floor.removeprefix('bare_')})",
            f"{o:.1f} ms",
            f"{b:.1f} ms",
            f"{o / b:.2f}",
        )


async def warm_pool_section(report: Report, root: Path) -> None:
    client = docker.from_env()
    ensure_sandbox_image(client, IMAGE)
    count = _int("BENCH_BURST", 100)
    size = count + 10
    root.mkdir(parents=True, exist_ok=True)
    make_sandbox_dirs(root)
    with nats_server(root / "nats") as server:
        env = sandboxd_env(
            server.url,
            root,
            NODE,
            TOKEN,
            SANDBOXD_SANDBOX_WARM_POOL_SIZE=str(size),
            SANDBOXD_RUNTIME_MAX_SESSIONS="1000",
            SANDBOXD_TELEMETRY_LOG_LEVEL="WARNING",
        )
        runtime = spawn("services.runtime", env, root / "runtime.log")
        api = spawn("services.api", env, root / "api.log")
        assert api.metrics_url is not None
        base = api.metrics_url.removesuffix("/metrics")
        try:
            await until_ready(base)
            async with httpx.AsyncClient(base_url=base, headers={"X-API-Token": TOKEN}, timeout=120) as http:
                fill = await pool_full(runtime, size)
                report.figures["warm_pool_fill"] = {"containers": size, "seconds": fill}
                report.row(f"warm pool of {size} filled after start-up", f"{fill:.1f} s", "", f"{size / fill:.1f}/s")
                await create(http, str(uuid.uuid4()))  # warm-up (first HTTP/NATS round trips)
                await warm_creates(report, http, client, runtime, root, size, _int("BENCH_WARM", 30))
                await burst(report, http, client, runtime, root, size, count, _int("BENCH_BURST_CONCURRENCY", 32))
                await pause_resume(report, http, client, root, _int("BENCH_PAUSE", 30))
        finally:
            stop(api)
            stop(runtime)
            await asyncio.to_thread(remove_bare, client)
            for c in client.containers.list(all=True, filters={"label": f"sandboxd.node_id={NODE}"}):
                c.remove(force=True)
            from services.runtime.slots import unmount_all  # noqa: PLC0415 - only here

            unmount_all(root / "slots")


async def main() -> None:
    report = new_report()
    with tempfile.TemporaryDirectory(prefix="sandboxd-bench-warm-") as tmp:
        await warm_pool_section(report, Path(tmp))


if __name__ == "__main__":
    asyncio.run(main())
