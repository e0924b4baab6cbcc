"""The pure lifecycle decisions, including the seed service's use-case edge cases."""

from __future__ import annotations

import uuid
from datetime import UTC, datetime, timedelta

import msgspec

from services.runtime.decisions import (
    AlreadyHandled,
    ClaimProvision,
    ClaimReplace,
    ClaimStop,
    Extend,
    OpenClaim,
    Policy,
    Reject,
    ResumeProvision,
    ResumeReplace,
    ResumeStop,
    Reuse,
    Wait,
    decide_create,
    decide_keepalive,
    decide_stop,
    find_open_claim,
    provision_after_replace,
)
from shared.contracts import (
    AnyEvent,
    CommandRejected,
    CreateSandbox,
    KeepaliveSandbox,
    PreviousSession,
    SandboxFailed,
    SandboxProvisioning,
    SandboxReused,
    SandboxRunning,
    SandboxStopped,
    SandboxStopping,
    SessionRecord,
    SessionStatus,
    StopSandbox,
)
from shared.instances import Liveness
from tests.support.records import session_record

NOW = datetime(2026, 3, 1, 12, 0, tzinfo=UTC)
CHAT = uuid.UUID("6f1c2a9e-4b7d-4e8a-9c3f-2d5e8b1a7c40")
POLICY = Policy(
    node_id="node-a",
    image="img",
    default_ttl=timedelta(minutes=5),
    max_ttl=timedelta(hours=1),
    claim_timeout=timedelta(seconds=60),
)


def session(status: SessionStatus = SessionStatus.RUNNING, *, expires_at: datetime | None = None) -> SessionRecord:
    return session_record(
        session_id="sess-old",
        chat_id=str(CHAT),
        container_id="container-old",
        image="img",
        status=status,
        now=NOW - timedelta(minutes=1),
        expires_at=expires_at or NOW + timedelta(minutes=4),
    )


def last(cls: type[AnyEvent], s: SessionRecord | None, *, cause: str = "other", at: datetime = NOW) -> AnyEvent:
    return cls(
        event_id="e",
        chat_id=str(CHAT),
        session_id=s.session_id if s else None,
        causation_id=cause,
        occurred_at=at,
        node_id="node-a",
        session=s,
    )


def create(**kw: object) -> CreateSandbox:
    return msgspec.convert({"command_id": str(uuid.uuid4()), "chat_id": str(CHAT), **kw}, CreateSandbox)


def stop(**kw: object) -> StopSandbox:
    return msgspec.convert({"command_id": str(uuid.uuid4()), "chat_id": str(CHAT), **kw}, StopSandbox)


def keepalive(**kw: object) -> KeepaliveSandbox:
    return msgspec.convert({"command_id": str(uuid.uuid4()), "chat_id": str(CHAT), **kw}, KeepaliveSandbox)


# --------------------------------------------------------------------------- create


def test_a_new_chat_gets_a_provisioning_claim_with_the_ttl() -> None:
    decision = decide_create(None, create(ttl_seconds=90, labels={"a": "b"}), NOW, POLICY, "sess-new")
    assert isinstance(decision, ClaimProvision)
    assert decision.previous is None
    s = decision.session
    assert (s.session_id, s.status, s.node_id, s.container_id) == (
        "sess-new",
        SessionStatus.PROVISIONING,
        "node-a",
        None,
    )
    assert (s.created_at, s.expires_at, s.labels) == (NOW, NOW + timedelta(seconds=90), {"a": "b"})


def test_default_ttl_applies_when_none_is_asked() -> None:
    decision = decide_create(None, create(), NOW, POLICY, "s")
    assert isinstance(decision, ClaimProvision)
    assert decision.session.expires_at == NOW + POLICY.default_ttl


def test_a_live_session_is_reused_without_changing_its_ttl() -> None:
    live = session()
    decision = decide_create(last(SandboxRunning, live), create(ttl_seconds=3000), NOW, POLICY, "s")
    assert decision == Reuse(live)


def test_expiry_boundary_expires_at_equal_to_now_is_expired() -> None:
    boundary = session(expires_at=NOW)
    decision = decide_create(last(SandboxRunning, boundary), create(), NOW, POLICY, "s")
    assert isinstance(decision, ClaimReplace)
    assert decision.old.session_id == "sess-old"
    assert decision.old.status == SessionStatus.STOPPING
    just_alive = session(expires_at=NOW + timedelta(microseconds=1))
    assert isinstance(decide_create(last(SandboxRunning, just_alive), create(), NOW, POLICY, "s"), Reuse)


def test_after_a_terminal_session_a_new_one_is_claimed() -> None:
    for cls, status in ((SandboxStopped, SessionStatus.STOPPED), (SandboxFailed, SessionStatus.FAILED)):
        decision = decide_create(last(cls, session(status)), create(), NOW, POLICY, "sess-new")
        assert isinstance(decision, ClaimProvision)
        assert decision.session.session_id == "sess-new"


def open_claim(event: AnyEvent, liveness: Liveness = Liveness.UNKNOWN) -> OpenClaim:
    assert isinstance(event, SandboxProvisioning | SandboxStopping)
    return OpenClaim(event, liveness)


def test_a_claim_in_flight_makes_others_wait_and_an_old_one_is_taken_over() -> None:
    claim = session(SessionStatus.PROVISIONING)
    fresh = last(SandboxProvisioning, claim, at=NOW - timedelta(seconds=59))
    assert isinstance(decide_create(fresh, create(), NOW, POLICY, "s", claim=open_claim(fresh)), Wait)
    stale = last(SandboxProvisioning, claim, at=NOW - timedelta(seconds=60))
    decision = decide_create(stale, create(), NOW, POLICY, "s", claim=open_claim(stale))
    assert isinstance(decision, ClaimReplace)
    assert decision.old.session_id == claim.session_id


def test_a_stop_in_flight_makes_a_create_wait() -> None:
    stopping = last(SandboxStopping, session(SessionStatus.STOPPING), at=NOW)
    assert isinstance(decide_create(stopping, create(), NOW, POLICY, "s", claim=open_claim(stopping)), Wait)


def test_a_claim_of_a_dead_instance_is_taken_over_at_once() -> None:
    provisioning = last(SandboxProvisioning, session(SessionStatus.PROVISIONING), at=NOW)
    stopping = last(SandboxStopping, session(SessionStatus.STOPPING), at=NOW)
    for event in (provisioning, stopping):
        dead = open_claim(event, Liveness.DEAD)
        replaced = decide_create(event, create(), NOW, POLICY, "s", claim=dead)
        assert isinstance(replaced, ClaimReplace), event.type
        assert replaced.old.session_id == "sess-old"
        assert isinstance(decide_stop(event, stop(), NOW, POLICY, claim=dead), ClaimStop), event.type
    refused = decide_keepalive(provisioning, keepalive(), NOW, POLICY, claim=open_claim(provisioning, Liveness.DEAD))
    assert isinstance(refused, Reject)
    assert refused.reason == "not_running"


def test_a_claim_of_a_live_instance_is_waited_on_until_the_claim_timeout() -> None:
    claim = session(SessionStatus.PROVISIONING)
    for liveness in (Liveness.ALIVE, Liveness.UNKNOWN):
        fresh = last(SandboxProvisioning, claim, at=NOW - timedelta(seconds=59))
        wait = decide_create(fresh, create(), NOW, POLICY, "s", claim=open_claim(fresh, liveness))
        assert isinstance(wait, Wait), liveness
        assert isinstance(decide_stop(fresh, stop(), NOW, POLICY, claim=open_claim(fresh, liveness)), Wait)
        assert isinstance(decide_keepalive(fresh, keepalive(), NOW, POLICY, claim=open_claim(fresh, liveness)), Wait)
        # The timeout stays the backstop, whatever is known of the instance.
        stale = last(SandboxProvisioning, claim, at=NOW - timedelta(seconds=60))
        taken = decide_create(stale, create(), NOW, POLICY, "s", claim=open_claim(stale, liveness))
        assert isinstance(taken, ClaimReplace), liveness


def test_liveness_does_not_matter_to_the_claims_own_command() -> None:
    command = create()
    event = last(SandboxProvisioning, session(SessionStatus.PROVISIONING), cause=str(command.command_id))
    for liveness in Liveness:
        decision = decide_create(event, command, NOW, POLICY, "s", claim=open_claim(event, liveness))
        assert isinstance(decision, ResumeProvision), liveness


def test_a_claim_buried_under_another_commands_answer_is_still_open() -> None:
    """A keepalive refused while the session provisioned lands on the create's claim: the
    create resumes its claim (never replaces its own session), others still wait on it."""
    command = create()
    claimed = session(SessionStatus.PROVISIONING)
    previous = PreviousSession("p", "c")
    claim = msgspec.structs.replace(
        last(SandboxProvisioning, claimed, cause=str(command.command_id)), previous=previous
    )
    on_top = last(CommandRejected, claimed, cause="keepalive")
    assert find_open_claim([claim, on_top]) == claim
    assert decide_create(on_top, command, NOW, POLICY, "s", claim=open_claim(claim)) == ResumeProvision(
        claimed, previous
    )
    assert isinstance(decide_create(on_top, create(), NOW, POLICY, "s", claim=open_claim(claim)), Wait)
    dead = open_claim(claim, Liveness.DEAD)
    assert isinstance(decide_create(on_top, create(), NOW, POLICY, "s", claim=dead), ClaimReplace)
    stop_claim = last(SandboxStopping, session(SessionStatus.STOPPING), cause="the-stop")
    on_stop = last(CommandRejected, session(SessionStatus.STOPPING), cause="keepalive")
    own_stop = msgspec.convert({"command_id": str(uuid.uuid4()), "chat_id": str(CHAT)}, StopSandbox)
    resumed = decide_stop(
        on_stop,
        own_stop,
        NOW,
        POLICY,
        claim=open_claim(msgspec.structs.replace(stop_claim, causation_id=str(own_stop.command_id))),
    )
    assert resumed == ResumeStop(session(SessionStatus.STOPPING))


def test_the_open_claim_is_the_last_claim_whose_command_has_no_outcome_yet() -> None:
    provisioning = session(SessionStatus.PROVISIONING)
    claim = last(SandboxProvisioning, provisioning, cause="c1")
    assert find_open_claim([]) is None
    assert find_open_claim([claim]) == claim
    assert find_open_claim([claim, last(CommandRejected, provisioning, cause="k")]) == claim
    # Its own outcome ends it, even when the session stays in a claim state (a failed stop).
    assert find_open_claim([claim, last(SandboxRunning, session(), cause="c1")]) is None
    stop_claim = last(SandboxStopping, session(SessionStatus.STOPPING), cause="s1")
    failed_stop = last(SandboxFailed, session(SessionStatus.STOPPING), cause="s1")
    assert find_open_claim([stop_claim, failed_stop]) is None
    assert find_open_claim([stop_claim, failed_stop, last(CommandRejected, session(SessionStatus.STOPPING))]) is None
    # A replace: the stopping claim on the old session, then the claim of the new one.
    new = msgspec.structs.replace(provisioning, session_id="sess-new")
    replace = [stop_claim, last(SandboxProvisioning, new, cause="s1"), last(CommandRejected, new, cause="k")]
    assert find_open_claim(replace) == replace[1]
    # The chat's session is not the one the last claim was for, or no claim is left in view.
    assert find_open_claim([claim, last(CommandRejected, new, cause="k")]) is None
    assert find_open_claim([last(CommandRejected, provisioning, cause="k")]) is None


def test_a_failed_stop_leaves_a_session_that_the_next_create_replaces() -> None:
    left = last(SandboxFailed, session(SessionStatus.STOPPING), at=NOW)
    assert isinstance(decide_create(left, create(), NOW, POLICY, "s"), ClaimReplace)


def test_a_command_resumes_its_own_claims() -> None:
    command = create()
    own = str(command.command_id)
    claim = session(SessionStatus.PROVISIONING)
    provisioning = last(SandboxProvisioning, claim, cause=own)
    previous = PreviousSession("p", "c")
    provisioning = msgspec.structs.replace(provisioning, previous=previous)
    resumed = decide_create(provisioning, command, NOW, POLICY, "s", claim=open_claim(provisioning))
    assert resumed == ResumeProvision(claim, previous)
    old = session(SessionStatus.STOPPING)
    replacing = last(SandboxStopping, old, cause=own)
    assert decide_create(replacing, command, NOW, POLICY, "s", claim=open_claim(replacing)) == ResumeReplace(old)


def test_a_command_whose_outcome_is_last_is_already_handled() -> None:
    command = create()
    for cls in (SandboxRunning, SandboxReused, SandboxFailed):
        assert isinstance(
            decide_create(last(cls, session(), cause=str(command.command_id)), command, NOW, POLICY, "s"),
            AlreadyHandled,
        )


def test_a_ttl_above_the_maximum_is_refused() -> None:
    decision = decide_create(None, create(ttl_seconds=3601), NOW, POLICY, "s")
    assert isinstance(decision, Reject)
    assert decision.reason == "ttl_too_long"


def test_replace_keeps_old_and_new_identities_apart() -> None:
    old = session(SessionStatus.STOPPING)
    decision = provision_after_replace(create(), old, "sess-new", NOW, POLICY)
    assert isinstance(decision, ClaimProvision)
    assert decision.session.session_id == "sess-new"
    assert decision.session.container_id is None
    assert decision.previous == PreviousSession("sess-old", "container-old")


# --------------------------------------------------------------------------- stop


def test_stop_claims_the_running_session() -> None:
    decision = decide_stop(last(SandboxRunning, session()), stop(), NOW, POLICY)
    assert isinstance(decision, ClaimStop)
    assert decision.session.status == SessionStatus.STOPPING
    assert decision.session.container_id == "container-old"


def test_stop_without_a_live_session_is_refused() -> None:
    for event in (None, last(SandboxStopped, session(SessionStatus.STOPPED))):
        decision = decide_stop(event, stop(), NOW, POLICY)
        assert isinstance(decision, Reject)
        assert decision.reason == "no_live_session"


def test_a_stale_stop_is_refused_as_in_the_seeds_stale_snapshot_case() -> None:
    decision = decide_stop(last(SandboxRunning, session()), stop(session_id=str(uuid.uuid4())), NOW, POLICY)
    assert isinstance(decision, Reject)
    assert decision.reason == "stale_session"


def test_a_stop_pinned_to_its_claimed_session_does_not_stop_a_newer_one() -> None:
    newer = msgspec.structs.replace(session(), session_id="sess-newer")
    decision = decide_stop(last(SandboxRunning, newer), stop(), NOW, POLICY, pinned_session_id="sess-old")
    assert isinstance(decision, Reject)


def test_stop_waits_for_a_claim_in_flight_and_resumes_its_own() -> None:
    command = stop()
    claim = session(SessionStatus.STOPPING)
    others = last(SandboxStopping, claim)
    assert isinstance(decide_stop(others, command, NOW, POLICY, claim=open_claim(others)), Wait)
    own = last(SandboxStopping, claim, cause=str(command.command_id))
    assert decide_stop(own, command, NOW, POLICY, claim=open_claim(own)) == ResumeStop(claim)
    retry_after_failure = last(SandboxFailed, claim)
    assert isinstance(decide_stop(retry_after_failure, command, NOW, POLICY), ClaimStop)


# --------------------------------------------------------------------------- keepalive


def test_keepalive_moves_expiry_to_now_plus_ttl() -> None:
    decision = decide_keepalive(last(SandboxRunning, session()), keepalive(ttl_seconds=600), NOW, POLICY)
    assert isinstance(decision, Extend)
    assert decision.session.expires_at == NOW + timedelta(seconds=600)
    assert decision.session.updated_at == NOW


def test_keepalive_refusals() -> None:
    cases: list[tuple[AnyEvent | None, KeepaliveSandbox, str]] = [
        (None, keepalive(), "no_live_session"),
        (last(SandboxRunning, session()), keepalive(session_id=str(uuid.uuid4())), "stale_session"),
        (last(SandboxRunning, session(expires_at=NOW)), keepalive(), "expired"),
        (last(SandboxStopping, session(SessionStatus.STOPPING)), keepalive(), "not_running"),
        (last(SandboxRunning, session()), keepalive(ttl_seconds=7200), "ttl_too_long"),
    ]
    for event, command, reason in cases:
        decision = decide_keepalive(event, command, NOW, POLICY)
        assert isinstance(decision, Reject), reason
        assert decision.reason == reason


def test_keepalive_never_passes_the_lifetime_cap() -> None:
    capped = Policy(
        node_id="node-a",
        image="img",
        default_ttl=timedelta(minutes=5),
        max_ttl=timedelta(hours=1),
        claim_timeout=timedelta(seconds=60),
        max_lifetime=timedelta(minutes=10),
    )
    alive = session()  # created a minute ago: the cap is 9 minutes from now
    decision = decide_keepalive(last(SandboxRunning, alive), keepalive(ttl_seconds=3600), NOW, capped)
    assert isinstance(decision, Extend)
    assert decision.capped
    assert decision.session.expires_at == alive.created_at + timedelta(minutes=10)
    within = decide_keepalive(last(SandboxRunning, alive), keepalive(ttl_seconds=300), NOW, capped)
    assert isinstance(within, Extend)
    assert not within.capped
    assert within.session.expires_at == NOW + timedelta(seconds=300)


def test_keepalive_never_moves_the_expiry_earlier() -> None:
    """A shorter keepalive than the session has left keeps its expiry (`already_later`)."""
    alive = session(expires_at=NOW + timedelta(minutes=30))
    shorter = decide_keepalive(last(SandboxRunning, alive), keepalive(ttl_seconds=60), NOW, POLICY)
    assert isinstance(shorter, Extend)
    assert (shorter.session.expires_at, shorter.kept, shorter.capped) == (alive.expires_at, True, False)
    assert shorter.session.updated_at == NOW
    longer = decide_keepalive(last(SandboxRunning, alive), keepalive(ttl_seconds=3600), NOW, POLICY)
    assert isinstance(longer, Extend)
    assert (longer.session.expires_at, longer.kept) == (NOW + timedelta(hours=1), False)
