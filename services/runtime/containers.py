"""What a session's container looks like: name, labels, mounts and the secure defaults.

Pure: the Docker driver turns a ContainerSpec into API calls. Everything that reaches
Docker comes from configuration and from the chat id of the command's subject; of a
session record only its (validated) session id, expiry and labels are used. A container is
touched only when its labels say it is the session's (`ContainerIdentity.matches`).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

from shared.config import SandboxSettings
from shared.contracts import SessionRecord
from shared.subjects import canonical_chat_id

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
class ContainerIdentity:
    """The session a container must belong to before sandboxd starts, stops or removes it."""

    chat_id: str
    session_id: str
    node_id: str

    @property
    def name(self) -> str:
        return container_name(self.session_id)

    def matches(self, labels: Mapping[str, str]) -> bool:
        return (
            labels.get(LABEL_MANAGED) == "true"
            and labels.get(LABEL_CHAT) == self.chat_id
            and labels.get(LABEL_SESSION) == self.session_id
            and labels.get(LABEL_NODE) == self.node_id
        )


@dataclass(frozen=True, slots=True)
class Mount:
    source: Path
    target: str
    read_only: bool
    setting: str  # the config key naming the source, for error messages
    create: bool = False
    owner: tuple[int, int] | None = None  # uid, gid a created source is handed to


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
    identity: ContainerIdentity
    user: str | None = None
    extra_env: dict[str, str] = field(default_factory=dict)


def sandbox_user(settings: SandboxSettings) -> tuple[int, int]:
    """(uid, gid) of `sandbox.user` (validated as `uid:gid` by the settings)."""
    uid, _, gid = settings.user.partition(":")
    return int(uid), int(gid or uid)


def container_spec(identity: ContainerIdentity, session: SessionRecord, settings: SandboxSettings) -> ContainerSpec:
    """The container of `session`, for the chat and node of `identity` (never the record's)."""
    if canonical_chat_id(identity.chat_id) != identity.chat_id:
        raise ValueError(f"not a canonical chat id: {identity.chat_id!r}")  # a host path is built from it
    labels = {
        LABEL_MANAGED: "true",
        LABEL_NODE: identity.node_id,
        LABEL_CHAT: identity.chat_id,
        LABEL_SESSION: identity.session_id,
        LABEL_EXPIRES: session.expires_at.isoformat(),
    }
    labels.update({f"{USER_LABEL_PREFIX}{k}": v for k, v in session.labels.items()})
    uid, gid = sandbox_user(settings)
    mounts = [
        Mount(
            Path(settings.chats_root).resolve() / identity.chat_id,
            settings.chat_mount_path,
            read_only=False,
            setting="sandbox.chats_root",
            create=True,
            owner=(uid, gid),
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
        name=identity.name,
        image=settings.image,
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
        identity=identity,
        user=f"{uid}:{gid}",
        extra_env={"SANDBOXD_CHAT_ID": identity.chat_id, "SANDBOXD_SESSION_ID": identity.session_id},
    )
