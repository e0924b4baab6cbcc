"""Replay: rebuild `sandbox_sessions` from the event stream and report the drift.

The last event of every chat subject is read in one pass (a consumer delivering the last
message per subject), the bucket in another; every chat whose key disagrees is handed to
the projector, which re-reads that chat and compare-and-sets its key. So replay is
idempotent and safe while runtimes and their projectors are running.
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
from shared.contracts import SessionRecord, decode_event
from shared.errors import NatsUnavailable
from shared.registry import Registry
from shared.subjects import EVENT_PREFIX, EVENT_SUBJECTS, EVENTS_STREAM, canonical_chat_id

log = logging.getLogger(__name__)


@dataclass
class DriftReport:
    chats: int = 0
    live: int = 0
    missing: list[str] = field(default_factory=list)  # live in the stream, absent from the bucket
    stale: list[str] = field(default_factory=list)  # in the bucket, but not as the last event says
    extra: list[str] = field(default_factory=list)  # in the bucket, but no live session in the stream
    repaired: int = 0
    seconds: float = 0.0

    @property
    def drift(self) -> int:
        return len(self.missing) + len(self.stale) + len(self.extra)


async def last_sessions(js: JetStreamContext) -> dict[str, tuple[int, SessionRecord | None]]:
    """chat_id -> (sequence of its last event, the session it carries)."""
    info = await js.stream_info(EVENTS_STREAM)
    out: dict[str, tuple[int, SessionRecord | None]] = {}
    if info.state.messages == 0:
        return out
    done = asyncio.Event()
    prefix = EVENT_PREFIX + "."

    async def on_msg(msg: Msg) -> None:
        chat = msg.subject[len(prefix) :]
        try:
            canonical_chat_id(chat)
            out[chat] = (msg.metadata.sequence.stream, decode_event(msg.data).session)
        except (ValueError, msgspec.DecodeError):
            log.debug("replay skips %s: not a chat subject or not an event", msg.subject)
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


async def replay(js: JetStreamContext, registry: Registry, projector: Projector, *, repair: bool = True) -> DriftReport:
    started = time.perf_counter()
    report = DriftReport()
    stream = await last_sessions(js)
    bucket = {r.chat_id: r for r in await registry.list()}
    report.chats = len(stream)
    for chat, (seq, session) in stream.items():
        held = bucket.get(chat)
        if session is not None and session.is_live:
            report.live += 1
            if held is None:
                report.missing.append(chat)
            elif held != msgspec.structs.replace(session, version=seq):
                report.stale.append(chat)
        elif held is not None:
            report.extra.append(chat)
    report.extra += [chat for chat in bucket if chat not in stream]
    if repair:
        drifted = report.missing + report.stale + report.extra
        semaphore = asyncio.Semaphore(64)

        async def fix(chat: str) -> None:
            async with semaphore:
                await projector.project_chat(chat)

        await asyncio.gather(*(fix(chat) for chat in drifted))
        report.repaired = len(drifted)
    report.seconds = time.perf_counter() - started
    log.info(
        "replay: %d chats (%d live), drift missing=%d stale=%d extra=%d, repaired %d in %.2fs",
        report.chats,
        report.live,
        len(report.missing),
        len(report.stale),
        len(report.extra),
        report.repaired,
        report.seconds,
    )
    return report
