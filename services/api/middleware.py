"""ASGI middleware of the HTTP facade: request hygiene before Litestar sees a request, and a
JSON error body whatever produced the error.

- `host_check_middleware`: a `Host` header whose port is not a port is a 400 (Litestar
  builds URLs from it while reporting a validation error, and would answer 500).
- `body_timeout_middleware`: a request body must arrive whole within a time limit (408).
- `json_errors_middleware`: an error answered with an HTML page (Litestar's OpenAPI
  router does that for unknown schema pages) becomes `{status_code, detail}` JSON.
- `tracing_middleware`: a server span per request and the request-duration metric.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from http import HTTPStatus
from urllib.parse import urlsplit

import msgspec
from litestar.exceptions import HTTPException
from litestar.types import ASGIApp, Message, Receive, ReceiveMessage, Scope, Send
from opentelemetry.trace import SpanKind

from shared.telemetry import Telemetry, elapsed_ms, extract

_BAD_REQUEST = 400
_FIRST_ERROR = 400


def _json_error(status: int, detail: str) -> tuple[list[tuple[bytes, bytes]], bytes]:
    body = msgspec.json.encode({"status_code": status, "detail": detail})
    headers = [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]
    return headers, body


async def _answer(send: Send, status: int, detail: str) -> None:
    headers, body = _json_error(status, detail)
    await send({"type": "http.response.start", "status": status, "headers": headers})
    await send({"type": "http.response.body", "body": body, "more_body": False})


def _host_is_valid(host: str) -> bool:
    try:
        urlsplit(f"//{host}").port  # noqa: B018 - parsing is the check
    except ValueError:
        return False
    return True


def host_check_middleware(app: ASGIApp) -> ASGIApp:
    async def middleware(scope: Scope, receive: Receive, send: Send) -> None:
        if str(scope["type"]) == "http":
            hosts = [v.decode("latin-1") for k, v in scope.get("headers", []) if k.lower() == b"host"]
            if any(not _host_is_valid(h) for h in hosts):
                await _answer(send, _BAD_REQUEST, "the Host header is not a valid host[:port]")
                return
        await app(scope, receive, send)

    return middleware


def json_errors_middleware(app: ASGIApp) -> ASGIApp:
    async def middleware(scope: Scope, receive: Receive, send: Send) -> None:
        if str(scope["type"]) != "http":
            await app(scope, receive, send)
            return
        replaced: int | None = None

        async def send_json_errors(message: Message) -> None:
            nonlocal replaced
            if message["type"] == "http.response.start":
                headers = dict(message.get("headers") or [])
                content_type = headers.get(b"content-type", b"").lower()
                if message["status"] >= _FIRST_ERROR and not content_type.startswith(b"application/json"):
                    replaced = message["status"]
                    return  # sent with the body, once its length is known
            elif message["type"] == "http.response.body" and replaced is not None:
                if message.get("more_body", False):
                    return
                reason = HTTPStatus(replaced).phrase if replaced in HTTPStatus._value2member_map_ else "error"
                json_headers, body = _json_error(replaced, reason)
                await send({"type": "http.response.start", "status": replaced, "headers": json_headers})
                await send({"type": "http.response.body", "body": body, "more_body": False})
                return
            await send(message)

        await app(scope, receive, send_json_errors)

    return middleware


# Metric labels and span names come from a closed set, never from what a client sends.
_METHODS = frozenset({"GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS"})


class BodyTimeout(HTTPException):
    status_code = 408


def body_timeout_middleware(seconds: float) -> Callable[[ASGIApp], ASGIApp]:
    """A request body must arrive whole within `seconds` (a client that announces more than
    it sends must not hold a connection open forever); after it, reads are not limited."""

    def wrap(app: ASGIApp) -> ASGIApp:
        async def middleware(scope: Scope, receive: Receive, send: Send) -> None:
            if str(scope["type"]) != "http":
                await app(scope, receive, send)
                return
            deadline = asyncio.get_running_loop().time() + seconds
            complete = False

            async def timed_receive() -> ReceiveMessage:
                nonlocal complete
                if complete:
                    return await receive()
                try:
                    async with asyncio.timeout_at(deadline):  # no task per read, unlike wait_for
                        message = await receive()
                except TimeoutError:
                    raise BodyTimeout(detail=f"the request body did not arrive within {seconds:g}s") from None
                if message["type"] != "http.request" or not message.get("more_body", False):
                    complete = True
                return message

            await app(scope, timed_receive, send)

        return middleware

    return wrap


def tracing_middleware(telemetry: Telemetry) -> Callable[[ASGIApp], ASGIApp]:
    """A server span per HTTP request, continuing a caller's W3C trace context."""

    def wrap(app: ASGIApp) -> ASGIApp:
        async def middleware(scope: Scope, receive: Receive, send: Send) -> None:
            if str(scope["type"]) != "http":
                await app(scope, receive, send)
                return
            method = str(scope.get("method", ""))
            method = method if method in _METHODS else "OTHER"
            headers = {k.decode("latin-1"): v.decode("latin-1") for k, v in scope.get("headers", [])}
            started = time.perf_counter()
            status_code = 500

            async def send_wrapper(message: Message) -> None:
                nonlocal status_code
                if message["type"] == "http.response.start":
                    status_code = message["status"]
                await send(message)

            with telemetry.tracer.span(
                f"HTTP {method}",
                {"http.request.method": method, "url.path": str(scope.get("path", ""))},
                kind=SpanKind.SERVER,
                parent=extract(headers),
            ) as span:
                try:
                    await app(scope, receive, send_wrapper)
                finally:
                    span.set_attribute("http.response.status_code", status_code)
                    telemetry.metrics.record(
                        "sandbox.api.request.duration_ms",
                        elapsed_ms(started),
                        {"method": method, "status": str(status_code)},
                    )

        return middleware

    return wrap
