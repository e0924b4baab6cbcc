"""Pure node decisions: a node's state from its beats, and where a new session goes."""

from __future__ import annotations

from collections.abc import Sequence
from datetime import UTC, datetime, timedelta
from typing import Any, cast

import msgspec

from shared.contracts import NodeBeat
from shared.nodes import NodeDirectory, NodeState, _Seen, choose_node, judge_node
from shared.subjects import node_command_subject, node_consumer, node_token, public_command_subject
from tests.unit.fakes_runtime import FakeClock

T0 = datetime(2026, 11, 25, 12, 0, tzinfo=UTC)
FRESH = timedelta(seconds=5)
DEAD = timedelta(seconds=30)
INSTANCE = "00000000-0000-4000-8000-000000000001"


def beat(node: str, live: int, limit: int | None = 10, at: datetime = T0) -> NodeBeat:
    return NodeBeat(node_id=node, instance_id=INSTANCE, beat_at=at, live_sessions=live, max_sessions=limit)


def first(names: Sequence[str]) -> str:
    return names[0]


def judge(beat_at: datetime | None, now: datetime, since: datetime = T0 - timedelta(hours=1)) -> NodeState:
    return judge_node(beat_at, now, since, fresh_for=FRESH, dead_after=DEAD)


def test_a_node_is_alive_silent_then_dead() -> None:
    assert judge(T0, T0 + timedelta(seconds=4)) == NodeState.ALIVE
    assert judge(T0, T0 + timedelta(seconds=5)) == NodeState.SILENT
    assert judge(T0, T0 + timedelta(seconds=29)) == NodeState.SILENT
    assert judge(T0, T0 + timedelta(seconds=30)) == NodeState.DEAD


def test_silence_counts_from_when_the_observer_began_watching() -> None:
    """A runtime that starts after the whole cluster was down does not declare every other
    node dead at once: it watches them for node_dead_after first."""
    started = T0 + timedelta(hours=2)
    assert judge(T0, started, since=started) == NodeState.SILENT
    assert judge(None, started + timedelta(seconds=29), since=started) == NodeState.SILENT
    assert judge(None, started + timedelta(seconds=30), since=started) == NodeState.DEAD


def test_the_node_with_most_free_places_is_chosen() -> None:
    placement = choose_node([beat("a", 8), beat("b", 3), beat("c", 5)], {}, "a", first)
    assert (placement.node_id, placement.free, placement.nodes, placement.placed_by) == ("b", 7, 3, "a")


def test_placements_not_yet_in_a_beat_count_against_their_node() -> None:
    alive = [beat("a", 2), beat("b", 2)]
    assert choose_node(alive, {"a": 1}, "a", first).node_id == "b"
    assert choose_node(alive, {"a": 1, "b": 2}, "a", first).node_id == "a"


def test_ties_are_broken_by_the_pick_among_the_best_only() -> None:
    seen: list[Sequence[str]] = []

    def pick(names: Sequence[str]) -> str:
        seen.append(names)
        return names[-1]

    assert choose_node([beat("a", 1), beat("b", 1), beat("c", 4)], {}, "c", pick).node_id == "b"
    assert seen == [["a", "b"]]


def test_unlimited_nodes_prefer_the_fewest_sessions_and_report_no_free_count() -> None:
    placement = choose_node([beat("a", 4, None), beat("b", 1, None)], {}, "a", first)
    assert (placement.node_id, placement.free) == ("b", None)


def test_with_no_beats_read_yet_a_session_stays_here() -> None:
    assert choose_node([], {}, "here", first).node_id == "here"


def test_node_subjects_and_consumers_survive_dots_in_node_ids() -> None:
    assert node_token("host.example.com") == "host~example~com"
    subject = node_command_subject("host.example.com", "stop", "6f1c2a9e-4b7d-4e8a-9c3f-2d5e8b1a7c40")
    assert subject == "sandbox.node.host~example~com.stop.6f1c2a9e-4b7d-4e8a-9c3f-2d5e8b1a7c40"
    assert public_command_subject(subject) == "sandbox.cmd.stop.6f1c2a9e-4b7d-4e8a-9c3f-2d5e8b1a7c40"
    assert public_command_subject("sandbox.cmd.create.x") == "sandbox.cmd.create.x"
    assert "." not in node_consumer("host.example.com")


class Unread:
    """Stands where the directory's bucket and connection are never used."""


def directory(clock: FakeClock) -> NodeDirectory:
    return NodeDirectory(
        cast("Any", Unread()),
        cast("Any", Unread()),
        clock,
        here="a",
        instance_id=INSTANCE,
        fresh_for=FRESH,
        dead_after=DEAD,
    )


def test_a_runtime_that_cannot_read_the_beats_judges_no_node_dead() -> None:
    clock = FakeClock(T0)
    nodes = directory(clock)
    nodes._watching_since = T0
    nodes._read_at = T0
    nodes.know_of("b")
    clock.advance(DEAD.total_seconds())
    assert nodes.state("b") == NodeState.SILENT, "its last read is older than a beat: stale, not dead"
    nodes._read_at = clock.now()
    assert nodes.state("b") == NodeState.DEAD


def test_a_node_whose_runtime_stopped_cleanly_gets_no_new_sessions() -> None:
    clock = FakeClock(T0)
    nodes = directory(clock)
    nodes._read_at = nodes._watching_since = T0
    nodes._seen["a"] = _Seen(beat("a", 9))
    nodes._seen["b"] = _Seen(msgspec.structs.replace(beat("b", 0), draining=True))
    assert nodes.place().node_id == "a", "b has more room, but its last runtime left"
    nodes._seen["b"] = _Seen(beat("b", 0))
    assert nodes.place().node_id == "b"


def test_placements_count_against_a_node_until_its_beat_covers_them() -> None:
    clock = FakeClock(T0)
    nodes = directory(clock)
    nodes._read_at = nodes._watching_since = T0
    nodes._seen["a"] = _Seen(beat("a", 0))
    assert [nodes.place().node_id for _ in range(3)] == ["a", "a", "a"]
    clock.advance(3)  # a's later beat counts the three placed there
    nodes._seen["a"] = _Seen(beat("a", 3, at=clock.now()))
    nodes._seen["b"] = _Seen(beat("b", 5, at=clock.now()))
    assert nodes.place().node_id == "a", "a: 7 free, b: 5; its placements are not counted twice"
