"""Declaring the topology against a real nats-server: idempotent, and loud on conflicts."""

from __future__ import annotations

import logging

import nats
import pytest
from nats.aio.client import Client
from nats.js.api import RetentionPolicy, StreamConfig

from shared.config import StreamSettings
from shared.nats_roles import FEED_SUBJECTS
from shared.subjects import COMMANDS_STREAM, EVENTS_STREAM, SESSIONS_BUCKET
from shared.topology import TopologyError, attach_topology, ensure_topology, topology_missing
from tests.support.nats_server import NatsServer


async def test_declaration_is_idempotent_and_keeps_data(nats: NatsServer) -> None:
    nc = await _connect(nats)
    js = nc.jetstream()
    assert sorted(await topology_missing(js)) == sorted([COMMANDS_STREAM, EVENTS_STREAM, SESSIONS_BUCKET])
    await ensure_topology(js, StreamSettings())
    await js.publish("sandbox.events.x", b"{}")
    before = await js.stream_info(EVENTS_STREAM)
    await ensure_topology(js, StreamSettings(events_max_age_seconds=3600))
    after = await js.stream_info(EVENTS_STREAM)
    assert after.state.messages == before.state.messages == 1
    assert after.config.max_age == 3600
    assert after.config.allow_direct is True
    commands = await js.stream_info(COMMANDS_STREAM)
    assert commands.config.retention == RetentionPolicy.WORK_QUEUE
    assert commands.config.duplicate_window >= 120
    assert await topology_missing(js) == []
    await nc.close()


async def test_a_conflicting_stream_is_refused_by_name(nats: NatsServer) -> None:
    nc = await _connect(nats)
    js = nc.jetstream()
    await js.add_stream(
        StreamConfig(name=COMMANDS_STREAM, subjects=["sandbox.cmd.>"], retention=RetentionPolicy.LIMITS)
    )
    with pytest.raises(TopologyError, match="SANDBOX_COMMANDS exists with retention"):
        await ensure_topology(js, StreamSettings())
    await nc.close()


async def test_attaching_changes_nothing_that_exists(nats: NatsServer, caplog: pytest.LogCaptureFixture) -> None:
    """Processes attach: a stream whose settings differ from theirs is left alone (warned about);
    only the admin's `ensure_topology` updates it."""
    nc = await _connect(nats)
    js = nc.jetstream()
    await ensure_topology(js, StreamSettings())
    with caplog.at_level(logging.WARNING, logger="shared.topology"):
        await attach_topology(js, StreamSettings(events_max_age_seconds=3600))
    events = await js.stream_info(EVENTS_STREAM)
    assert events.config.max_age == StreamSettings().events_max_age_seconds
    assert events.config.republish is not None
    assert (events.config.republish.src, events.config.republish.dest) == ("sandbox.events.>", FEED_SUBJECTS)
    assert any("SANDBOX_EVENTS differs" in r.getMessage() and "max_age" in r.getMessage() for r in caplog.records)
    await nc.close()


async def _connect(server: NatsServer) -> Client:
    return await nats.connect(server.url)
