"""The operator's daily commands: `ls`, `show`, `events`, `stop`, `keepalive`, `top`.

Each runs on an admin connection (`_with_admin` in `__main__`), reads NATS only (the registry,
the event stream, node beats, consumer info) and, for `stop` / `keepalive`, publishes the
command exactly as an agent would and waits for its outcome event. Exit codes are the
`Exit` enum, for scripts.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import enum
import heapq
import re
import sys
import time
import uuid
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any, TextIO

import httpx
import msgspec
from nats.aio.client import Client
from nats.aio.msg import Msg
from nats.js import JetStreamContext
from nats.js.api import ConsumerConfig, DeliverPolicy
from nats.js.errors import NotFoundError
from prometheus_client.parser import text_string_to_metric_families

from services.ctl.streams import LiveRegistry, follow, follow_registry, scan_registry
from services.ctl.terminal import Progress, Style, duration, table
from shared.config import Settings
from shared.contracts import (
    AnyCommand,
    AnyEvent,
    CommandRejected,
    KeepaliveSandbox,
    NodeBeat,
    RejectReason,
    SandboxExtended,
    SandboxStopped,
    SessionRecord,
    StopSandbox,
    decode_node_beat,
    decode_node_event,
    encode,
)
from shared.event_store import EventStore
from shared.nodes import judge_node, read_node_beats
from shared.poison import DECODE_ERRORS
from shared.registry import Registry
from shared.subjects import (
    COMMANDS_STREAM,
    EVENT_SUBJECTS,
    EVENTS_STREAM,
    MSG_ID_HEADER,
    NODE_COMMANDS_STREAM,
    SESSIONS_BUCKET,
    ConsumerName,
    canonical_chat_id,
    command_subject,
    event_subject,
    is_node_event_subject,
)
from shared.telemetry import inject


class Exit(enum.IntEnum):
    """`sandboxctl`'s exit codes (argparse's usage errors are 2 as well)."""

    OK = 0
    FAILED = 1  # NATS unreachable, a command failed, `doctor` found a failure
    USAGE = 2  # bad arguments or configuration
    NOT_FOUND = 3  # the chat has no live session
    REFUSED = 4  # the command was rejected (stale session, not running, TTL too long, ...)
    PENDING = 5  # the command was accepted; its outcome did not come within --wait


SCAN_TIMEOUT_SECONDS = 120.0
_LABELS_WIDTH = 48


def now() -> datetime:
    return datetime.now(UTC)


def chat_arg(raw: str) -> str:
    """argparse type: a chat id in any spelling uuid.UUID reads, canonical."""
    try:
        return canonical_chat_id(raw)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{raw!r} is not a chat id (a UUID)") from None


def label_arg(raw: str) -> tuple[str, str]:
    key, colon, value = raw.partition(":")
    if not colon or not key:
        raise argparse.ArgumentTypeError(f"a label filter is key:value, not {raw!r}")
    return key, value


_SINCE = re.compile(r"^(\d+(?:\.\d+)?)([smhd])$")
_UNITS = {"s": 1, "m": 60, "h": 3600, "d": 86400}


def since_arg(raw: str) -> datetime:
    """`90s`, `15m`, `2h`, `1d` ago, or an ISO 8601 time (UTC when it names no zone)."""
    match = _SINCE.match(raw.strip())
    if match:
        return now() - timedelta(seconds=float(match[1]) * _UNITS[match[2]])
    try:
        moment = datetime.fromisoformat(raw.strip())
    except ValueError:
        raise argparse.ArgumentTypeError(f"--since takes 15m, 2h, 1d or an ISO time, not {raw!r}") from None
    return moment if moment.tzinfo is not None else moment.replace(tzinfo=UTC)


def _labels(labels: dict[str, str]) -> str:
    text = ",".join(f"{k}={v}" for k, v in sorted(labels.items()))
    return text if len(text) <= _LABELS_WIDTH else text[: _LABELS_WIDTH - 1] + "…"


def _json_line(value: object, out: TextIO) -> None:
    out.write(msgspec.json.encode(value).decode() + "\n")


# --------------------------------------------------------------------------- ls


@dataclass(frozen=True, slots=True)
class SessionFilter:
    status: str | None = None
    labels: tuple[tuple[str, str], ...] = ()
    node: str | None = None

    def matches(self, record: SessionRecord) -> bool:
        if self.status is not None and record.status != self.status:
            return False
        if self.node is not None and record.node_id != self.node:
            return False
        return all(record.labels.get(k) == v for k, v in self.labels)


def session_row(record: SessionRecord, at: datetime) -> list[str]:
    return [
        record.chat_id,
        str(record.status),
        record.node_id,
        duration((at - record.created_at).total_seconds()),
        duration((record.expires_at - at).total_seconds()),
        _labels(record.labels),
    ]


SESSION_HEADERS = ("CHAT", "STATUS", "NODE", "AGE", "EXPIRES IN", "LABELS")


async def ls(nc: Client, settings: Settings, args: argparse.Namespace, out: TextIO = sys.stdout) -> int:
    """Live sessions. `--json`: one JSON record per line, streamed as the registry is read.
    The table: the `--limit` soonest to expire, sorted, and how many more match."""
    js = nc.jetstream(timeout=settings.nats.request_timeout_seconds)
    where = SessionFilter(args.status, tuple(args.label), args.node)
    limit: int = args.limit
    matched = 0
    soonest: list[tuple[float, str, SessionRecord]] = []  # a max-heap on expiry (negated)
    progress = Progress("reading the registry")

    def on_record(record: SessionRecord) -> None:
        nonlocal matched
        progress.update(matched)
        if not where.matches(record):
            return
        matched += 1
        if args.json:
            if limit == 0 or matched <= limit:
                _json_line(record, out)
            return
        item = (-record.expires_at.timestamp(), record.chat_id, record)
        if limit == 0 or len(soonest) < limit:
            heapq.heappush(soonest, item)
        elif item > soonest[0]:
            heapq.heapreplace(soonest, item)

    await scan_registry(js, on_record, timeout=SCAN_TIMEOUT_SECONDS)
    progress.done()
    shown = matched if limit == 0 else min(matched, limit)
    if not args.json:
        at = now()
        records = sorted((r for _, _, r in soonest), key=lambda r: (r.expires_at, r.chat_id))
        style = Style(out)
        out.write(table(SESSION_HEADERS, [session_row(r, at) for r in records], style, colour_column=1) + "\n")
    if shown < matched:
        print(
            f"{shown} of {matched} matching sessions shown (the soonest to expire); --limit 0 shows all",
            file=sys.stderr,
        )
    elif not args.json:
        print(f"{matched} session{'' if matched == 1 else 's'}", file=sys.stderr)
    return Exit.OK


# --------------------------------------------------------------------------- show


def event_line(seq: int, event: AnyEvent, style: Style, *, chat: bool) -> str:
    detail = []
    if event.result is not None:
        detail.append(f"result={event.result}")
    if event.reason:
        detail.append(f"reason={event.reason}")
    if event.error is not None:
        detail.append(f"error={event.error.type}: {event.error.message}")
    if event.causation_id:
        detail.append(f"cause={event.causation_id}")
    session = event.session
    if session is not None and session.is_live:
        detail.append(f"expires={session.expires_at.isoformat(timespec='seconds')}")
    parts = [
        f"{seq:>8}",
        event.occurred_at.isoformat(timespec="milliseconds"),
        style.meaning(f"{event.type:<12}", event.type),
        *([event.chat_id] if chat else []),
        (event.session_id or "-")[:8],
        event.node_id or "-",
        " ".join(detail),
    ]
    return "  ".join(parts).rstrip()


async def show(nc: Client, settings: Settings, args: argparse.Namespace, out: TextIO = sys.stdout) -> int:
    js = nc.jetstream(timeout=settings.nats.request_timeout_seconds)
    registry = Registry(js, await js.key_value(SESSIONS_BUCKET))
    record = await registry.get(args.chat)
    history = await EventStore(js).history(args.chat, limit=args.events)
    if args.json:
        body = {
            "session": record,
            "events": [{"seq": s.seq, "event": msgspec.to_builtins(s.event)} for s in history],
        }
        out.write(msgspec.json.format(msgspec.json.encode(body)).decode() + "\n")
    else:
        style = Style(out)
        if record is None:
            out.write(f"chat {args.chat}: no live session\n")
        else:
            at = now()
            rows = [
                ("chat", record.chat_id),
                ("session", record.session_id),
                ("status", style.meaning(str(record.status))),
                ("node", record.node_id),
                ("container", record.container_id or "-"),
                ("image", record.image),
                (
                    "created",
                    f"{record.created_at.isoformat()} ({duration((at - record.created_at).total_seconds())} ago)",
                ),
                (
                    "expires",
                    f"{record.expires_at.isoformat()} (in {duration((record.expires_at - at).total_seconds())})",
                ),
                ("updated", record.updated_at.isoformat()),
                ("labels", ", ".join(f"{k}={v}" for k, v in sorted(record.labels.items())) or "-"),
                ("version", str(record.version)),
            ]
            out.writelines(f"{style.paint(f'{name:<10}', 'bold')} {value}\n" for name, value in rows)
        out.write(f"\n{style.paint('recent events', 'bold')} ({len(history)}, oldest first)\n")
        out.writelines(event_line(s.seq, s.event, style, chat=False) + "\n" for s in history)
    return Exit.OK if record is not None else Exit.NOT_FOUND


# --------------------------------------------------------------------------- events


def _stream_event_line(msg: Msg, style: Style, as_json: bool) -> str:
    seq = msg.metadata.sequence.stream
    if is_node_event_subject(msg.subject):
        try:
            node_event = decode_node_event(msg.data)
        except DECODE_ERRORS as exc:
            return f"{seq:>8}  (a node event that does not decode: {exc})"
        if as_json:
            return msgspec.json.encode({"seq": seq, "event": node_event}).decode()
        when = node_event.occurred_at.isoformat(timespec="milliseconds")
        return (
            f"{seq:>8}  {when}  {style.meaning(f'{node_event.type:<12}', node_event.type)}  node {node_event.node_id}"
        )
    try:
        event = msgspec.json.decode(msg.data, type=AnyEvent)
    except DECODE_ERRORS as exc:
        return f"{seq:>8}  (an event on {msg.subject} that does not decode: {exc})"
    if as_json:
        return msgspec.json.encode({"seq": seq, "event": event}).decode()
    return event_line(seq, event, style, chat=True)


async def events(nc: Client, settings: Settings, args: argparse.Namespace, out: TextIO = sys.stdout) -> int:
    """The event stream (one chat's, or everybody's): from `--since`, else the last `--last`;
    with `--follow`, then every new event until interrupted."""
    js = nc.jetstream(timeout=settings.nats.request_timeout_seconds)
    subject = event_subject(args.chat) if args.chat else EVENT_SUBJECTS
    style = Style(out)
    if args.since is not None:
        deliver, config = DeliverPolicy.BY_START_TIME, ConsumerConfig(opt_start_time=args.since.isoformat())
    elif args.follow and args.last == 0:
        deliver, config = DeliverPolicy.NEW, None
    else:
        start = await _start_of_last(js, subject, args.last)
        deliver, config = DeliverPolicy.BY_START_SEQUENCE, ConsumerConfig(opt_start_seq=start)
    if args.follow and not style.enabled:
        # Piped: one line per event as it comes, not when a buffer fills.
        with contextlib.suppress(AttributeError, ValueError):
            out.reconfigure(line_buffering=True)  # type: ignore[attr-defined]

    def on_message(msg: Msg) -> None:
        out.write(_stream_event_line(msg, style, args.json) + "\n")
        if args.follow:
            out.flush()

    following = await follow(js, EVENTS_STREAM, subject, on_message, deliver=deliver, config=config)
    try:
        if args.follow:
            print(f"following {subject} (Ctrl-C to stop)", file=sys.stderr, flush=True)
            await asyncio.Event().wait()  # until interrupted
        else:
            await asyncio.wait_for(following.caught_up.wait(), SCAN_TIMEOUT_SECONDS)
    finally:
        await following.stop()
    return Exit.OK


async def _start_of_last(js: JetStreamContext, subject: str, last: int) -> int:
    """The stream sequence from which `subject`'s last `last` messages are delivered (at
    least 1: the server takes 0 for "no start sequence", and an empty stream has last_seq 0)."""
    return max(1, await _first_of_last(js, subject, last))


async def _first_of_last(js: JetStreamContext, subject: str, last: int) -> int:
    if last == 0:
        info = await js.stream_info(EVENTS_STREAM)
        return info.state.last_seq + 1
    if subject == EVENT_SUBJECTS:
        info = await js.stream_info(EVENTS_STREAM)
        return max(info.state.first_seq, info.state.last_seq - last + 1)
    history = await EventStore(js).history(subject.removeprefix("sandbox.events."), limit=last)
    if history:
        return history[0].seq
    info = await js.stream_info(EVENTS_STREAM)
    return info.state.last_seq + 1


# --------------------------------------------------------------------------- stop / keepalive


async def send_command(js: JetStreamContext, command: AnyCommand, wait: float) -> AnyEvent | None:
    """Publish `command` as an agent would (`Nats-Msg-Id` = its id, trace context) and wait
    for its outcome on the chat's subject; None when it did not come within `wait`."""
    chat = str(command.chat_id)
    loop = asyncio.get_running_loop()
    outcome: asyncio.Future[AnyEvent] = loop.create_future()

    def on_message(msg: Msg) -> None:
        with contextlib.suppress(*DECODE_ERRORS):
            event = msgspec.json.decode(msg.data, type=AnyEvent)
            if event.causation_id == str(command.command_id) and not outcome.done():
                is_claim = event.type in ("provisioning", "stopping")
                if not is_claim:
                    outcome.set_result(event)

    # The waiter first (new messages only), then the command: the outcome cannot slip past.
    following = await follow(js, EVENTS_STREAM, event_subject(chat), on_message, deliver=DeliverPolicy.NEW)
    try:
        await js.publish(
            command_subject(command.kind, chat),
            encode(command),
            headers=inject({MSG_ID_HEADER: str(command.command_id)}),
        )
        try:
            return await asyncio.wait_for(outcome, wait)
        except TimeoutError:
            return None
    finally:
        await following.stop()


def _outcome_exit(event: AnyEvent, success: type[AnyEvent]) -> Exit:
    if isinstance(event, success):
        return Exit.OK
    if isinstance(event, CommandRejected):
        return Exit.NOT_FOUND if event.reason == RejectReason.NO_LIVE_SESSION else Exit.REFUSED
    return Exit.FAILED


def _report(event: AnyEvent | None, command: AnyCommand, args: argparse.Namespace, done: str) -> None:
    chat = str(command.chat_id)
    if event is None:
        print(
            f"sandboxctl: {command.kind} {command.command_id} for chat {chat} was accepted; its outcome did not "
            f"come within {args.wait:g}s (watch `sandboxctl events {chat} --follow`)",
            file=sys.stderr,
        )
        return
    if args.json:
        _json_line(event, sys.stdout)
        return
    style = Style(sys.stdout)
    if event.type in ("stopped", "extended"):
        print(f"{style.meaning(event.type)} chat {chat}: {done}")
    else:
        detail = event.reason or (event.error.message if event.error else "")
        print(f"{style.meaning(event.type)} chat {chat}: {detail}", file=sys.stderr)


async def stop(nc: Client, settings: Settings, args: argparse.Namespace) -> int:
    js = nc.jetstream(timeout=settings.nats.request_timeout_seconds)
    command = StopSandbox(
        command_id=uuid.uuid4(),
        chat_id=uuid.UUID(args.chat),
        session_id=uuid.UUID(args.session) if args.session else None,
        reason=args.reason,
        requested_at=now(),
        requested_by="sandboxctl",
    )
    event = await send_command(js, command, args.wait)
    session = event.session if event is not None else None
    _report(event, command, args, f"session {session.session_id if session else '-'} stopped")
    return Exit.PENDING if event is None else _outcome_exit(event, SandboxStopped)


async def keepalive(nc: Client, settings: Settings, args: argparse.Namespace) -> int:
    js = nc.jetstream(timeout=settings.nats.request_timeout_seconds)
    command = KeepaliveSandbox(
        command_id=uuid.uuid4(),
        chat_id=uuid.UUID(args.chat),
        session_id=uuid.UUID(args.session) if args.session else None,
        ttl_seconds=args.ttl,
        requested_at=now(),
        requested_by="sandboxctl",
    )
    event = await send_command(js, command, args.wait)
    session = event.session if event is not None else None
    expires = (
        f"expires {session.expires_at.isoformat(timespec='seconds')} "
        f"(in {duration((session.expires_at - now()).total_seconds())})"
        if session is not None
        else ""
    )
    _report(event, command, args, expires + (f" ({event.reason})" if event is not None and event.reason else ""))
    return Exit.PENDING if event is None else _outcome_exit(event, SandboxExtended)


# --------------------------------------------------------------------------- top


@dataclass
class Counter:
    """A monotonically growing number and its rate between two readings."""

    value: float | None = None
    at: float = 0.0
    rate: float | None = None

    def read(self, value: float | None, at: float) -> None:
        if value is not None and self.value is not None and at > self.at:
            self.rate = max(0.0, (value - self.value) / (at - self.at))
        self.value, self.at = value, at


APPEND_CONFLICTS = "sandbox_append_conflict_total"


async def scrape_conflicts(urls: Sequence[str]) -> float | None:
    """Total lost append races the runtimes' metrics report (None: none reachable)."""
    total: float | None = None
    async with httpx.AsyncClient(timeout=1.0) as http:
        for url in urls:
            try:
                answer = await http.get(url)
                answer.raise_for_status()
            except httpx.HTTPError:
                continue
            total = total or 0.0
            for family in text_string_to_metric_families(answer.text):
                total += sum(s.value for s in family.samples if s.name == APPEND_CONFLICTS)
    return total


@dataclass
class TopState:
    registry: LiveRegistry
    commands: Counter
    events: Counter
    conflicts: Counter


async def _lag(js: JetStreamContext) -> list[tuple[str, int, int]]:
    """(consumer, pending, ack pending) of the system's consumers."""
    rows: list[tuple[str, int, int]] = []
    for stream, name in ((COMMANDS_STREAM, ConsumerName.RUNTIME), (EVENTS_STREAM, ConsumerName.PROJECTOR)):
        try:
            info = await js.consumer_info(stream, name)
        except NotFoundError:
            continue
        rows.append((str(name), info.num_pending or 0, info.num_ack_pending or 0))
    with contextlib.suppress(NotFoundError):
        nodes = await js.consumers_info(NODE_COMMANDS_STREAM)
        rows.extend((info.name, info.num_pending or 0, info.num_ack_pending or 0) for info in nodes)
    return rows


async def top_frame(nc: Client, settings: Settings, state: TopState, metrics: Sequence[str]) -> list[str]:
    """One screen of `top`, as lines without colour codes decided yet (Style applies them)."""
    js = nc.jetstream(timeout=settings.nats.request_timeout_seconds)
    at, clock = now(), time.monotonic()
    commands, events_info = await js.stream_info(COMMANDS_STREAM), await js.stream_info(EVENTS_STREAM)
    state.commands.read(commands.state.last_seq, clock)
    state.events.read(events_info.state.last_seq, clock)
    state.conflicts.read(await scrape_conflicts(metrics), clock)
    sessions = list(state.registry.sessions.items())
    by_node: dict[str, int] = {}
    by_status: dict[str, int] = {}
    for _, brief in sessions:
        by_node[brief.node_id] = by_node.get(brief.node_id, 0) + 1
        by_status[brief.status] = by_status.get(brief.status, 0) + 1
    beats: dict[str, NodeBeat] = {}
    for _key, _rev, value in await read_node_beats(nc, settings.nats.request_timeout_seconds):
        with contextlib.suppress(*DECODE_ERRORS):
            decoded = decode_node_beat(value)
            beats[decoded.node_id] = decoded

    def rate(counter: Counter, unit: str) -> str:
        return "…" if counter.rate is None else f"{counter.rate:.1f} {unit}/s"

    conflicts = state.conflicts
    conflict_text = (
        "n/a (no runtime metrics reachable; --metrics URL)"
        if conflicts.value is None
        else f"{conflicts.value:.0f} total, {rate(conflicts, 'conflicts')}"
    )
    lines = [
        f"sandboxd top — {at.isoformat(timespec='seconds')}",
        f"sessions  {len(sessions)} live: " + ", ".join(f"{s} {n}" for s, n in sorted(by_status.items())),
        f"commands  {rate(state.commands, 'commands')} (stream seq {commands.state.last_seq})",
        f"events    {rate(state.events, 'events')} (stream seq {events_info.state.last_seq})",
        f"conflicts {conflict_text}",
        "",
        "NODE                STATE    LIVE   BEAT   MAX     LAST BEAT",
    ]
    runtime = settings.runtime
    for node in sorted(set(beats) | set(by_node)):
        beat = beats.get(node)
        beat_at = beat.beat_at if beat is not None else None
        node_state = judge_node(
            beat_at,
            at,
            beat_at if beat_at is not None else at,
            fresh_for=timedelta(seconds=runtime.instance_dead_after_seconds),
            dead_after=timedelta(seconds=runtime.node_dead_after_seconds),
        )
        live = str(by_node.get(node, 0))
        beat_live = str(beat.live_sessions) if beat is not None else "-"
        limit = "-" if beat is None else ("∞" if beat.max_sessions is None else str(beat.max_sessions))
        ago = "never" if beat_at is None else duration((at - beat_at).total_seconds()) + " ago"
        drain = " draining" if beat is not None and beat.draining else ""
        lines.append(f"{node[:19]:<19} {node_state!s:<8} {live:>5} {beat_live:>6} {limit:>5}     {ago}{drain}")
    lines += ["", "CONSUMER                        PENDING  ACK PENDING"]
    lines += [f"{name[:31]:<31} {pending:>7}  {acks:>11}" for name, pending, acks in await _lag(js)]
    soonest = heapq.nsmallest(5, sessions, key=lambda item: item[1].expires_at)
    lines += ["", "NEXT EXPIRIES"]
    lines += [
        f"{chat}  {brief.status:<12} {brief.node_id[:19]:<19} in {duration((brief.expires_at - at).total_seconds())}"
        for chat, brief in soonest
    ] or ["(none)"]
    return lines


_STATE_WORDS = re.compile(r"\b(alive|silent|dead|running|provisioning|stopping|paused|draining)\b")


def _paint_frame(lines: list[str], style: Style) -> str:
    painted = []
    for i, line in enumerate(lines):
        if i == 0 or line.isupper() or line.startswith(("NODE ", "CONSUMER ", "NEXT EXPIRIES")):
            painted.append(style.paint(line, "bold"))
        else:
            painted.append(_STATE_WORDS.sub(lambda m: style.meaning(m[0]), line))
    return "\n".join(painted)


async def top(nc: Client, settings: Settings, args: argparse.Namespace, out: TextIO = sys.stdout) -> int:
    js = nc.jetstream(timeout=settings.nats.request_timeout_seconds)
    registry = LiveRegistry()
    following = await follow_registry(js, registry.apply)
    style = Style(out)
    metrics = args.metrics or [f"http://127.0.0.1:{settings.telemetry.runtime_metrics_port}/metrics"]
    state = TopState(registry, Counter(), Counter(), Counter())
    try:
        if style.enabled:
            out.write("reading the registry…\n")
            out.flush()
        await asyncio.wait_for(following.caught_up.wait(), SCAN_TIMEOUT_SECONDS)
        frames = 0
        while True:
            text = _paint_frame(await top_frame(nc, settings, state, metrics), style)
            if style.enabled:
                out.write("\x1b[H\x1b[2J" + text + "\n")  # home, clear: a refreshing screen
            else:
                out.write(text + "\n\n")
            out.flush()
            frames += 1
            if args.iterations and frames >= args.iterations:
                return Exit.OK
            await asyncio.sleep(args.interval)
    finally:
        await following.stop()


Runner = Callable[[Client, Settings, argparse.Namespace], Any]
