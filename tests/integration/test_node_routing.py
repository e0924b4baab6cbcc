"""Docker work on a session is for the runtime of its node: another node's runtime hands
the command back to the stream instead of recording a stop it cannot perform."""

from __future__ import annotations

import json
import uuid
from pathlib import Path

import docker
import msgspec
import nats

from services.runtime.service import running_runtime
from shared.config import Settings
from shared.event_store import EventStore
from shared.subjects import COMMANDS_STREAM, ConsumerName, command_subject
from tests.support.eventually import eventually


def on_node(settings: Settings, node_id: str) -> Settings:
    return msgspec.structs.replace(settings, runtime=msgspec.structs.replace(settings.runtime, node_id=node_id))


async def test_a_stop_waits_for_the_owning_node(
    settings: Settings, docker_client: docker.DockerClient, node_id: str, node_containers: None, tmp_path: Path
) -> None:
    nc = await nats.connect(settings.nats.url or "")
    js = nc.jetstream()
    store = EventStore(js)
    chat = str(uuid.uuid4())

    async def command(kind: str) -> str:
        command_id = str(uuid.uuid4())
        body = json.dumps({"command_id": command_id, "chat_id": chat}).encode()
        await js.publish(command_subject(kind, chat), body, headers={"Nats-Msg-Id": command_id})
        return command_id

    async def outcome_types(command_id: str) -> list[str]:
        return [s.event.type for s in await store.history(chat) if s.event.causation_id == command_id]

    async def deliveries() -> int:
        return (await js.consumer_info(COMMANDS_STREAM, ConsumerName.RUNTIME)).delivered.consumer_seq or 0

    async with running_runtime(settings):  # the owner, node_id
        create = await command("create")
        await eventually(lambda: outcome_types(create), lambda types: "running" in types, what="the create's outcome")
    other = f"{node_id}-other"
    async with running_runtime(on_node(settings, other)):
        before = await deliveries()
        stop = await command("stop")
        # The other node has the stop again and again and hands it back each time.
        await eventually(deliveries, lambda n: n >= before + 3, what="the stop delivered three times")
        assert await outcome_types(stop) == [], "the other node neither claims nor stops"
        assert len(docker_client.containers.list(filters={"label": f"sandboxd.chat_id={chat}"})) == 1
        async with running_runtime(settings):  # the owner is back: it takes the command
            await eventually(lambda: outcome_types(stop), lambda types: "stopped" in types, what="the stop's outcome")
    assert await outcome_types(stop) == ["stopping", "stopped"]
    assert not docker_client.containers.list(all=True, filters={"label": f"sandboxd.chat_id={chat}"})
    await nc.close()
