"""The API's session index: ordering, paging, cursors and filters, without NATS."""

from __future__ import annotations

import random
import uuid

import pytest
from msgspec.structs import replace

from services.api.session_index import (
    InvalidListQuery,
    SessionIndex,
    SessionPage,
    SessionQuery,
    decode_cursor,
    encode_cursor,
    parse_label_filter,
)
from shared.contracts import SessionRecord, SessionStatus
from tests.support.records import session_record

TEAMS = ("a", "b", "c")


def population(n: int, seed: int = 7) -> list[SessionRecord]:
    rnd = random.Random(seed)  # noqa: S311 - a reproducible population, not a secret
    statuses = (SessionStatus.RUNNING, SessionStatus.RUNNING, SessionStatus.PROVISIONING, SessionStatus.STOPPING)
    out = []
    for i in range(n):
        labels = {"team": TEAMS[i % 3]}
        if i % 5 == 0:
            labels["tier"] = "gold"
        chat = str(uuid.UUID(int=rnd.getrandbits(128), version=4))
        out.append(session_record(chat_id=chat, status=rnd.choice(statuses), labels=labels))
    return out


def every_page(index: SessionIndex, query: SessionQuery, limit: int) -> list[SessionPage]:
    pages = [index.page(query, limit=limit)]
    while pages[-1].next_cursor is not None:
        pages.append(index.page(query, limit=limit, after=decode_cursor(pages[-1].next_cursor)))
        assert len(pages) < 10_000, "paging does not end"
    return pages


def expected(records: list[SessionRecord], query: SessionQuery) -> list[str]:
    return sorted(r.chat_id for r in records if query.matches(r))


QUERIES = [
    SessionQuery(),
    SessionQuery(status=SessionStatus.RUNNING),
    SessionQuery(labels=(("team", "b"),)),
    SessionQuery(labels=(("team", "b"), ("tier", "gold"))),
    SessionQuery(status=SessionStatus.STOPPING, labels=(("tier", "gold"),)),
    SessionQuery(labels=(("team", "nobody"),)),
    SessionQuery(labels=(("team", "a"), ("team", "b"))),  # one key cannot hold two values
    SessionQuery(status=SessionStatus.LOST),
]


@pytest.mark.parametrize("query", QUERIES, ids=str)
@pytest.mark.parametrize("limit", [1, 7, 1000])
def test_paging_yields_every_match_once_in_chat_order(query: SessionQuery, limit: int) -> None:
    records = population(300)
    index = SessionIndex()
    for record in records:
        index.put(record)
    pages = every_page(index, query, limit)
    listed = [r.chat_id for page in pages for r in page.records]
    assert listed == expected(records, query)
    assert all(len(page.records) == limit for page in pages[:-1]), "only the last page may be short"
    assert pages[-1].records or len(pages) == 1, "a cursor is given only when another match follows"


def test_updates_between_pages_keep_every_session_that_lives_throughout() -> None:
    records = population(200)
    index = SessionIndex()
    for record in records:
        index.put(record)
    query = SessionQuery(labels=(("team", "a"),))
    first = index.page(query, limit=10)
    assert first.next_cursor is not None
    # Meanwhile: some sessions end, some start, some change status or labels.
    ended = [r for r in records if r.labels["team"] == "a"][20:30]
    for r in ended:
        index.remove(r.chat_id)
    started = [session_record(labels={"team": "a"}) for _ in range(15)]
    for r in started:
        index.put(r)
    moved = [r for r in records if r.labels["team"] == "c"][:10]
    for r in moved:
        index.put(replace(r, labels={"team": "a"}))
    after = [r.chat_id for p in every_page_from(index, query, 10, first.next_cursor) for r in p.records]
    listed = [r.chat_id for r in first.records] + after
    assert len(listed) == len(set(listed)), "no session appears twice"
    survivors = {r.chat_id for r in records if r.labels["team"] == "a"} - {r.chat_id for r in ended}
    assert survivors <= set(listed), "every session that lived throughout appears"
    assert not {r.chat_id for r in ended} & set(after), "an ended session is not listed after it ended"
    assert listed == sorted(listed)


def every_page_from(index: SessionIndex, query: SessionQuery, limit: int, cursor: str) -> list[SessionPage]:
    pages = [index.page(query, limit=limit, after=decode_cursor(cursor))]
    while pages[-1].next_cursor is not None:
        pages.append(index.page(query, limit=limit, after=decode_cursor(pages[-1].next_cursor)))
    return pages


def test_postings_follow_puts_and_removes_after_the_index_is_built() -> None:
    index = SessionIndex()
    record = session_record(labels={"team": "a"}, status=SessionStatus.PROVISIONING)
    index.put(record)
    index.build()
    running = replace(record, status=SessionStatus.RUNNING, labels={"team": "b"})
    index.put(running)
    assert index.page(SessionQuery(status=SessionStatus.PROVISIONING), limit=5).records == []
    assert index.page(SessionQuery(labels=(("team", "a"),)), limit=5).records == []
    assert index.page(SessionQuery(status=SessionStatus.RUNNING, labels=(("team", "b"),)), limit=5).records == [running]
    index.remove(record.chat_id)
    assert index.page(SessionQuery(), limit=5).records == []
    assert index.page(SessionQuery(labels=(("team", "b"),)), limit=5).records == []
    index.remove(record.chat_id)  # removing what is not there is harmless
    assert len(index) == 0


def test_counts_by_status_follow_puts_and_removes() -> None:
    """What GET /status reports as the registry's sessions by status."""
    index = SessionIndex()
    first = session_record(status=SessionStatus.PROVISIONING)
    second = session_record(status=SessionStatus.RUNNING)
    index.put(first)
    index.put(second)
    assert index.count_by_status() == {"provisioning": 1, "running": 1}
    index.put(replace(first, status=SessionStatus.RUNNING))
    assert index.count_by_status() == {"running": 2}
    index.remove(second.chat_id)
    assert index.count_by_status() == {"running": 1}


def test_a_bulk_load_then_single_updates_match_a_fresh_build() -> None:
    """The lazily built lists and the incrementally kept ones agree."""
    records = population(500, seed=3)
    rnd = random.Random(5)  # noqa: S311 - reproducible, not a secret
    kept = SessionIndex()
    for record in records[:250]:
        kept.put(record)
    kept.build()
    for record in records[250:]:
        kept.put(record)
    for record in rnd.sample(records, 100):
        kept.remove(record.chat_id)
    for record in rnd.sample(records, 100):
        kept.put(replace(record, status=SessionStatus.STOPPING))
    fresh = SessionIndex()
    for chat_id in sorted({r.chat_id for r in records}):
        held = kept.get(chat_id)
        if held is not None:
            fresh.put(held)
    for query in QUERIES:
        got = [r.chat_id for p in every_page(kept, query, 13) for r in p.records]
        want = [r.chat_id for p in every_page(fresh, query, 1000) for r in p.records]
        assert got == want, query


def test_cursors_round_trip_and_anything_else_is_refused() -> None:
    chat = str(uuid.uuid4())
    cursor = encode_cursor(chat)
    assert chat not in cursor, "opaque"
    assert decode_cursor(cursor) == chat
    not_canonical = encode_cursor(chat.upper())
    for bad in ("", "x", "%%%", cursor[:-3], encode_cursor("nope"), not_canonical, "A" * 500, cursor + "!"):
        with pytest.raises(InvalidListQuery, match="cursor"):
            decode_cursor(bad)


def test_label_filters_are_key_colon_value() -> None:
    assert parse_label_filter("team:qa") == ("team", "qa")
    assert parse_label_filter("url:http://x:1") == ("url", "http://x:1")
    assert parse_label_filter("empty:") == ("empty", "")
    for bad in ("team", ":qa", ""):
        with pytest.raises(InvalidListQuery, match="key:value"):
            parse_label_filter(bad)
