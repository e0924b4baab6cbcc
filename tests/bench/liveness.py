"""Liveness under a runtime crash, measured: `uv run python -m tests.bench.liveness`.

Prints, for a few rounds each (real nats-server, real Docker, runtimes as OS processes with
the default settings: `runtime.ack_wait_seconds` 4, `runtime.instance_dead_after_seconds` 5):

- kill -9 of a runtime with another alive: the first runtime holds BENCH_LIVENESS_IN_FLIGHT
  creates, each right after its claim (`SANDBOXD_FAILPOINT=after_claim:hang`); the time from
  the kill until the last of them has its outcome (issue target: 6 s);
- claim crash, another runtime alive: one create held after its claim, the runtime killed,
  a keepalive for the chat published at once; the time from the kill until the keepalive has
  its outcome, and until the create has its own (target: the chat's next command 10 s);
- claim crash of the only runtime: it kills itself right after the claim
  (`SANDBOXD_FAILPOINT=after_claim`), a keepalive is published and a new runtime started at
  once; the same two times, process start-up included.

Nothing is asserted: the tests judge behaviour, this reports figures.
"""

from __future__ import annotations

import asyncio
import json
import os
import signal
import statistics
import tempfile
import time
import uuid
from pathlib import Path
from typing import Any

import docker
import nats
from nats.aio.client import Client
from nats.aio.msg import Msg
from nats.js.api import DeliverPolicy

from services.runtime.image import ensure_sandbox_image
from shared.config import StreamSettings
from shared.contracts import OUTCOME_TYPES
from shared.failpoints import FAILPOINT_ENV
from shared.nodes import NODE_KEY_PREFIX
from shared.subjects import INSTANCES_BUCKET, command_subject
from shared.topology import ensure_topology
from tests.support.nats_server import nats_server
from tests.support.processes import Child, make_sandbox_dirs, sandboxd_env, spawn, stop

IMAGE = "sandboxd-sandbox:latest"
NODE = "bench-liveness"
OUTCOMES = {t.__struct_config__.tag for t in OUTCOME_TYPES}


class Seen:
    """When each command's outcome and each chat's first event arrived (monotonic clock)."""

    def __init__(self) -> None:
        self.outcomes: dict[str, float] = {}
        self.claimed: dict[str, float] = {}

    async def on_msg(self, msg: Msg) -> None:
        event = json.loads(msg.data)
        if event["type"] in OUTCOMES and event.get("causation_id"):
            self.outcomes.setdefault(event["causation_id"], time.monotonic())
        elif event["type"] == "provisioning":
            self.claimed.setdefault(event["chat_id"], time.monotonic())

    async def until(self, done: Any, timeout: float = 180.0) -> None:
        deadline = time.monotonic() + timeout
        while not done():
            if time.monotonic() > deadline:
                raise TimeoutError("not within the bench's deadline")
            await asyncio.sleep(0.005)


async def publish(nc: Client, kind: str, chat: str) -> str:
    command_id = str(uuid.uuid4())
    body = json.dumps({"command_id": command_id, "chat_id": chat}).encode()
    await nc.jetstream().publish(command_subject(kind, chat), body, headers={"Nats-Msg-Id": command_id})
    return command_id


async def live_instances(nc: Client) -> int:
    kv = await nc.jetstream().key_value(INSTANCES_BUCKET)
    try:
        return len([key for key in await kv.keys() if not key.startswith(NODE_KEY_PREFIX)])
    except nats.js.errors.NoKeysError:
        return 0


async def until_instances(nc: Client, count: int) -> None:
    while await live_instances(nc) < count:
        await asyncio.sleep(0.02)


async def kill(child: Child) -> float:
    child.send_signal(signal.SIGKILL)
    await asyncio.to_thread(child.wait)
    return time.monotonic()


async def in_flight_round(nc: Client, seen: Seen, env: dict[str, str], root: Path, n: int, r: int) -> float:
    chats = [str(uuid.uuid4()) for _ in range(n)]
    victim = spawn("services.runtime", {**env, FAILPOINT_ENV: "after_claim:hang"}, root / f"a{r}-1.log")
    survivor: Child | None = None
    try:
        await until_instances(nc, 1)
        creates = [await publish(nc, "create", chat) for chat in chats]
        await seen.until(lambda: all(c in seen.claimed for c in chats))
        # The survivor starts after the claims, so that it takes none of the creates.
        survivor = spawn("services.runtime", env, root / f"a{r}-2.log")
        await until_instances(nc, 2)
        killed_at = await kill(victim)
        await seen.until(lambda: all(c in seen.outcomes for c in creates))
        return max(seen.outcomes[c] for c in creates) - killed_at
    finally:
        stop(victim)
        if survivor is not None:
            stop(survivor)


async def claim_crash_round(
    nc: Client, seen: Seen, env: dict[str, str], root: Path, r: int, *, restart: bool
) -> tuple[float, float]:
    chat = str(uuid.uuid4())
    if restart:
        victim = spawn("services.runtime", {**env, FAILPOINT_ENV: "after_claim"}, root / f"c{r}-1.log")
        await until_instances(nc, 1)
        create = await publish(nc, "create", chat)
        await asyncio.to_thread(victim.wait)
        crashed_at = time.monotonic()
        keepalive = await publish(nc, "keepalive", chat)
        survivor = spawn("services.runtime", env, root / f"c{r}-2.log")
    else:
        victim = spawn("services.runtime", {**env, FAILPOINT_ENV: "after_claim:hang"}, root / f"b{r}-1.log")
        await until_instances(nc, 1)
        create = await publish(nc, "create", chat)
        await seen.until(lambda: chat in seen.claimed)
        survivor = spawn("services.runtime", env, root / f"b{r}-2.log")
        await until_instances(nc, 2)
        crashed_at = await kill(victim)
        keepalive = await publish(nc, "keepalive", chat)
    try:
        await seen.until(lambda: keepalive in seen.outcomes and create in seen.outcomes)
        return seen.outcomes[keepalive] - crashed_at, seen.outcomes[create] - crashed_at
    finally:
        stop(victim)
        stop(survivor)


def spread(values: list[float]) -> str:
    each = ", ".join(f"{v:.2f}" for v in values)
    return f"median {statistics.median(values):5.2f} s, max {max(values):5.2f} s  ({each})"


async def main() -> None:
    rounds = int(os.environ.get("BENCH_LIVENESS_ROUNDS", "3"))
    in_flight = int(os.environ.get("BENCH_LIVENESS_IN_FLIGHT", "8"))
    client = docker.from_env()
    ensure_sandbox_image(client, IMAGE)
    with tempfile.TemporaryDirectory(prefix="sandboxd-liveness-") as tmp, nats_server(Path(tmp) / "nats") as server:
        root = Path(tmp)
        make_sandbox_dirs(root)
        env = sandboxd_env(
            server.url,
            root,
            NODE,
            "bench-token",
            SANDBOXD_TELEMETRY_RUNTIME_METRICS_PORT="0",
            SANDBOXD_TELEMETRY_LOG_LEVEL="WARNING",
            SANDBOXD_RUNTIME_RECONCILE_ENABLED="false",
        )
        nc = await nats.connect(server.url)
        seen = Seen()
        try:
            await ensure_topology(nc.jetstream(), StreamSettings())
            # A stream consumer: only stored events (a core subscription also sees refused appends).
            await nc.jetstream().subscribe(
                "sandbox.events.>", cb=seen.on_msg, ordered_consumer=True, deliver_policy=DeliverPolicy.NEW
            )
            after_kill = [await in_flight_round(nc, seen, env, root, in_flight, r) for r in range(rounds)]
            alive = [await claim_crash_round(nc, seen, env, root, r, restart=False) for r in range(rounds)]
            restarted = [await claim_crash_round(nc, seen, env, root, r, restart=True) for r in range(rounds)]
        finally:
            await nc.close()
            for container in client.containers.list(all=True, filters={"label": f"sandboxd.node_id={NODE}"}):
                container.remove(force=True)
    print(f"kill -9 of a runtime with another alive, {in_flight} creates in flight (target <= 6 s):")
    print(f"  kill -> last of them answered        {spread(after_kill)}")
    print("claim crash, another runtime alive (target <= 10 s):")
    print(f"  kill -> the chat's keepalive answered {spread([k for k, _ in alive])}")
    print(f"  kill -> the claimed create answered   {spread([c for _, c in alive])}")
    print("claim crash of the only runtime, a new one started at once (target <= 10 s):")
    print(f"  crash -> the chat's keepalive answered {spread([k for k, _ in restarted])}")
    print(f"  crash -> the claimed create answered   {spread([c for _, c in restarted])}")


if __name__ == "__main__":
    asyncio.run(main())
