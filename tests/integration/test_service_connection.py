"""A service's NATS connection ends with its block, also when the server is gone by then."""

from __future__ import annotations

from shared.config import NatsSettings
from shared.nats_connection import service_connection
from shared.nats_roles import Role
from tests.support.eventually import until
from tests.support.nats_server import NatsServer


async def test_a_connection_whose_server_is_gone_is_closed_when_its_block_ends(nats: NatsServer) -> None:
    async with service_connection(NatsSettings(url=nats.url), "test", role=Role.ADMIN) as nc:
        nats.stop()
        await until(lambda: nc.is_reconnecting, what="the client reconnecting")
    assert nc.is_closed, "left reconnecting to a server that is gone"
