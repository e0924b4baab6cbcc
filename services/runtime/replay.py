"""Replay: rebuild `sandbox_sessions` from the event stream and report the drift.

The last event of every chat subject is read in one pass (a consumer delivering the last
message per subject), the bucket in another; every chat whose key disagrees is handed to
the projector, which re-reads that chat and compare-and-sets its key. So replay is
idempotent and safe while runtimes and their projectors are running. Poison on either side
never stops it: an event that cannot be trusted is quarantined (the projector falls back to
the chat's last valid event) and a key holding poison is reported as `corrupt` and repaired.
"""

from __future__ import annotations

import asyncio
import logging
import time
from dataclasses import dataclass, field

import msgspec
from nats.aio.msg import Msg
from nats.js import JetStreamContext
from nats.js.api import DeliverPolicy

from services.runtime.projector import Projector
from shared.contracts import SessionRecord
from shared.errors import NatsUnavailable
from shared.event_store import check_event
from shared.poison import PoisonSource, Quarantine
from shared.registry import Registry
from shared.subjects import EVENT_SUBJECTS, EVENTS_STREAM, INVALID_EVENTS_SUBJECT, chat_of, is_node_event_subject

log = logging.getLogger(__name__)


@dataclass
class DriftReport:
    chats: int = 0
    live: int = 0
    missing: list[str] = field(default_factory=list)  # live in the stream, absent from the bucket
    stale: list[str] = field(default_factory=list)  # in the bucket, but not as the last event says
    extra: list[str] = field(default_factory=list)  # in the bucket, but no live session in the stream
    corrupt: list[str] = field(default_factory=list)  # keys whose value is poison
    repaired: int = 0  # drifted chats whose key now matches their last event
    unrepaired: list[str] = field(default_factory=list)  # drifted chats a repair could not settle
    seconds: float = 0.0

    @property
    def drift(self) -> int:
        return len(self.missing) + len(self.stale) + len(self.extra) + len(self.corrupt)


@dataclass(frozen=True, slots=True)
class LastEvent:
    """A chat's last message: its sequence and the session it carries; `trusted` is False
    when the message is poison (the projector then resolves the chat's last valid event)."""

    seq: int
    session: SessionRecord | None
    trusted: bool = True


async def last_sessions(js: JetStreamContext, quarantine: Quarantine | None = None) -> dict[str, LastEvent]:
    """chat_id -> its last event, read in one pass over the stream."""
    quarantine = quarantine or Quarantine()
    info = await js.stream_info(EVENTS_STREAM)
    out: dict[str, LastEvent] = {}
    if info.state.messages == 0:
        return out
    done = asyncio.Event()

    async def on_msg(msg: Msg) -> None:
        chat = chat_of(msg.subject)
        seq = msg.metadata.sequence.stream
        if chat is not None:
            checked = check_event(chat, msg.data)
            if isinstance(checked, str):
                quarantine.report(PoisonSource.EVENT, msg.subject, seq, checked)
                out[chat] = LastEvent(seq, None, trusted=False)
            else:
                out[chat] = LastEvent(seq, checked.session)
        elif msg.subject != INVALID_EVENTS_SUBJECT and not is_node_event_subject(msg.subject):
            quarantine.report(PoisonSource.EVENT, msg.subject, seq, "its subject names no chat")
        if msg.metadata.num_pending == 0:
            done.set()

    sub = await js.subscribe(
        EVENT_SUBJECTS,
        stream=EVENTS_STREAM,
        cb=on_msg,
        ordered_consumer=True,
        deliver_policy=DeliverPolicy.LAST_PER_SUBJECT,
        pending_msgs_limit=-1,
        pending_bytes_limit=-1,
    )
    try:
        await asyncio.wait_for(done.wait(), timeout=600)
    except TimeoutError as exc:
        raise NatsUnavailable("replay: the event stream did not deliver its last messages in time") from exc
    finally:
        await sub.unsubscribe()
    return out


async def replay(
    js: JetStreamContext,
    registry: Registry,
    projector: Projector,
    *,
    repair: bool = True,
    quarantine: Quarantine | None = None,
) -> DriftReport:
    started = time.perf_counter()
    report = DriftReport()
    stream = await last_sessions(js, quarantine)
    scan = await registry.scan()
    bucket = scan.records
    report.corrupt = list(scan.corrupt)
    report.chats = len(stream)
    corrupt = set(scan.corrupt)
    for chat, last in stream.items():
        held = bucket.get(chat)
        session = last.session
        if not last.trusted:  # the chat's state is its last valid event, which the store finds
            session = (await projector.store.read(chat)).session
        if session is not None and session.is_live:
            report.live += 1
            if held is None and chat not in corrupt:
                report.missing.append(chat)
            elif held is not None and held != msgspec.structs.replace(session, version=last.seq):
                report.stale.append(chat)
        elif held is not None:
            report.extra.append(chat)
    report.extra += [chat for chat in bucket if chat not in stream]
    if repair:
        drifted = report.missing + report.stale + report.extra + report.corrupt
        semaphore = asyncio.Semaphore(64)

        async def fix(chat: str) -> bool:
            async with semaphore:
                try:
                    return await projector.project_chat(chat) != "contended"
                except Exception as exc:  # noqa: BLE001 - one chat's failure is reported, the rest go on
                    log.warning("replay: repairing chat %s failed: %s", chat, exc)
                    return False

        fixed = await asyncio.gather(*(fix(chat) for chat in drifted))
        report.repaired = sum(fixed)
        report.unrepaired = [chat for chat, ok in zip(drifted, fixed, strict=True) if not ok]
    report.seconds = time.perf_counter() - started
    log.info(
        "replay: %d chats (%d live), drift missing=%d stale=%d extra=%d corrupt=%d, repaired %d (unrepaired %d) "
        "in %.2fs",
        report.chats,
        report.live,
        len(report.missing),
        len(report.stale),
        len(report.extra),
        len(report.corrupt),
        report.repaired,
        len(report.unrepaired),
        report.seconds,
    )
    return report
