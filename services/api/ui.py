"""The live dashboard at `/ui`: server-rendered HTML, one small script, server-sent events.

Auth: a browser cannot send the `X-API-Token` header when it navigates, and a token in the
query string would end up in access logs, history and referrers. So `/ui` without a valid
cookie is a sign-in page whose form POSTs the token (the script also takes it from the URL
fragment, `/ui#token=...`, which browsers never send to the server); a valid token is answered
with an HttpOnly, SameSite=Strict cookie scoped to `/ui` holding an HMAC of the token (never
the token itself) and a redirect to `/ui`. Every check is in constant time; the header works
too, for curl. Changing the token invalidates every cookie.

Data: the page renders the API's session index (the first `PAGE_ROWS` by chat id) and the
nodes' capacity (their beats); `/ui/feed` streams every new event from an ordered consumer
on SANDBOX_EVENTS (deliver new) plus the nodes every few seconds, and `/ui/state` is the same
snapshot as JSON, which the script re-reads whenever its feed (re)connects.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import hmac
import html
import logging
from collections.abc import AsyncGenerator
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import msgspec
from litestar import MediaType, Request, Response, Router, get, post
from litestar.datastructures import Cookie, State
from litestar.exceptions import NotAuthorizedException
from litestar.params import FromPath, FromQuery, URLEncodedBody
from litestar.response import Redirect, ServerSentEvent, ServerSentEventMessage
from nats.aio.client import Client
from nats.aio.msg import Msg
from nats.js.api import DeliverPolicy

from services.api.services import services_of
from services.api.session_index import RegistryFollower, SessionQuery
from shared.config import ApiSettings
from shared.contracts import NodeBeat, SessionRecord, decode_event, decode_node_beat, decode_node_event
from shared.nodes import read_node_beats
from shared.poison import DECODE_ERRORS
from shared.subjects import EVENT_SUBJECTS, EVENTS_STREAM, is_node_event_subject

log = logging.getLogger(__name__)

COOKIE = "sandboxd_ui"
COOKIE_MAX_AGE = 12 * 3600
PAGE_ROWS = 500
NODES_EVERY_SECONDS = 3.0
# A feed ends after this long and the browser reconnects (and re-reads the state): uvicorn
# waits for open responses when it shuts down, and an endless stream would hold it up.
FEED_MAX_SECONDS = 30.0
_FEED_QUEUE = 10_000
_STATIC = Path(__file__).resolve().parent / "static"
_SECURITY_HEADERS = {
    "Content-Security-Policy": (
        "default-src 'none'; script-src 'self'; style-src 'self'; connect-src 'self'; img-src 'self'; "
        "base-uri 'none'; form-action 'self'; frame-ancestors 'none'"
    ),
    "Referrer-Policy": "same-origin",  # with no-referrer a form POST says `Origin: null`
    "X-Content-Type-Options": "nosniff",
    "Cache-Control": "no-store",
}


def _cookie_value(token: str) -> str:
    """What the cookie holds: derived from the token, useless anywhere else."""
    return hmac.new(token.encode(), b"sandboxd-ui-cookie-v1", hashlib.sha256).hexdigest()


class UiAuth:
    def __init__(self, api: ApiSettings) -> None:
        self._token = (api.token or "").encode()
        self._cookie = _cookie_value(api.token).encode() if api.token else b""
        self.header = api.token_header

    def token_ok(self, given: str | None) -> bool:
        return bool(given and self._token and hmac.compare_digest(given.encode(), self._token))

    def allowed(self, request: Request[Any, Any, Any]) -> bool:
        cookie = request.cookies.get(COOKIE)
        if cookie and self._cookie and hmac.compare_digest(cookie.encode(), self._cookie):
            return True
        return self.token_ok(request.headers.get(self.header))

    def require(self, request: Request[Any, Any, Any]) -> None:
        if not self.allowed(request):
            raise NotAuthorizedException(detail="sign in at /ui first (or send the API token header)")

    def cookie(self, request: Request[Any, Any, Any]) -> Cookie:
        return Cookie(
            key=COOKIE,
            value=self._cookie.decode(),
            path="/ui",
            max_age=COOKIE_MAX_AGE,
            httponly=True,
            samesite="strict",
            secure=request.url.scheme == "https",
        )


# --------------------------------------------------------------------------- data


class NodeView(msgspec.Struct):
    node_id: str
    live_sessions: int
    max_sessions: int | None
    beat_at: datetime | None
    draining: bool
    in_registry: int


class SessionRow(msgspec.Struct):
    chat_id: str
    session_id: str
    status: str
    node_id: str
    expires_at: datetime
    labels: dict[str, str]


class Snapshot(msgspec.Struct):
    generated_at: datetime
    total: int
    shown: int
    sessions: list[SessionRow]
    nodes: list[NodeView]


def _row(record: SessionRecord) -> SessionRow:
    return SessionRow(
        record.chat_id, record.session_id, str(record.status), record.node_id, record.expires_at, dict(record.labels)
    )


async def _nodes(nc: Client, follower: RegistryFollower) -> list[NodeView]:
    beats: dict[str, NodeBeat] = {}
    with contextlib.suppress(Exception):  # the dashboard shows what it can
        for _key, _rev, value in await read_node_beats(nc, 2.0):
            with contextlib.suppress(*DECODE_ERRORS):
                beat = decode_node_beat(value)
                beats[beat.node_id] = beat
    counts = _count_by_node(follower)
    views = []
    for node in sorted(set(beats) | set(counts)):
        b = beats.get(node)
        views.append(
            NodeView(
                node_id=node,
                live_sessions=b.live_sessions if b is not None else counts.get(node, 0),
                max_sessions=b.max_sessions if b is not None else None,
                beat_at=b.beat_at if b is not None else None,
                draining=b.draining if b is not None else False,
                in_registry=counts.get(node, 0),
            )
        )
    return views


def _count_by_node(follower: RegistryFollower) -> dict[str, int]:
    counts: dict[str, int] = {}
    page = follower.index.page(SessionQuery(), limit=len(follower.index) or 1)
    for record in page.records:
        counts[record.node_id] = counts.get(record.node_id, 0) + 1
    return counts


async def snapshot(nc: Client, follower: RegistryFollower) -> Snapshot:
    page = follower.index.page(SessionQuery(), limit=PAGE_ROWS)
    rows = [_row(r) for r in page.records]
    return Snapshot(datetime.now(UTC), len(follower.index), len(rows), rows, await _nodes(nc, follower))


def feed_item(msg: Msg) -> dict[str, Any] | None:
    """An event as the dashboard needs it; None for one that does not decode."""
    seq = msg.metadata.sequence.stream
    try:
        if is_node_event_subject(msg.subject):
            node_event = decode_node_event(msg.data)
            return {"seq": seq, "type": node_event.type, "node_id": node_event.node_id, "at": node_event.occurred_at}
        event = decode_event(msg.data)
    except DECODE_ERRORS:
        return None
    session = event.session
    return {
        "seq": seq,
        "type": event.type,
        "chat_id": event.chat_id,
        "node_id": event.node_id,
        "at": event.occurred_at,
        "reason": event.reason,
        "session": None if session is None else {**msgspec.to_builtins(_row(session)), "live": session.is_live},
    }


# --------------------------------------------------------------------------- pages


def _page(title: str, body: str) -> Response[str]:
    doc = (
        '<!doctype html><html lang="en"><head><meta charset="utf-8">'
        '<meta name="viewport" content="width=device-width, initial-scale=1">'
        f'<title>{html.escape(title)}</title><link rel="stylesheet" href="/ui/static/ui.css"></head>'
        f'<body>{body}<script src="/ui/static/ui.js"></script></body></html>'
    )
    return Response(doc, media_type=MediaType.HTML, headers=_SECURITY_HEADERS)


def _sign_in(failed: bool) -> Response[str]:
    error = '<p class="error" id="signin-error">That token is not valid.</p>' if failed else ""
    return _page(
        "sandboxd — sign in",
        '<main class="signin"><h1>sandboxd</h1><form id="signin" method="post" action="/ui/login">'
        '<label for="token">API token</label>'
        '<input id="token" name="token" type="password" autocomplete="off" required>'
        f'<button type="submit">Sign in</button></form>{error}'
        "<p>The token is the one <code>just up</code> printed (or SANDBOXD_API_TOKEN).</p></main>",
    )


def _e(value: object) -> str:
    return html.escape(str(value), quote=True)


def _session_tr(row: SessionRow) -> str:
    labels = " ".join(f'<span class="label">{_e(k)}={_e(v)}</span>' for k, v in sorted(row.labels.items()))
    return (
        f'<tr data-chat="{_e(row.chat_id)}"><td class="mono">{_e(row.chat_id)}</td>'
        f'<td><span class="status s-{_e(row.status)}">{_e(row.status)}</span></td>'
        f"<td>{_e(row.node_id)}</td>"
        f'<td class="ttl" data-expires="{_e(row.expires_at.isoformat())}"></td>'
        f"<td>{labels}</td></tr>"
    )


def _node_tr(node: NodeView) -> str:
    limit = "∞" if node.max_sessions is None else str(node.max_sessions)
    fill = 0 if not node.max_sessions else min(100, round(100 * node.live_sessions / node.max_sessions))
    beat = node.beat_at.isoformat() if node.beat_at else ""
    return (
        f'<tr data-node="{_e(node.node_id)}"><td>{_e(node.node_id)}</td>'
        f'<td>{node.live_sessions} / {limit}</td><td><meter min="0" max="100" value="{fill}"></meter></td>'
        f'<td class="beat" data-beat="{_e(beat)}"></td><td>{"draining" if node.draining else ""}</td></tr>'
    )


def _dashboard(snap: Snapshot) -> Response[str]:
    sessions = "".join(_session_tr(r) for r in snap.sessions)
    nodes = "".join(_node_tr(n) for n in snap.nodes)
    more = f"showing {snap.shown} of {snap.total}" if snap.total > snap.shown else f"{snap.total}"
    return _page(
        "sandboxd — live",
        '<header><h1>sandboxd</h1><span id="feed-state" class="feed-state">connecting…</span>'
        f'<span>live sessions: <strong id="total">{snap.total}</strong> <span id="shown">({more})</span></span>'
        "</header><main><section><h2>Nodes</h2>"
        '<table id="nodes"><thead><tr><th>node</th><th>sessions</th><th>capacity</th><th>last beat</th><th></th>'
        f"</tr></thead><tbody>{nodes}</tbody></table></section>"
        '<section><h2>Live sessions</h2><table id="sessions"><thead><tr><th>chat</th><th>status</th>'
        f"<th>node</th><th>expires in</th><th>labels</th></tr></thead><tbody>{sessions}</tbody></table></section>"
        '<section><h2>Events</h2><ol id="feed" reversed></ol></section></main>',
    )


# --------------------------------------------------------------------------- routes


def ui_router(api: ApiSettings) -> Router:
    auth = UiAuth(api)

    @get("/", operation_id="uiDashboard", include_in_schema=False)
    async def dashboard(
        request: Request[Any, Any, Any], state: State, error: FromQuery[str | None] = None
    ) -> Response[str]:
        if not auth.allowed(request):
            return _sign_in(failed=error is not None)
        services = services_of(state)
        return _dashboard(await snapshot(services.nc, services.sessions))

    @post("/login", operation_id="uiLogin", include_in_schema=False, status_code=303)
    async def login(
        request: Request[Any, Any, Any],
        data: URLEncodedBody[dict[str, str]],
    ) -> Redirect:
        origin = request.headers.get("origin")
        host = request.headers.get("host", "")
        if origin and origin.split("://", 1)[-1] != host:
            return Redirect("/ui?error=origin", status_code=303)
        if not auth.token_ok(data.get("token")):
            return Redirect("/ui?error=token", status_code=303)
        return Redirect("/ui", status_code=303, cookies=[auth.cookie(request)], headers=_SECURITY_HEADERS)

    @get("/state", operation_id="uiState", include_in_schema=False)
    async def ui_state(request: Request[Any, Any, Any], state: State) -> Response[bytes]:
        auth.require(request)
        services = services_of(state)
        body = msgspec.json.encode(await snapshot(services.nc, services.sessions))
        return Response(body, media_type=MediaType.JSON, headers=_SECURITY_HEADERS)

    @get("/feed", operation_id="uiFeed", include_in_schema=False)
    async def feed(request: Request[Any, Any, Any], state: State) -> ServerSentEvent:
        auth.require(request)
        services = services_of(state)
        headers = {"Cache-Control": "no-store", "X-Accel-Buffering": "no"}
        return ServerSentEvent(_feed(services.nc, services.sessions), headers=headers)

    @get("/static/{name:str}", operation_id="uiStatic", include_in_schema=False)
    async def static(name: FromPath[str]) -> Response[bytes]:
        kinds = {"ui.js": "text/javascript; charset=utf-8", "ui.css": "text/css; charset=utf-8"}
        if name not in kinds:
            raise NotAuthorizedException(detail="no such file")  # nothing else is served from here
        return Response((_STATIC / name).read_bytes(), media_type=kinds[name], headers={"Cache-Control": "no-cache"})

    return Router(path="/ui", route_handlers=[dashboard, login, ui_state, feed, static])


async def _feed(nc: Client, follower: RegistryFollower) -> AsyncGenerator[ServerSentEventMessage, None]:
    """`ready` once the consumer listens (the client then re-reads `/ui/state`), then one
    `event` per new event and `nodes` every few seconds; `resync` when this client fell too
    far behind to be sent every event."""
    queue: asyncio.Queue[dict[str, Any] | None] = asyncio.Queue(_FEED_QUEUE)

    async def on_message(msg: Msg) -> None:
        item = feed_item(msg)
        if item is None:
            return
        try:
            queue.put_nowait(item)
        except asyncio.QueueFull:
            with contextlib.suppress(asyncio.QueueEmpty):
                while True:
                    queue.get_nowait()
            queue.put_nowait(None)  # resync

    js = nc.jetstream(timeout=5.0)
    sub = await js.subscribe(
        EVENT_SUBJECTS, stream=EVENTS_STREAM, cb=on_message, ordered_consumer=True, deliver_policy=DeliverPolicy.NEW
    )
    encode = msgspec.json.encode
    loop = asyncio.get_running_loop()
    ends = loop.time() + FEED_MAX_SECONDS
    try:
        yield ServerSentEventMessage(event="ready", data="{}", retry=1000)
        while (left := ends - loop.time()) > 0:
            try:
                item = await asyncio.wait_for(queue.get(), min(NODES_EVERY_SECONDS, left))
            except TimeoutError:
                nodes = await _nodes(nc, follower)
                yield ServerSentEventMessage(
                    event="nodes", data=encode({"nodes": nodes, "total": len(follower.index)}).decode()
                )
                continue
            if item is None:
                yield ServerSentEventMessage(event="resync", data="{}")
            else:
                yield ServerSentEventMessage(event="event", data=encode(item).decode())
    finally:
        with contextlib.suppress(Exception):
            await sub.unsubscribe()
