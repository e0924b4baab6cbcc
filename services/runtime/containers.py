"""What a session's container looks like: name, labels, mounts and the secure defaults.

Pure: the Docker driver turns a ContainerSpec into API calls. Everything that reaches
Docker comes from configuration and from the chat id of the command's subject; of a
session record only its (validated) session id, expiry and labels are used. A container is
touched only when its labels say it is the session's (`ContainerIdentity.matches`).
"""

from __future__ import annotations

import functools
import os
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath

from services.runtime.oci import AUTO
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
# A warm container: made ahead of any chat (so without chat, expiry or request labels; the
# session record holds those), owned by the runtime instance that keeps it warm.
LABEL_POOL = "sandboxd.pool"
LABEL_POOL_OWNER = "sandboxd.pool_owner"


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
        """A warm container carries no chat label (it was made before its chat was known):
        its session id, a fresh uuid handed to exactly one claim, identifies it."""
        chat = labels.get(LABEL_CHAT)
        return (
            labels.get(LABEL_MANAGED) == "true"
            and (chat == self.chat_id or (chat is None and labels.get(LABEL_POOL) == "true"))
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
    propagation: str | None = None  # a bind's propagation (a warm slot's: rslave)


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

    @property
    def chat_mount(self) -> Mount | None:
        """The chat's own (writable, created) directory, if the spec has one."""
        return next((m for m in self.mounts if m.create), None)


def sandbox_user(settings: SandboxSettings) -> tuple[int, int]:
    """(uid, gid) of `sandbox.user` (validated as `uid:gid` by the settings)."""
    uid, _, gid = settings.user.partition(":")
    return int(uid), int(gid or uid)


def container_spec(identity: ContainerIdentity, session: SessionRecord, settings: SandboxSettings) -> ContainerSpec:
    """The container of `session`, for the chat and node of `identity` (never the record's;
    chat_mount refuses a chat id that is not canonical)."""
    labels = {
        LABEL_MANAGED: "true",
        LABEL_NODE: identity.node_id,
        LABEL_CHAT: identity.chat_id,
        LABEL_SESSION: identity.session_id,
        LABEL_EXPIRES: session.expires_at.isoformat(),
    }
    labels.update({f"{USER_LABEL_PREFIX}{k}": v for k, v in session.labels.items()})
    env = {"SANDBOXD_CHAT_ID": identity.chat_id, "SANDBOXD_SESSION_ID": identity.session_id}
    return _spec(identity, labels, [chat_mount(identity, settings), *_shared_mounts(settings)], env, settings)


def chat_mount(identity: ContainerIdentity, settings: SandboxSettings) -> Mount:
    """The chat's own directory: created, handed to the sandbox's user, writable."""
    if canonical_chat_id(identity.chat_id) != identity.chat_id:
        raise ValueError(f"not a canonical chat id: {identity.chat_id!r}")  # a host path is built from it
    return Mount(
        resolved(settings.chats_root) / identity.chat_id,
        settings.chat_mount_path,
        read_only=False,
        setting="sandbox.chats_root",
        create=True,
        owner=sandbox_user(settings),
    )


def resolved(path: str) -> Path:
    """A configured host directory as an absolute, resolved path. A resolve is a syscall
    per path component: it is done once per directory (a relative one: per working
    directory), not on every create."""
    return _resolved(os.path.join(os.getcwd(), path))  # noqa: PTH109, PTH118 - a str key, one syscall


@functools.lru_cache(maxsize=64)
def _resolved(absolute: str) -> Path:
    return Path(absolute).resolve()


def _shared_mounts(settings: SandboxSettings) -> list[Mount]:
    return [
        Mount(
            resolved(settings.dependencies_host_path),
            settings.dependencies_mount_path,
            read_only=True,
            setting="sandbox.dependencies_host_path",
        ),
        Mount(
            resolved(settings.lambda_tools_host_path),
            settings.lambda_tools_mount_path,
            read_only=True,
            setting="sandbox.lambda_tools_host_path",
        ),
    ]


def _spec(
    identity: ContainerIdentity,
    labels: dict[str, str],
    mounts: list[Mount],
    env: dict[str, str],
    settings: SandboxSettings,
) -> ContainerSpec:
    uid, gid = sandbox_user(settings)
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
        # `auto` is resolved at start-up (oci.py); unresolved, the engine's default runtime.
        oci_runtime=None if settings.oci_runtime == AUTO else settings.oci_runtime,
        stop_timeout_seconds=settings.stop_timeout_seconds,
        identity=identity,
        user=f"{uid}:{gid}",
        extra_env=env,
    )


def warm_layout_blocker(settings: SandboxSettings) -> str | None:
    """Why warm containers cannot have this layout (their slot at the chat mount path's
    parent, see slots.py); None: they can."""
    chat = PurePosixPath(settings.chat_mount_path)
    parent = chat.parent
    if not chat.is_absolute() or parent == PurePosixPath("/") or chat.name in {"", ".", ".."}:
        return (
            f"sandbox.chat_mount_path {settings.chat_mount_path!r} has no directory of its own above it "
            "(a warm container binds its slot at the chat mount path's parent, e.g. /workspace for /workspace/chat)"
        )
    for mount in _shared_mounts(settings):
        target = PurePosixPath(mount.target)
        if target == parent or parent in target.parents or target in parent.parents:
            return (
                f"{mount.setting.replace('_host_path', '_mount_path')} {mount.target!r} overlaps "
                f"{parent} (the chat mount path's parent, where a warm container binds its slot)"
            )
    return None


def warm_spec(session_id: str, node_id: str, owner: str, slot: Path, settings: SandboxSettings) -> ContainerSpec:
    """A warm container for a session to come: every option of a session's container, its
    slot directory where the chat's will be (see slots.py), no chat yet. Its name and session
    label are those of the session that will claim it; the chat's id is not in its
    environment (it was not known when the container started)."""
    labels = {
        LABEL_MANAGED: "true",
        LABEL_NODE: node_id,
        LABEL_SESSION: session_id,
        LABEL_POOL: "true",
        LABEL_POOL_OWNER: owner,
    }
    # The slot at the chat mount path's parent; the claim mounts the chat's directory on the
    # slot's `<name>` directory (slots.py), so it appears at the chat mount path itself.
    parent = str(PurePosixPath(settings.chat_mount_path).parent)
    slot_mount = Mount(slot, parent, read_only=False, setting="sandbox.slots_root", propagation="rslave")
    identity = ContainerIdentity("", session_id, node_id)
    return _spec(identity, labels, [slot_mount, *_shared_mounts(settings)], {}, settings)
