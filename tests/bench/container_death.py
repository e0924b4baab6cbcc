"""How soon a sandbox killed behind the system's back is `lost` in the log (printed, never
asserted): `uv run python -m tests.bench.container_death`.

A real nats-server, the runtime and the API as separate processes (periodic reconciliation
at its default 30 s, so what is measured is the death watch), the real Docker engine. Each
sandbox is created over HTTP, then `docker kill`ed; the figure is the time from the kill call
to the `lost` event arriving on a core subscription to `sandbox.events.>`. First one at a
time (BENCH_DEATHS, default 20), then a burst killed at once (BENCH_DEATH_BURST, default 10).
"""

from __future__ import annotations

import asyncio
import json
import os
import tempfile
import time
import uuid
from pathlib import Path

import docker
import httpx
import nats
from nats.aio.msg import Msg

from services.runtime.image import ensure_sandbox_image
from tests.bench.harness import dist
from tests.support.nats_server import free_port, nats_server
from tests.support.processes import make_sandbox_dirs, sandboxd_env, spawn, stop, until_ready

IMAGE = "sandboxd-sandbox:latest"
TOKEN = "bench-" + uuid.uuid4().hex
NODE = f"bench-deaths-{uuid.uuid4().hex[:6]}"


class LostWatch:
    """When each chat's `lost` event arrived (monotonic)."""

    def __init__(self) -> None:
        self.at: dict[str, float] = {}
        self.events: dict[str, dict[str, object]] = {}
        self._arrived: dict[str, asyncio.Event] = {}

    async def on_msg(self, msg: Msg) -> None:
        event = json.loads(msg.data)
        if event.get("type") == "lost":
            chat = str(event["chat_id"])
            self.at.setdefault(chat, time.monotonic())
            self.events[chat] = event
            self.arrived(chat).set()

    def arrived(self, chat: str) -> asyncio.Event:
        return self._arrived.setdefault(chat, asyncio.Event())


async def create(http: httpx.AsyncClient) -> tuple[str, str]:
    chat = str(uuid.uuid4())
    answer = await http.post("/api/v1/sandboxes", json={"chat_id": chat})
    answer.raise_for_status()
    return chat, str(answer.json()["container_id"])


async def kill_and_time(client: docker.DockerClient, watch: LostWatch, chat: str, container: str) -> float:
    killed_at = time.monotonic()
    await asyncio.to_thread(client.api.kill, container)
    await asyncio.wait_for(watch.arrived(chat).wait(), 60)
    return (watch.at[chat] - killed_at) * 1000


def show(what: str, values: list[float]) -> None:
    d = dist(values)
    print(
        f"  {what:<44} n={len(values):<4} p50 {d['p50']:8.1f} ms  p95 {d['p95']:8.1f} ms  max {d['max']:8.1f} ms",
        flush=True,
    )


async def main() -> None:
    sequential = int(os.environ.get("BENCH_DEATHS", "20"))
    burst = int(os.environ.get("BENCH_DEATH_BURST", "10"))
    client = docker.from_env()
    ensure_sandbox_image(client, IMAGE)
    with tempfile.TemporaryDirectory(prefix="sandboxd-deaths-") as tmp, nats_server(Path(tmp) / "nats") as server:
        root = Path(tmp)
        make_sandbox_dirs(root)
        port = free_port()
        env = sandboxd_env(
            server.url,
            root,
            NODE,
            TOKEN,
            SANDBOXD_HTTP_PORT=str(port),
            SANDBOXD_TELEMETRY_RUNTIME_METRICS_PORT="0",
            SANDBOXD_TELEMETRY_LOG_LEVEL="WARNING",
        )
        procs = [spawn(m, env, root / f"{m}.log") for m in ("services.runtime", "services.api")]
        nc = await nats.connect(server.url)
        watch = LostWatch()
        await nc.subscribe("sandbox.events.>", cb=watch.on_msg)
        try:
            await until_ready(f"http://127.0.0.1:{port}")
            async with httpx.AsyncClient(
                base_url=f"http://127.0.0.1:{port}", headers={"X-API-Token": TOKEN}, timeout=60
            ) as http:
                one_by_one = []
                for _ in range(sequential):
                    chat, container = await create(http)
                    one_by_one.append(await kill_and_time(client, watch, chat, container))
                sessions = [await create(http) for _ in range(burst)]
                together = await asyncio.gather(*(kill_and_time(client, watch, c, k) for c, k in sessions))
            reasons = {(e.get("reason"), json.dumps(e.get("error"))) for e in watch.events.values()}
            print("container killed -> `lost` in the log (docker kill call to the event on a subscription)")
            show("one at a time", one_by_one)
            show(f"{burst} killed at once", list(together))
            print(f"  lost events seen: {len(watch.events)}; reasons/errors: {sorted(reasons)[:2]}", flush=True)
        finally:
            await nc.close()
            for proc in procs:
                stop(proc)
            for left in client.containers.list(all=True, filters={"label": f"sandboxd.node_id={NODE}"}):
                left.remove(force=True)
            client.close()


if __name__ == "__main__":
    asyncio.run(main())
