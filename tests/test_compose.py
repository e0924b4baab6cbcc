"""infra/compose.yaml (several Docker hosts against one NATS cluster) checked against what it names,
without Docker: every SANDBOXD_* variable of every service loads as a setting; the NATS servers are
the repository's cluster configs, routed to each other; every sandboxd process reaches all of them
with its own role's seed, with as many stream replicas as there are servers, and exports to the
collector; each runtime has its own node id and its own engine, which sees the sandbox paths where
the runtime names them. The mutation tests break the file in the ways that matter and require the
check to say so."""

from __future__ import annotations

import copy
import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import Any
from urllib.parse import urlsplit

import pytest
import yaml

from shared.config import ENV_PREFIX, ConfigError, Settings, load_settings
from shared.nats_credentials import role_seed_path, write_credentials
from shared.nats_infra import CLUSTER, INFRA_DIR
from shared.nats_roles import Role
from shared.nats_server_config import ACCOUNTS_FILE, USERS_FILE, ClusterNode

ROOT = Path(__file__).resolve().parents[1]
COMPOSE = ROOT / "infra" / "compose.yaml"
PROJECT_DIR = COMPOSE.parent  # Compose resolves relative paths from the file's directory

# Host variables the file requires (`${NAME:?...}`), with the value a user would export.
REQUIRED_HOST_VARIABLES = {"SANDBOXD_API_TOKEN": "compose-test-token"}

SANDBOXD_DOCKERFILE = "infra/Dockerfile"
SANDBOXD_IMAGE = "sandboxd:local"
NATS_CLIENTS = {
    ("python", "-m", "services.runtime"): Role.RUNTIME,
    ("python", "-m", "services.api"): Role.API,
    ("python", "-m", "services.reaper"): Role.REAPER,
    ("sandboxctl", "declare"): Role.ADMIN,
}
IMAGE_BUILDER = ("sandboxctl", "build-image")
SECRETS_DIR = PurePosixPath("/run/secrets")
OTLP_HTTP_ENDPOINT = "receivers::otlp::protocols::http::endpoint"
CONFIG_BY_FILE: dict[str, ClusterNode] = {f"cluster-{n.name.removeprefix('sandboxd-')}.conf": n for n in CLUSTER}

_VARIABLE = re.compile(r"\$(?:\$|\{(?P<name>[A-Za-z_][A-Za-z0-9_]*)(?:(?P<op>:?[-?])(?P<arg>[^}]*))?\})")


def interpolate(text: str, host: Mapping[str, str]) -> str:
    """Compose's `${NAME}`, `${NAME:-default}`, `${NAME:?error}` and `$$`, against `host`."""

    def value(match: re.Match[str]) -> str:
        if match.group(0) == "$$":
            return "$"
        name, op, arg = match.group("name"), match.group("op") or "", match.group("arg") or ""
        if host.get(name):
            return host[name]
        assert op in (":-", "-"), f"compose.yaml needs ${{{name}}} from the host and gives no default ({arg})"
        return arg

    return _VARIABLE.sub(value, text)


def load_compose(host: Mapping[str, str] = REQUIRED_HOST_VARIABLES) -> dict[str, Any]:
    document = yaml.safe_load(interpolate(COMPOSE.read_text(), host))
    assert isinstance(document, dict)
    return document


# --------------------------------------------------------------------------- reading services


@dataclass(frozen=True)
class Mount:
    source: str
    target: str
    read_only: bool

    @property
    def is_path(self) -> bool:
        return self.source.startswith(("./", "../", "/"))

    def host_path(self) -> Path:
        return (PROJECT_DIR / self.source).resolve()


def mounts(service: Mapping[str, Any]) -> list[Mount]:
    out = []
    for spec in service.get("volumes", []):
        assert isinstance(spec, str), f"only the short volume syntax is checked here: {spec!r}"
        source, target, *mode = spec.split(":")
        out.append(Mount(source, target, read_only=mode == ["ro"]))
    return out


def mount_at(service: Mapping[str, Any], target: str) -> Mount | None:
    return next((m for m in mounts(service) if m.target == target), None)


def environment(service: Mapping[str, Any]) -> dict[str, str]:
    env = service.get("environment") or {}
    assert isinstance(env, dict), "environment is written as a mapping"
    return {str(k): str(v) for k, v in env.items()}


def command(service: Mapping[str, Any]) -> tuple[str, ...]:
    cmd = service.get("command") or []
    assert isinstance(cmd, list), f"command is written as a list: {cmd!r}"
    return tuple(str(a) for a in cmd)


def flags(service: Mapping[str, Any]) -> dict[str, str]:
    """`--name=value` arguments (the last one of a name wins, as with nats-server)."""
    return dict(a.split("=", 1) for a in command(service) if a.startswith("--") and "=" in a)


def is_sandboxd(service: Mapping[str, Any]) -> bool:
    """A process of sandboxd's own image (infra/Dockerfile)."""
    build = service.get("build")
    built = isinstance(build, dict) and build.get("dockerfile") == SANDBOXD_DOCKERFILE
    return built or image(service) == SANDBOXD_IMAGE


def image(service: Mapping[str, Any]) -> str:
    return str(service.get("image", ""))


def of_image(doc: Mapping[str, Any], prefix: str, suffix: str = "") -> dict[str, dict[str, Any]]:
    return {
        name: s
        for name, s in doc["services"].items()
        if image(s).startswith(prefix) and image(s).endswith(suffix) and not is_sandboxd(s)
    }


def nats_servers(doc: Mapping[str, Any]) -> dict[str, dict[str, Any]]:
    return of_image(doc, "nats:")


def engines(doc: Mapping[str, Any]) -> dict[str, dict[str, Any]]:
    return of_image(doc, "docker:", "-dind")


def collectors(doc: Mapping[str, Any]) -> dict[str, dict[str, Any]]:
    return of_image(doc, "otel/opentelemetry-collector")


def sandboxd_roles(doc: Mapping[str, Any]) -> dict[str, Role | None]:
    """Every service of the project's image and the NATS role it connects as (None: none)."""
    out: dict[str, Role | None] = {}
    for name, service in doc["services"].items():
        if not is_sandboxd(service):
            continue
        cmd = command(service)
        assert cmd in NATS_CLIENTS or cmd == IMAGE_BUILDER, f"{name}: unknown sandboxd command {cmd}"
        out[name] = NATS_CLIENTS.get(cmd)
    return out


def settings_of(doc: Mapping[str, Any], name: str, seeds: Path) -> Settings:
    """The service's settings as its process would load them; its seed file (a secret, absent
    here) replaced by a real seed of the same file name."""
    env = environment(doc["services"][name])
    if "SANDBOXD_NATS_NKEY_FILE" in env:
        secret = PurePosixPath(env["SANDBOXD_NATS_NKEY_FILE"])
        assert secret.parent == SECRETS_DIR, f"{name}: the nkey seed is a secret under {SECRETS_DIR}"
        assert secret.name in doc["services"][name].get("secrets", []), f"{name}: does not mount {secret}"
        env["SANDBOXD_NATS_NKEY_FILE"] = str(seeds / PurePosixPath(doc["secrets"][secret.name]["file"]).name)
    try:
        return load_settings(environ=env)
    except ConfigError as exc:
        raise AssertionError(f"{name}: {exc}") from exc


# --------------------------------------------------------------------------- checks


def check_references(doc: Mapping[str, Any]) -> None:
    """What services name is declared: services they depend on, volumes, secrets, networks; and
    only sandboxd's own processes are given its settings."""
    services = doc["services"]
    for name, service in services.items():
        if not is_sandboxd(service):
            given = sorted(k for k in environment(service) if k.startswith(ENV_PREFIX))
            assert not given, f"{name}: {', '.join(given)} set on a service that is not sandboxd's"
        for dependency in service.get("depends_on", {}):
            assert dependency in services, f"{name} depends on {dependency}, not a service"
        for m in mounts(service):
            assert m.is_path or m.source in doc.get("volumes", {}), f"{name}: volume {m.source} is not declared"
        for secret in service.get("secrets", []):
            assert secret in doc.get("secrets", {}), f"{name}: secret {secret} is not declared"
        for network in service.get("networks", []):
            assert network in doc.get("networks", {}), f"{name}: network {network} is not declared"


def check_nats_cluster(doc: Mapping[str, Any]) -> tuple[set[str], Path]:
    """The servers are the repository's cluster-n*.conf, each once, listening beyond loopback and
    routed to all the others; their client URLs, and the directory their users.conf (and so the
    seeds) come from."""
    servers = nats_servers(doc)
    nodes: dict[str, ClusterNode] = {}
    credentials: set[Path] = set()
    for name, server in servers.items():
        config = PurePosixPath(flags(server).get("--config", ""))
        conf = mount_at(server, str(config))
        assert conf is not None, f"{name}: its --config {config} is not mounted"
        assert conf.host_path().parent == INFRA_DIR, f"{name}: {conf.source} is not one of infra/nats/"
        assert conf.host_path().name in CONFIG_BY_FILE, f"{name}: {conf.source} is not a cluster config"
        nodes[name] = CONFIG_BY_FILE[conf.host_path().name]
        accounts = mount_at(server, str(config.parent / ACCOUNTS_FILE))
        users = mount_at(server, str(config.parent / USERS_FILE))
        assert accounts is not None, f"{name}: {ACCOUNTS_FILE} is not mounted beside {config}"
        assert accounts.host_path() == INFRA_DIR / ACCOUNTS_FILE, f"{name}: {accounts.source} is not infra/nats's"
        assert users is not None, f"{name}: {USERS_FILE} is not mounted beside {config}"
        credentials.add(users.host_path().parent)  # the operator's: not in the repository
        for m in (conf, accounts, users):
            assert m.read_only, f"{name}: {m.source} is not mounted read-only"
        for m in (conf, accounts):
            assert m.host_path().is_file(), f"{name}: {m.source} does not exist in the repository"
    running = sorted(n.name for n in nodes.values())
    assert running == sorted(n.name for n in CLUSTER), (
        f"the NATS servers run {running}, not each of {[n.name for n in CLUSTER]} once"
    )
    assert len(credentials) == 1, f"the servers' users.conf come from several directories: {credentials}"
    for name, node in nodes.items():
        f = flags(servers[name])
        assert f.get("--addr") == "0.0.0.0", f"{name}: clients must reach it (--addr=0.0.0.0)"
        assert f.get("--cluster") == f"nats://0.0.0.0:{node.cluster_port}", f"{name}: --cluster is not its route port"
        routes = set(f.get("--routes", "").split(","))
        others = {f"nats-route://{other}:{nodes[other].cluster_port}" for other in nodes if other != name}
        assert routes == others, f"{name}: routes {sorted(routes)}, wanted the other servers {sorted(others)}"
    return {f"nats://{name}:{node.client_port}" for name, node in nodes.items()}, credentials.pop()


def collector_endpoints(doc: Mapping[str, Any]) -> set[str]:
    """OTLP/HTTP base URLs the collectors of the file answer on (beyond their loopback)."""
    out = set()
    for name, collector in collectors(doc).items():
        config_path = flags(collector).get("--config", "")
        config = mount_at(collector, config_path)
        assert config is not None, f"{name}: its --config {config_path} is not mounted"
        assert config.read_only, f"{name}: {config.source} is not mounted read-only"
        assert config.host_path().is_file(), f"{name}: {config.source} does not exist in the repository"
        loaded = yaml.safe_load(config.host_path().read_text())
        endpoint = str(loaded["receivers"]["otlp"]["protocols"]["http"]["endpoint"])
        sets = dict(a.removeprefix("--set=").split("=", 1) for a in command(collector) if a.startswith("--set="))
        endpoint = sets.get(OTLP_HTTP_ENDPOINT, endpoint)
        host, _, port = endpoint.rpartition(":")
        assert host not in ("127.0.0.1", "localhost"), f"{name}: OTLP/HTTP listens on {endpoint}, its loopback only"
        out.add(f"http://{name}:{port}")
    return out


def check_nats_clients(doc: Mapping[str, Any], seeds: Path) -> None:
    """Every process on NATS: all the servers' URLs, its own role's seed, replicas = servers,
    OTLP to the collector; and every sandboxd service's variables are settings."""
    urls, seeds_from = check_nats_cluster(doc)
    otlp = collector_endpoints(doc)
    roles = sandboxd_roles(doc)
    assert {Role.ADMIN, Role.API, Role.REAPER, Role.RUNTIME} <= set(roles.values()), (
        f"the layout runs declare (admin), the API, the reaper and runtimes: {roles}"
    )
    for name, role in roles.items():
        settings = settings_of(doc, name, seeds)
        if role is None:
            continue
        env = environment(doc["services"][name])
        listed = env.get("SANDBOXD_NATS_URL", "").split(",")
        assert len(listed) == len(set(listed)), f"{name}: a NATS URL is listed twice: {listed}"
        assert set(listed) == urls, f"{name}: SANDBOXD_NATS_URL lists {listed}, the servers are {sorted(urls)}"
        secret = PurePosixPath(env.get("SANDBOXD_NATS_NKEY_FILE", "")).name
        seed_file = (PROJECT_DIR / doc["secrets"][secret]["file"]).resolve() if secret else None
        wanted = role_seed_path(seeds_from, role)
        assert seed_file == wanted, f"{name} connects as {role.value}: its seed is {wanted}, not {seed_file}"
        assert settings.streams.replicas == len(urls), (
            f"{name}: streams.replicas is {settings.streams.replicas} on {len(urls)} NATS servers"
        )
        assert settings.telemetry.otlp_endpoint in otlp, (
            f"{name}: OTLP goes to {settings.telemetry.otlp_endpoint}, the collector answers on {sorted(otlp)}"
        )


def engine_of(doc: Mapping[str, Any], name: str) -> str:
    """The engine service a sandboxd service's DOCKER_HOST names (TLS with that engine's
    client certificate)."""
    service = doc["services"][name]
    env = environment(service)
    url = urlsplit(env.get("DOCKER_HOST", ""))
    engine = url.hostname or ""
    assert engine in engines(doc), f"{name}: DOCKER_HOST={env.get('DOCKER_HOST')} is not an engine of the file"
    assert (url.scheme, url.port, env.get("DOCKER_TLS_VERIFY")) == ("tcp", 2376, "1"), (
        f"{name}: talks to {engine} over TLS (tcp://{engine}:2376, DOCKER_TLS_VERIFY=1)"
    )
    theirs = mount_at(doc["services"][engine], "/certs/client")
    ours = mount_at(service, env.get("DOCKER_CERT_PATH", ""))
    assert theirs is not None, f"{engine}: its client certificate (/certs/client) is not on a volume"
    assert ours is not None, f"{name}: DOCKER_CERT_PATH is not mounted"
    assert ours.source == theirs.source, f"{name}: certificates from {ours.source}, not {engine}'s {theirs.source}"
    return engine


def check_docker_hosts(doc: Mapping[str, Any], seeds: Path) -> None:
    """At least two Docker hosts, each an engine with one runtime of its own node id, the image
    built there first, the sandbox paths shared with the engine, sandboxes network-less."""
    roles = sandboxd_roles(doc)
    runtimes = [name for name, role in roles.items() if role is Role.RUNTIME]
    builders = {engine_of(doc, name): name for name, role in roles.items() if role is None}
    node_ids: dict[str, str] = {}
    engine_by_runtime: dict[str, str] = {}
    chats_volumes: dict[str, str] = {}
    for name in runtimes:
        service = doc["services"][name]
        settings = settings_of(doc, name, seeds)
        assert "SANDBOXD_RUNTIME_NODE_ID" in environment(service), f"{name}: no SANDBOXD_RUNTIME_NODE_ID"
        node_ids[name] = settings.runtime.node_id
        assert settings.sandbox.network_mode == "none", f"{name}: sandboxes get network {settings.sandbox.network_mode}"
        engine = engine_of(doc, name)
        engine_by_runtime[name] = engine
        builder = builders.get(engine)
        assert builder is not None, f"{engine}: nothing builds the sandbox image there"
        assert service.get("depends_on", {}).get(builder) == {"condition": "service_completed_successfully"}, (
            f"{name} does not wait for {builder} to build the sandbox image"
        )
        for setting, path in (
            ("sandbox.chats_root", settings.sandbox.chats_root),
            ("sandbox.dependencies_host_path", settings.sandbox.dependencies_host_path),
            ("sandbox.lambda_tools_host_path", settings.sandbox.lambda_tools_host_path),
        ):
            ours, theirs = mount_at(service, path), mount_at(doc["services"][engine], path)
            assert ours is not None, f"{name}: {setting} {path} is not mounted"
            seen = theirs.source if theirs is not None else None
            assert seen == ours.source, f"{name}: {setting} {path} is not where {engine} sees the same directory"
            if setting == "sandbox.chats_root":
                chats_volumes[name] = ours.source
    assert len(runtimes) >= 2, f"two Docker hosts at least, each with a runtime: {runtimes}"
    assert len(set(node_ids.values())) == len(node_ids), f"runtimes share a node id: {node_ids}"
    assert len(set(engine_by_runtime.values())) == len(engine_by_runtime), (
        f"runtimes share an engine (one runtime per Docker host here): {engine_by_runtime}"
    )
    assert len(set(chats_volumes.values())) == len(chats_volumes), (
        f"Docker hosts share chat directories: {chats_volumes}"
    )


def check(doc: Mapping[str, Any], seeds: Path) -> None:
    check_references(doc)
    check_nats_clients(doc, seeds)
    check_docker_hosts(doc, seeds)


# --------------------------------------------------------------------------- tests


@pytest.fixture
def seeds(tmp_path: Path) -> Path:
    """Real seeds under the file names the compose secrets use."""
    directory = tmp_path / "nats"
    write_credentials(directory)
    return directory


def test_compose_file_matches_the_settings_and_infra_it_names(seeds: Path) -> None:
    check(load_compose(), seeds)


def test_a_required_host_variable_is_required() -> None:
    with pytest.raises(AssertionError, match="SANDBOXD_API_TOKEN"):
        load_compose(host={})


def _env(service: str, **values: str | None) -> Callable[[dict[str, Any]], None]:
    def mutate(doc: dict[str, Any]) -> None:
        env = doc["services"][service]["environment"]
        for key, value in values.items():
            if value is None:
                del env[key]
            else:
                env[key] = value

    return mutate


def _set(path: str, value: Any) -> Callable[[dict[str, Any]], None]:
    def mutate(doc: dict[str, Any]) -> None:
        *parents, last = path.split("/")
        node = doc
        for part in parents:
            node = node[part]
        if value is None:
            del node[last]
        else:
            node[last] = value

    return mutate


def _rename_env(service: str, old: str, new: str) -> Callable[[dict[str, Any]], None]:
    def mutate(doc: dict[str, Any]) -> None:
        env = doc["services"][service]["environment"]
        env[new] = env.pop(old)

    return mutate


def _both(*mutations: Callable[[dict[str, Any]], None]) -> Callable[[dict[str, Any]], None]:
    def mutate(doc: dict[str, Any]) -> None:
        for one in mutations:
            one(doc)

    return mutate


def _replace_in_list(path: str, old: str, new: str) -> Callable[[dict[str, Any]], None]:
    def mutate(doc: dict[str, Any]) -> None:
        items: Any = doc
        for part in path.split("/"):
            items = items[part]
        assert old in items, f"the mutation does not apply: {old!r} is not in {path}"
        items[items.index(old)] = new

    return mutate


def _runtime_b_on_engine_a(doc: dict[str, Any]) -> None:
    """runtime-b wired exactly as runtime-a but for its node id."""
    doc["services"]["runtime-b"] = copy.deepcopy(doc["services"]["runtime-a"])
    doc["services"]["runtime-b"]["environment"]["SANDBOXD_RUNTIME_NODE_ID"] = "node-b"


TWO_URLS = "nats://nats-n1:4222,nats://nats-n2:4223"
MUTATIONS: dict[str, tuple[Callable[[dict[str, Any]], None], str]] = {
    "a URL removed": (_env("api", SANDBOXD_NATS_URL=TWO_URLS), "SANDBOXD_NATS_URL lists"),
    "a URL listed twice": (
        _env("reaper", SANDBOXD_NATS_URL=TWO_URLS + ",nats://nats-n3:4224,nats://nats-n1:4222"),
        "listed twice",
    ),
    "a URL with another port": (
        _env("runtime-b", SANDBOXD_NATS_URL=TWO_URLS + ",nats://nats-n3:4222"),
        "SANDBOXD_NATS_URL lists",
    ),
    "a duplicated node id": (_env("runtime-b", SANDBOXD_RUNTIME_NODE_ID="node-a"), "share a node id"),
    "a node id left to the host name": (
        _env("runtime-a", SANDBOXD_RUNTIME_NODE_ID=None),
        "no SANDBOXD_RUNTIME_NODE_ID",
    ),
    "a misspelled variable": (
        _rename_env("reaper", "SANDBOXD_STREAMS_REPLICAS", "SANDBOXD_STREAM_REPLICAS"),
        "unknown configuration variable SANDBOXD_STREAM_REPLICAS",
    ),
    "a misspelled variable of a non-NATS service": (
        _env("image-a", SANDBOXD_SANDBOX_IMAGES="x"),
        "unknown configuration variable",
    ),
    "an invalid value": (_env("api", SANDBOXD_HTTP_PORT="http"), "http.port"),
    "fewer replicas than servers": (_env("declare", SANDBOXD_STREAMS_REPLICAS="1"), "streams.replicas is 1"),
    "another role's seed": (
        _set("services/runtime-a/secrets", ["nats-admin"]),
        "does not mount",
    ),
    "another role's seed, mounted": (
        _both(
            _set("services/runtime-a/secrets", ["nats-admin"]),
            _env("runtime-a", SANDBOXD_NATS_NKEY_FILE="/run/secrets/nats-admin"),
        ),
        "connects as runtime",
    ),
    "a misspelled seed file": (
        _set("secrets/nats-api/file", "../.sandboxd/compose-nats/apu.nk"),
        "api: nats.nkey_file",
    ),
    "a server removed": (_set("services/nats-n3", None), "nats-n3, not a service"),
    "a server and what depends on it removed": (
        _both(_set("services/nats-n3", None), _set("services/declare/depends_on/nats-n3", None)),
        "NATS servers run",
    ),
    "a config not in the repository": (
        _replace_in_list(
            "services/nats-n2/volumes",
            "./nats/cluster-n2.conf:/etc/nats/cluster-n2.conf:ro",
            "./cluster-n2.conf:/etc/nats/cluster-n2.conf:ro",
        ),
        "not one of infra/nats",
    ),
    "a config mounted writable": (
        _replace_in_list(
            "services/nats-n1/volumes",
            "./nats/accounts.conf:/etc/nats/accounts.conf:ro",
            "./nats/accounts.conf:/etc/nats/accounts.conf",
        ),
        "read-only",
    ),
    "one config on two servers": (
        _replace_in_list(
            "services/nats-n3/volumes",
            "./nats/cluster-n3.conf:/etc/nats/cluster-n3.conf:ro",
            "./nats/cluster-n1.conf:/etc/nats/cluster-n3.conf:ro",
        ),
        "each of",
    ),
    "a route missing": (
        _replace_in_list(
            "services/nats-n2/command",
            "--routes=nats-route://nats-n1:6222,nats-route://nats-n3:6224",
            "--routes=nats-route://nats-n1:6222",
        ),
        "routes",
    ),
    "a server on its loopback": (
        _replace_in_list("services/nats-n1/command", "--addr=0.0.0.0", "--addr=127.0.0.1"),
        "--addr",
    ),
    "DOCKER_HOST at no engine": (_env("runtime-b", DOCKER_HOST="tcp://engine-c:2376"), "not an engine"),
    "two runtimes on one engine": (_runtime_b_on_engine_a, "share an engine"),
    "another engine's certificate": (
        _replace_in_list(
            "services/runtime-a/volumes", "engine-a-certs:/certs/client:ro", "engine-b-certs:/certs/client:ro"
        ),
        "certificates from",
    ),
    "the chats root where the engine does not see it": (
        _env("runtime-a", SANDBOXD_SANDBOX_CHATS_ROOT="/var/lib/sandboxd/chats"),
        "sandbox.chats_root",
    ),
    "no image built on an engine": (
        _both(_set("services/image-b", None), _set("services/runtime-b/depends_on/image-b", None)),
        "engine-b: nothing builds the sandbox image",
    ),
    "a runtime that does not wait for its image": (
        _set("services/runtime-a/depends_on/image-a", None),
        "runtime-a does not wait for image-a",
    ),
    "a setting given to a process that reads none": (
        _set("services/engine-a/environment/SANDBOXD_RUNTIME_NODE_ID", "node-a"),
        "engine-a: SANDBOXD_RUNTIME_NODE_ID",
    ),
    "sandboxes with a network": (_env("runtime-a", SANDBOXD_SANDBOX_NETWORK_MODE="bridge"), "network bridge"),
    "OTLP to no collector": (
        _env("reaper", SANDBOXD_TELEMETRY_OTLP_ENDPOINT="http://collector:4318"),
        "OTLP goes to",
    ),
    "OTLP to the gRPC port": (
        _env("runtime-a", SANDBOXD_TELEMETRY_OTLP_ENDPOINT="http://otel-collector:4317"),
        "OTLP goes to",
    ),
    "the collector on its loopback": (
        _replace_in_list(
            "services/otel-collector/command", "--set=receivers::otlp::protocols::http::endpoint=0.0.0.0:4318", "--x"
        ),
        "loopback",
    ),
    "an undeclared volume": (_set("volumes/chats-b", None), "not declared"),
    "an unknown command": (_set("services/reaper/command", ["python", "-m", "services.reapr"]), "unknown sandboxd"),
}


@pytest.mark.parametrize("mutation", sorted(MUTATIONS))
def test_a_broken_compose_file_fails_the_check(seeds: Path, mutation: str) -> None:
    mutate, message = MUTATIONS[mutation]
    doc = copy.deepcopy(load_compose())
    mutate(doc)
    with pytest.raises(AssertionError, match=message):
        check(doc, seeds)
