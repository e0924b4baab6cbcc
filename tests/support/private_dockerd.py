"""A second, private Docker engine for tests that stop and start it (the shared engine
stays up). Same binary, its own socket, data root and exec root; no bridge, no iptables."""

from __future__ import annotations

import contextlib
import shutil
import subprocess
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import docker
import requests
from docker.errors import DockerException


@dataclass
class PrivateDockerd:
    root: Path
    extra_args: tuple[str, ...] = ()
    process: subprocess.Popen[bytes] | None = None

    @property
    def socket(self) -> Path:
        return self.root / "docker.sock"

    @property
    def base_url(self) -> str:
        return f"unix://{self.socket}"

    def client(self) -> docker.DockerClient:
        return docker.DockerClient(base_url=self.base_url, timeout=30)

    def start(self, timeout: float = 60.0) -> None:
        binary = shutil.which("dockerd")
        if binary is None:
            raise RuntimeError("dockerd is not installed")
        log = (self.root / "dockerd.log").open("ab")
        self.process = subprocess.Popen(
            [
                binary,
                "--data-root",
                str(self.root / "data"),
                "--exec-root",
                str(self.root / "exec"),
                "--pidfile",
                str(self.root / "docker.pid"),
                "-H",
                self.base_url,
                "--bridge=none",
                "--iptables=false",
                "--ip6tables=false",
                *self.extra_args,
            ],
            stdout=log,
            stderr=subprocess.STDOUT,
        )
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            try:
                client = self.client()
            except (DockerException, requests.exceptions.RequestException):
                time.sleep(0.2)
                continue
            try:
                client.ping()
            except (DockerException, requests.exceptions.RequestException):
                pass
            else:
                return
            finally:
                client.close()
            if self.process.poll() is not None:
                break
            time.sleep(0.2)
        self.stop()
        raise RuntimeError(f"private dockerd did not start: {(self.root / 'dockerd.log').read_text()[-2000:]}")

    def stop(self) -> None:
        if self.process is not None:
            self.process.terminate()
            try:
                self.process.wait(60)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
            self.process = None


@contextlib.contextmanager
def private_dockerd(root: Path, *extra_args: str) -> Iterator[PrivateDockerd]:
    root.mkdir(parents=True, exist_ok=True)
    engine = PrivateDockerd(root, extra_args)
    try:
        engine.start()
        yield engine
    finally:
        client = engine.client()
        with contextlib.suppress(DockerException):
            for container in client.containers.list(all=True):
                container.remove(force=True)
        client.close()
        engine.stop()


@contextlib.contextmanager
def private_dockerd_with_image(root: Path, image: str, *extra_args: str) -> Iterator[PrivateDockerd]:
    """A private engine that has the sandbox image (built there: engines share no images)."""
    from services.runtime.image import ensure_sandbox_image  # noqa: PLC0415 - only these tests build

    with private_dockerd(root, *extra_args) as engine:
        client = engine.client()
        try:
            ensure_sandbox_image(client, image)
        finally:
            client.close()
        yield engine
