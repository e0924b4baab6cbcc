"""`sandboxctl`: the operator's command line (`python -m services.ctl` works too)."""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import sys
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import TypeVar

import docker
import msgspec
from nats.aio.client import Client
from nats.errors import Error as NatsError

from shared.config import ConfigError, NatsSettings, Settings, load_settings
from shared.contracts import SessionRecord
from shared.nats_connection import connect, nats_url
from shared.nats_credentials import EMBEDDED_DIR, role_seed_path
from shared.nats_roles import Role
from shared.poison import DECODE_ERRORS
from shared.service import setup_logging
from shared.topology import TopologyError

T = TypeVar("T")


def _settings() -> Settings:
    try:
        return load_settings()
    except ConfigError as exc:
        print(f"sandboxctl: configuration error: {exc}", file=sys.stderr)
        raise SystemExit(2) from exc


def admin_nats(settings: Settings) -> NatsSettings:
    """The operator commands connect as admin: `nats.nkey_file` when set, else the embedded
    server's admin seed when `sandboxctl up` has written one here."""
    seed = role_seed_path(EMBEDDED_DIR, Role.ADMIN)
    if settings.nats.nkey_file is None and seed.is_file():
        return msgspec.structs.replace(settings.nats, nkey_file=str(seed))
    return settings.nats


def _with_admin(settings: Settings, name: str, work: Callable[[Client], Awaitable[T]]) -> T:
    """Run `work` on an admin connection; NATS and topology failures end the command with a
    message instead of a traceback."""
    nats = admin_nats(settings)

    async def run() -> T:
        nc = await connect(nats, name=name, role=Role.ADMIN)
        try:
            return await work(nc)
        finally:
            await nc.close()

    try:
        return asyncio.run(run())
    except (ConfigError, TopologyError, NatsError, OSError, TimeoutError) as exc:
        print(f"sandboxctl: {name} against {nats_url(nats)} failed: {type(exc).__name__}: {exc}", file=sys.stderr)
        raise SystemExit(1) from exc


def cmd_up(_: argparse.Namespace) -> int:
    from services.ctl.stack import run_up  # noqa: PLC0415

    return run_up(_settings())


def cmd_build_image(_: argparse.Namespace) -> int:
    from services.runtime.image import ImageBuildError, build_sandbox_image  # noqa: PLC0415

    settings = _settings()
    try:
        image_id = build_sandbox_image(docker.from_env(), settings.sandbox.image)
    except ImageBuildError as exc:
        print(f"sandboxctl: {exc}", file=sys.stderr)
        return 1
    print(f"built {settings.sandbox.image} ({image_id})")
    return 0


def cmd_schemas(args: argparse.Namespace) -> int:
    from shared.schema_export import SCHEMA_DIR, stale, write  # noqa: PLC0415

    if args.check:
        out = stale()
        for rel in out:
            print(f"stale: schemas/{rel}")
        return 1 if out else 0
    for path in write():
        print(f"wrote {path.relative_to(SCHEMA_DIR.parent)}")
    return 0


def cmd_declare(_: argparse.Namespace) -> int:
    from shared.topology import STATUS, ensure_bucket, ensure_topology  # noqa: PLC0415

    settings = _settings()

    async def run(nc: Client) -> None:
        js = nc.jetstream(timeout=settings.nats.request_timeout_seconds)
        await ensure_topology(js, settings.streams)
        await ensure_bucket(js, STATUS, settings.streams)

    _with_admin(settings, "sandboxctl-declare", run)
    print(
        "SANDBOX_COMMANDS, SANDBOX_EVENTS, sandbox_sessions, sandbox_handled, sandbox_idempotency, "
        "sandbox_instances and sandbox_status are declared"
    )
    return 0


def cmd_nats_credentials(args: argparse.Namespace) -> int:
    from shared.nats_credentials import NkeyFileError, chat_seed_path, write_credentials  # noqa: PLC0415
    from shared.subjects import canonical_chat_id  # noqa: PLC0415

    try:
        chats = tuple(canonical_chat_id(c) for c in args.chat)
    except ValueError:
        print(f"sandboxctl: --chat takes chat ids (UUIDs), got {args.chat}", file=sys.stderr)
        return 2
    try:
        credentials = write_credentials(Path(args.out), chats)
    except NkeyFileError as exc:
        print(f"sandboxctl: {exc}: delete it to have a new key generated", file=sys.stderr)
        return 1
    for role in Role:
        print(f"{role.value:<8} {credentials.seed_file(role)}")
    for chat in credentials.chats:
        print(f"chat     {chat_seed_path(credentials.directory, chat)}")
    print(f"users    {credentials.users_file} (include it beside accounts.conf; reload the server after a change)")
    return 0


def cmd_nats_infra(args: argparse.Namespace) -> int:
    from shared.nats_infra import INFRA_DIR, stale, write  # noqa: PLC0415

    if args.check:
        out = stale()
        for name in out:
            print(f"stale: infra/nats/{name}")
        return 1 if out else 0
    for path in write():
        print(f"wrote {path.relative_to(INFRA_DIR.parents[1])}")
    return 0


def cmd_replay(args: argparse.Namespace) -> int:
    from services.runtime.projector import Projector  # noqa: PLC0415
    from services.runtime.replay import replay  # noqa: PLC0415
    from shared.event_store import EventStore  # noqa: PLC0415
    from shared.poison import Quarantine  # noqa: PLC0415
    from shared.registry import Registry  # noqa: PLC0415
    from shared.subjects import SESSIONS_BUCKET  # noqa: PLC0415
    from shared.topology import attach_topology, require_topology  # noqa: PLC0415

    settings = _settings()

    async def run(nc: Client) -> int:
        js = nc.jetstream(timeout=settings.nats.request_timeout_seconds)
        if args.dry_run:  # only reads: creates nothing
            await require_topology(js)
            kv = await js.key_value(SESSIONS_BUCKET)
        else:
            kv = await attach_topology(js, settings.streams)
        quarantine = Quarantine()  # one, so each poisoned message is reported once
        registry = Registry(js, kv, quarantine=quarantine)
        projector = Projector(js, EventStore(js, quarantine=quarantine), registry, quarantine=quarantine)
        report = await replay(js, registry, projector, repair=not args.dry_run, quarantine=quarantine)
        print(msgspec.json.format(msgspec.json.encode(report)).decode())
        # Scripts can tell: 1 when a dry run found drift, or a repair left some unrepaired.
        return 1 if (args.dry_run and report.drift) or report.unrepaired else 0

    return _with_admin(settings, "sandboxctl-replay", run)


async def node_status(nc: Client, settings: Settings, live: list[SessionRecord]) -> dict[str, object]:
    """Every node that beats or that a live session names: its state as a runtime would judge
    it now (silence counted from its last beat), its beat, its sessions in the registry."""
    from datetime import UTC, datetime, timedelta  # noqa: PLC0415

    from shared.contracts import NodeBeat, decode_node_beat  # noqa: PLC0415
    from shared.nodes import judge_node, read_node_beats  # noqa: PLC0415

    now = datetime.now(UTC)
    runtime = settings.runtime
    beats: dict[str, NodeBeat] = {}
    for _key, _rev, value in await read_node_beats(nc, settings.nats.request_timeout_seconds):
        with contextlib.suppress(*DECODE_ERRORS):
            decoded = decode_node_beat(value)
            beats[decoded.node_id] = decoded
    sessions: dict[str, int] = {}
    for record in live:
        sessions[record.node_id] = sessions.get(record.node_id, 0) + 1
    out: dict[str, object] = {}
    for node in sorted(set(beats) | set(sessions)):
        beat = beats.get(node)
        beat_at = beat.beat_at if beat is not None else None
        # A node no beat names (it never beat, or its beat expired): silent since now.
        state = judge_node(
            beat_at,
            now,
            beat_at if beat_at is not None else now,
            fresh_for=timedelta(seconds=runtime.instance_dead_after_seconds),
            dead_after=timedelta(seconds=runtime.node_dead_after_seconds),
        )
        out[node] = {
            "state": str(state),
            "last_beat_at": beat_at.isoformat() if beat_at is not None else None,
            "draining": beat.draining if beat is not None else None,
            "live_sessions": beat.live_sessions if beat is not None else None,
            "max_sessions": beat.max_sessions if beat is not None else None,
            "sessions_in_registry": sessions.get(node, 0),
        }
    return out


def cmd_status(_: argparse.Namespace) -> int:
    from shared.registry import Registry  # noqa: PLC0415
    from shared.subjects import SESSIONS_BUCKET, STATUS_BUCKET  # noqa: PLC0415
    from shared.topology import require_topology  # noqa: PLC0415

    settings = _settings()

    async def run(nc: Client) -> None:
        js = nc.jetstream(timeout=settings.nats.request_timeout_seconds)
        await require_topology(js, status_bucket=True)  # only reads: creates nothing
        sessions = await js.key_value(SESSIONS_BUCKET)
        status = await js.key_value(STATUS_BUCKET)
        live = await Registry(js, sessions).list()
        out: dict[str, object] = {"registry": {"sessions": len(live)}, "nodes": await node_status(nc, settings, live)}
        watcher = await status.watchall()
        async for entry in watcher:
            if entry is None:
                break
            if entry.value:
                try:
                    out[entry.key] = msgspec.json.decode(entry.value)
                except DECODE_ERRORS:
                    out[entry.key] = {"error": "this status block does not decode"}
        await watcher.stop()  # type: ignore[no-untyped-call]
        print(msgspec.json.format(msgspec.json.encode(out)).decode())

    _with_admin(settings, "sandboxctl-status", run)
    return 0


def _ops(name: str) -> Callable[[argparse.Namespace], int]:
    """A daily command of services/ctl/ops.py, run on an admin connection; Ctrl-C ends it
    quietly (`top` and `events --follow` run until interrupted)."""

    def run(args: argparse.Namespace) -> int:
        from services.ctl import ops  # noqa: PLC0415

        settings = _settings()
        work = getattr(ops, name.replace("-", "_"))

        async def call(nc: Client) -> int:
            code: int = await work(nc, settings, args)
            return code

        try:
            return _with_admin(settings, f"sandboxctl-{name}", call)
        except KeyboardInterrupt:
            return 0

    return run


def cmd_doctor(args: argparse.Namespace) -> int:
    from services.ctl.doctor import run_doctor  # noqa: PLC0415

    settings = _settings()
    return run_doctor(settings, admin_nats(settings), strict=args.strict)


def _daily_commands(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    from services.ctl.ops import chat_arg, label_arg, since_arg  # noqa: PLC0415

    ls = sub.add_parser("ls", help="live sessions: chat, status, node, age, expires in, labels")
    ls.add_argument("--status", help="only this status (running, provisioning, stopping, ...)")
    ls.add_argument(
        "--label", action="append", default=[], type=label_arg, help="key:value; may repeat, all must match"
    )
    ls.add_argument("--node", help="only sessions on this node")
    ls.add_argument(
        "--limit", type=int, default=50, help="at most this many (the soonest to expire; default 50, 0: all)"
    )
    ls.add_argument("--json", action="store_true", help="one JSON session record per line, streamed")
    ls.set_defaults(fn=_ops("ls"))
    show = sub.add_parser("show", help="a chat's live session and its recent events")
    show.add_argument("chat", type=chat_arg)
    show.add_argument("--events", type=int, default=20, help="how many recent events (default 20)")
    show.add_argument("--json", action="store_true")
    show.set_defaults(fn=_ops("show"))
    events = sub.add_parser("events", help="lifecycle events from the stream, of one chat or all; --follow for live")
    events.add_argument("chat", nargs="?", type=chat_arg)
    events.add_argument("--follow", "-f", action="store_true", help="keep printing new events until interrupted")
    events.add_argument("--since", type=since_arg, help="from this long ago (90s, 15m, 2h, 1d) or this ISO time")
    events.add_argument(
        "--last",
        type=int,
        default=20,
        help="without --since: start with the last N (default 20; 0 with --follow: only new)",
    )
    events.add_argument("--json", action="store_true", help="one JSON object {seq, event} per line")
    events.set_defaults(fn=_ops("events"))
    for kind, what in (("stop", "stop a chat's sandbox"), ("keepalive", "extend a chat's sandbox")):
        cmd = sub.add_parser(kind, help=f"{what} (a {kind} command over NATS; waits for its outcome)")
        cmd.add_argument("chat", type=chat_arg)
        cmd.add_argument("--session", type=chat_arg, help="act only if this is still the chat's session")
        cmd.add_argument("--wait", type=float, default=30.0, help="seconds to wait for the outcome (default 30)")
        cmd.add_argument("--json", action="store_true", help="print the outcome event as JSON")
        if kind == "stop":
            cmd.add_argument("--reason", default="operator", help="the stop's reason (default operator)")
        else:
            cmd.add_argument("--ttl", type=int, help="seconds from now (default: the configured ttl)")
        cmd.set_defaults(fn=_ops(kind))
    top = sub.add_parser("top", help="a refreshing summary: sessions per node, rates, conflicts, lag, next expiries")
    top.add_argument("--interval", type=float, default=2.0, help="seconds between refreshes (default 2)")
    top.add_argument("--iterations", type=int, default=0, help="stop after N screens (default 0: until Ctrl-C)")
    top.add_argument(
        "--metrics",
        action="append",
        default=[],
        help="a runtime's Prometheus URL for the conflict count; may repeat (default: this host's runtime)",
    )
    top.set_defaults(fn=_ops("top"))
    doctor = sub.add_parser("doctor", help="check NATS, streams, permissions, Docker, image, mounts, clocks, nodes")
    doctor.add_argument("--strict", action="store_true", help="exit 1 on warnings too")
    doctor.set_defaults(fn=cmd_doctor)


def main(argv: list[str] | None = None) -> int:
    setup_logging("WARNING")
    parser = argparse.ArgumentParser(prog="sandboxctl", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    sub.add_parser("up", help="run the whole stack (embedded nats-server, runtime, API)").set_defaults(fn=cmd_up)
    sub.add_parser("build-image", help="build the default sandbox image locally").set_defaults(fn=cmd_build_image)
    schemas = sub.add_parser("schemas", help="regenerate schemas/ from the contracts")
    schemas.add_argument("--check", action="store_true", help="only report stale files (exit 1 if any)")
    schemas.set_defaults(fn=cmd_schemas)
    sub.add_parser("declare", help="declare the streams and the KV buckets (as admin)").set_defaults(fn=cmd_declare)
    creds = sub.add_parser("nats-credentials", help="write role seeds (reused if present) and users.conf")
    creds.add_argument("--out", required=True, help="directory for <role>.nk, chat-<id>.nk and users.conf")
    creds.add_argument("--chat", action="append", default=[], help="also a chat-scoped agent for this chat id")
    creds.set_defaults(fn=cmd_nats_credentials)
    infra = sub.add_parser("nats-infra", help="regenerate infra/nats/ from shared/nats_roles.py")
    infra.add_argument("--check", action="store_true", help="only report stale files (exit 1 if any)")
    infra.set_defaults(fn=cmd_nats_infra)
    replay_cmd = sub.add_parser("replay", help="rebuild sandbox_sessions from the event stream, report drift")
    replay_cmd.add_argument("--dry-run", action="store_true", help="only report drift (exit 1 if there is any)")
    replay_cmd.set_defaults(fn=cmd_replay)
    sub.add_parser(
        "status", help="registry size, the nodes (state, beat, sessions) and the status blocks"
    ).set_defaults(fn=cmd_status)
    _daily_commands(sub)
    args = parser.parse_args(argv)
    result: int = args.fn(args)
    return result


if __name__ == "__main__":
    sys.exit(main())
