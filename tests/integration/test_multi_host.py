"""Several Docker hosts: two private Docker engines on this machine (their own sockets, data
and exec roots), each with its own runtime processes and node id, against one NATS server.

- placement: ten new chats spread over two equal nodes, each claim records its placement;
- routing: a stop for a session reaches its node's runtimes through the node's queue, each
  command taken from the shared queue once (no nak, no redelivery);
- node failure: a node keeps its sessions while one of its two runtimes lives; once both are
  killed (engine left running) it is declared dead, its sessions are lost, new creates for
  those chats go to the other node, a command stranded in its queue is carried out by the
  other node; when it comes back it records its return and removes its stale containers.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import json
import signal
import uuid
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import msgspec
import nats as nats_client
import pytest
from nats.js import JetStreamContext
from nats.js.errors import KeyNotFoundError, NotFoundError

from services.runtime.routing import PLACEMENT_HEADER
from shared.config import StreamSettings
from shared.contracts import OUTCOME_TYPES, Placement, decode_node_beat, encode
from shared.event_store import EventStore
from shared.nodes import node_key
from shared.subjects import (
    COMMANDS_STREAM,
    EVENTS_STREAM,
    INSTANCES_BUCKET,
    NODE_COMMANDS_STREAM,
    ConsumerName,
    command_subject,
    node_command_subject,
    node_consumer,
    node_event_subject,
)
from shared.topology import ensure_topology
from tests.support.eventually import eventually, holds
from tests.support.nats_server import NatsServer
from tests.support.private_dockerd import PrivateDockerd, private_dockerd_with_image
from tests.support.processes import Child, make_sandbox_dirs, metric_total, sandboxd_env, spawn, stop

TEST_IMAGE = "sandboxd-sandbox:latest"
TOKEN = "multi-host-token"
OUTCOMES = {t.__struct_config__.tag for t in OUTCOME_TYPES}
NODES = ("node-a", "node-b")
DEAD_AFTER = 4.0
FAST_LIVENESS = {
    "SANDBOXD_RUNTIME_INSTANCE_DEAD_AFTER_SECONDS": "1.5",
    "SANDBOXD_RUNTIME_NODE_DEAD_AFTER_SECONDS": str(DEAD_AFTER),
    "SANDBOXD_RUNTIME_MAX_SESSIONS": "20",
    # Fencing must not wait for reconciliation: its start-up pass alone (and the next one,
    # minutes away) could not remove an orphan that needs three observations.
    "SANDBOXD_RUNTIME_RECONCILE_INTERVAL_SECONDS": "300",
    "SANDBOXD_RUNTIME_RECONCILE_CONFIRMATIONS": "3",
}
Events = list[dict[str, Any]]


@pytest.fixture(scope="module")
def engines(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, PrivateDockerd]]:
    roots = {node: tmp_path_factory.mktemp(f"dockerd-{node}") for node in NODES}
    with (
        private_dockerd_with_image(roots["node-a"], TEST_IMAGE) as a,
        private_dockerd_with_image(roots["node-b"], TEST_IMAGE) as b,
    ):
        yield {"node-a": a, "node-b": b}


class Hosts:
    """Runtime processes per node, each node on its own engine."""

    def __init__(self, nats: NatsServer, root: Path, engines: dict[str, PrivateDockerd]) -> None:
        self.nats = nats
        self.root = root
        self.engines = engines
        self.children: list[Child] = []

    def runtime(self, node: str, name: str) -> Child:
        env = sandboxd_env(
            self.nats.url, self.root / node, node, TOKEN, DOCKER_HOST=self.engines[node].base_url, **FAST_LIVENESS
        )
        child = spawn("services.runtime", env, self.root / f"{name}.log")
        self.children.append(child)
        return child

    def containers(self, node: str) -> dict[str, str]:
        """session id -> state of the managed containers on `node`'s engine."""
        client = self.engines[node].client()
        try:
            found = client.containers.list(all=True, filters={"label": "sandboxd.managed=true"})
            return {c.labels["sandboxd.session_id"]: c.status for c in found}
        finally:
            client.close()

    def stop_all(self) -> None:
        stop(*self.children)


@pytest.fixture
async def hosts(nats: NatsServer, tmp_path: Path, engines: dict[str, PrivateDockerd]) -> Any:
    for node in NODES:  # each host's own sandbox directories
        (tmp_path / node).mkdir()
        make_sandbox_dirs(tmp_path / node)
    nc = await nats_client.connect(nats.url)
    await ensure_topology(nc.jetstream(), StreamSettings())
    await nc.close()
    made = Hosts(nats, tmp_path, engines)
    try:
        yield made
    finally:
        made.stop_all()
        await asyncio.gather(*(asyncio.to_thread(remove_all_containers, engine) for engine in engines.values()))


def remove_all_containers(engine: PrivateDockerd) -> None:
    client = engine.client()
    try:
        with ThreadPoolExecutor(8) as removing:  # side by side: each removal waits on its own kill
            list(removing.map(lambda c: c.remove(force=True), client.containers.list(all=True)))
    finally:
        client.close()


async def history(js: JetStreamContext, chat: str) -> Events:
    return [json.loads(encode(s.event)) for s in await EventStore(js).history(chat)]


async def publish(js: JetStreamContext, kind: str, chat: str) -> str:
    command_id = str(uuid.uuid4())
    body = json.dumps({"command_id": command_id, "chat_id": chat}).encode()
    await js.publish(command_subject(kind, chat), body, headers={"Nats-Msg-Id": command_id})
    return command_id


def outcome(events: Events, command_id: str) -> dict[str, Any] | None:
    found = [e for e in events if e["causation_id"] == command_id and e["type"] in OUTCOMES]
    assert len(found) <= 1, found
    return found[0] if found else None


async def outcomes(js: JetStreamContext, commands: dict[str, str]) -> dict[str, dict[str, Any] | None]:
    """chat -> the outcome of its command (None while it has none)."""
    return {chat: outcome(await history(js, chat), cmd) for chat, cmd in commands.items()}


async def all_answered(js: JetStreamContext, commands: dict[str, str], timeout: float = 90) -> dict[str, Any]:
    return await eventually(
        lambda: outcomes(js, commands),
        lambda found: all(v is not None for v in found.values()),
        timeout=timeout,
        what=f"{len(commands)} commands answered",
    )


async def nodes_beating(js: JetStreamContext, *nodes: str) -> None:
    kv = await js.key_value(INSTANCES_BUCKET)

    async def beating() -> set[str]:
        found = set()
        for node in nodes:
            with contextlib.suppress(KeyNotFoundError):
                found.add(decode_node_beat((await kv.get(node_key(node))).value or b"").node_id)
        return found

    await eventually(beating, lambda found: found == set(nodes), timeout=60, what=f"beats of {nodes}")


def assert_alive(*children: Child) -> None:
    for child in children:
        assert child.poll() is None, child.log.read_text()[-3000:]


async def all_nodes_seen(js: JetStreamContext, runtimes: list[Child]) -> None:
    """Every node beats, and every runtime has read every node's beat: a burst can spread."""
    await nodes_beating(js, *NODES)
    for child in runtimes:
        alive = functools.partial(metric_total, child, "sandbox_nodes", state="alive")
        await eventually(alive, lambda n: n == len(NODES), what="both nodes alive to each runtime")


async def node_events(js: JetStreamContext, node: str) -> list[str]:
    """The types of the node's events (last first is enough: the last one)."""
    try:
        raw = await js.get_last_msg(EVENTS_STREAM, node_event_subject(node))
    except NotFoundError:
        return []
    return [json.loads(raw.data or b"{}")["type"]]


async def consumer_counts(js: JetStreamContext, durable: str, stream: str = COMMANDS_STREAM) -> tuple[int, int, int]:
    """(delivered, redelivered, ack pending) of a consumer."""
    info = await js.consumer_info(stream, durable)
    return info.delivered.consumer_seq or 0, info.num_redelivered or 0, info.num_ack_pending or 0


async def test_placement_spreads_and_commands_reach_their_node_once(hosts: Hosts) -> None:
    runtimes = [hosts.runtime(node, f"runtime-{node}") for node in NODES]
    nc = await nats_client.connect(hosts.nats.url)
    js = nc.jetstream()
    try:
        await all_nodes_seen(js, runtimes)
        chats = [str(uuid.uuid4()) for _ in range(10)]
        creates = {chat: await publish(js, "create", chat) for chat in chats}
        created = await all_answered(js, creates)
        assert {o["type"] for o in created.values()} == {"running"}, created
        placed = {chat: o["session"]["node_id"] for chat, o in created.items()}
        per_node = {node: sorted(c for c, n in placed.items() if n == node) for node in NODES}
        assert all(len(on) >= 3 for on in per_node.values()), per_node
        for chat in chats:  # the choice is recorded in the claim, and the container is on that node's engine
            [claim] = [e for e in await history(js, chat) if e["type"] == "provisioning"]
            assert claim["placement"]["node_id"] == placed[chat] == claim["node_id"], claim
            assert claim["placement"]["placed_by"] in NODES, claim
        claims = [e for chat in chats for e in await history(js, chat) if e["type"] == "provisioning"]
        assert any(c["placement"]["placed_by"] != c["node_id"] for c in claims), "no create was placed elsewhere"
        for node in NODES:
            sessions = {o["session_id"] for o in created.values() if o["session"]["node_id"] == node}
            assert set(hosts.containers(node)) == sessions, node

        stops = {chat: await publish(js, "stop", chat) for chat in chats}
        stopped = await all_answered(js, stops)
        assert {o["type"] for o in stopped.values()} == {"stopped"}, stopped
        for chat, o in stopped.items():
            assert o["node_id"] == placed[chat], "the stop was carried out by the session's node"
        for node in NODES:
            assert hosts.containers(node) == {}, node
        # Each of the 20 commands was taken from the shared queue once and acknowledged;
        # what was forwarded went through a node's queue once: no nak, no redelivery.
        shared = await consumer_counts(js, ConsumerName.RUNTIME)
        assert shared == (len(creates) + len(stops), 0, 0), shared
        forwarded = 0
        for node in NODES:
            delivered, redelivered, pending = await consumer_counts(js, node_consumer(node), NODE_COMMANDS_STREAM)
            assert (redelivered, pending) == (0, 0), node
            forwarded += delivered
        assert forwarded > 0, "two nodes and twenty commands: some were another node's"
        for stream in (COMMANDS_STREAM, NODE_COMMANDS_STREAM):
            assert (await js.stream_info(stream)).state.messages == 0, stream
        assert_alive(*runtimes)  # each also did work: sessions ran on both nodes' engines
    finally:
        await nc.close()


async def test_a_dead_node_loses_its_sessions_and_fences_them_when_it_returns(hosts: Hosts) -> None:
    a1 = hosts.runtime("node-a", "runtime-a1")
    a2 = hosts.runtime("node-a", "runtime-a2")
    b = hosts.runtime("node-b", "runtime-b")
    nc = await nats_client.connect(hosts.nats.url)
    js = nc.jetstream()
    try:
        await all_nodes_seen(js, [a1, a2, b])
        chats = [str(uuid.uuid4()) for _ in range(8)]
        created = await all_answered(js, {chat: await publish(js, "create", chat) for chat in chats})
        on_a = {c: o["session_id"] for c, o in created.items() if o["session"]["node_id"] == "node-a"}
        assert on_a, "eight chats over two nodes: some on node-a"
        assert set(hosts.containers("node-a")) == set(on_a.values())

        # One of node-a's two runtimes dies: the node lives on, and keeps its sessions.
        a1.send_signal(signal.SIGKILL)
        assert await asyncio.to_thread(a1.wait, 30) == -signal.SIGKILL
        await holds(
            lambda: node_events(js, "node-a"),
            lambda found: found == [],
            seconds=DEAD_AFTER + 2,
            what="node-a alive with one runtime",
        )
        # Both dead (the engine keeps running): the node is declared dead, its sessions lost.
        a2.send_signal(signal.SIGKILL)
        assert await asyncio.to_thread(a2.wait, 30) == -signal.SIGKILL
        # A create forwarded to node-a just as it went is stranded in its queue: the live node
        # carries it out (placing it again) without waiting for node-a's return.
        stranded_chat = str(uuid.uuid4())
        stranded = str(uuid.uuid4())
        placement = Placement(node_id="node-a", placed_by="node-b")
        await js.publish(
            node_command_subject("node-a", "create", stranded_chat),
            json.dumps({"command_id": stranded, "chat_id": stranded_chat}).encode(),
            headers={"Nats-Msg-Id": stranded, PLACEMENT_HEADER: msgspec.json.encode(placement).decode()},
        )
        await eventually(lambda: node_events(js, "node-a"), lambda found: found == ["node_dead"], timeout=60)
        lost = await eventually(
            lambda: _last_events(js, list(on_a)),
            lambda last: all(e["type"] == "lost" for e in last.values()),
            timeout=30,
            what="node-a's sessions lost",
        )
        assert {e["reason"] for e in lost.values()} == {"node_lost"}, lost
        assert {e["session_id"] for e in lost.values()} == set(on_a.values())
        # Its containers still run on its engine (nobody can reach them): fenced on return.
        assert set(hosts.containers("node-a")) == set(on_a.values())

        # New creates for node-a's chats go to node-b.
        again = {chat: await publish(js, "create", chat) for chat in on_a}
        recreated = await all_answered(js, {**again, stranded_chat: stranded})
        assert {(o["type"], o["session"]["node_id"]) for o in recreated.values()} == {("running", "node-b")}
        moved = {chat: o["session_id"] for chat, o in recreated.items()}

        # node-a returns: it records so, and removes the containers of the sessions it lost.
        a3 = hosts.runtime("node-a", "runtime-a3")
        await eventually(lambda: node_events(js, "node-a"), lambda found: found == ["node_returned"], timeout=60)
        await eventually(lambda: asyncio.to_thread(hosts.containers, "node-a"), lambda c: c == {}, timeout=30)
        # Nothing was resurrected: the chats keep their sessions on node-b.
        last = await _last_events(js, list(moved))
        assert {chat: e["session"]["session_id"] for chat, e in last.items()} == moved
        assert {e["session"]["status"] for e in last.values()} == {"running"}
        assert set(hosts.containers("node-b")) >= set(moved.values())
        assert_alive(b, a3)  # b ran the moved chats; a3 recorded the return and fenced
    finally:
        await nc.close()


async def _last_events(js: JetStreamContext, chats: list[str]) -> dict[str, dict[str, Any]]:
    store = EventStore(js)
    out = {}
    for chat in chats:
        state = await store.read(chat)
        assert state.last is not None
        out[chat] = json.loads(encode(state.last))
    return out
