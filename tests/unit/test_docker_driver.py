"""The Docker driver's pure helpers."""

from __future__ import annotations

import stat
from pathlib import Path

from services.runtime.containers import Mount
from services.runtime.docker_driver import prepare_owned_dir, userns_offset


def test_a_user_namespace_remap_shifts_the_host_ids() -> None:
    plain = {"SecurityOptions": ["name=seccomp,profile=default"], "DockerRootDir": "/var/lib/docker"}
    remapped = {
        "SecurityOptions": ["name=seccomp,profile=default", "name=userns"],
        "DockerRootDir": "/var/lib/docker/165536.165536",
    }
    assert userns_offset(plain) == (0, 0)
    assert userns_offset(remapped) == (165536, 165536)
    assert userns_offset({"SecurityOptions": ["name=userns"], "DockerRootDir": "/srv/docker"}) == (0, 0)


def test_a_chat_directory_is_created_private(tmp_path: Path) -> None:
    source = tmp_path / "chats" / "c"
    prepare_owned_dir(Mount(source, "/workspace/chat", read_only=False, setting="sandbox.chats_root", create=True))
    assert stat.S_IMODE(source.stat().st_mode) == 0o700
    assert stat.S_IMODE(source.parent.stat().st_mode) == 0o700
