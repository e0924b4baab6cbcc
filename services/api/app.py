"""The Litestar HTTP facade: `create_app(settings) -> Litestar`.

Controllers only translate: validate and normalise input, send a command through the
gateway (or read the registry / event stream), and map the outcome to a response. What they
use (the gateway, event store, session index, clock) is one `ApiServices` (services/api/services.py),
which the lifespan builds once NATS is connected, under an exit stack. Errors become JSON
`{status_code, detail}` in one place; an outcome that is late is a 202, raised.

Input is strict: a JSON body is decoded with the request type before Litestar sees it (no
coercion of `"600"` to 600, unknown fields refused, invalid UTF-8 or absurd nesting a 400),
and a body that does not arrive within `http.body_timeout_seconds` is a 408.
"""

from __future__ import annotations

import contextlib
import hmac
import logging
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from datetime import timedelta
from typing import Annotated, Any

import msgspec
from litestar import Litestar, Request, Response, Router, delete, get, post
from litestar.datastructures import State
from litestar.exceptions import HTTPException, NotAuthorizedException
from litestar.openapi import OpenAPIConfig
from litestar.params import FromPath, HeaderParameter, JSONBody, QueryParameter
from litestar.types import ASGIApp, Receive, Scope, Send
from prometheus_client import CONTENT_TYPE_LATEST, REGISTRY, generate_latest

from services.api.gateway import CommandGateway, OutcomePending, OutcomeWaiter
from services.api.idempotency import Answer, IdempotencyKeyReused, IdempotentRequests, KeyedRequest
from services.api.middleware import (
    body_timeout_middleware,
    host_check_middleware,
    json_errors_middleware,
    tracing_middleware,
)
from services.api.reuse import ReuseShortcut
from services.api.services import ApiServices, services_of
from services.api.session_index import (
    LIST_DEFAULT_LIMIT,
    LIST_MAX_LABEL_FILTERS,
    LIST_MAX_LIMIT,
    IndexNotReady,
    InvalidListQuery,
    RegistryFollower,
    SessionIndex,
    SessionQuery,
    decode_cursor,
    parse_label_filter,
)
from services.api.status import StatusEnvelope, build_status
from services.api.ui import ui_router
from services.api.views import (
    RETRY_AFTER_SECONDS,
    Accepted,
    CreateSandboxRequest,
    ErrorBody,
    EventHistory,
    KeepaliveRequest,
    PauseRequest,
    ResumeRequest,
    SeedCreateRequest,
    SeedCreateResponse,
    SessionList,
    StoredEventView,
    failure_detail,
    outcome_status,
    session_view,
)
from shared.clock import Clock, SystemClock
from shared.config import ApiSettings, Settings
from shared.contracts import (
    AnyCommand,
    AnyEvent,
    CreateResult,
    CreateSandbox,
    KeepaliveSandbox,
    PauseReason,
    PauseSandbox,
    ResumeSandbox,
    SandboxExtended,
    SandboxPaused,
    SandboxResumed,
    SandboxReused,
    SandboxRunning,
    SandboxStopped,
    SessionRecord,
    SessionStatus,
    StopReason,
    StopSandbox,
)
from shared.errors import NatsUnavailable
from shared.event_store import EventStore
from shared.idempotency import IDEMPOTENCY_HEADER, IdempotencyRecords, InvalidIdempotencyKey, check_key
from shared.nats_connection import service_connection
from shared.nats_roles import Role
from shared.poison import DECODE_ERRORS, Quarantine
from shared.subjects import canonical_chat_id
from shared.telemetry import Telemetry, setup_telemetry
from shared.topology import IDEMPOTENCY, attach_bucket, attach_topology, topology_missing

log = logging.getLogger(__name__)

API_PREFIX = "/api/v1"
VERSION = "0.1.0"
REQUEST_MAX_BODY_BYTES = 1024 * 1024
# How long start-up waits for the session index's first load (100k records take ~2 s);
# past it the API serves, and lists answer 503 until the load is complete.
INDEX_LOAD_WAIT_SECONDS = 30.0


def _uuid(raw: str, name: str) -> str:
    try:
        return canonical_chat_id(raw)
    except ValueError:
        raise HTTPException(status_code=400, detail=f"{name} {raw!r} is not a UUID") from None


def _chat(raw: str) -> str:
    return _uuid(raw, "chat_id")


def _bounded_int(name: str, raw: str | None, low: int, high: int) -> int | None:
    """A query parameter written as plain decimal digits within [low, high] (no `1e3`)."""
    if raw is None:
        return None
    if not (raw.isascii() and raw.isdigit()) or not low <= int(raw) <= high:
        raise HTTPException(status_code=400, detail=f"{name} must be an integer from {low} to {high}, not {raw[:40]!r}")
    return int(raw)


def _json_answer(body: object, status: int) -> Answer:
    return Answer(status, msgspec.json.encode(body))


def _error_answer(status: int, detail: str, event: AnyEvent | None = None) -> Answer:
    body = ErrorBody(status_code=status, detail=detail, error=event.error if event else None)
    headers = {"Retry-After": str(RETRY_AFTER_SECONDS)} if status == 429 else {}  # noqa: PLR2004 - Too Many Requests
    return Answer(status, msgspec.json.encode(body), headers)


def _json(body: object, status: int) -> Response[Any]:
    return _json_answer(body, status).response()


def _error(status: int, detail: str, event: AnyEvent | None = None) -> Response[Any]:
    return _error_answer(status, detail, event).response()


IdempotencyKey = Annotated[
    str | None,
    HeaderParameter(
        name=IDEMPOTENCY_HEADER,
        required=False,
        description=(
            "Makes the request safe to retry: the same key returns the first answer (status and body) for at "
            "least 24 h, even after the session ended; with another request it is a 422. 1-255 printable ASCII "
            "characters; a request whose answer was a 202 is answered with the outcome once it exists."
        ),
    ),
]


async def _answer(
    make_command: Callable[[], AnyCommand],
    respond: Callable[[AnyEvent], Answer],
    *,
    key: str | None,
    request: str,
    fields: dict[str, object],
    services: ApiServices,
    shortcut: Callable[[], Awaitable[Answer | None]] | None = None,
) -> Response[Any]:
    """Send the command and answer from its outcome, through its idempotency key if any.
    `shortcut` may answer without the command (see services/api/reuse.py); the command (its
    id, its time) is made only when it is sent or its key is claimed."""
    gateway = services.gateway
    if key is None:
        gateway.require_connection()
        shortcut_answer = await shortcut() if shortcut is not None else None
        if shortcut_answer is not None:
            return shortcut_answer.response()
        return respond(await gateway.send(make_command())).response()
    try:
        checked = check_key(key)
    except InvalidIdempotencyKey as exc:
        raise HTTPException(status_code=400, detail=str(exc)) from None
    command = make_command()
    keyed = KeyedRequest(key=checked, request=request, chat_id=command.chat_key, fields=fields)
    gateway.require_connection()  # before the key is claimed
    return await services.idempotent.answer(keyed, command, respond, shortcut)


def strict_body(
    request_type: type[msgspec.Struct], *, optional: bool = False
) -> Callable[[Request[Any, Any, Any]], Awaitable[None]]:
    """A before-request hook: the body must decode as `request_type`, strictly, or it is a 400
    naming what is wrong (Litestar's own parsing would coerce types and 500 on bad UTF-8)."""
    decoder = msgspec.json.Decoder(request_type)

    async def check(request: Request[Any, Any, Any]) -> None:
        raw = await request.body()
        if optional and not raw:
            return
        try:
            decoder.decode(raw)
        except msgspec.ValidationError as exc:
            raise HTTPException(status_code=400, detail=f"invalid request body: {exc}") from None
        except DECODE_ERRORS as exc:
            raise HTTPException(status_code=400, detail=f"the request body is not valid JSON: {exc}") from None

    return check


def _stamp(clock: Clock) -> dict[str, Any]:
    """The fields of every command the API sends."""
    return {"command_id": uuid.uuid4(), "requested_at": clock.now(), "requested_by": "api"}


# --------------------------------------------------------------------------- path


def _path_chat(chat_id: str) -> uuid.UUID:
    """The `{chat_id}` path parameter as a UUID: any spelling `uuid.UUID` reads (upper case,
    no hyphens, braces), normalised; anything else is a 400 that says so."""
    return uuid.UUID(_chat(chat_id))


# --------------------------------------------------------------------------- auth


def token_middleware(api: ApiSettings) -> Callable[[ASGIApp], ASGIApp]:
    """Every request to a protected route carries the API token in `api.token_header`, or it
    is a 401 (before its body is read). A router middleware, not a Litestar guard: a guard
    costs a copy of the route handler per request."""
    name = api.token_header.lower().encode("latin-1")
    expected = (api.token or "").encode()
    detail = f"missing or invalid API token (header {api.token_header})"

    def wrap(app: ASGIApp) -> ASGIApp:
        async def middleware(scope: Scope, receive: Receive, send: Send) -> None:
            given = next((v for k, v in scope.get("headers", ()) if k == name), b"")  # ASGI: names lower-case
            if not given or not expected or not hmac.compare_digest(given, expected):
                raise NotAuthorizedException(detail=detail)
            await app(scope, receive, send)

        return middleware

    return wrap


# --------------------------------------------------------------------------- public


@get("/health", operation_id="health", tags=["meta"])
async def health() -> dict[str, str]:
    return {"status": "ok"}


@get("/ready", operation_id="ready", tags=["meta"])
async def ready(state: State) -> Response[dict[str, Any]]:
    services = services_of(state)
    nc, sessions = services.nc, services.sessions
    if not nc.is_connected:
        return Response({"status": "unavailable", "detail": "NATS is not connected"}, status_code=503)
    try:
        sessions.require_fresh()
    except IndexNotReady as exc:
        return Response({"status": "unavailable", "detail": str(exc)}, status_code=503)
    try:
        missing = await topology_missing(nc.jetstream(timeout=2.0))
    except Exception as exc:  # noqa: BLE001 - any failure means not ready, and says why
        return Response({"status": "unavailable", "detail": f"JetStream check failed: {exc!r}"}, status_code=503)
    if missing:
        return Response({"status": "unavailable", "detail": f"missing: {', '.join(missing)}"}, status_code=503)
    return Response({"status": "ready"}, status_code=200)


# --------------------------------------------------------------------------- sandboxes


@post(
    "/sandboxes",
    operation_id="createSandbox",
    tags=["sandboxes"],
    status_code=201,
    before_request=strict_body(CreateSandboxRequest),
)
async def create_sandbox(  # keyword-only: Litestar passes everything by name
    *,
    state: State,
    data: JSONBody[CreateSandboxRequest],
    idempotency_key: IdempotencyKey = None,
) -> Response[Any]:
    """Create the chat's sandbox, or reuse its live one: 201 created/replaced, 200 reused
    (or resumed: a paused session runs again). A running, unexpired session is reused from the
    chat's last event, without a command (see the README: activity of an idle timeout)."""
    services = services_of(state)
    chat = uuid.UUID(_chat(data.chat_id))

    def command() -> CreateSandbox:
        return CreateSandbox(
            chat_id=chat,
            ttl_seconds=data.ttl_seconds,
            idle_ttl_seconds=data.idle_ttl_seconds,
            labels=data.labels,
            **_stamp(services.clock),
        )

    fields: dict[str, object] = {"ttl_seconds": data.ttl_seconds, "labels": data.labels}
    if data.idle_ttl_seconds is not None:  # keys made before idle timeouts existed still match
        fields["idle_ttl_seconds"] = data.idle_ttl_seconds
    return await _answer(
        command,
        lambda outcome: _create_answer(outcome, seed=False),
        key=idempotency_key,
        request=f"POST {API_PREFIX}/sandboxes",
        fields=fields,
        services=services,
        shortcut=lambda: _reused_answer(services.reuse, chat, data.ttl_seconds, seed=False),
    )


@post(
    "/create",
    operation_id="createSandboxSeed",
    tags=["sandboxes"],
    status_code=201,
    before_request=strict_body(SeedCreateRequest),
)
async def create_seed(  # keyword-only: Litestar passes everything by name
    *,
    state: State,
    data: JSONBody[SeedCreateRequest],
    idempotency_key: IdempotencyKey = None,
) -> Response[Any]:
    """The seed service's create endpoint: same semantics, the seed's response fields."""
    services = services_of(state)
    chat = uuid.UUID(_chat(data.chat_id))
    return await _answer(
        lambda: CreateSandbox(chat_id=chat, **_stamp(services.clock)),
        lambda outcome: _create_answer(outcome, seed=True),
        key=idempotency_key,
        request=f"POST {API_PREFIX}/create",
        fields={},
        services=services,
        shortcut=lambda: _reused_answer(services.reuse, chat, None, seed=True),
    )


async def _reused_answer(
    reuse: ReuseShortcut, chat: uuid.UUID, ttl_seconds: int | None, *, seed: bool
) -> Answer | None:
    """`200 reused` from the chat's last event when it shows a running, unexpired session;
    None: the command path answers."""
    session = await reuse.live_session(chat, ttl_seconds)
    if session is None:
        return None
    return _session_answer(session, CreateResult.REUSED, 200, seed=seed)


def _create_answer(outcome: AnyEvent, *, seed: bool) -> Answer:
    status = outcome_status(outcome)
    if isinstance(outcome, SandboxRunning | SandboxReused | SandboxResumed) and outcome.session is not None:
        return _session_answer(outcome.session, outcome.result, status, seed=seed)
    return _error_answer(status, failure_detail(outcome), outcome)


def _session_answer(s: SessionRecord, result: CreateResult | None, status: int, *, seed: bool) -> Answer:
    if seed:
        body: object = SeedCreateResponse(s.session_id, s.chat_id, s.container_id, s.status, s.created_at, s.expires_at)
    else:
        body = session_view(s, result)
    return _json_answer(body, status)


@get("/sandboxes/{chat_id:str}", operation_id="getSandbox", tags=["sandboxes"])
async def get_sandbox(chat_id: FromPath[str], state: State) -> Response[Any]:
    chat = _path_chat(chat_id)
    events = services_of(state).events
    # The chat's last event is the registry's source and never lags behind an answer this
    # API already gave (the KV view is projected from it asynchronously).
    record = (await events.read(str(chat))).session
    if record is None or not record.is_live:
        return _error(404, f"chat {chat} has no live sandbox")
    return _json(session_view(record), 200)


@get("/sandboxes", operation_id="listSandboxes", tags=["sandboxes"])
async def list_sandboxes(
    state: State,
    status: Annotated[SessionStatus | None, QueryParameter(required=False, description="only this status")] = None,
    label: Annotated[
        list[str] | None,
        QueryParameter(
            required=False,
            description=f"key:value; may repeat (up to {LIST_MAX_LABEL_FILTERS}), every one must match",
        ),
    ] = None,
    limit: Annotated[
        str | None,
        QueryParameter(required=False, description=f"1 to {LIST_MAX_LIMIT}, default {LIST_DEFAULT_LIMIT}"),
    ] = None,
    cursor: Annotated[
        str | None, QueryParameter(required=False, description="the next_cursor of the previous page")
    ] = None,
) -> SessionList:
    """Live sessions in chat id order, a page at a time, from the API's index of the
    registry (as fresh as its KV watch). `count` is the number in this page; `next_cursor`
    is null exactly when no more sessions match."""
    sessions = services_of(state).sessions
    labels = label or []
    if len(labels) > LIST_MAX_LABEL_FILTERS:
        raise HTTPException(status_code=400, detail=f"at most {LIST_MAX_LABEL_FILTERS} label filters")
    page_size = _bounded_int("limit", limit, 1, LIST_MAX_LIMIT) or LIST_DEFAULT_LIMIT
    try:
        query = SessionQuery(status=status, labels=tuple(parse_label_filter(raw) for raw in labels))
        after = decode_cursor(cursor) if cursor is not None else None
    except InvalidListQuery as exc:
        raise HTTPException(status_code=400, detail=str(exc)) from None
    sessions.require_fresh()
    page = sessions.index.page(query, limit=page_size, after=after)
    views = [session_view(r) for r in page.records]
    return SessionList(sessions=views, count=len(views), next_cursor=page.next_cursor)


@delete("/sandboxes/{chat_id:str}", operation_id="stopSandbox", tags=["sandboxes"], status_code=200)
async def stop_sandbox(
    chat_id: FromPath[str],
    state: State,
    idempotency_key: IdempotencyKey = None,
) -> Response[Any]:
    """Stop the chat's sandbox: 200 with the final view, 404 when it has none."""
    chat = _path_chat(chat_id)
    services = services_of(state)
    return await _answer(
        lambda: StopSandbox(chat_id=chat, reason=StopReason.API, **_stamp(services.clock)),
        _stop_answer,
        key=idempotency_key,
        request=f"DELETE {API_PREFIX}/sandboxes/{{chat_id}}",
        fields={},
        services=services,
    )


def _stop_answer(outcome: AnyEvent) -> Answer:
    if isinstance(outcome, SandboxStopped) and outcome.session is not None:
        return _json_answer(session_view(outcome.session), 200)
    return _error_answer(outcome_status(outcome), failure_detail(outcome), outcome)


@post(
    "/sandboxes/{chat_id:str}/keepalive",
    operation_id="keepaliveSandbox",
    tags=["sandboxes"],
    status_code=200,
    before_request=strict_body(KeepaliveRequest, optional=True),
)
async def keepalive_sandbox(  # keyword-only: Litestar passes everything by name
    *,
    chat_id: FromPath[str],
    state: State,
    data: JSONBody[KeepaliveRequest | None] = None,
    idempotency_key: IdempotencyKey = None,
) -> Response[Any]:
    """Move the live session's `expires_at` to now + ttl (default: the configured ttl)."""
    chat = _path_chat(chat_id)
    services = services_of(state)
    body = data or KeepaliveRequest()
    session_id = uuid.UUID(_uuid(body.session_id, "session_id")) if body.session_id is not None else None
    return await _answer(
        lambda: KeepaliveSandbox(
            chat_id=chat, ttl_seconds=body.ttl_seconds, session_id=session_id, **_stamp(services.clock)
        ),
        _keepalive_answer,
        key=idempotency_key,
        request=f"POST {API_PREFIX}/sandboxes/{{chat_id}}/keepalive",
        fields={"ttl_seconds": body.ttl_seconds, "session_id": str(session_id) if session_id else None},
        services=services,
    )


def _keepalive_answer(outcome: AnyEvent) -> Answer:
    if isinstance(outcome, SandboxExtended) and outcome.session is not None:
        return _json_answer(session_view(outcome.session), 200)
    return _error_answer(outcome_status(outcome), failure_detail(outcome), outcome)


@post(
    "/sandboxes/{chat_id:str}/pause",
    operation_id="pauseSandbox",
    tags=["sandboxes"],
    status_code=200,
    before_request=strict_body(PauseRequest, optional=True),
)
async def pause_sandbox(  # keyword-only: Litestar passes everything by name
    *,
    chat_id: FromPath[str],
    state: State,
    data: JSONBody[PauseRequest | None] = None,
    idempotency_key: IdempotencyKey = None,
) -> Response[Any]:
    """Freeze the running session's processes (memory and files kept): 200 paused; 409 when
    it is not running."""
    chat = _path_chat(chat_id)
    services = services_of(state)
    body = data or PauseRequest()
    session_id = uuid.UUID(_uuid(body.session_id, "session_id")) if body.session_id is not None else None
    return await _answer(
        lambda: PauseSandbox(chat_id=chat, session_id=session_id, reason=PauseReason.API, **_stamp(services.clock)),
        lambda outcome: _changed_answer(outcome, SandboxPaused),
        key=idempotency_key,
        request=f"POST {API_PREFIX}/sandboxes/{{chat_id}}/pause",
        fields={"session_id": str(session_id) if session_id else None},
        services=services,
    )


@post(
    "/sandboxes/{chat_id:str}/resume",
    operation_id="resumeSandbox",
    tags=["sandboxes"],
    status_code=200,
    before_request=strict_body(ResumeRequest, optional=True),
)
async def resume_sandbox(  # keyword-only: Litestar passes everything by name
    *,
    chat_id: FromPath[str],
    state: State,
    data: JSONBody[ResumeRequest | None] = None,
    idempotency_key: IdempotencyKey = None,
) -> Response[Any]:
    """Unfreeze the paused session: 200 running; 409 when it is not paused."""
    chat = _path_chat(chat_id)
    services = services_of(state)
    body = data or ResumeRequest()
    session_id = uuid.UUID(_uuid(body.session_id, "session_id")) if body.session_id is not None else None
    return await _answer(
        lambda: ResumeSandbox(chat_id=chat, session_id=session_id, **_stamp(services.clock)),
        lambda outcome: _changed_answer(outcome, SandboxResumed),
        key=idempotency_key,
        request=f"POST {API_PREFIX}/sandboxes/{{chat_id}}/resume",
        fields={"session_id": str(session_id) if session_id else None},
        services=services,
    )


def _changed_answer(outcome: AnyEvent, wanted: type[AnyEvent]) -> Answer:
    if isinstance(outcome, wanted) and outcome.session is not None:
        return _json_answer(session_view(outcome.session), 200)
    return _error_answer(outcome_status(outcome), failure_detail(outcome), outcome)


@get("/sandboxes/{chat_id:str}/events", operation_id="sandboxEvents", tags=["sandboxes"])
async def sandbox_events(
    chat_id: FromPath[str],
    state: State,
    limit: Annotated[str | None, QueryParameter(required=False, description="1 to 10000")] = None,
) -> EventHistory:
    """The chat's event history from the stream, oldest first (the last `limit` events)."""
    chat = _path_chat(chat_id)
    events = services_of(state).events
    stored = await events.history(str(chat), limit=_bounded_int("limit", limit, 1, 10_000))
    return EventHistory(
        chat_id=str(chat), events=[StoredEventView(seq=s.seq, event=msgspec.to_builtins(s.event)) for s in stored]
    )


@get("/status", operation_id="status", tags=["meta"])
async def status(state: State) -> StatusEnvelope:
    """A versioned envelope: NATS, streams, consumers (lag), registry, reapers, runtime nodes."""
    services = services_of(state)
    return await build_status(services.nc, services.sessions, services.clock.now())


@get("/metrics", operation_id="metrics", tags=["meta"], include_in_schema=False)
async def metrics() -> Response[bytes]:
    """Prometheus text format (every metric this process recorded)."""
    return Response(generate_latest(REGISTRY), media_type=CONTENT_TYPE_LATEST)


# --------------------------------------------------------------------------- errors


def _nats_unavailable(_: Request[Any, Any, Any], exc: NatsUnavailable) -> Response[Any]:
    return _error(503, f"NATS is unreachable, nothing was done: {exc}")


def _key_reused(_: Request[Any, Any, Any], exc: IdempotencyKeyReused) -> Response[Any]:
    return _error(422, str(exc))


def _index_not_ready(_: Request[Any, Any, Any], exc: IndexNotReady) -> Response[Any]:
    return Response(ErrorBody(status_code=503, detail=str(exc)), status_code=503, headers={"Retry-After": "1"})


def _log_exception(exc: Exception, scope: Scope) -> None:
    """The API's error lines (Litestar's own logging is off: it would re-configure the root
    logger away from JSON). A refusal of the client's request is not an error of ours."""
    if isinstance(exc, OutcomePending | IdempotencyKeyReused):
        return
    where = f"{scope.get('method', '')} {scope.get('path', '')}"
    if isinstance(exc, NatsUnavailable | IndexNotReady):
        log.warning("%s answered 503: %s", where, exc)
    elif not isinstance(exc, HTTPException) or exc.status_code >= 500:  # noqa: PLR2004 - server errors
        log.error("%s failed: %r", where, exc, exc_info=exc)


def _outcome_pending(_: Request[Any, Any, Any], exc: OutcomePending) -> Response[Any]:
    """Accepted: the command is in the stream and its outcome will appear in the chat's events."""
    chat, wait = str(exc.command.chat_id), exc.wait_seconds
    accepted = Accepted(
        command_id=str(exc.command.command_id),
        chat_id=chat,
        detail=f"accepted; the outcome did not arrive within {wait:g}s, it will appear in the chat's events",
        status_url=f"{API_PREFIX}/sandboxes/{chat}/events",
    )
    return _json(accepted, 202)


# --------------------------------------------------------------------------- app


async def _connect(
    stack: contextlib.AsyncExitStack, settings: Settings, telemetry: Telemetry, clock: Clock
) -> ApiServices:
    """Connect, attach and start waiting for outcomes; each undone when the stack unwinds.
    The outcome waiter re-creates its consumer as soon as the connection is back."""
    waiter = OutcomeWaiter()
    quarantine = Quarantine(telemetry.metrics)
    sessions = RegistryFollower(SessionIndex(), quarantine)

    def reconnected() -> None:
        waiter.reconnected()
        sessions.reconnected()

    nc = await stack.enter_async_context(
        service_connection(settings.nats, "sandboxd-api", role=Role.API, on_reconnected=reconnected)
    )
    js = nc.jetstream(timeout=settings.nats.request_timeout_seconds)
    await attach_topology(js, settings.streams)  # the streams and buckets exist, or this says which not
    idempotency_kv = await attach_bucket(js, IDEMPOTENCY, settings.streams)
    events = EventStore(js, quarantine=quarantine)
    await waiter.start(js, events)
    stack.push_async_callback(waiter.stop)
    stack.push_async_callback(sessions.stop)
    await sessions.start(nc, js, wait_seconds=INDEX_LOAD_WAIT_SECONDS)
    gateway = CommandGateway(nc, js, waiter, events, telemetry, wait_seconds=settings.api.wait_seconds)
    records = IdempotencyRecords(js, idempotency_kv, quarantine=quarantine)
    reuse = ReuseShortcut(
        events,
        clock,
        telemetry.metrics,
        settings.sandbox.max_ttl_seconds,
        timedelta(seconds=settings.sandbox.activity_interval_seconds),
    )
    return ApiServices(
        nc=nc,
        clock=clock,
        gateway=gateway,
        idempotent=IdempotentRequests(records, gateway, clock),
        events=events,
        reuse=reuse,
        sessions=sessions,
    )


def create_app(settings: Settings, *, clock: Clock | None = None, telemetry: Telemetry | None = None) -> Litestar:
    telemetry = telemetry or setup_telemetry(
        "sandboxd-api", otlp_endpoint=settings.telemetry.otlp_endpoint, always_start_traces=True
    )
    clock = clock or SystemClock()

    @contextlib.asynccontextmanager
    async def lifespan(app: Litestar) -> AsyncIterator[None]:
        async with contextlib.AsyncExitStack() as stack:
            stack.callback(telemetry.shutdown)
            app.state.services = await _connect(stack, settings, telemetry, clock)
            yield

    protected = Router(
        path="/",
        middleware=[token_middleware(settings.api)],
        route_handlers=[
            create_sandbox,
            create_seed,
            get_sandbox,
            list_sandboxes,
            stop_sandbox,
            keepalive_sandbox,
            pause_sandbox,
            resume_sandbox,
            sandbox_events,
            status,
        ],
    )
    api = Router(path=API_PREFIX, route_handlers=[health, ready, protected])
    return Litestar(
        route_handlers=[api, metrics, ui_router(settings.api)],
        middleware=[
            host_check_middleware,
            json_errors_middleware,
            tracing_middleware(telemetry),
            body_timeout_middleware(settings.http.body_timeout_seconds),
        ],
        lifespan=[lifespan],
        # Logging is the process's (JSON, shared/logs.py): Litestar's default config would
        # replace the root handler with a plain-text one. Errors are logged by the hook.
        logging_config=None,
        after_exception=[_log_exception],
        exception_handlers={
            NatsUnavailable: _nats_unavailable,
            OutcomePending: _outcome_pending,
            IdempotencyKeyReused: _key_reused,
            IndexNotReady: _index_not_ready,
        },
        openapi_config=OpenAPIConfig(title="sandboxd", version=VERSION, path=f"{API_PREFIX}/schema"),
        # No valid body comes near this (a command is at most 64 KiB on NATS); a larger one is
        # refused from its Content-Length, before a byte of it is read.
        request_max_body_size=REQUEST_MAX_BODY_BYTES,
        debug=False,
    )
