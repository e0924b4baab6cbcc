"""Building the default sandbox image locally from `infra/sandbox-image` and the host's
static busybox (Debian: busybox-static), since no image registry is assumed reachable."""

from __future__ import annotations

import hashlib
import io
import shutil
import struct
import tarfile
from pathlib import Path

import docker
from docker.errors import BuildError, ImageNotFound

IMAGE_CONTEXT = Path(__file__).resolve().parents[2] / "infra" / "sandbox-image"
# The digest of what the image was built from: an image built from an older Dockerfile (or
# another busybox) is rebuilt rather than used as found.
CONTEXT_LABEL = "sandboxd.image.context"
_PT_INTERP = 3


class ImageBuildError(Exception):
    pass


def is_static_elf(path: Path) -> bool:
    """True for an ELF executable without an interpreter (a static binary)."""
    data = path.read_bytes()
    if data[:4] != b"\x7fELF" or data[4] != 2:  # noqa: PLR2004 - 64-bit ELF only
        return False
    (phoff,) = struct.unpack_from("<Q", data, 0x20)
    phentsize, phnum = struct.unpack_from("<HH", data, 0x36)
    return all(struct.unpack_from("<I", data, phoff + i * phentsize)[0] != _PT_INTERP for i in range(phnum))


def find_static_busybox() -> Path:
    for candidate in ("/bin/busybox", "/usr/bin/busybox", shutil.which("busybox") or ""):
        path = Path(candidate)
        if candidate and path.is_file() and is_static_elf(path):
            return path
    raise ImageBuildError(
        "no static busybox found to build the sandbox image: install it with `apt-get install -y busybox-static`"
    )


def image_exists(client: docker.DockerClient, tag: str) -> bool:
    try:
        client.images.get(tag)
    except ImageNotFound:
        return False
    return True


def context_digest(busybox: Path) -> str:
    digest = hashlib.sha256((IMAGE_CONTEXT / "Dockerfile").read_bytes())
    digest.update(busybox.read_bytes())
    return digest.hexdigest()[:32]


def image_is_current(client: docker.DockerClient, tag: str, digest: str) -> bool:
    try:
        image = client.images.get(tag)
    except ImageNotFound:
        return False
    return bool((image.labels or {}).get(CONTEXT_LABEL) == digest)


def build_sandbox_image(client: docker.DockerClient, tag: str) -> str:
    """Build the image under `tag`; its id."""
    busybox = find_static_busybox()
    context = io.BytesIO()
    with tarfile.open(fileobj=context, mode="w") as tar:
        tar.add(IMAGE_CONTEXT / "Dockerfile", arcname="Dockerfile")
        tar.add(busybox, arcname="busybox")
    context.seek(0)
    try:
        image, _ = client.images.build(
            fileobj=context,
            custom_context=True,
            tag=tag,
            rm=True,
            forcerm=True,
            labels={CONTEXT_LABEL: context_digest(busybox)},
        )
    except BuildError as exc:
        raise ImageBuildError(f"building {tag} failed: {exc.msg}") from exc
    return str(image.id)


def ensure_sandbox_image(client: docker.DockerClient, tag: str) -> bool:
    """Build the image if it is missing or was built from another context; True when built."""
    if image_is_current(client, tag, context_digest(find_static_busybox())):
        return False
    build_sandbox_image(client, tag)
    return True
