"""NATS user nkeys on disk: one seed file per role (`<role>.nk`) and per chat-scoped agent
(`chat-<chat_id>.nk`), mode 0600 in a 0700 directory, created once and reused after that
(agents configured with a seed keep working across restarts)."""

from __future__ import annotations

import contextlib
import os
import re
import stat
from dataclasses import dataclass
from pathlib import Path

import nkeys

from shared.nats_roles import Role
from shared.nats_server_config import USERS_FILE, render_users
from shared.subjects import canonical_chat_id

SEED_SUFFIX = ".nk"
# Where `sandboxctl up` keeps the embedded server's seeds, config and JetStream store
# (relative to where it runs); `sandboxctl` falls back to its admin seed.
EMBEDDED_DIR = Path(".sandboxd") / "nats"
PRIVATE_FILE = 0o600
PRIVATE_DIR = 0o700
_CHAT_SEED = re.compile(r"^chat-([0-9a-f-]{36})\.nk$")


class NkeyFileError(Exception):
    """A seed file is missing, unreadable or not a NATS user seed; the message says which."""


def new_user_seed() -> str:
    return str(nkeys.encode_seed(os.urandom(32), nkeys.PREFIX_BYTE_USER).decode("ascii"))


def public_key(seed: str) -> str:
    """The user's public nkey (`U...`) of a seed; NkeyFileError if it is not a user seed."""
    try:
        pair = nkeys.from_seed(seed.strip().encode("ascii"))
        key = str(pair.public_key.decode("ascii"))
    except (nkeys.NkeysError, UnicodeError, ValueError, TypeError) as exc:
        raise NkeyFileError(f"not a NATS nkey seed ({type(exc).__name__})") from exc
    if not key.startswith("U"):
        raise NkeyFileError(f"not a user nkey seed (its public key starts with {key[:1]!r}, not 'U')")
    return key


def read_user_seed(path: str | Path) -> str:
    """The seed in `path` (validated); NkeyFileError naming the file otherwise."""
    file = Path(path)
    try:
        seed = file.read_text(encoding="ascii").strip()
    except FileNotFoundError:
        raise NkeyFileError(f"{file} does not exist") from None
    except (OSError, UnicodeError) as exc:
        raise NkeyFileError(f"{file} cannot be read: {exc}") from exc
    try:
        public_key(seed)
    except NkeyFileError as exc:
        raise NkeyFileError(f"{file} is {exc}") from None
    return seed


def ensure_private_dir(directory: Path) -> Path:
    directory.mkdir(parents=True, exist_ok=True)
    directory.chmod(PRIVATE_DIR)
    return directory


def write_private(path: Path, text: str) -> None:
    """Write `text` readable by the owner only, whatever the umask."""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, PRIVATE_FILE)
    with os.fdopen(fd, "w", encoding="utf-8") as out:
        os.fchmod(out.fileno(), PRIVATE_FILE)
        out.write(text)


def ensure_seed(path: Path) -> str:
    """The seed in `path`, created if missing. An existing file is reused (never rotated) and
    made 0600; one that is not a user seed is an error (delete it to get a new key)."""
    if path.exists():
        seed = read_user_seed(path)
        if stat.S_IMODE(path.stat().st_mode) != PRIVATE_FILE:
            path.chmod(PRIVATE_FILE)
        return seed
    seed = new_user_seed()
    write_private(path, seed + "\n")
    return seed


def role_seed_path(directory: Path, role: Role) -> Path:
    return directory / f"{role.value}{SEED_SUFFIX}"


def chat_seed_path(directory: Path, chat_id: str) -> Path:
    return directory / f"chat-{canonical_chat_id(chat_id)}{SEED_SUFFIX}"


def ensure_role_seeds(directory: Path) -> dict[Role, str]:
    """Every role's seed in `directory` (0700), created where missing."""
    ensure_private_dir(directory)
    return {role: ensure_seed(role_seed_path(directory, role)) for role in Role}


def chat_seeds(directory: Path) -> dict[str, str]:
    """chat_id -> seed of every `chat-<chat_id>.nk` in `directory`."""
    found: dict[str, str] = {}
    with contextlib.suppress(FileNotFoundError):
        for path in sorted(directory.iterdir()):
            match = _CHAT_SEED.match(path.name)
            if match is not None:
                found[canonical_chat_id(match.group(1))] = read_user_seed(path)
    return found


@dataclass(frozen=True, slots=True)
class Credentials:
    """The seed files of one NATS deployment and the users.conf made from them."""

    directory: Path
    users_file: Path
    chats: tuple[str, ...]

    def seed_file(self, role: Role) -> Path:
        return role_seed_path(self.directory, role)


def write_credentials(directory: Path, new_chats: tuple[str, ...] = ()) -> Credentials:
    """Seeds for every role and for `new_chats` (existing ones reused), and `users.conf` with
    every role and every `chat-<id>.nk` found in `directory` (delete one to revoke it)."""
    roles = ensure_role_seeds(directory)
    for chat in new_chats:
        ensure_seed(chat_seed_path(directory, chat))
    chats = chat_seeds(directory)
    users = directory / USERS_FILE
    write_private(
        users,
        render_users(
            {role: public_key(seed) for role, seed in roles.items()},
            {chat: public_key(seed) for chat, seed in chats.items()},
        ),
    )
    return Credentials(directory, users, tuple(chats))
