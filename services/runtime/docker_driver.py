"""The Docker engine adapter: start a session's container (idempotently, by name) and
remove it. docker-py is synchronous, so calls run on a small thread pool; its exceptions
are wrapped into sandboxd's error tree here and nowhere else."""

from __future__ import annotations

import asyncio
import logging
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any, Protocol

import docker
import requests
from docker.errors import APIError, DockerException, ImageNotFound, NotFound
from docker.types import Mount as DockerMount

from services.runtime.containers import LABEL_CHAT, LABEL_MANAGED, LABEL_NODE, LABEL_SESSION, ContainerSpec
from shared.errors import DockerUnavailable, SandboxStartFailed, SandboxStopFailed
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


class ContainerDriver(Protocol):
    """What the command handlers need from a container engine."""

    async def ensure_running(self, spec: ContainerSpec) -> str:
        """Start the spec's container (or find the one a retry already made); its id."""
        ...

    async def remove(self, ref: str, stop_timeout_seconds: int) -> None:
        """Stop and remove a container by id or name; a missing one counts as removed."""
        ...

    async def list_managed(self, node_id: str) -> list[ObservedContainer]:
        """This node's managed containers, in any state."""
        ...


def _unavailable(exc: Exception) -> DockerUnavailable:
    return DockerUnavailable(f"Docker engine unreachable: {exc}")


class DockerDriver:
    def __init__(
        self, client: docker.DockerClient, *, max_workers: int = 16, telemetry: Telemetry | None = None
    ) -> None:
        self._client = client
        self._api = client.api
        self._pool = ThreadPoolExecutor(max_workers=max_workers, thread_name_prefix="docker")
        self._telemetry = telemetry or telemetry_disabled()

    @classmethod
    def from_env(
        cls, timeout_seconds: float, max_workers: int = 16, telemetry: Telemetry | None = None
    ) -> DockerDriver:
        try:
            client = docker.DockerClient.from_env(timeout=int(timeout_seconds), max_pool_size=max_workers)
        except DockerException as exc:
            raise _unavailable(exc) from exc
        return cls(client, max_workers=max_workers, telemetry=telemetry)

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
        result: str = await self._instrumented(
            "create", "adapter.docker.create_sandbox", attributes, self._ensure_running, spec
        )
        return result

    def _prepare_mounts(self, spec: ContainerSpec) -> list[DockerMount]:
        mounts: list[DockerMount] = []
        for m in spec.mounts:
            if m.create:
                try:
                    m.source.mkdir(parents=True, exist_ok=True)
                except OSError as exc:
                    raise SandboxStartFailed(f"cannot create {m.source} ({m.setting}): {exc}") from exc
            elif not m.source.is_dir():
                raise SandboxStartFailed(f"read-only mount source {m.source} ({m.setting}) does not exist")
            mounts.append(DockerMount(target=m.target, source=str(m.source), type="bind", read_only=m.read_only))
        return mounts

    def _host_config(self, spec: ContainerSpec, mounts: list[DockerMount]) -> Any:
        return self._api.create_host_config(
            mounts=mounts,
            network_mode=spec.network_mode,
            cap_drop=["ALL"] if spec.cap_drop_all else None,
            security_opt=["no-new-privileges:true"] if spec.no_new_privileges else None,
            init=spec.init,
            read_only=spec.read_only_root,
            tmpfs={"/tmp": f"rw,noexec,nosuid,size={spec.tmpfs_size}"},  # noqa: S108 - the sandbox's own /tmp
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
                # A retry of the same session: the container by this name is ours.
                container_id = self._api.inspect_container(spec.name)["Id"]
            try:
                self._api.start(container_id)
            except APIError as exc:
                self._force_remove_quietly(container_id)
                raise SandboxStartFailed(f"docker start failed: {exc.explanation or exc}") from exc
            return container_id
        except (requests.exceptions.ConnectionError, requests.exceptions.Timeout) as exc:
            raise _unavailable(exc) from exc

    def _force_remove_quietly(self, ref: str) -> None:
        try:
            self._api.remove_container(ref, force=True)
        except (DockerException, requests.exceptions.RequestException):
            log.warning("could not remove container %s after a failed start", ref, exc_info=True)

    # ------------------------------------------------------------------ stop

    async def remove(self, ref: str, stop_timeout_seconds: int) -> None:
        attributes = {"container.ref": ref}
        await self._instrumented(
            "stop", "adapter.docker.stop_sandbox", attributes, self._remove, ref, stop_timeout_seconds
        )

    def _remove(self, ref: str, stop_timeout_seconds: int) -> None:
        try:
            try:
                self._api.stop(ref, timeout=stop_timeout_seconds)
            except NotFound:
                return
            except APIError as exc:
                log.info("stop of %s failed (%s); removing by force", ref, exc.explanation)
            self._api.remove_container(ref, force=True)
        except NotFound:
            return
        except APIError as exc:
            if exc.status_code == _HTTP_CONFLICT and "already in progress" in str(exc.explanation):
                return
            raise SandboxStopFailed(f"docker remove of {ref} failed: {exc.explanation or exc}") from exc
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
                chat_id=row["Labels"].get(LABEL_CHAT, ""),
                session_id=row["Labels"].get(LABEL_SESSION, ""),
                state=row.get("State", ""),
                status=row.get("Status", ""),
            )
            for row in rows
        ]
