"""What a session's container looks like: name, labels, mounts and the secure defaults.

Pure: the Docker driver turns a ContainerSpec into API calls.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from shared.config import SandboxSettings
from shared.contracts import SessionRecord

CONTAINER_PREFIX = "sandboxd-"
LABEL_MANAGED = "sandboxd.managed"
LABEL_NODE = "sandboxd.node_id"
LABEL_CHAT = "sandboxd.chat_id"
LABEL_SESSION = "sandboxd.session_id"
LABEL_EXPIRES = "sandboxd.expires_at"
USER_LABEL_PREFIX = "sandboxd.label."


def container_name(session_id: str) -> str:
    return f"{CONTAINER_PREFIX}{session_id}"


@dataclass(frozen=True, slots=True)
class Mount:
    source: Path
    target: str
    read_only: bool
    setting: str  # the config key naming the source, for error messages
    create: bool = False


@dataclass(frozen=True, slots=True)
class ContainerSpec:
    name: str
    image: str
    command: list[str]
    labels: dict[str, str]
    mounts: list[Mount]
    working_dir: str
    network_mode: str
    cap_drop_all: bool
    no_new_privileges: bool
    init: bool
    read_only_root: bool
    tmpfs_size: str
    pids_limit: int
    memory_limit: str
    nano_cpus: int
    oci_runtime: str | None
    stop_timeout_seconds: int
    extra_env: dict[str, str] = field(default_factory=dict)


def container_spec(session: SessionRecord, settings: SandboxSettings) -> ContainerSpec:
    labels = {
        LABEL_MANAGED: "true",
        LABEL_NODE: session.node_id,
        LABEL_CHAT: session.chat_id,
        LABEL_SESSION: session.session_id,
        LABEL_EXPIRES: session.expires_at.isoformat(),
    }
    labels.update({f"{USER_LABEL_PREFIX}{k}": v for k, v in session.labels.items()})
    mounts = [
        Mount(
            Path(settings.chats_root).resolve() / session.chat_id,
            settings.chat_mount_path,
            read_only=False,
            setting="sandbox.chats_root",
            create=True,
        ),
        Mount(
            Path(settings.dependencies_host_path).resolve(),
            settings.dependencies_mount_path,
            read_only=True,
            setting="sandbox.dependencies_host_path",
        ),
        Mount(
            Path(settings.lambda_tools_host_path).resolve(),
            settings.lambda_tools_mount_path,
            read_only=True,
            setting="sandbox.lambda_tools_host_path",
        ),
    ]
    return ContainerSpec(
        name=container_name(session.session_id),
        image=session.image,
        command=list(settings.command),
        labels=labels,
        mounts=mounts,
        working_dir=settings.chat_mount_path,
        network_mode=settings.network_mode,
        cap_drop_all=settings.cap_drop_all,
        no_new_privileges=settings.no_new_privileges,
        init=settings.init,
        read_only_root=settings.read_only_root,
        tmpfs_size=settings.tmpfs_size,
        pids_limit=settings.pids_limit,
        memory_limit=settings.memory_limit,
        nano_cpus=int(settings.cpus * 1e9),
        oci_runtime=settings.oci_runtime,
        stop_timeout_seconds=settings.stop_timeout_seconds,
        extra_env={"SANDBOXD_CHAT_ID": session.chat_id, "SANDBOXD_SESSION_ID": session.session_id},
    )
