"""`sandboxctl`: the operator's command line (`python -m services.ctl` works too)."""

from __future__ import annotations

import argparse
import asyncio
import sys

import docker
import msgspec

from shared.config import ConfigError, Settings, load_settings
from shared.nats_connection import connect
from shared.service import setup_logging


def _settings() -> Settings:
    try:
        return load_settings()
    except ConfigError as exc:
        print(f"sandboxctl: configuration error: {exc}", file=sys.stderr)
        raise SystemExit(2) from exc


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
    from shared.topology import ensure_topology  # noqa: PLC0415

    settings = _settings()

    async def run() -> None:
        nc = await connect(settings.nats, name="sandboxctl")
        try:
            await ensure_topology(nc.jetstream(), settings.streams)
        finally:
            await nc.close()

    asyncio.run(run())
    print("SANDBOX_COMMANDS, SANDBOX_EVENTS and sandbox_sessions are declared")
    return 0


def cmd_replay(args: argparse.Namespace) -> int:
    from services.runtime.projector import Projector  # noqa: PLC0415
    from services.runtime.replay import replay  # noqa: PLC0415
    from shared.event_store import EventStore  # noqa: PLC0415
    from shared.registry import Registry  # noqa: PLC0415
    from shared.topology import ensure_topology  # noqa: PLC0415

    settings = _settings()

    async def run() -> int:
        nc = await connect(settings.nats, name="sandboxctl-replay")
        try:
            js = nc.jetstream(timeout=settings.nats.request_timeout_seconds)
            kv = await ensure_topology(js, settings.streams)
            registry = Registry(js, kv)
            report = await replay(js, registry, Projector(js, EventStore(js), registry), repair=not args.dry_run)
        finally:
            await nc.close()
        print(msgspec.json.format(msgspec.json.encode(report)).decode())
        return 1 if args.dry_run and report.drift else 0

    return asyncio.run(run())


def cmd_status(_: argparse.Namespace) -> int:
    from shared.registry import Registry  # noqa: PLC0415
    from shared.topology import ensure_status_bucket, ensure_topology  # noqa: PLC0415

    settings = _settings()

    async def run() -> None:
        nc = await connect(settings.nats, name="sandboxctl-status")
        try:
            js = nc.jetstream(timeout=settings.nats.request_timeout_seconds)
            sessions = await ensure_topology(js, settings.streams)
            status = await ensure_status_bucket(js, settings.streams)
            live = await Registry(js, sessions).list()
            out: dict[str, object] = {"registry": {"sessions": len(live)}}
            watcher = await status.watchall()
            async for entry in watcher:
                if entry is None:
                    break
                if entry.value:
                    out[entry.key] = msgspec.json.decode(entry.value)
            await watcher.stop()  # type: ignore[no-untyped-call]
        finally:
            await nc.close()
        print(msgspec.json.format(msgspec.json.encode(out)).decode())

    asyncio.run(run())
    return 0


def main(argv: list[str] | None = None) -> int:
    setup_logging("WARNING")
    parser = argparse.ArgumentParser(prog="sandboxctl", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    sub.add_parser("up", help="run the whole stack (embedded nats-server, runtime, API)").set_defaults(fn=cmd_up)
    sub.add_parser("build-image", help="build the default sandbox image locally").set_defaults(fn=cmd_build_image)
    schemas = sub.add_parser("schemas", help="regenerate schemas/ from the contracts")
    schemas.add_argument("--check", action="store_true", help="only report stale files (exit 1 if any)")
    schemas.set_defaults(fn=cmd_schemas)
    sub.add_parser("declare", help="declare the streams and the KV bucket").set_defaults(fn=cmd_declare)
    replay_cmd = sub.add_parser("replay", help="rebuild sandbox_sessions from the event stream, report drift")
    replay_cmd.add_argument("--dry-run", action="store_true", help="only report drift (exit 1 if there is any)")
    replay_cmd.set_defaults(fn=cmd_replay)
    sub.add_parser("status", help="registry size and the reapers' status blocks").set_defaults(fn=cmd_status)
    args = parser.parse_args(argv)
    result: int = args.fn(args)
    return result


if __name__ == "__main__":
    sys.exit(main())
