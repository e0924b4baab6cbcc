"""How soon a dead node's sessions are `lost`, and how soon their chats run elsewhere
(printed, never asserted): `uv run python -m tests.bench.node_failure`.

A real nats-server and two nodes, each one runtime process (both on this machine's Docker
engine, told apart by node id: containers are labelled with their node); the runtimes use
`runtime.node_dead_after_seconds` = BENCH_NODE_DEAD_AFTER (default 4 s) and
`instance_dead_after_seconds` 1.5 s. BENCH_NODE_SESSIONS chats (default 10) are created over
raw NATS, then node-a's runtime is killed -9 (its containers keep running). Figures, from
the kill: `node_dead` on `sandbox.events.node.node-a`, the last of node-a's sessions `lost`,
and a create for each of those chats `running` on node-b; then, from node-a's restart, its
stale containers gone (fencing).
"""

from __future__ import annotations

import asyncio
import json
import os
import signal
import tempfile
import time
import uuid
from pathlib import Path

import docker
import nats
from nats.aio.msg import Msg

from services.runtime.image import ensure_sandbox_image
from shared.subjects import command_subject
from tests.support.nats_server import nats_server
from tests.support.processes import Child, make_sandbox_dirs, sandboxd_env, spawn, stop

IMAGE = "sandboxd-sandbox:latest"
TOKEN = "bench-" + uuid.uuid4().hex
RUN = uuid.uuid4().hex[:6]
NODES = (f"node-a-{RUN}", f"node-b-{RUN}")


class Watch:
    """Events by (type, chat or node), with when they arrived (monotonic)."""

    def __init__(self) -> None:
        self.seen: dict[tuple[str, str], tuple[float, dict[str, object]]] = {}
        self.changed = asyncio.Event()

    async def on_msg(self, msg: Msg) -> None:
        event = json.loads(msg.data)
        key = (str(event.get("type")), str(event.get("chat_id") or event.get("node_id")))
        self.seen.setdefault(key, (time.monotonic(), event))
        self.changed.set()

    async def until(self, check: object, timeout: float = 120) -> None:
        deadline = time.monotonic() + timeout
        while not check():  # type: ignore[operator]
            self.changed.clear()
            await asyncio.wait_for(self.changed.wait(), max(deadline - time.monotonic(), 0.01))


async def publish(js: nats.js.JetStreamContext, kind: str, chat: str) -> str:
    command_id = str(uuid.uuid4())
    body = json.dumps({"command_id": command_id, "chat_id": chat}).encode()
    await js.publish(command_subject(kind, chat), body, headers={"Nats-Msg-Id": command_id})
    return command_id


async def main() -> None:
    sessions = int(os.environ.get("BENCH_NODE_SESSIONS", "10"))
    dead_after = float(os.environ.get("BENCH_NODE_DEAD_AFTER", "4"))
    client = docker.from_env()
    ensure_sandbox_image(client, IMAGE)
    node_a, node_b = NODES
    with tempfile.TemporaryDirectory(prefix="sandboxd-nodes-") as tmp, nats_server(Path(tmp) / "nats") as server:
        root = make_sandbox_dirs(Path(tmp))

        def runtime(node: str, name: str) -> Child:
            env = sandboxd_env(
                server.url,
                root,
                node,
                TOKEN,
                SANDBOXD_RUNTIME_INSTANCE_DEAD_AFTER_SECONDS="1.5",
                SANDBOXD_RUNTIME_NODE_DEAD_AFTER_SECONDS=str(dead_after),
                SANDBOXD_RUNTIME_RECONCILE_INTERVAL_SECONDS="300",
                SANDBOXD_TELEMETRY_RUNTIME_METRICS_PORT="0",
                SANDBOXD_TELEMETRY_LOG_LEVEL="WARNING",
            )
            return spawn("services.runtime", env, root / f"{name}.log")

        procs = [runtime(node_a, "a1"), runtime(node_b, "b1")]
        nc = await nats.connect(server.url)
        js = nc.jetstream()
        watch = Watch()
        await nc.subscribe("sandbox.events.>", cb=watch.on_msg)
        try:
            await asyncio.sleep(3)  # both runtimes beating
            chats = [str(uuid.uuid4()) for _ in range(sessions)]
            for chat in chats:
                await publish(js, "create", chat)
            await watch.until(lambda: all(("running", c) in watch.seen for c in chats))
            on_a = [c for c in chats if watch.seen[("running", c)][1]["session"]["node_id"] == node_a]  # type: ignore[index]
            print(f"node failure: {len(on_a)} of {len(chats)} sessions on {node_a}; node_dead_after {dead_after:g} s")
            killed_at = time.monotonic()
            procs[0].send_signal(signal.SIGKILL)
            await watch.until(lambda: ("node_dead", node_a) in watch.seen)
            dead = watch.seen[("node_dead", node_a)][0] - killed_at
            await watch.until(lambda: all(("lost", c) in watch.seen for c in on_a))
            lost = max(watch.seen[("lost", c)][0] for c in on_a) - killed_at
            for chat in on_a:
                await publish(js, "create", chat)

            # `seen` keeps the first event per (type, chat): watch the registry-free way, the log.
            watch.seen = {k: v for k, v in watch.seen.items() if not (k[0] == "running" and k[1] in on_a)}
            await watch.until(lambda: all(("running", c) in watch.seen for c in on_a))
            elsewhere = max(watch.seen[("running", c)][0] for c in on_a) - killed_at
            on_b = {watch.seen[("running", c)][1]["session"]["node_id"] for c in on_a}  # type: ignore[index]
            back_at = time.monotonic()
            procs.append(runtime(node_a, "a2"))

            def stale() -> int:
                return len(client.api.containers(all=True, filters={"label": f"sandboxd.node_id={node_a}"}))

            while stale():
                await asyncio.sleep(0.05)
            fenced = time.monotonic() - back_at
            ratio = f"{dead / dead_after:.2f}x the setting"
            print(f"  kill -9 of node-a's runtime -> node_dead event   {dead:6.2f} s ({ratio})")
            print(f"  kill -9 -> last of its {len(on_a)} sessions lost        {lost:6.2f} s ({lost / dead_after:.2f}x)")
            print(f"  kill -9 -> those chats running again           {elsewhere:6.2f} s (on {sorted(on_b)})")
            print(f"  restart of node-a -> stale containers removed  {fenced:6.2f} s (includes its start-up)")
        finally:
            await nc.close()
            for proc in procs:
                stop(proc)
            for node in NODES:
                for left in client.containers.list(all=True, filters={"label": f"sandboxd.node_id={node}"}):
                    left.remove(force=True)
            client.close()


if __name__ == "__main__":
    asyncio.run(main())
