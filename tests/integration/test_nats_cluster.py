"""NATS clustering: `sandboxctl up` with a 3-node embedded cluster, and a real 3-node cluster
losing a server (kill -9) under a load of creates and stops: no command JetStream
acknowledged is lost, creates keep succeeding, and the server rejoins."""

from __future__ import annotations

import asyncio
import itertools
import json
import socket
import uuid
from collections import Counter
from functools import partial
from pathlib import Path

import docker
import httpx
import nats
import pytest
from nats.aio.client import Client
from nats.js import JetStreamContext

from shared.config import StreamSettings, load_settings
from shared.contracts import is_outcome
from shared.event_store import ChatState, EventStore
from shared.nats_connection import connect
from shared.nats_roles import Role, inbox_prefix
from shared.subjects import (
    COMMANDS_STREAM,
    EVENTS_STREAM,
    HANDLED_BUCKET,
    IDEMPOTENCY_BUCKET,
    INSTANCES_BUCKET,
    SESSIONS_BUCKET,
    STATUS_BUCKET,
    command_subject,
)
from shared.topology import ensure_topology
from tests.integration.test_stack_up import running_stack, supervision
from tests.support.consistency import assert_consistent
from tests.support.eventually import eventually, until
from tests.support.nats_cluster import NatsCluster, is_current, nats_cluster, stream_leader
from tests.support.nats_server import NatsServer, free_port
from tests.support.processes import api_base, make_sandbox_dirs, sandboxd_env, spawn, stop, until_ready

TOKEN = "cluster-" + uuid.uuid4().hex
REPLICATED = (COMMANDS_STREAM, EVENTS_STREAM, f"KV_{SESSIONS_BUCKET}")
BUCKETS = (SESSIONS_BUCKET, HANDLED_BUCKET, IDEMPOTENCY_BUCKET, INSTANCES_BUCKET, STATUS_BUCKET)


def free_port_run(count: int) -> int:
    """The first of `count` consecutive free loopback ports."""
    for _ in range(100):
        first = free_port()
        if all(_bindable(port) for port in range(first + 1, first + count)):
            return first
    raise RuntimeError(f"no {count} consecutive free ports")


def _bindable(port: int) -> bool:
    with socket.socket() as s:
        try:
            s.bind(("127.0.0.1", port))
        except OSError:
            return False
        return True


# --------------------------------------------------------------------------- sandboxctl up


async def test_up_runs_a_three_node_cluster_with_three_replicas(
    tmp_path: Path, docker_client: docker.DockerClient, node_id: str, node_containers: None
) -> None:
    client_port, route_port = free_port_run(3), free_port_run(3)
    cluster_env = {
        "SANDBOXD_NATS_EMBEDDED_CLUSTER_SIZE": "3",
        "SANDBOXD_NATS_EMBEDDED_PORT": str(client_port),
        "SANDBOXD_NATS_EMBEDDED_CLUSTER_PORT": str(route_port),
    }
    with running_stack(tmp_path, node_id, **cluster_env) as stack:
        async with httpx.AsyncClient(base_url=stack.base, headers={"X-API-Token": stack.token}, timeout=30) as http:
            created = await http.post("/api/v1/sandboxes", json={"chat_id": str(uuid.uuid4())})
        assert created.status_code == 201, created.text

        urls = [f"nats://127.0.0.1:{client_port + i}" for i in range(3)]
        seeds = tmp_path / ".sandboxd" / "nats"
        admin = await nats.connect(
            servers=urls, nkeys_seed_str=(seeds / "admin.nk").read_text().strip(), inbox_prefix=inbox_prefix(Role.ADMIN)
        )
        try:
            js = admin.jetstream(timeout=5)
            for stream in (COMMANDS_STREAM, EVENTS_STREAM, *(f"KV_{b}" for b in BUCKETS)):
                info = await js.stream_info(stream)
                assert info.config.num_replicas == 3, stream
                assert info.cluster is not None
                assert info.cluster.leader is not None, stream
                assert len(info.cluster.replicas or []) == 2, stream  # the leader and two followers
        finally:
            await admin.close()

        children = supervision(stack, node_id)["children"]
        assert {"nats-server-n1", "nats-server-n2", "nats-server-n3"} <= set(children), children
        # Every child knows every server, and the replicas the topology was declared with.
        for name in ("runtime", "reaper", "api"):
            environ = _environ(children[name]["pid"])
            assert environ["SANDBOXD_NATS_URL"] == ",".join(urls), name
            assert environ["SANDBOXD_STREAMS_REPLICAS"] == "3", name
        for i in (1, 2, 3):
            assert (tmp_path / ".sandboxd" / "nats" / f"sandboxd-n{i}" / "jetstream").is_dir()
            assert (tmp_path / ".sandboxd" / f"nats-server-n{i}.log").is_file()


def _environ(pid: int) -> dict[str, str]:
    entries = Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
    return dict(e.decode().split("=", 1) for e in entries if b"=" in e)


async def test_a_client_connects_while_a_server_of_its_list_is_down(nats: NatsServer) -> None:
    down = f"nats://127.0.0.1:{free_port()}"
    for url in (f"{down},{nats.url}", f"{nats.url},{down}"):
        settings = load_settings(environ={"SANDBOXD_NATS_URL": url, "SANDBOXD_NATS_CONNECT_TIMEOUT_SECONDS": "3"})
        nc = await connect(settings.nats, "test")
        assert nc.connected_url is not None
        assert f"{nc.connected_url.hostname}:{nc.connected_url.port}" == nats.url.removeprefix("nats://")
        await nc.close()


async def test_a_secured_cluster_has_the_roles_of_the_single_server(tmp_path: Path) -> None:
    with nats_cluster(tmp_path, secured=True) as cluster:
        with pytest.raises(Exception, match="Authorization Violation"):
            await nats.connect(cluster.urls[0], allow_reconnect=False, connect_timeout=5)
        admin = await cluster.connect(Role.ADMIN)
        try:
            js = admin.jetstream(timeout=5)
            await cluster.ready(js)
            await ensure_topology(js, StreamSettings(replicas=3))
            assert (await js.stream_info(EVENTS_STREAM)).config.num_replicas == 3
        finally:
            await admin.close()
        agent = await cluster.connect(Role.AGENT)
        try:
            with pytest.raises(TimeoutError):  # refused: an agent may not declare streams
                await agent.jetstream(timeout=1).add_stream(name="NOT_ALLOWED", subjects=["x.>"])
        finally:
            await agent.close()


# --------------------------------------------------------------------------- a server lost under load


class Load:
    """Workers that create and stop sandboxes straight over NATS, one new chat after another
    until stopped, each command published until JetStream acknowledged it (the same
    Nats-Msg-Id on a retry). A worker waits for its create's outcome, not its stop's: the
    stops are checked at the end (while a server is down, a command on a chat with history
    may wait for a redelivery: see the README's cluster section)."""

    def __init__(self, js: JetStreamContext) -> None:
        self.js = js
        self.chats: list[str] = []
        self.acknowledged: dict[str, str] = {}  # command id -> chat
        self.done = 0  # chats created and their stop published
        self.stopping = False

    async def run(self, workers: int) -> None:
        await asyncio.gather(*(self._worker() for _ in range(workers)))

    async def _worker(self) -> None:
        while not self.stopping:
            chat = str(uuid.uuid4())
            self.chats.append(chat)
            command_id = await self._publish("create", chat)
            await eventually(
                partial(EventStore(self.js).read, chat),
                partial(_has_outcome, command_id),
                timeout=60,
                what=f"the outcome of create {command_id}",
            )
            await self._publish("stop", chat)
            self.done += 1

    async def until_done(self, count: int, what: str) -> None:
        await until(lambda: self.done >= count, timeout=60, what=what)

    async def _publish(self, kind: str, chat: str) -> str:
        command_id = str(uuid.uuid4())
        body = json.dumps({"command_id": command_id, "chat_id": chat}).encode()

        async def publish() -> bool:
            await self.js.publish(command_subject(kind, chat), body, headers={"Nats-Msg-Id": command_id})
            return True

        # A publish that raised may still have been stored: the retry is de-duplicated.
        await eventually(publish, timeout=60, what=f"a PubAck for {kind} {command_id}")
        self.acknowledged[command_id] = chat
        return command_id


async def outcome_counts(js: JetStreamContext, chats: list[str]) -> Counter[str]:
    """How many outcome events each command id has, over the chats' histories."""
    counts: Counter[str] = Counter()
    for chat in chats:
        for stored in await EventStore(js).history(chat):
            if is_outcome(stored.event) and stored.event.causation_id is not None:
                counts[stored.event.causation_id] += 1
    return counts


def _has_outcome(command_id: str, state: ChatState) -> bool:
    return state.last is not None and state.last.causation_id == command_id and is_outcome(state.last)


async def _create(http: httpx.AsyncClient) -> str:
    chat = str(uuid.uuid4())
    answer = await http.post("/api/v1/sandboxes", json={"chat_id": chat})
    assert answer.status_code == 201, answer.text
    return chat


async def test_a_server_killed_under_load_loses_no_acknowledged_command(
    open_nats_cluster: NatsCluster,
    tmp_path: Path,
    docker_client: docker.DockerClient,
    node_id: str,
    node_containers: None,
) -> None:
    cluster = open_nats_cluster
    nc: Client = await cluster.connect()
    js = nc.jetstream(timeout=2)
    await cluster.ready(js)
    await ensure_topology(js, StreamSettings(replicas=3))
    env = sandboxd_env(
        cluster.url,
        make_sandbox_dirs(tmp_path),
        node_id,
        TOKEN,
        SANDBOXD_STREAMS_REPLICAS="3",
        SANDBOXD_API_WAIT_SECONDS="30",
    )
    runtime = spawn("services.runtime", env, tmp_path / "runtime.log")
    api = spawn("services.api", env, tmp_path / "api.log")
    http = httpx.AsyncClient(base_url=api_base(api), headers={"X-API-Token": TOKEN}, timeout=60)
    load = Load(js)
    running: asyncio.Task[None] | None = None
    try:
        await until_ready(api_base(api))
        running = asyncio.create_task(load.run(workers=4))
        await load.until_done(4, "the load under way")

        victim = await eventually(lambda: stream_leader(js, COMMANDS_STREAM), what="the commands stream's leader")
        assert victim is not None
        cluster.kill(cluster.index(victim))
        killed_at = load.done

        # Creates keep succeeding: once the cluster has chosen new leaders, every one does.
        after = [await eventually(lambda: _create(http), timeout=30, what="a create after the kill")]
        after += [await _create(http) for _ in range(3)]
        await load.until_done(killed_at + 4, "the load going on after the kill")
        load.stopping = True
        await running

        cluster.restart(cluster.index(victim))
        for stream in REPLICATED:
            await eventually(partial(is_current, js, stream, victim), timeout=30, what=f"{victim} current in {stream}")

        # Every command JetStream acknowledged has exactly one outcome.
        assert len(load.acknowledged) == 2 * len(load.chats)  # before, across and after the kill
        outcomes = await eventually(
            lambda: outcome_counts(js, load.chats),
            lambda counts: all(counts[c] for c in load.acknowledged),
            timeout=60,
            what="an outcome for every acknowledged command",
        )
        assert {c: outcomes[c] for c in load.acknowledged if outcomes[c] != 1} == {}
        for chat in itertools.chain(load.chats, after):
            await assert_consistent(js, docker_client, chat)
        for child in (runtime, api):  # both rode through the kill (and both did the work above)
            assert child.poll() is None, child.log.read_text()[-3000:]
    finally:
        load.stopping = True
        if running is not None and not running.done():
            running.cancel()
        await http.aclose()
        stop(api, runtime)
        await nc.close()
