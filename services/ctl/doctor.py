"""`sandboxctl doctor`: is this installation able to run sandboxes, and if not, what to do.

Each check is a small function returning `Finding`s (ok / warn / fail, what was seen, and the
fix); one that raises is a failure naming the exception, never the end of the run. The NATS
checks need a connection; without one they are reported as not run, and the host checks
(Docker engine, image, mount sources) still run.
"""

from __future__ import annotations

import asyncio
import enum
import os
import sys
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import TextIO

import docker
import msgspec
from docker.errors import DockerException, ImageNotFound
from nats.aio.client import Client
from nats.js import JetStreamContext
from nats.js.api import StreamConfig
from nats.js.errors import BucketNotFoundError, NotFoundError

from services.ctl.terminal import Style
from shared.config import NatsSettings, Settings
from shared.contracts import NodeBeat, decode_node_beat
from shared.nats_connection import connect, nats_url
from shared.nats_roles import Role
from shared.nodes import NODE_KEY_PREFIX, NodeState, judge_node
from shared.poison import DECODE_ERRORS
from shared.subjects import INSTANCES_BUCKET, STATUS_BUCKET
from shared.topology import (
    HANDLED,
    IDEMPOTENCY,
    INSTANCES,
    SESSIONS,
    STATUS,
    commands_stream_config,
    events_stream_config,
    node_commands_stream_config,
)

# A node's clock this far from the server's is suspect (expiry and claims compare times).
SKEW_WARN_SECONDS = 1.0
SKEW_FAIL_SECONDS = 5.0
_DRIFT_FIELDS = (
    "duplicate_window",
    "max_age",
    "max_bytes",
    "max_msgs_per_subject",
    "max_msg_size",
    "discard",
    "num_replicas",
    "allow_direct",
)
_CHECK_TIMEOUT = 10.0


class Level(enum.StrEnum):
    OK = "ok"
    WARN = "warn"
    FAIL = "fail"


@dataclass(frozen=True, slots=True)
class Finding:
    level: Level
    check: str
    detail: str
    fix: str = ""


DECLARE_FIX = "run `sandboxctl declare` (as admin) or `just up`"


def _ok(check: str, detail: str) -> Finding:
    return Finding(Level.OK, check, detail)


# --------------------------------------------------------------------------- NATS


async def check_permissions(nc: Client, _: Settings) -> list[Finding]:
    js = nc.jetstream(timeout=3.0)
    try:
        info = await js.account_info()
    except Exception as exc:  # noqa: BLE001 - any refusal is the finding
        return [
            Finding(
                Level.FAIL,
                "nats permissions",
                f"JetStream account info refused: {type(exc).__name__}: {exc}",
                "connect as admin: SANDBOXD_NATS_NKEY_FILE=.sandboxd/nats/admin.nk "
                "(or run from the directory of `just up`)",
            )
        ]
    return [
        _ok("nats permissions", f"JetStream reachable as admin ({info.streams} streams, {info.consumers} consumers)")
    ]


def _stream_findings(name: str, have: StreamConfig, wanted: StreamConfig) -> Finding:
    if have.retention != wanted.retention or set(have.subjects or []) != set(wanted.subjects or []):
        return Finding(
            Level.FAIL,
            f"stream {name}",
            f"retention {have.retention} / subjects {have.subjects}; the contract needs "
            f"{wanted.retention} / {wanted.subjects}",
            "these cannot change in place: move the old stream away, then `sandboxctl declare`",
        )
    drift = [
        f"{f} {getattr(have, f)!r} (settings: {getattr(wanted, f)!r})"
        for f in _DRIFT_FIELDS
        if getattr(have, f) != getattr(wanted, f)
    ]
    if drift:
        return Finding(Level.WARN, f"stream {name}", "differs from the settings: " + "; ".join(drift), DECLARE_FIX)
    return _ok(f"stream {name}", f"as declared ({have.retention}, {', '.join(have.subjects or [])})")


async def check_streams(nc: Client, settings: Settings) -> list[Finding]:
    js = nc.jetstream(timeout=3.0)
    findings = []
    for wanted in (
        commands_stream_config(settings.streams),
        node_commands_stream_config(settings.streams),
        events_stream_config(settings.streams),
    ):
        name = wanted.name or ""
        try:
            info = await js.stream_info(name)
        except NotFoundError:
            findings.append(Finding(Level.FAIL, f"stream {name}", "missing", DECLARE_FIX))
            continue
        findings.append(_stream_findings(name, info.config, wanted))
    for spec in (SESSIONS, HANDLED, IDEMPOTENCY, INSTANCES, STATUS):
        try:
            await js.key_value(spec.name)
        except BucketNotFoundError:
            findings.append(Finding(Level.FAIL, f"bucket {spec.name}", "missing", DECLARE_FIX))
        else:
            findings.append(_ok(f"bucket {spec.name}", "present"))
    return findings


@dataclass(frozen=True, slots=True)
class _Beat:
    beat: NodeBeat
    stored_at: datetime  # the server's clock when it was written


async def _node_beats(js: JetStreamContext) -> list[_Beat]:
    """Every node's last beat and when the server stored it (for the clock comparison)."""
    kv = await js.key_value(INSTANCES_BUCKET)
    beats = []
    for key in await _keys(kv):
        if not key.startswith(NODE_KEY_PREFIX):
            continue
        raw = await js.get_last_msg(f"KV_{INSTANCES_BUCKET}", f"$KV.{INSTANCES_BUCKET}.{key}", direct=True)
        if not raw.data:
            continue
        try:
            beat = decode_node_beat(raw.data)
        except DECODE_ERRORS:
            continue
        stored = raw.time or _header_time((raw.headers or {}).get("Nats-Time-Stamp"))
        if stored is not None:
            beats.append(_Beat(beat, stored))
    return beats


async def _keys(kv: object) -> list[str]:
    try:
        keys: list[str] = await kv.keys()  # type: ignore[attr-defined]
    except Exception:  # noqa: BLE001 - nats-py raises NoKeysError for an empty bucket
        return []
    return keys


def _header_time(raw: str | None) -> datetime | None:
    """An RFC 3339 time with nanoseconds (the server's `Nats-Time-Stamp`)."""
    if not raw:
        return None
    head, _, frac = raw.rstrip("Z").partition(".")
    try:
        return datetime.fromisoformat(f"{head}.{(frac + '000000')[:6]}+00:00" if frac else f"{head}+00:00")
    except ValueError:
        return None


async def check_nodes(nc: Client, settings: Settings) -> list[Finding]:
    js = nc.jetstream(timeout=3.0)
    beats = await _node_beats(js)
    if not beats:
        return [
            Finding(
                Level.FAIL,
                "node heartbeats",
                "no node has ever beaten",
                "start a runtime: `just up` (or `python -m services.runtime`) with the runtime role's seed",
            )
        ]
    at = datetime.now(UTC)
    runtime = settings.runtime
    findings = []
    alive = 0
    for seen in sorted(beats, key=lambda b: b.beat.node_id):
        beat = seen.beat
        state = judge_node(
            beat.beat_at,
            at,
            beat.beat_at,
            fresh_for=timedelta(seconds=runtime.instance_dead_after_seconds),
            dead_after=timedelta(seconds=runtime.node_dead_after_seconds),
        )
        ago = (at - beat.beat_at).total_seconds()
        capacity = f"{beat.live_sessions}/{beat.max_sessions or '∞'} sessions"
        if state == NodeState.ALIVE:
            alive += 1
            findings.append(_ok(f"node {beat.node_id}", f"alive (beat {ago:.1f}s ago, {capacity})"))
        else:
            findings.append(
                Finding(
                    Level.WARN,
                    f"node {beat.node_id}",
                    f"{state} (last beat {ago:.0f}s ago, {capacity})",
                    "restart its runtime, or ignore a node that was retired",
                )
            )
        # The node wrote beat_at with its clock; the server stamped the message with its own.
        skew = (beat.beat_at - seen.stored_at).total_seconds()
        level = Level.OK
        if abs(skew) >= SKEW_FAIL_SECONDS:
            level = Level.FAIL
        elif abs(skew) >= SKEW_WARN_SECONDS:
            level = Level.WARN
        findings.append(
            Finding(
                level,
                f"clock {beat.node_id}",
                f"{round(skew * 1000):+d} ms from the NATS server's clock",
                "" if level == Level.OK else "run NTP (chrony / systemd-timesyncd) on that host",
            )
        )
    skews = [(b.beat.beat_at - b.stored_at).total_seconds() for b in beats]
    if len(skews) > 1:
        spread = max(skews) - min(skews)
        level = Level.OK if spread < SKEW_WARN_SECONDS else (Level.WARN if spread < SKEW_FAIL_SECONDS else Level.FAIL)
        findings.append(
            Finding(
                level,
                "clock skew between nodes",
                f"{spread * 1000:.0f} ms",
                "" if level == Level.OK else "run NTP on every node",
            )
        )
    if alive == 0:
        findings.append(
            Finding(
                Level.FAIL,
                "node heartbeats",
                "no node is alive: nothing can create sandboxes",
                "start a runtime (`just up`)",
            )
        )
    return findings


async def check_reaper(nc: Client, settings: Settings) -> list[Finding]:
    js = nc.jetstream(timeout=3.0)
    kv = await js.key_value(STATUS_BUCKET)
    newest: datetime | None = None
    for key in await _keys(kv):
        if not key.startswith("reaper."):
            continue
        entry = await kv.get(key)
        try:
            block = msgspec.json.decode(entry.value or b"{}")
            seen = datetime.fromisoformat(str(block.get("last_run_ts") or block.get("last_seen") or ""))
        except (ValueError, AttributeError, TypeError, msgspec.DecodeError):
            continue
        seen = seen if seen.tzinfo is not None else seen.replace(tzinfo=UTC)
        newest = seen if newest is None or seen > newest else newest
    limit = max(30.0, settings.telemetry.status_interval_seconds * 3)
    if newest is None:
        return [
            Finding(
                Level.WARN,
                "reaper",
                "no reaper status block",
                "start a reaper (`just up` runs one); nothing expires without it",
            )
        ]
    ago = (datetime.now(UTC) - newest).total_seconds()
    if ago > limit:
        return [
            Finding(
                Level.WARN,
                "reaper",
                f"last reported {ago:.0f}s ago",
                "check the reaper process; nothing expires without it",
            )
        ]
    return [_ok("reaper", f"reported {ago:.0f}s ago")]


# --------------------------------------------------------------------------- this host


def check_docker(settings: Settings) -> list[Finding]:
    try:
        client = docker.from_env(timeout=5)
        client.ping()
    except DockerException as exc:
        return [
            Finding(
                Level.FAIL,
                "docker engine",
                f"not reachable: {exc}",
                "start it: `dockerd --bridge=none --iptables=false &` (apt-get install docker.io), or set DOCKER_HOST",
            )
        ]
    try:
        version = client.version().get("Version", "?")
        findings = [_ok("docker engine", f"reachable (Docker {version})")]
        try:
            image = client.images.get(settings.sandbox.image)
            findings.append(_ok("sandbox image", f"{settings.sandbox.image} present ({(image.id or '')[:19]})"))
        except ImageNotFound:
            findings.append(
                Finding(
                    Level.FAIL,
                    "sandbox image",
                    f"{settings.sandbox.image} is missing",
                    "run `sandboxctl build-image` (or `just image`)",
                )
            )
        return findings
    finally:
        client.close()


def check_mounts(settings: Settings) -> list[Finding]:
    sandbox = settings.sandbox
    findings = []
    chats = Path(sandbox.chats_root)
    if chats.is_dir():
        writable = os.access(chats, os.W_OK | os.X_OK)
        findings.append(
            _ok("chats root", f"{chats} exists and is writable")
            if writable
            else Finding(
                Level.FAIL,
                "chats root",
                f"{chats} is not writable",
                f"chmod u+w {chats} (the runtime creates chat directories in it)",
            )
        )
    else:
        findings.append(
            Finding(
                Level.WARN,
                "chats root",
                f"{chats} does not exist yet",
                f"mkdir -p {chats} (the runtime creates it on start)",
            )
        )
    for name, raw in (
        ("dependencies", sandbox.dependencies_host_path),
        ("lambda tools", sandbox.lambda_tools_host_path),
    ):
        path = Path(raw)
        if path.is_dir():
            findings.append(_ok(f"{name} mount", f"{path} exists"))
        else:
            findings.append(
                Finding(
                    Level.FAIL,
                    f"{name} mount",
                    f"{path} does not exist (every create would fail: sandbox_start_failed)",
                    f"mkdir -p {path}",
                )
            )
    return findings


# --------------------------------------------------------------------------- running it


NatsCheck = Callable[[Client, Settings], Awaitable[list[Finding]]]
NATS_CHECKS: tuple[NatsCheck, ...] = (check_permissions, check_streams, check_nodes, check_reaper)


async def _run_nats(check: NatsCheck, nc: Client, settings: Settings) -> list[Finding]:
    try:
        return await asyncio.wait_for(check(nc, settings), _CHECK_TIMEOUT)
    except Exception as exc:  # noqa: BLE001 - a broken check is a finding, not the end of the run
        name = check.__name__.removeprefix("check_")
        return [Finding(Level.FAIL, name, f"could not check: {type(exc).__name__}: {exc}")]


async def diagnose(settings: Settings, nats: NatsSettings, emit: Callable[[Finding], None]) -> None:
    try:
        nc = await connect(nats, name="sandboxctl-doctor", role=Role.ADMIN)
    except Exception as exc:  # noqa: BLE001 - unreachable is the finding
        emit(
            Finding(
                Level.FAIL,
                "nats",
                f"cannot connect to {nats_url(nats)}: {exc}",
                "start the stack (`just up`) or set SANDBOXD_NATS_URL / SANDBOXD_NATS_NKEY_FILE",
            )
        )
    else:
        try:
            rtt = await nc.rtt()
            emit(_ok("nats", f"connected to {nats_url(nats)} (rtt {rtt * 1000:.1f} ms)"))
            for check in NATS_CHECKS:
                for finding in await _run_nats(check, nc, settings):
                    emit(finding)
        finally:
            await nc.close()
    for host_check in (check_docker, check_mounts):
        try:
            found = await asyncio.to_thread(host_check, settings)
        except Exception as exc:  # noqa: BLE001 - as above
            found = [Finding(Level.FAIL, host_check.__name__.removeprefix("check_"), f"could not check: {exc}")]
        for finding in found:
            emit(finding)


def run_doctor(settings: Settings, nats: NatsSettings, *, strict: bool, out: TextIO = sys.stdout) -> int:
    """Print one line per finding as it is made; 1 when any failed (or warned, with strict)."""
    style = Style(out)
    seen: list[Finding] = []

    def emit(finding: Finding) -> None:
        seen.append(finding)
        level = style.meaning(f"{finding.level:<4}", str(finding.level))
        out.write(f"{level}  {finding.check:<28} {finding.detail}\n")
        if finding.fix:
            out.write(f"      {'':<28} {style.paint('fix:', 'bold')} {finding.fix}\n")
        out.flush()

    asyncio.run(diagnose(settings, nats, emit))
    fails = sum(f.level == Level.FAIL for f in seen)
    warns = sum(f.level == Level.WARN for f in seen)
    out.write(f"\n{len(seen)} checks: {fails} failed, {warns} warnings\n")
    return 1 if fails or (strict and warns) else 0
