"""Typed configuration: defaults, then a TOML file, then `SANDBOXD_<SECTION>_<KEY>` variables.

The file is named by `SANDBOXD_CONFIG` (or passed explicitly). Every key has an environment
variable made of its section and name, e.g. `http.port` is `SANDBOXD_HTTP_PORT` and
`api.token` is `SANDBOXD_API_TOKEN`. A bad or unknown key fails start-up with a ConfigError
that names it.
"""

from __future__ import annotations

import difflib
import os
import re
import socket
import tomllib
from collections.abc import Mapping
from pathlib import Path
from typing import Annotated, Any, Literal

import msgspec

from shared.failpoints import FAILPOINT_ENV
from shared.nats_credentials import NkeyFileError, read_user_seed

ENV_PREFIX = "SANDBOXD_"
CONFIG_FILE_ENV = "SANDBOXD_CONFIG"
NKEY_FILE_KEY = "nats.nkey_file (SANDBOXD_NATS_NKEY_FILE)"

MAX_PORT = 65535
Port = Annotated[int, msgspec.Meta(ge=0, le=MAX_PORT)]
PositiveSeconds = Annotated[float, msgspec.Meta(gt=0)]
PositiveInt = Annotated[int, msgspec.Meta(ge=1)]
MAX_EMBEDDED_CLUSTER_SIZE = 5


class ConfigError(Exception):
    """Start-up configuration is invalid; the message names the key."""


def _hostname() -> str:
    return re.sub(r"[^A-Za-z0-9_.\-]", "-", socket.gethostname())[:48] or "node"


class NatsSettings(msgspec.Struct, frozen=True, kw_only=True, forbid_unknown_fields=True):
    # One server URL, or several comma-separated (the servers of a cluster: the client picks
    # one and moves to another when it goes). Unset: `sandboxctl up` starts the embedded
    # server(s) on 127.0.0.1:embedded_port (and the next ports in cluster mode).
    url: str | None = None
    embedded_port: Port = 4222
    # Servers of the embedded stack: 1 (a single server) or a 3- or 5-node JetStream cluster
    # on loopback, clients on embedded_port, +1, ..., routes on embedded_cluster_port, +1, ...
    embedded_cluster_size: Annotated[int, msgspec.Meta(ge=1, le=MAX_EMBEDDED_CLUSTER_SIZE)] = 1
    embedded_cluster_port: Port = 6222
    connect_timeout_seconds: PositiveSeconds = 5.0
    request_timeout_seconds: PositiveSeconds = 5.0
    # The NATS user nkey seed this process connects with (`.sandboxd/nats/<role>.nk`, written
    # by `sandboxctl up` / `sandboxctl nats-credentials`); unset: no authentication.
    nkey_file: str | None = None


class StreamSettings(msgspec.Struct, frozen=True, kw_only=True, forbid_unknown_fields=True):
    replicas: Annotated[int, msgspec.Meta(ge=1, le=5)] = 1
    commands_duplicate_window_seconds: Annotated[float, msgspec.Meta(ge=120)] = 120.0
    commands_max_age_seconds: PositiveSeconds = 24 * 3600.0
    events_duplicate_window_seconds: Annotated[float, msgspec.Meta(ge=120)] = 600.0
    # Bounded: unconsumed commands beyond this are refused at publish (nothing accepted is dropped).
    commands_max_bytes: Annotated[int, msgspec.Meta(ge=1024 * 1024)] = 256 * 1024 * 1024
    events_max_age_seconds: Annotated[float, msgspec.Meta(ge=0)] = 30 * 24 * 3600.0
    # Oldest events go first when the stream is full; keep it large (a quiet live chat's last
    # event is its state). -1: unbounded.
    events_max_bytes: Annotated[int, msgspec.Meta(ge=-1)] = 4 * 1024 * 1024 * 1024
    # A chat keeps its newest events only, so no chat can grow the stream without bound and a
    # chat's latest event is never dropped for its own history.
    events_max_msgs_per_subject: Annotated[int, msgspec.Meta(ge=10)] = 1000
    # How long `sandbox_handled` remembers that a command had its outcome (no command id is
    # carried out twice within it); at least commands_max_age_seconds, so no redelivery
    # outlives it.
    handled_max_age_seconds: PositiveSeconds = 7 * 24 * 3600.0
    # How long `sandbox_idempotency` keeps an HTTP request sent with an Idempotency-Key and
    # its answer (from the last write: the answer); the contract promises at least 24 h.
    idempotency_max_age_seconds: Annotated[float, msgspec.Meta(ge=24 * 3600)] = 24 * 3600.0


class HttpSettings(msgspec.Struct, frozen=True, kw_only=True, forbid_unknown_fields=True):
    host: str = "127.0.0.1"
    port: Port = 8123
    # A request body that has not fully arrived within this is answered 408 (slow senders).
    body_timeout_seconds: PositiveSeconds = 10.0


class ApiSettings(msgspec.Struct, frozen=True, kw_only=True, forbid_unknown_fields=True):
    token: str | None = None
    token_header: Annotated[str, msgspec.Meta(pattern=r"^[A-Za-z0-9-]+$")] = "X-API-Token"  # noqa: S105 - a header name
    wait_seconds: PositiveSeconds = 30.0


class SandboxSettings(msgspec.Struct, frozen=True, kw_only=True, forbid_unknown_fields=True):
    image: str = "sandboxd-sandbox:latest"
    command: list[str] = msgspec.field(default_factory=lambda: ["sleep", "infinity"])
    ttl_seconds: PositiveInt = 3600
    max_ttl_seconds: PositiveInt = 7 * 24 * 3600
    # No keepalive moves expires_at past created_at + this.
    max_lifetime_seconds: PositiveInt = 7 * 24 * 3600
    # uid:gid the sandbox's processes run as (numeric: the chat directory is handed to it).
    user: Annotated[str, msgspec.Meta(pattern=r"^[0-9]{1,10}(:[0-9]{1,10})?$")] = "10001:10001"
    chats_root: str = ".sandboxd/chats"
    dependencies_host_path: str = ".sandboxd/dependencies"
    lambda_tools_host_path: str = ".sandboxd/lambda-tools"
    chat_mount_path: str = "/workspace/chat"
    dependencies_mount_path: str = "/opt/dependencies"
    lambda_tools_mount_path: str = "/opt/lambda-tools"
    network_mode: str = "none"
    cap_drop_all: bool = True
    no_new_privileges: bool = True
    init: bool = True
    read_only_root: bool = True
    tmpfs_size: str = "64m"
    # The container's pids limit. Under gVisor it counts the sandbox's host threads (about 45
    # idle, some 7 to 10 more per process), and reaching it ends the whole sandbox: 1024
    # leaves room for about 120 processes there (under runc: 1024 tasks).
    pids_limit: PositiveInt = 1024
    memory_limit: Annotated[str, msgspec.Meta(pattern=r"^[0-9]+[bkmgBKMG]?$")] = "512m"
    cpus: Annotated[float, msgspec.Meta(gt=0)] = 1.0
    # The OCI runtime sandboxes run under: `auto` is gVisor (`runsc`) when the Docker engine
    # lists it, else runc; a name the engine does not list stops start-up. The warm pool works
    # only under runtimes that see host mounts in a running container (runc, crun): under
    # gVisor it is off (start-up logs why) and every create is cold.
    oci_runtime: Annotated[str, msgspec.Meta(pattern=r"^[A-Za-z0-9][A-Za-z0-9_.\-]{0,127}$")] = "auto"
    stop_timeout_seconds: Annotated[int, msgspec.Meta(ge=0)] = 2
    # Warm containers each runtime keeps started ahead of any chat: a create takes one and
    # gets its chat's directory attached (a host bind mount into the slot the container
    # binds with rslave propagation) instead of waiting for docker create + start. Each costs
    # an idle container (memory: what `sleep` uses). 0: every create is cold. Needs root
    # (mounts); without it the runtime logs why and creates cold.
    warm_pool_size: Annotated[int, msgspec.Meta(ge=0, le=1000)] = 4
    # Where warm containers' slot directories live (made a shared mount point of its own).
    slots_root: str = ".sandboxd/slots"
    # Idle timeout of a session whose create names none (0: none). Activity: a create that
    # reuses or resumes it, a keepalive, a resume.
    idle_ttl_seconds: Annotated[int, msgspec.Meta(ge=0, le=30 * 24 * 3600)] = 0
    # What idleness does: stop the session, or pause it (then stopped after paused_ttl_seconds).
    on_idle: Literal["stop", "pause"] = "stop"
    paused_ttl_seconds: PositiveInt = 24 * 3600
    # An `expiring` event this long before a session's deadline (lifetime, idle, paused); 0: none.
    expiry_warning_seconds: Annotated[int, msgspec.Meta(ge=0)] = 60
    # Activity is recorded at most once per chat per this (a reuse over HTTP within it is
    # answered without writing anything), so an idle stop comes at least idle_ttl_seconds
    # after the last recorded activity and at most this much less after the very last.
    activity_interval_seconds: PositiveSeconds = 5.0


# An engine makes only so many containers a second however many it is given at once (see
# services/runtime/create_gate.py).
DEFAULT_MAX_CONCURRENT_CREATES = 4


class RuntimeSettings(msgspec.Struct, frozen=True, kw_only=True, forbid_unknown_fields=True):
    node_id: Annotated[str, msgspec.Meta(pattern=r"^[A-Za-z0-9_.\-]{1,64}$")] = msgspec.field(default_factory=_hostname)
    max_in_flight: PositiveInt = 32
    # Container creates this runtime has in the engine at once; more wait their turn, a
    # session's before a warm pool refill (stops and the rest are not held behind them).
    max_concurrent_creates: PositiveInt = DEFAULT_MAX_CONCURRENT_CREATES
    # Live sessions this node may hold; 0: the engine's memory divided by sandbox.memory_limit.
    max_sessions: Annotated[int, msgspec.Meta(ge=0)] = 0
    # A command redelivered this often (transient failures, another node's session) ends with
    # a `failed` outcome instead of another try.
    max_deliveries: Annotated[int, msgspec.Meta(ge=2, le=10_000)] = 100
    # A claim (provisioning/stopping) older than this is presumed abandoned and taken over:
    # the backstop for claims whose instance is unknown (written before instances heartbeated,
    # or while its heartbeat cannot be read).
    claim_timeout_seconds: PositiveSeconds = 120.0
    # A runtime instance whose heartbeat in `sandbox_instances` is this old (or gone) is dead:
    # its claims are taken over at once (whatever their age; the claim timeout frees any claim
    # older than itself). It heartbeats five times within this.
    instance_dead_after_seconds: PositiveSeconds = 5.0
    # A node (Docker host) whose runtimes have all been silent this long is dead: its live
    # sessions become `lost {reason: node_lost}` and new sessions are placed elsewhere; when it
    # returns it removes their containers. At least instance_dead_after_seconds.
    node_dead_after_seconds: PositiveSeconds = 30.0
    # A command whose runtime goes silent is redelivered after this; a runtime keeps every
    # command it works on in progress five times within it (long Docker calls, waits).
    ack_wait_seconds: PositiveSeconds = 4.0
    docker_timeout_seconds: PositiveSeconds = 60.0
    # Rebuild sandbox_sessions from the event stream before consuming commands.
    replay_on_start: bool = True
    # Node reconciliation (Docker containers of this node against the registry).
    reconcile_enabled: bool = True
    reconcile_interval_seconds: PositiveSeconds = 30.0
    # Consecutive observations before a destructive reconciliation step (lost, orphan).
    reconcile_confirmations: PositiveInt = 2
    # Kill switch of the death watch: follow the engine's events and record a running
    # session whose container dies as `lost` at once (reconciliation stays the backstop).
    death_watch_enabled: bool = True


class ReaperSettings(msgspec.Struct, frozen=True, kw_only=True, forbid_unknown_fields=True):
    reaper_id: Annotated[str, msgspec.Meta(pattern=r"^[A-Za-z0-9_.\-]{1,64}$")] = msgspec.field(
        default_factory=lambda: f"{_hostname()}-{os.getpid()}"
    )
    # Kill switches, one per mechanism.
    expiry_enabled: bool = True
    redrive_enabled: bool = True
    # A provisioning/stopping session unchanged for this long is re-driven with a stop.
    redrive_grace_seconds: PositiveSeconds = 180.0
    tick_seconds: PositiveSeconds = 1.0
    status_interval_seconds: PositiveSeconds = 5.0


class SupervisorSettings(msgspec.Struct, frozen=True, kw_only=True, forbid_unknown_fields=True):
    """How `sandboxctl up` keeps its children (nats-server, runtime, reaper, API) running."""

    # Restarts of one child allowed within the window; one more death stops the whole stack.
    max_restarts: Annotated[int, msgspec.Meta(ge=0)] = 5
    restart_window_seconds: PositiveSeconds = 60.0
    # Back-off before a restart: this, doubled for every death within the window, capped.
    restart_backoff_seconds: PositiveSeconds = 0.5
    restart_backoff_max_seconds: PositiveSeconds = 10.0


class TelemetrySettings(msgspec.Struct, frozen=True, kw_only=True, forbid_unknown_fields=True):
    # OTLP/HTTP collector base URL (e.g. http://127.0.0.1:4318); unset: no export, no span processing.
    otlp_endpoint: str | None = None
    log_level: Annotated[str, msgspec.Meta(pattern=r"^(DEBUG|INFO|WARNING|ERROR)$")] = "INFO"
    # Prometheus text endpoints of the runtime and the reaper (the API serves /metrics itself); 0: off.
    metrics_host: str = "127.0.0.1"
    runtime_metrics_port: Port = 9464
    reaper_metrics_port: Port = 9465
    status_interval_seconds: PositiveSeconds = 5.0


class Settings(msgspec.Struct, frozen=True, kw_only=True, forbid_unknown_fields=True):
    nats: NatsSettings = msgspec.field(default_factory=NatsSettings)
    streams: StreamSettings = msgspec.field(default_factory=StreamSettings)
    http: HttpSettings = msgspec.field(default_factory=HttpSettings)
    api: ApiSettings = msgspec.field(default_factory=ApiSettings)
    sandbox: SandboxSettings = msgspec.field(default_factory=SandboxSettings)
    runtime: RuntimeSettings = msgspec.field(default_factory=RuntimeSettings)
    reaper: ReaperSettings = msgspec.field(default_factory=ReaperSettings)
    supervisor: SupervisorSettings = msgspec.field(default_factory=SupervisorSettings)
    telemetry: TelemetrySettings = msgspec.field(default_factory=TelemetrySettings)


def env_name(section: str, key: str) -> str:
    return f"{ENV_PREFIX}{section}_{key}".upper()


def _sections() -> dict[str, type[msgspec.Struct]]:
    return {f.name: f.type for f in msgspec.structs.fields(Settings)}


def _env_overrides(environ: Mapping[str, str]) -> dict[str, dict[str, Any]]:
    known: dict[str, tuple[str, str]] = {}
    for section, struct in _sections().items():
        for field in msgspec.structs.fields(struct):
            known[env_name(section, field.name)] = (section, field.name)
    overrides: dict[str, dict[str, Any]] = {}
    for name, raw in environ.items():
        if not name.startswith(ENV_PREFIX) or name in (CONFIG_FILE_ENV, FAILPOINT_ENV):
            continue
        if name not in known:
            close = difflib.get_close_matches(name, known, n=1)
            hint = f"; did you mean {close[0]}?" if close else " (the README's configuration table lists them)"
            raise ConfigError(f"unknown configuration variable {name}{hint}")
        section, key = known[name]
        overrides.setdefault(section, {})[key] = _parse_env_value(raw)
    return overrides


def _parse_env_value(raw: str) -> Any:
    """Lists and objects are written as JSON; everything else is taken as a string and
    converted by the field's type (so `8123` becomes an int where an int is expected)."""
    text = raw.strip()
    if text.startswith(("[", "{")):
        try:
            return msgspec.json.decode(text)
        except msgspec.DecodeError:
            return raw
    return raw


def _source_of(path: str, environ: Mapping[str, str], file: Path | None) -> str:
    """'SANDBOXD_HTTP_PORT (http.port)' for a msgspec error path like '$.http.port'."""
    parts = [p for p in re.split(r"[.\[\]]", path.removeprefix("$")) if p]
    if len(parts) >= 2:  # noqa: PLR2004 - section and key
        var = env_name(parts[0], parts[1])
        dotted = ".".join(parts)
        where = var if var in environ else (f"{file}" if file else "defaults")
        return f"{dotted} (from {where}; variable {var})"
    return path


def load_settings(path: str | Path | None = None, environ: Mapping[str, str] | None = None) -> Settings:
    env = os.environ if environ is None else environ
    file = Path(path) if path is not None else (Path(env[CONFIG_FILE_ENV]) if env.get(CONFIG_FILE_ENV) else None)
    data: dict[str, dict[str, Any]] = {}
    if file is not None:
        try:
            loaded = tomllib.loads(file.read_text())
        except OSError as exc:
            raise ConfigError(f"{CONFIG_FILE_ENV}: cannot read config file {file}: {exc}") from exc
        except tomllib.TOMLDecodeError as exc:
            raise ConfigError(f"config file {file} is not valid TOML: {exc}") from exc
        for section, values in loaded.items():
            if not isinstance(values, dict):
                raise ConfigError(f"config file {file}: {section} must be a [section] table")
            data[section] = dict(values)
    for section, values in _env_overrides(env).items():
        data.setdefault(section, {}).update(values)
    try:
        settings = msgspec.convert(data, Settings, strict=False)
    except msgspec.ValidationError as exc:
        message = str(exc)
        match = re.search(r" - at `(\$[^`]*)`", message)
        if match is None:
            raise ConfigError(f"invalid configuration: {message}") from exc
        where = _source_of(match.group(1), env, file)
        raise ConfigError(f"invalid configuration value for {where}: {message[: match.start()]}") from exc
    _check_relations(settings)
    return _embedded_cluster_replicas(settings, data.get("streams", {}))


def _check_nkey_file(settings: NatsSettings) -> None:
    """A seed file that is missing or not a seed stops start-up here, naming the key."""
    if settings.nkey_file is not None:
        try:
            read_user_seed(settings.nkey_file)
        except NkeyFileError as exc:
            raise ConfigError(f"{NKEY_FILE_KEY}: {exc}") from exc


def _check_nats(settings: NatsSettings) -> None:
    url_key = f"nats.url ({env_name('nats', 'url')})"
    if settings.url is not None:
        urls = settings.url.split(",")
        if not all(url.strip() for url in urls):
            raise ConfigError(f"{url_key} = {settings.url!r}: an empty server URL in the comma-separated list")
        if any(any(c.isspace() for c in url.strip()) for url in urls):
            raise ConfigError(f"{url_key} = {settings.url!r}: server URLs are separated by commas, not spaces")
    size = settings.embedded_cluster_size
    size_key = f"nats.embedded_cluster_size ({env_name('nats', 'embedded_cluster_size')}={size})"
    if size % 2 == 0:
        raise ConfigError(
            f"{size_key} must be odd (1, 3 or 5): a JetStream cluster needs a majority of its servers, "
            f"so {size} servers survive no more losses than {size - 1}"
        )
    for name, port in (
        ("embedded_port", settings.embedded_port),
        ("embedded_cluster_port", settings.embedded_cluster_port),
    ):
        if port + size - 1 > MAX_PORT:
            raise ConfigError(
                f"nats.{name} ({env_name('nats', name)}={port}) leaves no room for {size} servers "
                f"(ports {port}..{port + size - 1}; {size_key})"
            )
    if size > 1:
        clients = set(range(settings.embedded_port, settings.embedded_port + size))
        routes = set(range(settings.embedded_cluster_port, settings.embedded_cluster_port + size))
        if clients & routes:
            raise ConfigError(
                f"nats.embedded_port ({env_name('nats', 'embedded_port')}={settings.embedded_port}) and "
                f"nats.embedded_cluster_port ({env_name('nats', 'embedded_cluster_port')}="
                f"{settings.embedded_cluster_port}) overlap for {size} servers ({size_key})"
            )


def _embedded_cluster_replicas(settings: Settings, given: Mapping[str, Any]) -> Settings:
    """With the embedded cluster, streams and buckets default to one replica per server
    (unless `streams.replicas` was given)."""
    nats = settings.nats
    if nats.url is not None or nats.embedded_cluster_size == 1 or "replicas" in given:
        return settings
    streams = msgspec.structs.replace(settings.streams, replicas=nats.embedded_cluster_size)
    return msgspec.structs.replace(settings, streams=streams)


def check_embedded_replicas(settings: Settings) -> None:
    """The embedded stack cannot give a stream more replicas than it has servers."""
    size, replicas = settings.nats.embedded_cluster_size, settings.streams.replicas
    if replicas > size:
        raise ConfigError(
            f"streams.replicas ({env_name('streams', 'replicas')}={replicas}) exceeds "
            f"nats.embedded_cluster_size ({env_name('nats', 'embedded_cluster_size')}={size}): a stream cannot "
            f"have more replicas than there are servers; set {env_name('nats', 'embedded_cluster_size')}="
            f"{replicas if replicas % 2 else replicas + 1} or lower the replicas"
        )


def _check_relations(settings: Settings) -> None:
    """Constraints between keys, each message naming both; files a key names must be usable."""
    _check_nkey_file(settings.nats)
    _check_nats(settings.nats)
    if settings.sandbox.max_ttl_seconds > settings.sandbox.max_lifetime_seconds:
        raise ConfigError(
            f"sandbox.max_ttl_seconds ({env_name('sandbox', 'max_ttl_seconds')}={settings.sandbox.max_ttl_seconds}) "
            f"must not exceed sandbox.max_lifetime_seconds ({env_name('sandbox', 'max_lifetime_seconds')}="
            f"{settings.sandbox.max_lifetime_seconds})"
        )
    if settings.sandbox.ttl_seconds > settings.sandbox.max_ttl_seconds:
        raise ConfigError(
            f"sandbox.ttl_seconds ({env_name('sandbox', 'ttl_seconds')}={settings.sandbox.ttl_seconds}) must not "
            f"exceed sandbox.max_ttl_seconds ({env_name('sandbox', 'max_ttl_seconds')}="
            f"{settings.sandbox.max_ttl_seconds})"
        )
    streams = settings.streams
    if streams.handled_max_age_seconds < streams.commands_max_age_seconds:
        raise ConfigError(
            f"streams.handled_max_age_seconds ({env_name('streams', 'handled_max_age_seconds')}="
            f"{streams.handled_max_age_seconds:g}) must be at least streams.commands_max_age_seconds "
            f"({env_name('streams', 'commands_max_age_seconds')}={streams.commands_max_age_seconds:g}): a command "
            "redelivered after its record expired could be carried out twice"
        )
    runtime = settings.runtime
    if runtime.node_dead_after_seconds < runtime.instance_dead_after_seconds:
        raise ConfigError(
            f"runtime.node_dead_after_seconds ({env_name('runtime', 'node_dead_after_seconds')}="
            f"{runtime.node_dead_after_seconds:g}) must be at least runtime.instance_dead_after_seconds "
            f"({env_name('runtime', 'instance_dead_after_seconds')}={runtime.instance_dead_after_seconds:g}): "
            "a node is dead only when all its instances are"
        )
    if settings.reaper.redrive_grace_seconds <= settings.runtime.claim_timeout_seconds:
        raise ConfigError(
            f"reaper.redrive_grace_seconds ({env_name('reaper', 'redrive_grace_seconds')}="
            f"{settings.reaper.redrive_grace_seconds:g}) must exceed runtime.claim_timeout_seconds "
            f"({env_name('runtime', 'claim_timeout_seconds')}={settings.runtime.claim_timeout_seconds:g}): "
            "a re-drive before the claim timeout would only wait on the claim"
        )
