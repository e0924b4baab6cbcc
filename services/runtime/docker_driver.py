"""The Docker engine adapter: start a session's container (idempotently, by name) and
remove it, list and inspect this node's containers, and follow the engine's event stream of
their deaths. docker-py is synchronous, so calls run on a small thread pool (the event stream
blocks a thread of its own); its exceptions are wrapped into sandboxd's error tree here and
nowhere else.

A container is started, stopped or removed only when its labels say it is the session's
(managed, chat, session and node): a container by another's name, or one named by a record,
is never touched. The chat directory is created for, and handed to, the sandbox's user."""

from __future__ import annotations

import asyncio
import logging
import os
import re
import stat
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, replace
from functools import partial
from pathlib import Path
from typing import Any, Protocol

import docker
import requests
from docker.errors import APIError, DockerException, ImageNotFound, NotFound
from docker.types import Mount as DockerMount

from services.runtime.containers import (
    LABEL_CHAT,
    LABEL_MANAGED,
    LABEL_NODE,
    LABEL_POOL,
    LABEL_POOL_OWNER,
    LABEL_SESSION,
    ContainerIdentity,
    ContainerSpec,
    Mount,
)
from services.runtime.create_gate import CreateGate
from services.runtime.slots import SlotMounts
from shared.config import DEFAULT_MAX_CONCURRENT_CREATES
from shared.errors import DockerUnavailable, SandboxPauseFailed, SandboxStartFailed, SandboxStopFailed
from shared.telemetry import Telemetry, elapsed_ms
from shared.telemetry import disabled as telemetry_disabled

log = logging.getLogger(__name__)

_RESULTS = {"create": "created", "stop": "stopped", "list_active": "listed"}
_HTTP_CONFLICT = 409
_HTTP_NOT_FOUND = 404


@dataclass(frozen=True, slots=True)
class ObservedContainer:
    """A managed container as `docker ps -a` shows it."""

    container_id: str
    name: str
    chat_id: str
    session_id: str
    state: str  # created, running, exited, dead, ...
    status: str  # Docker's human-readable status, e.g. "Exited (137) 3 seconds ago"
    node_id: str = ""
    pool: bool = False  # a warm container (its chat, once claimed, comes from its slot)
    pool_owner: str = ""  # the runtime instance keeping it warm

    @property
    def unclaimed_warm(self) -> bool:
        """A warm container no session has claimed yet: the pool's, nobody else's."""
        return self.pool and not self.chat_id

    @property
    def identity(self) -> ContainerIdentity:
        return ContainerIdentity(self.chat_id, self.session_id, self.node_id)


@dataclass(frozen=True, slots=True)
class ContainerEvent:
    """A managed container's `die`, `oom` or `destroy`, as the engine reported it."""

    action: str
    container_id: str
    name: str
    chat_id: str
    session_id: str
    node_id: str
    exit_code: int | None  # a `die`'s
    time_ns: int  # the engine's clock


@dataclass(frozen=True, slots=True)
class ExitState:
    """How a container that is not running ended, as `docker inspect` tells."""

    running: bool
    exit_code: int
    oom_killed: bool
    status: str  # Docker's state: exited, dead, running, ...


class ContainerEventStream(Protocol):
    """The engine's events as they happen: iterating blocks (run it in a thread of its own),
    ends when the engine goes away (DockerUnavailable, or simply the end), and `close()` from
    any thread ends it."""

    def __iter__(self) -> Iterator[ContainerEvent]: ...

    def close(self) -> None: ...


class ContainerEventSource(Protocol):
    """What the death watch needs of a container engine."""

    def open_events(self, node_id: str, since_ns: int | None) -> ContainerEventStream:
        """Start following this node's managed containers' deaths (blocking; DockerUnavailable
        when the engine does not answer); `since_ns` replays what the engine still holds from
        then on."""
        ...

    async def exit_state(self, container_id: str) -> ExitState | None:
        """How the container is now; None when it no longer exists."""
        ...

    async def list_managed(self, node_id: str) -> list[ObservedContainer]: ...

    async def remove(self, identity: ContainerIdentity, stop_timeout_seconds: int, ref: str | None = None) -> None: ...


class ContainerDriver(Protocol):
    """What the command handlers need from a container engine."""

    async def ensure_running(self, spec: ContainerSpec) -> str:
        """Start the spec's container (or find the one a retry already made); its id."""
        ...

    async def remove(self, identity: ContainerIdentity, stop_timeout_seconds: int, ref: str | None = None) -> None:
        """Stop and remove the session's container (by `ref`, default its name) if its labels
        say it is the session's; a missing one, or one that is not the session's, counts as
        removed (the latter is left alone)."""
        ...

    async def list_managed(self, node_id: str) -> list[ObservedContainer]:
        """This node's managed containers, in any state."""
        ...

    async def pause(self, identity: ContainerIdentity, ref: str | None = None) -> None:
        """Freeze the session's container (already paused: fine); SandboxPauseFailed when it
        is gone, not the session's, or Docker refuses."""
        ...

    async def unpause(self, identity: ContainerIdentity, ref: str | None = None) -> None:
        """Unfreeze it (already running: fine); errors as `pause`."""
        ...


def _unavailable(exc: Exception) -> DockerUnavailable:
    return DockerUnavailable(f"Docker engine unreachable: {exc}")


class DockerDriver:
    def __init__(
        self,
        client: docker.DockerClient,
        *,
        max_workers: int = 16,
        telemetry: Telemetry | None = None,
        events_client: Callable[[], docker.DockerClient] | None = None,
        slots: SlotMounts | None = None,
        max_concurrent_creates: int = DEFAULT_MAX_CONCURRENT_CREATES,
    ) -> None:
        self._client = client
        self._creates = CreateGate(max_concurrent_creates)  # see create_gate.py
        self.slots = slots  # where warm containers get their chat's directory; None: no pool
        # The event stream holds a connection for as long as it runs: one of its own when we
        # know how to make one, else one of the client's pool.
        self._events_client = events_client
        self._api = client.api
        self._pool = ThreadPoolExecutor(max_workers=max_workers, thread_name_prefix="docker")
        self._telemetry = telemetry or telemetry_disabled()
        self._id_offset: tuple[int, int] | None = None  # the engine's user-namespace remap

    @classmethod
    def from_env(
        cls,
        timeout_seconds: float,
        max_workers: int = 16,
        telemetry: Telemetry | None = None,
        slots: SlotMounts | None = None,
        max_concurrent_creates: int = DEFAULT_MAX_CONCURRENT_CREATES,
    ) -> DockerDriver:
        try:
            client = docker.DockerClient.from_env(timeout=int(timeout_seconds), max_pool_size=max_workers)
        except DockerException as exc:
            raise _unavailable(exc) from exc
        return cls(
            client,
            max_workers=max_workers,
            telemetry=telemetry,
            events_client=lambda: docker.DockerClient.from_env(max_pool_size=1),
            slots=slots,
            max_concurrent_creates=max_concurrent_creates,
        )

    async def _instrumented(
        self, operation: str, span_name: str, attributes: dict[str, str], fn: Any, *args: Any
    ) -> Any:
        """The seed's adapter span and metrics around one Docker operation."""
        metrics = self._telemetry.metrics
        started = time.perf_counter()
        result = "error"
        with self._telemetry.tracer.span(span_name, attributes) as span:
            try:
                value = await self._run(fn, *args)
            except Exception as exc:
                span.set_attribute("sandbox.result", result)
                metrics.increment(
                    "sandbox.runtime.error.total", {"operation": operation, "error.type": type(exc).__name__}
                )
                raise
            else:
                result = _RESULTS[operation]
                span.set_attribute("sandbox.result", result)
                if isinstance(value, str):
                    span.set_attribute("container.id", value)
                return value
            finally:
                metrics.record(
                    f"sandbox.runtime.{operation}.duration_ms",
                    elapsed_ms(started),
                    {"operation": operation, "result": result},
                )

    async def _run(self, fn: Any, *args: Any) -> Any:
        return await asyncio.get_running_loop().run_in_executor(self._pool, fn, *args)

    def close(self) -> None:
        self._pool.shutdown(wait=False, cancel_futures=True)
        self._client.close()

    async def ping(self) -> None:
        await self._run(self._ping)

    def _ping(self) -> None:
        try:
            self._api.ping()
        except (requests.exceptions.RequestException, DockerException) as exc:
            raise _unavailable(exc) from exc

    # ------------------------------------------------------------------ start

    async def ensure_running(self, spec: ContainerSpec) -> str:
        attributes = {"chat.id": spec.labels.get(LABEL_CHAT, ""), "session.id": spec.labels.get(LABEL_SESSION, "")}
        async with self._creates.turn(refill=spec.labels.get(LABEL_POOL) == "true"):
            result: str = await self._instrumented(
                "create", "adapter.docker.create_sandbox", attributes, self._ensure_running, spec
            )
        return result

    def _prepare_mounts(self, spec: ContainerSpec) -> list[DockerMount]:
        mounts: list[DockerMount] = []
        for m in spec.mounts:
            if m.create:
                prepare_owned_dir(m, self._host_id_offset())
            elif not m.source.is_dir():
                raise SandboxStartFailed(f"read-only mount source {m.source} ({m.setting}) does not exist")
            mounts.append(
                DockerMount(
                    target=m.target,
                    source=str(m.source),
                    type="bind",
                    read_only=m.read_only,
                    propagation=m.propagation,
                )
            )
        return mounts

    def _host_id_offset(self) -> tuple[int, int]:
        """(uid, gid) that container ids are shifted by on the host: non-zero when the engine
        remaps user namespaces (its root dir then ends in `<uid>.<gid>`)."""
        if self._id_offset is None:
            self._id_offset = userns_offset(self._info())
        return self._id_offset

    def _host_config(self, spec: ContainerSpec, mounts: list[DockerMount]) -> Any:
        return self._api.create_host_config(
            mounts=mounts,
            network_mode=spec.network_mode,
            cap_drop=["ALL"] if spec.cap_drop_all else None,
            security_opt=["no-new-privileges:true"] if spec.no_new_privileges else None,
            init=spec.init,
            read_only=spec.read_only_root,
            tmpfs={"/tmp": f"rw,noexec,nosuid,nodev,size={spec.tmpfs_size},mode=1777"},  # noqa: S108 - the sandbox's own /tmp
            pids_limit=spec.pids_limit,
            mem_limit=spec.memory_limit,
            nano_cpus=spec.nano_cpus,
            runtime=spec.oci_runtime,
        )

    def _ensure_running(self, spec: ContainerSpec) -> str:
        mounts = self._prepare_mounts(spec)
        try:
            try:
                created = self._api.create_container(
                    spec.image,
                    command=spec.command,
                    name=spec.name,
                    labels=spec.labels,
                    working_dir=spec.working_dir,
                    environment=spec.extra_env,
                    user=spec.user,
                    host_config=self._host_config(spec, mounts),
                    stop_signal="SIGTERM",
                )
                container_id: str = created["Id"]
            except ImageNotFound as exc:
                raise SandboxStartFailed(
                    f"image {spec.image!r} is not on this Docker engine: {exc.explanation}"
                ) from exc
            except APIError as exc:
                if exc.status_code != _HTTP_CONFLICT:
                    raise SandboxStartFailed(f"docker create failed: {exc.explanation or exc}") from exc
                # A retry of the same session finds its container by name, if it is the session's.
                found = self._inspect_for_retry(spec.name)
                labels = found.get("Config", {}).get("Labels") or {}
                if not spec.identity.matches(labels):
                    raise SandboxStartFailed(
                        f"a container named {spec.name} exists that is not this session's; it is left alone"
                    ) from exc
                container_id = found["Id"]
                if labels.get(LABEL_POOL) == "true" and spec.chat_mount is not None:
                    # A warm container claimed before a crash: its chat is attached again.
                    self._attach(spec)
            try:
                self._api.start(container_id)
            except APIError as exc:
                self._force_remove_quietly(container_id)
                raise SandboxStartFailed(f"docker start failed: {exc.explanation or exc}") from exc
            return container_id
        except (requests.exceptions.ConnectionError, requests.exceptions.Timeout) as exc:
            raise _unavailable(exc) from exc

    async def attach_warm(self, spec: ContainerSpec) -> None:
        """Give a running warm container the chat directory of `spec` (a session's spec)."""
        attributes = {"chat.id": spec.identity.chat_id, "session.id": spec.identity.session_id}
        with self._telemetry.tracer.span("adapter.docker.attach_warm", attributes):
            await self._run(self._attach, spec)

    def _attach(self, spec: ContainerSpec) -> None:
        chat = spec.chat_mount
        if self.slots is None or chat is None:
            raise SandboxStartFailed("a warm container needs sandbox.slots_root and a chat directory")
        prepare_owned_dir(chat, self._host_id_offset())
        self.slots.attach(spec.identity.session_id, chat.source, spec.identity.chat_id)

    def _release_slot(self, session_id: str) -> None:
        if self.slots is None:
            return
        try:
            self.slots.release(session_id)
        except (OSError, ValueError):
            log.warning("could not release the warm slot of session %s", session_id, exc_info=True)

    def _inspect_for_retry(self, name: str) -> dict[str, Any]:
        try:
            found: dict[str, Any] = self._api.inspect_container(name)
        except APIError as exc:  # it went away between the conflict and now, or Docker refused
            raise SandboxStartFailed(f"docker create of {name} conflicted, then inspect failed: {exc}") from exc
        return found

    def _force_remove_quietly(self, ref: str) -> None:
        try:
            self._api.remove_container(ref, force=True)
        except (DockerException, requests.exceptions.RequestException):
            log.warning("could not remove container %s after a failed start", ref, exc_info=True)

    # ------------------------------------------------------------------ stop

    async def remove(self, identity: ContainerIdentity, stop_timeout_seconds: int, ref: str | None = None) -> None:
        attributes = {"chat.id": identity.chat_id, "session.id": identity.session_id, "container.ref": ref or ""}
        await self._instrumented(
            "stop", "adapter.docker.stop_sandbox", attributes, self._remove, identity, ref, stop_timeout_seconds
        )

    def _remove(self, identity: ContainerIdentity, ref: str | None, stop_timeout_seconds: int) -> None:
        try:
            try:
                found = self._api.inspect_container(ref or identity.name)
            except NotFound:
                self._release_slot(identity.session_id)
                return
            if not identity.matches(found.get("Config", {}).get("Labels") or {}):
                log.warning(
                    "container %s is not session %s's (labels differ); left alone", ref or identity.name, identity
                )
                return
            ref = found["Id"]
            try:
                self._api.stop(ref, timeout=stop_timeout_seconds)
            except NotFound:
                self._release_slot(identity.session_id)
                return
            except APIError as exc:
                log.info("stop of %s failed (%s); removing by force", ref, exc.explanation)
            self._api.remove_container(ref, force=True)
            self._release_slot(identity.session_id)
        except NotFound:
            self._release_slot(identity.session_id)
            return
        except APIError as exc:
            if exc.status_code == _HTTP_CONFLICT and "already in progress" in str(exc.explanation):
                return
            raise SandboxStopFailed(f"docker remove of {ref} failed: {exc.explanation or exc}") from exc
        except (requests.exceptions.ConnectionError, requests.exceptions.Timeout) as exc:
            raise _unavailable(exc) from exc

    # ------------------------------------------------------------------ pause

    async def pause(self, identity: ContainerIdentity, ref: str | None = None) -> None:
        attributes = {"chat.id": identity.chat_id, "session.id": identity.session_id}
        with self._telemetry.tracer.span("adapter.docker.pause_sandbox", attributes):
            await self._run(partial(self._freeze, identity, ref, frozen=True))

    async def unpause(self, identity: ContainerIdentity, ref: str | None = None) -> None:
        attributes = {"chat.id": identity.chat_id, "session.id": identity.session_id}
        with self._telemetry.tracer.span("adapter.docker.unpause_sandbox", attributes):
            await self._run(partial(self._freeze, identity, ref, frozen=False))

    def _freeze(self, identity: ContainerIdentity, ref: str | None, *, frozen: bool) -> None:
        what = "pause" if frozen else "unpause"
        try:
            try:
                found = self._api.inspect_container(ref or identity.name)
            except NotFound as exc:
                raise SandboxPauseFailed(f"{what}: the container of session {identity.session_id} is gone") from exc
            if not identity.matches(found.get("Config", {}).get("Labels") or {}):
                raise SandboxPauseFailed(f"{what}: container {ref or identity.name} is not session {identity}'s")
            state = found.get("State") or {}
            if bool(state.get("Paused")) == frozen and state.get("Running"):
                return  # already so
            if frozen:
                self._api.pause(found["Id"])
            else:
                self._api.unpause(found["Id"])
        except APIError as exc:
            raise SandboxPauseFailed(
                f"docker {what} of {ref or identity.name} failed: {exc.explanation or exc}"
            ) from exc
        except (requests.exceptions.ConnectionError, requests.exceptions.Timeout) as exc:
            raise _unavailable(exc) from exc

    # ------------------------------------------------------------------ inspection

    async def list_managed(self, node_id: str) -> list[ObservedContainer]:
        result: list[ObservedContainer] = await self._instrumented(
            "list_active", "adapter.docker.list_active_sandboxes", {"node.id": node_id}, self._list_managed, node_id
        )
        return result

    def _list_managed(self, node_id: str) -> list[ObservedContainer]:
        try:
            rows: list[dict[str, Any]] = self._api.containers(
                all=True, filters={"label": [f"{LABEL_MANAGED}=true", f"{LABEL_NODE}={node_id}"]}
            )
        except (requests.exceptions.ConnectionError, requests.exceptions.Timeout) as exc:
            raise _unavailable(exc) from exc
        except APIError as exc:
            raise DockerUnavailable(f"listing containers failed: {exc.explanation or exc}") from exc
        return [
            ObservedContainer(
                container_id=row["Id"],
                name=(row.get("Names") or ["?"])[0].lstrip("/"),
                chat_id=self._chat_of(row["Labels"]),
                session_id=row["Labels"].get(LABEL_SESSION, ""),
                state=row.get("State", ""),
                status=row.get("Status", ""),
                node_id=row["Labels"].get(LABEL_NODE, ""),
                pool=row["Labels"].get(LABEL_POOL) == "true",
                pool_owner=row["Labels"].get(LABEL_POOL_OWNER, ""),
            )
            for row in rows
        ]

    def _chat_of(self, labels: dict[str, str]) -> str:
        """A container's chat: its label, or for a claimed warm container its slot's marker."""
        chat = labels.get(LABEL_CHAT)
        if chat is not None or labels.get(LABEL_POOL) != "true" or self.slots is None:
            return chat or ""
        try:
            return self.slots.chat_of(labels.get(LABEL_SESSION, "")) or ""
        except ValueError:
            return ""

    async def exit_state(self, container_id: str) -> ExitState | None:
        return await self._run(self._exit_state, container_id)  # type: ignore[no-any-return]

    def _exit_state(self, container_id: str) -> ExitState | None:
        try:
            state: dict[str, Any] = self._api.inspect_container(container_id).get("State") or {}
        except NotFound:
            return None
        except (requests.exceptions.ConnectionError, requests.exceptions.Timeout) as exc:
            raise _unavailable(exc) from exc
        except APIError as exc:
            raise DockerUnavailable(f"inspecting {container_id} failed: {exc.explanation or exc}") from exc
        return ExitState(
            running=bool(state.get("Running")),
            exit_code=int(state.get("ExitCode") or 0),
            oom_killed=bool(state.get("OOMKilled")),
            status=str(state.get("Status", "")),
        )

    # ------------------------------------------------------------------ events

    def open_events(self, node_id: str, since_ns: int | None) -> ContainerEventStream:
        client: docker.DockerClient | None = None
        try:
            client = self._events_client() if self._events_client is not None else None
        except DockerException as exc:
            raise _unavailable(exc) from exc
        api = client.api if client is not None else self._api
        try:
            raw = api.events(
                since=None if since_ns is None else since_ns // 1_000_000_000,
                filters={
                    "type": "container",
                    "event": list(FOLLOWED_ACTIONS),
                    "label": [f"{LABEL_MANAGED}=true", f"{LABEL_NODE}={node_id}"],
                },
                decode=True,
            )
        except (requests.exceptions.RequestException, DockerException) as exc:
            if client is not None:
                client.close()
            raise _unavailable(exc) from exc
        return _DockerEventStream(client, raw, self._chat_of)

    async def info(self) -> dict[str, Any]:
        """The engine's `docker info` (its runtimes, memory, root dir...)."""
        info: dict[str, Any] = await self._run(self._info)
        return info

    async def memory_bytes(self) -> int:
        """The engine's total memory (what `docker info` calls MemTotal)."""
        return int((await self._run(self._info)).get("MemTotal", 0))

    def _info(self) -> dict[str, Any]:
        try:
            info: dict[str, Any] = self._api.info()
        except (requests.exceptions.RequestException, DockerException) as exc:
            raise _unavailable(exc) from exc
        return info


FOLLOWED_ACTIONS = ("die", "oom", "destroy")


class _DockerEventStream:
    def __init__(self, client: docker.DockerClient | None, raw: Any, chat_of: Callable[[dict[str, str]], str]) -> None:
        self._client = client
        self._raw = raw
        self._chat_of = chat_of

    def __iter__(self) -> Iterator[ContainerEvent]:
        try:
            for raw in self._raw:
                event = container_event(raw)
                if event is not None and not event.chat_id:
                    attributes = (raw.get("Actor") or {}).get("Attributes") or {}
                    event = replace(event, chat_id=self._chat_of(attributes))
                if event is not None:
                    yield event
        except (requests.exceptions.RequestException, DockerException, OSError, ValueError) as exc:
            raise _unavailable(exc) from exc

    def close(self) -> None:
        try:
            self._raw.close()
        except (DockerException, OSError, AttributeError):  # already closed, or never fully open
            log.debug("closing the event stream", exc_info=True)
        if self._client is not None:
            self._client.close()


def container_event(raw: dict[str, Any]) -> ContainerEvent | None:
    """A followed action of a container from the engine's JSON; None for anything else."""
    action = str(raw.get("Action") or raw.get("status") or "")
    if raw.get("Type", "container") != "container" or action not in FOLLOWED_ACTIONS:
        return None
    actor = raw.get("Actor") or {}
    attributes: dict[str, str] = actor.get("Attributes") or {}
    container_id = str(actor.get("ID") or raw.get("id") or "")
    if not container_id:
        return None
    exit_code = attributes.get("exitCode")
    return ContainerEvent(
        action=action,
        container_id=container_id,
        name=attributes.get("name", ""),
        chat_id=attributes.get(LABEL_CHAT, ""),
        session_id=attributes.get(LABEL_SESSION, ""),
        node_id=attributes.get(LABEL_NODE, ""),
        exit_code=int(exit_code) if exit_code is not None and exit_code.lstrip("-").isdigit() else None,
        time_ns=int(raw.get("timeNano") or int(raw.get("time") or 0) * 1_000_000_000),
    )


def userns_offset(info: dict[str, Any]) -> tuple[int, int]:
    if not any("name=userns" in option for option in info.get("SecurityOptions") or []):
        return (0, 0)
    match = re.search(r"/(\d+)\.(\d+)/?$", str(info.get("DockerRootDir", "")))
    return (int(match.group(1)), int(match.group(2))) if match else (0, 0)


def prepare_owned_dir(mount: Mount, id_offset: tuple[int, int] = (0, 0)) -> None:
    """Create a writable mount source and hand it to its owner (the sandbox's user, as the
    host sees it under a user-namespace remap), mode 0700.

    A directory found with another owner (made by an older version, whose sandboxes ran as
    root) is handed over with everything in it, set-id bits stripped, so nothing a sandbox
    wrote earlier can gain privileges on the host."""
    try:
        mount.source.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
        mount.source.mkdir(mode=0o700, exist_ok=True)
        if mount.owner is None:
            return
        uid, gid = mount.owner[0] + id_offset[0], mount.owner[1] + id_offset[1]
        info = mount.source.lstat()
        if (info.st_uid, info.st_gid) != (uid, gid):
            _hand_over(mount.source, uid, gid)
    except OSError as exc:
        raise SandboxStartFailed(
            f"cannot prepare {mount.source} ({mount.setting}) for the sandbox's user: {exc}"
        ) from exc


_SET_ID_BITS = stat.S_ISUID | stat.S_ISGID


def prepare_chats_root(path: str) -> None:
    """Keep the chats root for its owner's eyes only (mode 0700): what sandboxes write there,
    set-id bits included, is then out of reach of every other host user. Sandboxes do not
    need it: each gets its own chat directory bind-mounted."""
    root = Path(path).resolve()
    root.mkdir(mode=0o700, parents=True, exist_ok=True)
    mode = stat.S_IMODE(root.stat().st_mode)
    if not mode & 0o077:
        return
    try:
        root.chmod(0o700)
    except OSError as exc:
        log.warning(
            "sandbox.chats_root %s has mode %o and cannot be made 700 (%s): other host users can reach what "
            "sandboxes write there",
            root,
            mode,
            exc,
        )
        return
    log.info("sandbox.chats_root %s had mode %o; made it 700", root, mode)


def _hand_over(root: Path, uid: int, gid: int) -> None:
    for directory, dirs, files in os.walk(root, followlinks=False):
        for name in [*dirs, *files]:
            path = os.path.join(directory, name)  # noqa: PTH118 - os.walk hands out strings
            info = os.lstat(path)
            if not stat.S_ISLNK(info.st_mode) and info.st_mode & _SET_ID_BITS:
                os.chmod(path, stat.S_IMODE(info.st_mode) & ~_SET_ID_BITS)  # noqa: PTH101
            os.lchown(path, uid, gid)
    os.chown(root, uid, gid)
    root.chmod(0o700)
