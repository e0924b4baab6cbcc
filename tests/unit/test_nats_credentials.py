"""Seed files: created 0600 in a 0700 directory, reused (never rotated), refused with a clear
message naming the key when unusable."""

from __future__ import annotations

import os
import stat
from pathlib import Path

import nkeys
import pytest

from shared.config import ConfigError, load_settings
from shared.nats_credentials import (
    NkeyFileError,
    chat_seed_path,
    ensure_role_seeds,
    public_key,
    read_user_seed,
    role_seed_path,
    write_credentials,
)
from shared.nats_roles import Role

CHAT = "6f1c2a9e-4b7d-4e8a-9c3f-2d5e8b1a7c40"


def mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


def test_seeds_are_private_and_reused(tmp_path: Path) -> None:
    directory = tmp_path / "nats"
    first = ensure_role_seeds(directory)
    assert mode(directory) == 0o700
    for role in Role:
        assert mode(role_seed_path(directory, role)) == 0o600
        assert public_key(first[role]).startswith("U")
    role_seed_path(directory, Role.AGENT).chmod(0o644)
    directory.chmod(0o755)
    again = ensure_role_seeds(directory)
    assert again == first
    assert mode(role_seed_path(directory, Role.AGENT)) == 0o600
    assert mode(directory) == 0o700
    assert len(set(first.values())) == len(Role)


def test_users_file_lists_the_roles_and_the_chats_present(tmp_path: Path) -> None:
    credentials = write_credentials(tmp_path, (CHAT.upper(),))
    assert credentials.chats == (CHAT,)
    users = credentials.users_file.read_text()
    assert public_key(read_user_seed(chat_seed_path(tmp_path, CHAT))) in users
    assert public_key(read_user_seed(credentials.seed_file(Role.ADMIN))) in users
    chat_seed_path(tmp_path, CHAT).unlink()  # revoking a chat agent: delete its seed, regenerate
    assert write_credentials(tmp_path).chats == ()
    assert CHAT not in credentials.users_file.read_text()


@pytest.mark.parametrize(
    ("content", "needle"),
    [
        (None, "does not exist"),
        ("garbage\n", "not a NATS nkey seed"),
        (nkeys.encode_seed(os.urandom(32), nkeys.PREFIX_BYTE_ACCOUNT).decode(), "not a user nkey seed"),
    ],
)
def test_an_unusable_seed_file_is_a_startup_error_naming_the_key(
    tmp_path: Path, content: str | None, needle: str
) -> None:
    path = tmp_path / "role.nk"
    if content is not None:
        path.write_text(content)
    with pytest.raises(NkeyFileError, match=needle):
        read_user_seed(path)
    with pytest.raises(ConfigError) as caught:
        load_settings(environ={"SANDBOXD_NATS_NKEY_FILE": str(path)})
    assert "nats.nkey_file (SANDBOXD_NATS_NKEY_FILE)" in str(caught.value)
    assert str(path) in str(caught.value)
    assert needle in str(caught.value)


def test_a_directory_is_not_a_seed(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="cannot be read"):
        load_settings(environ={"SANDBOXD_NATS_NKEY_FILE": str(tmp_path)})


def test_an_existing_file_that_is_not_a_seed_is_not_replaced(tmp_path: Path) -> None:
    path = role_seed_path(tmp_path, Role.API)
    path.write_text("not a seed\n")
    with pytest.raises(NkeyFileError, match=str(path)):
        ensure_role_seeds(tmp_path)
    assert path.read_text() == "not a seed\n"
