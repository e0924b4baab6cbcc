"""A real 3-node nats-server 2.14 JetStream cluster on 127.0.0.1: random free client and route
ports, a temporary store per server, open (no authentication, as `nats_server` is) or secured
with the roles of `sandboxctl up` (the same renderer: accounts, users, one file per node).

A server can be killed (-9) and restarted on its own ports with its own store, so it rejoins
the cluster as a crashed machine would; `is_current` says when it has caught up.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from nats.aio.client import Client
from nats.js import JetStreamContext

from services.ctl.stack import wait_for_jetstream
from shared.config import NatsSettings
from shared.nats_connection import connect
from shared.nats_credentials import Credentials, write_credentials, write_private
from shared.nats_roles import Role
from shared.nats_server_config import ACCOUNTS_FILE, CLUSTER_NAME, ClusterNode, render_accounts, render_server
from tests.support.nats_server import NatsServer, free_port

CLUSTER_SIZE = 3


def _free_ports(count: int) -> list[int]:
    ports: set[int] = set()
    while len(ports) < count:
        ports.add(free_port())
    return sorted(ports)


@dataclass
class NatsCluster:
    nodes: tuple[ClusterNode, ...]
    servers: list[NatsServer]
    credentials: Credentials | None = None  # secured mode

    @property
    def urls(self) -> list[str]:
        return [server.url for server in self.servers]

    @property
    def url(self) -> str:
        """Every server, as `nats.url` (`SANDBOXD_NATS_URL`) takes them."""
        return ",".join(self.urls)

    def name(self, index: int) -> str:
        return self.nodes[index].name

    def index(self, name: str) -> int:
        return next(i for i, node in enumerate(self.nodes) if node.name == name)

    def seed_file(self, role: Role) -> Path:
        assert self.credentials is not None, "an open cluster has no credentials"
        return self.credentials.seed_file(role)

    def start(self) -> None:
        for i in range(len(self.servers)):
            self.restart(i)

    def kill(self, index: int) -> None:
        """kill -9: no goodbye to its peers or clients."""
        server = self.servers[index]
        assert server.process is not None, f"{self.name(index)} is not running"
        server.process.kill()
        server.process.wait()
        server.process = None

    def restart(self, index: int) -> None:
        """Start the server again on its ports, with its store (returns once it listens)."""
        self.servers[index].start()

    def stop(self) -> None:
        for server in self.servers:
            server.stop()

    def settings(self, role: Role | None = None) -> NatsSettings:
        """`nats` settings naming every server (and `role`'s seed in secured mode)."""
        return NatsSettings(url=self.url, nkey_file=str(self.seed_file(role)) if role is not None else None)

    async def connect(self, role: Role | None = None) -> Client:
        """A client of every server, connected as the processes connect (as `role` in secured
        mode): it moves to another server when its own goes."""
        return await connect(self.settings(role), "test", role=role)

    async def ready(self, js: JetStreamContext) -> None:
        """Until JetStream answers: a meta leader is elected."""
        await wait_for_jetstream(js)


def _nodes(size: int) -> tuple[ClusterNode, ...]:
    ports = _free_ports(2 * size)
    return tuple(ClusterNode(f"sandboxd-n{i + 1}", ports[i], ports[size + i]) for i in range(size))


def _open_server(directory: Path, node: ClusterNode, nodes: tuple[ClusterNode, ...]) -> NatsServer:
    routes = ",".join(f"nats-route://127.0.0.1:{n.cluster_port}" for n in nodes if n != node)
    args = (
        "--server_name",
        node.name,
        "--cluster_name",
        CLUSTER_NAME,
        "--cluster",
        f"nats://127.0.0.1:{node.cluster_port}",
        "--routes",
        routes,
    )
    return NatsServer(node.client_port, directory / node.name, args=args)


def _secured_server(
    directory: Path, node: ClusterNode, nodes: tuple[ClusterNode, ...], credentials: Credentials
) -> NatsServer:
    config = directory / "nats" / f"{node.name}.conf"
    store = directory / node.name
    write_private(
        config, render_server(server_name=node.name, port=node.client_port, store_dir=str(store), cluster=(node, nodes))
    )
    return NatsServer(node.client_port, store, config=config, credentials=credentials)


@contextlib.contextmanager
def nats_cluster(directory: Path, *, secured: bool = False, size: int = CLUSTER_SIZE) -> Iterator[NatsCluster]:
    """A running cluster (servers listening; await `ready` before using JetStream), stopped
    on the way out. Secured: the seeds, users.conf, accounts.conf and one file per node in
    `directory / "nats"`, as `sandboxctl up` writes them."""
    nodes = _nodes(size)
    credentials = None
    if secured:
        credentials = write_credentials(directory / "nats")
        write_private(directory / "nats" / ACCOUNTS_FILE, render_accounts())
        servers = [_secured_server(directory, node, nodes, credentials) for node in nodes]
    else:
        servers = [_open_server(directory, node, nodes) for node in nodes]
    cluster = NatsCluster(nodes, servers, credentials)
    try:
        cluster.start()
        yield cluster
    finally:
        cluster.stop()


async def stream_leader(js: JetStreamContext, stream: str) -> str | None:
    info = await js.stream_info(stream)
    return info.cluster.leader if info.cluster is not None else None


async def is_current(js: JetStreamContext, stream: str, name: str) -> bool:
    """Whether server `name` serves `stream` again: its leader, or a replica that has caught
    up (as the stream's leader reports it)."""
    info = await js.stream_info(stream)
    cluster = info.cluster
    if cluster is None or cluster.leader is None:
        return False
    if cluster.leader == name:
        return True
    return any(peer.name == name and peer.current for peer in cluster.replicas or [])
