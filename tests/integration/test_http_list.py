"""`GET /sandboxes`: paged, filtered lists from the API's index of the registry, against a
real nats-server, the real runtime and API (a fake container driver where there are many
sessions; the real Docker engine for a handful), and the index's load and resume."""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import docker
import httpx
import nats as nats_client
import pytest
from msgspec.structs import replace
from nats.js.kv import KeyValue

from services.api.session_index import LIST_MAX_LIMIT, encode_cursor
from services.runtime.service import running_runtime
from shared.config import Settings
from shared.contracts import SessionRecord, SessionStatus, encode
from shared.subjects import SESSIONS_BUCKET
from shared.topology import ensure_topology
from tests.conftest import TEST_TOKEN, settings_for
from tests.support.api_server import serving_api
from tests.support.eventually import eventually
from tests.support.nats_server import NatsServer
from tests.support.records import session_record
from tests.unit.fakes_runtime import FakeDriver

API = "/api/v1"
TEAMS = ("a", "b", "c")

Query = dict[str, Any]


def labels_of(i: int) -> dict[str, str]:
    labels = {"team": TEAMS[i % 3], "n": str(i)}
    if i % 4 == 0:
        labels["tier"] = "gold"
    return labels


async def page_through(http: httpx.AsyncClient, params: Query, limit: int) -> list[dict[str, Any]]:
    """Every page of a list, in order; checks each page's shape on the way."""
    sessions: list[dict[str, Any]] = []
    cursor: str | None = None
    for _ in range(100_000):
        answer = await http.get(
            f"{API}/sandboxes", params={**params, "limit": limit, **({"cursor": cursor} if cursor else {})}
        )
        assert answer.status_code == 200, answer.text
        page = answer.json()
        assert page["count"] == len(page["sessions"]) <= limit
        sessions += page["sessions"]
        cursor = page["next_cursor"]
        if cursor is None:
            return sessions
        assert page["count"] == limit, "only the last page is short"
    raise AssertionError("paging did not end")


def check_listing(listed: list[dict[str, Any]], want: set[str]) -> None:
    chats = [s["chat_id"] for s in listed]
    assert len(chats) == len(set(chats)), "a session appeared twice"
    assert chats == sorted(chats), "pages are in chat id order"
    assert set(chats) == want


async def refusals(http: httpx.AsyncClient) -> None:
    bad: list[tuple[Query, str]] = [
        ({"limit": 0}, "limit"),
        ({"limit": LIST_MAX_LIMIT + 1}, "limit"),
        ({"limit": "ten"}, "limit"),
        ({"limit": "1e3"}, "limit"),
        ({"label": "team"}, "key:value"),
        ({"label": ":a"}, "key:value"),
        ({"cursor": "not-a-cursor"}, "cursor"),
        ({"cursor": encode_cursor("nope")}, "cursor"),
        ({"status": "sleeping"}, "status"),
        ({"label": [f"k{i}:v" for i in range(33)]}, "label"),
    ]
    for params, needle in bad:
        answer = await http.get(f"{API}/sandboxes", params=params)
        assert answer.status_code == 400, (params, answer.text)
        assert needle in answer.json()["detail"], (params, answer.text)


# --------------------------------------------------------------------------- through the runtime


@pytest.fixture
def many_settings(nats: NatsServer, tmp_path: Path) -> Settings:
    return settings_for(nats.url, tmp_path, f"list-{uuid.uuid4().hex[:8]}")


async def test_sessions_created_over_http_page_through_filtered_each_exactly_once(
    many_settings: Settings,
) -> None:
    n = 150
    async with (
        running_runtime(many_settings, driver=FakeDriver()),
        serving_api(many_settings) as base,
        httpx.AsyncClient(base_url=base, headers={"X-API-Token": TEST_TOKEN}, timeout=30) as http,
    ):
        chats = [str(uuid.uuid4()) for _ in range(n)]
        limit = asyncio.Semaphore(16)

        async def create(i: int) -> None:
            async with limit:
                answer = await http.post(f"{API}/sandboxes", json={"chat_id": chats[i], "labels": labels_of(i)})
            assert answer.status_code == 201, answer.text

        await asyncio.gather(*(create(i) for i in range(n)))

        async def listed_all() -> list[dict[str, Any]]:
            return await page_through(http, {}, 1000)

        await eventually(listed_all, lambda got: len(got) == n, what="every session is in the index")
        everyone = set(chats)
        check_listing(await page_through(http, {}, 7), everyone)
        check_listing(await page_through(http, {"status": "running"}, 11), everyone)
        assert await page_through(http, {"status": "stopping"}, 5) == []
        team_b = {chats[i] for i in range(n) if labels_of(i)["team"] == "b"}
        listed_b = await page_through(http, {"label": "team:b"}, 6)
        check_listing(listed_b, team_b)
        assert all(s["labels"]["team"] == "b" and s["status"] == "running" for s in listed_b)
        gold_b = {c for i, c in enumerate(chats) if labels_of(i)["team"] == "b" and "tier" in labels_of(i)}
        check_listing(await page_through(http, {"label": ["team:b", "tier:gold"], "status": "running"}, 4), gold_b)
        check_listing(await page_through(http, {"label": "n:17"}, 100), {chats[17]})
        check_listing(await page_through(http, {"label": "team:z"}, 100), set())
        first = (await http.get(f"{API}/sandboxes")).json()
        assert first["count"] == 100, "the default limit is 100"
        assert first["next_cursor"] is not None

        # Stopped sessions leave the list (it follows the registry).
        stopped = set(chats[:10])
        for chat in stopped:
            assert (await http.delete(f"{API}/sandboxes/{chat}")).status_code == 200
        await eventually(
            lambda: page_through(http, {}, 50),
            lambda got: {s["chat_id"] for s in got} == everyone - stopped,
            what="stopped sessions leave the list",
        )
        await refusals(http)


async def test_a_handful_of_docker_sandboxes_are_listed_by_label(
    api: httpx.AsyncClient, docker_client: docker.DockerClient
) -> None:
    tag = uuid.uuid4().hex[:8]
    chats = [str(uuid.uuid4()) for _ in range(3)]
    for i, chat in enumerate(chats):
        labels = {"run": tag, "role": "writer" if i else "reader"}
        answer = await api.post(f"{API}/sandboxes", json={"chat_id": chat, "labels": labels})
        assert answer.status_code == 201, answer.text
    await eventually(
        lambda: page_through(api, {"label": f"run:{tag}"}, 1),
        lambda got: len(got) == len(chats),
        what="the three sandboxes are listed",
    )
    listed = await page_through(api, {"label": f"run:{tag}"}, 1)
    check_listing(listed, set(chats))
    assert all(docker_client.containers.get(s["container_id"]).status == "running" for s in listed)
    check_listing(await page_through(api, {"label": [f"run:{tag}", "role:writer"]}, 1), set(chats[1:]))
    for chat in chats:
        assert (await api.delete(f"{API}/sandboxes/{chat}")).status_code == 200


# --------------------------------------------------------------------------- the index on its own


@pytest.fixture
async def bucket(nats: NatsServer, tmp_path: Path) -> AsyncIterator[tuple[Settings, KeyValue]]:
    """The topology on the test's server, and the sessions bucket to write records into."""
    settings = settings_for(nats.url, tmp_path, "no-runtime")
    nc = await nats_client.connect(nats.url, max_reconnect_attempts=-1, reconnect_time_wait=0.2)
    try:
        await ensure_topology(nc.jetstream(), settings.streams)
        yield settings, await nc.jetstream().key_value(SESSIONS_BUCKET)
    finally:
        await nc.close()


async def put_all(kv: KeyValue, records: list[SessionRecord]) -> None:
    for record in records:
        await kv.put(record.chat_id, encode(record))


def records(n: int, status: SessionStatus = SessionStatus.RUNNING) -> list[SessionRecord]:
    return [session_record(status=status, labels=labels_of(i)) for i in range(n)]


async def test_the_index_loads_a_large_registry_at_start_and_follows_it(
    bucket: tuple[Settings, KeyValue],
) -> None:
    settings, kv = bucket
    held = records(3000)
    await put_all(kv, held)
    poisoned = str(uuid.uuid4())
    await kv.put(poisoned, b"\xff{not json")
    async with (
        serving_api(settings) as base,
        httpx.AsyncClient(base_url=base, headers={"X-API-Token": TEST_TOKEN}, timeout=30) as http,
    ):
        # Start-up waited for the load: the first list has everything.
        assert (await http.get(f"{API}/ready")).status_code == 200
        check_listing(await page_through(http, {}, LIST_MAX_LIMIT), {r.chat_id for r in held})
        gold = {r.chat_id for r in held if r.labels.get("tier") == "gold" and r.labels["team"] == "c"}
        check_listing(await page_through(http, {"label": ["tier:gold", "team:c"]}, 37), gold)

        # Changes after the load: new records, deleted ones, a status change, relabelling.
        new = records(40, SessionStatus.PROVISIONING)
        await put_all(kv, new)
        gone = held[:25]
        for record in gone:
            await kv.delete(record.chat_id)
        moved = held[100]
        await kv.put(moved.chat_id, encode(replace(moved, status=SessionStatus.STOPPING, labels={"team": "z"})))
        want = {r.chat_id for r in held + new} - {r.chat_id for r in gone}
        await eventually(
            lambda: page_through(http, {}, LIST_MAX_LIMIT),
            lambda got: {s["chat_id"] for s in got} == want,
            what="the list follows the registry",
        )
        check_listing(await page_through(http, {"status": "provisioning"}, 9), {r.chat_id for r in new})
        check_listing(await page_through(http, {"label": "team:z", "status": "stopping"}, 9), {moved.chat_id})
        assert moved.chat_id not in {s["chat_id"] for s in await page_through(http, {"status": "running"}, 1000)}
        await refusals(http)


async def test_lists_refuse_while_nats_is_down_and_resume_after_it_returns(
    nats: NatsServer, bucket: tuple[Settings, KeyValue]
) -> None:
    settings, kv = bucket
    before = records(30)
    await put_all(kv, before)
    async with (
        serving_api(settings) as base,
        httpx.AsyncClient(base_url=base, headers={"X-API-Token": TEST_TOKEN}, timeout=30) as http,
    ):
        check_listing(await page_through(http, {}, 7), {r.chat_id for r in before})
        nats.stop()

        async def list_status() -> int:
            return (await http.get(f"{API}/sandboxes")).status_code

        refused = await eventually(list_status, lambda s: s == 503, what="a list without NATS is refused")
        assert refused == 503
        nats.start()
        # What changed while the API was away, or before it caught up, is in the list after.
        after = records(20)
        await put_all(kv, after)
        for record in before[:10]:
            await kv.delete(record.chat_id)
        want = {r.chat_id for r in before[10:] + after}
        await eventually(
            lambda: page_through(http, {}, 7),
            lambda got: {s["chat_id"] for s in got} == want,
            what="the list after the restart is the registry's",
        )
        assert (await http.get(f"{API}/ready")).status_code == 200
        # And it keeps following.
        later = records(5)
        await put_all(kv, later)
        await eventually(
            lambda: page_through(http, {}, 1000),
            lambda got: {s["chat_id"] for s in got} == want | {r.chat_id for r in later},
            what="the index follows after the resume",
        )
