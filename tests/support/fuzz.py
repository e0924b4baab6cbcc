"""Generators and oracles for the fuzz tests (`tests/integration/test_fuzz.py`).

HTTP: hypothesis strategies that build `HttpCase`s — a method, a raw path and query, headers
and a body — for every route of the API, each with the statuses the contract allows for it
(`expect`, None when the contract leaves it open beyond "not a 5xx"). `HttpFuzzer` sends them
with a synchronous httpx client and collects every response that breaks a rule.

NATS: strategies that build `BadCommand`s — a subject and a payload that the contract calls
malformed — with placeholders for the chat and command ids, so that `materialize` can give
every command its own fresh chat (hypothesis likes to repeat simple UUIDs such as all zeros).

Valid creates always name a chat of a small pool and never ask for a short TTL, and valid
DELETEs of pool chats are budgeted: the fuzz exercises the control plane, not Docker.
"""

from __future__ import annotations

import json
import threading
import time
import urllib.parse
import uuid
from collections import Counter
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field, replace
from typing import Any, Literal

import httpx
from hypothesis import strategies as st

from shared.subjects import INVALID_EVENTS_SUBJECT

API = "/api/v1"
TOKEN_HEADER = "X-API-Token"
MAX_TTL = 604_800  # sandbox.max_ttl_seconds (default): above it a create/keepalive is 422
SCHEMA_MAX_TTL = 30 * 24 * 3600  # the contract's TtlSeconds bound: above it the body is malformed
SAFE_TTLS = st.integers(min_value=300, max_value=MAX_TTL)  # long enough that no pool session expires mid-run

Validity = Literal["valid", "invalid", "open"]  # open: the contract does not say

# --------------------------------------------------------------------------- shared pieces

KNOWN_KINDS = frozenset({"create", "stop", "keepalive", "pause", "resume"})  # pause/resume: in the contract
FIELDS: dict[str, frozenset[str]] = {
    "create": frozenset({"command_id", "chat_id", "requested_at", "requested_by", "ttl_seconds", "labels"}),
    "stop": frozenset({"command_id", "chat_id", "requested_at", "requested_by", "session_id", "reason"}),
    "keepalive": frozenset({"command_id", "chat_id", "requested_at", "requested_by", "session_id", "ttl_seconds"}),
}
HTTP_FIELDS: dict[str, frozenset[str]] = {
    "sandboxes": frozenset({"chat_id", "ttl_seconds", "labels", "idle_ttl_seconds"}),
    "create": frozenset({"chat_id"}),
    "keepalive": frozenset({"ttl_seconds", "session_id"}),
}

INVALID_UTF8 = (b"\xff", b"\xfe\xff", b"\xc0\xaf", b"\xed\xa0\x80", b"\x80", b"\xf8\x88\x80\x80\x80", b"\xe2\x82")
LONE_SURROGATES = ("\ud800", "\udfff", "\udc00x", "a\ud83d")


def chance(draw: st.DrawFn, one_in: int) -> bool:
    """True about once in `one_in` draws. (Not `integers(0, n) == 0`: hypothesis favours the
    bounds of a range, so that would be true far more often.)"""
    return draw(st.integers(min_value=0, max_value=one_in - 1)) == one_in // 2


def is_uuid(text: str) -> bool:
    try:
        uuid.UUID(text.strip())
    except (ValueError, TypeError):
        return False
    return True


def spell(chat: str, how: str) -> str:
    """A spelling of a UUID that the contract says is normalised."""
    u = uuid.UUID(chat)
    return {
        "canonical": str(u),
        "upper": str(u).upper(),
        "hex": u.hex,
        "braces": "{" + str(u) + "}",
        "urn": u.urn,
        "padded": f"  {u}\t",
    }[how]


PATH_SPELLINGS = ("canonical", "upper", "hex", "braces", "urn")
BODY_SPELLINGS = (*PATH_SPELLINGS, "padded")

json_scalars = (
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False, allow_infinity=False) | st.text(max_size=20)
)
json_values = st.recursive(
    json_scalars,
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=10), inner, max_size=4),
    max_leaves=12,
)


def dumps(obj: object, *, ascii_only: bool) -> bytes:
    """JSON bytes; a lone surrogate becomes `\\udXXX` (ascii) or its invalid UTF-8 bytes."""
    return json.dumps(obj, ensure_ascii=ascii_only).encode("utf-8", "surrogatepass")


def nested(depth: int, kind: str) -> bytes:
    if kind == "array":
        return b"[" * depth + b"]" * depth
    if kind == "object":
        return b'{"a":' * depth + b"1" + b"}" * depth
    return b'[{"a":' * depth + b"null" + b"}]" * depth


deep_json = st.builds(
    nested, st.integers(min_value=1_000, max_value=6_000), st.sampled_from(["array", "object", "mix"])
)


def garbage_token(alphabet: str) -> st.SearchStrategy[str]:
    """Non-empty text that is not any spelling of a UUID."""
    return st.one_of(
        st.text(alphabet=alphabet, min_size=1, max_size=60),
        st.uuids().map(lambda u: str(u)[:-1]),
        st.uuids().map(lambda u: str(u) + "0"),
        st.uuids().map(lambda u: "g" + str(u)[1:]),
        st.uuids().map(lambda u: u.hex[:31]),
        st.sampled_from(["invalid", "null", "None", "undefined", "0", "-1", "nope", "00000000", "chat", "events"]),
    ).filter(lambda t: t.strip() != "" and not is_uuid(t))


PATH_SAFE = "abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789-_~:@!$&'()*+,;=éß漢"
PATH_SUBDELIMS = ":@!$&'()*+,;=-_~"  # kept as written in a path segment
SUBJECT_SAFE = "abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789-_{}:@!#$%&éß漢"


# --------------------------------------------------------------------------- bodies


@dataclass(frozen=True)
class Body:
    raw: bytes
    validity: Validity
    ttl: int | None = None  # the ttl_seconds of a valid body, if any


def bad_labels() -> st.SearchStrategy[object]:
    """Label maps the contract refuses (schemas/: key pattern, value length and characters,
    at most 32 labels, str → str)."""
    return st.one_of(
        st.sampled_from([[], "team=qa", 5, None, True, ["a", "b"]]),
        st.dictionaries(
            st.from_regex(r"[a-z]{1,8}", fullmatch=True),
            json_scalars.filter(lambda v: not isinstance(v, str)),
            min_size=1,
            max_size=3,
        ),
        st.just({"": "v"}),
        st.builds(lambda c: {"k": f"a{c}b"}, st.characters(max_codepoint=0x1F) | st.just("\x7f")),
        st.builds(
            lambda c: {f"k{c}": "v"}, st.characters(max_codepoint=0x1F) | st.sampled_from([" ", "/", "\x7f", "é"])
        ),
        st.builds(lambda n: {"k": "v" * n}, st.integers(min_value=257, max_value=2_000)),
        st.builds(lambda n: {"k" * n: "v"}, st.integers(min_value=64, max_value=500)),
        st.builds(lambda n: {f"k{i}": "v" for i in range(n)}, st.integers(min_value=33, max_value=150)),
        st.just({"k": {"nested": "v"}}),
        st.just({"-lead": "v"}),
    )


def wrong_ttl() -> st.SearchStrategy[object]:
    return st.one_of(
        st.sampled_from(["600", "", "1h", True, False, [], {}, [600], {"seconds": 600}]),
        st.integers(max_value=0),
        st.integers(min_value=SCHEMA_MAX_TTL + 1),
        st.sampled_from([2**63, 2**64, 10**30, -(2**63) - 1, 10**400]),
        st.floats(allow_nan=False, allow_infinity=False).filter(lambda f: not f.is_integer()),
    )


def wrong_id() -> st.SearchStrategy[object]:
    """Not a UUID in any spelling, nor null."""
    return st.one_of(
        st.sampled_from([5, 1.5, True, [], {}, ""]),
        st.lists(st.uuids().map(str), min_size=1, max_size=2),
        st.uuids().map(lambda u: {"id": str(u)}),
        st.uuids().map(lambda u: u.int),
        garbage_token(PATH_SAFE + " /.?#%"),
    )


def required_id() -> st.SearchStrategy[object]:
    """Not a UUID; null too, where the id is required."""
    return st.one_of(st.none(), wrong_id())


@st.composite
def raw_junk(draw: st.DrawFn, valid: bytes) -> bytes:
    """Bytes that are not a JSON object: truncated, random, empty, other JSON types."""
    choice = draw(st.sampled_from(["truncated", "random", "empty", "scalar", "deep", "literal"]))
    if choice == "truncated" and len(valid) > 1:
        return valid[: draw(st.integers(min_value=1, max_value=len(valid) - 1))]
    if choice == "random":
        return draw(st.binary(min_size=1, max_size=2_000))
    if choice == "empty":
        return draw(st.sampled_from([b"", b" ", b"\n\t ", b"\x00"]))
    if choice == "scalar":
        return dumps(draw(json_values.filter(lambda v: not isinstance(v, dict))), ascii_only=True)
    if choice == "deep":
        return draw(deep_json)
    return draw(
        st.sampled_from(
            [
                b"NaN",
                b"Infinity",
                b"-Infinity",
                b"1e999999",
                b"{",
                b"}",
                b"{'chat_id': 'x'}",
                b'{"a":1,}',
                b"[1,]",
                b"{}{}",
            ]
        )
    )


@st.composite
def mutated_object(
    draw: st.DrawFn,
    base: dict[str, Any],
    allowed: frozenset[str],
    wrongs: dict[str, Callable[[], st.SearchStrategy[object]]],
) -> bytes:
    """`base` broken in one of the ways the contract refuses; returns the JSON bytes."""
    how = draw(st.sampled_from(["wrong_type", "unknown_field", "invalid_utf8", "surrogate", "deep_field", "junk"]))
    obj = dict(base)
    if how == "wrong_type":
        name = draw(st.sampled_from(sorted(wrongs)))
        obj[name] = draw(wrongs[name]())
        return dumps(obj, ascii_only=draw(st.booleans()))
    if how == "unknown_field":
        names = st.text(min_size=1, max_size=30).filter(lambda n: n not in allowed)
        extra = draw(st.dictionaries(names, json_values, min_size=1, max_size=3))
        obj.update(extra)
        return dumps(obj, ascii_only=draw(st.booleans()))
    if how == "invalid_utf8":
        target = draw(st.sampled_from([*sorted(base), "@KEY@"]))
        if target == "@KEY@":
            obj["@BAD@"] = "v"
        else:
            obj[target] = "x@BAD@y"
        return dumps(obj, ascii_only=True).replace(b"@BAD@", draw(st.sampled_from(INVALID_UTF8)))
    if how == "surrogate":
        target = draw(st.sampled_from(sorted(base)))
        obj[target] = draw(st.sampled_from(LONE_SURROGATES))
        return dumps(obj, ascii_only=draw(st.booleans()))
    if how == "deep_field":
        target = draw(st.sampled_from([*sorted(wrongs), "zz_unknown"]))
        obj[target] = "@DEEP@"
        return dumps(obj, ascii_only=True).replace(b'"@DEEP@"', draw(deep_json))
    return draw(raw_junk(dumps(obj, ascii_only=True)))


# --------------------------------------------------------------------------- HTTP


@dataclass(frozen=True)
class HttpCase:
    method: str
    path: str  # raw path and query, sent as written (percent escapes included)
    headers: tuple[tuple[str, bytes], ...]
    body: bytes | None
    expect: frozenset[int] | None  # allowed statuses; None: anything below 500
    label: str
    pool_delete: int | None = None  # a DELETE of pool chat N (Docker work: budgeted by the runner)
    chunked: bool = False  # send the body with Transfer-Encoding: chunked

    def describe(self) -> str:
        headers = {k: v.decode("latin-1") for k, v in self.headers}
        body = "None" if self.body is None else _short(repr(self.body), 600) + f" ({len(self.body)} bytes)"
        return f"{self.method} {self.path} [{self.label}]\n    headers={headers}\n    body={body}"


def _short(text: str, limit: int) -> str:
    return text if len(text) <= limit else text[:limit] + f"...<{len(text) - limit} more chars>"


@dataclass(frozen=True)
class Auth:
    headers: tuple[tuple[str, bytes], ...]
    ok: bool | None  # None: the contract leaves it open (a duplicated header)


@st.composite
def auth(draw: st.DrawFn, token: str) -> Auth:
    t = token.encode()
    choice = draw(
        st.sampled_from(
            ["ok", "ok", "ok", "ok", "lower", "missing", "empty", "wrong", "near", "latin", "bearer", "dup"]
        )
    )
    if choice == "ok":
        return Auth(((TOKEN_HEADER, t),), ok=True)
    if choice == "lower":
        return Auth(((TOKEN_HEADER.lower(), t),), ok=True)
    if choice == "missing":
        return Auth((), ok=False)
    if choice == "empty":
        return Auth(((TOKEN_HEADER, b""),), ok=False)
    if choice == "wrong":
        wrong = draw(
            st.text(alphabet=st.characters(min_codepoint=0x21, max_codepoint=0x7E), min_size=1, max_size=80).filter(
                lambda w: w != token
            )
        )
        return Auth(((TOKEN_HEADER, wrong.encode()),), ok=False)
    if choice == "near":
        near = draw(st.sampled_from([t[:-1], t + b"x", t.upper(), t[1:], t[::-1], t + t]))
        return Auth(((TOKEN_HEADER, near),), ok=False)
    if choice == "latin":
        junk = draw(st.binary(min_size=1, max_size=40).map(lambda b: bytes(c for c in b if c >= 0x20 and c != 0x7F)))
        junk = junk.strip() or b"\xff"
        return Auth(((TOKEN_HEADER, junk),), ok=False)
    if choice == "bearer":
        return Auth((("Authorization", b"Bearer " + t),), ok=False)
    # Two token headers, a wrong one first: which one counts is not in the contract. (A
    # value with surrounding blanks cannot be sent: h11 refuses it on the client side.)
    return Auth(((TOKEN_HEADER, b"wrong"), (TOKEN_HEADER, t)), ok=None)


JSON_CT = b"application/json"
OTHER_CTS = (
    b"text/plain",
    b"application/x-www-form-urlencoded",
    b"multipart/form-data",
    b"multipart/form-data; boundary=xyz",
    b"application/json; charset=latin-1",
    b"application/xml",
    b"*/*",
    b"application/json\xff",
    b"",
)


@st.composite
def extra_headers(draw: st.DrawFn, *, has_body: bool) -> tuple[tuple[tuple[str, bytes], ...], bool]:
    """(headers, JSON content type?) — content type, tracing and idempotency junk."""
    out: list[tuple[str, bytes]] = []
    json_ct = True
    if has_body:
        ct = draw(st.sampled_from([JSON_CT, JSON_CT, JSON_CT, None, *OTHER_CTS]))
        json_ct = ct == JSON_CT
        if ct is not None:
            out.append(("Content-Type", ct))
    if chance(draw, 10):
        out.append(
            (
                "traceparent",
                draw(
                    st.sampled_from(
                        [b"00-zz", b"", b"00-" + b"0" * 32 + b"-" + b"0" * 16 + b"-01", b"ff-" + b"a" * 200]
                    )
                ),
            )
        )
    if chance(draw, 10):
        # Printable junk made unique: the same key on another request is a 422 by contract,
        # which the oracles of the routes do not expect (tests/integration/test_idempotency.py
        # covers reuse, and keys that are refused).
        junk = draw(st.binary(min_size=1, max_size=60).map(lambda b: bytes(c for c in b if 0x21 <= c <= 0x7E)))
        out.append(("Idempotency-Key", junk + b"." + uuid.uuid4().hex.encode()))
    if chance(draw, 15):
        out.append(("Accept", draw(st.sampled_from([b"text/html", b"application/xml", b"*/*;q=0", b"\xff"]))))
    return tuple(out), json_ct


@dataclass(frozen=True)
class Chat:
    """A path segment naming a chat: its raw text and what it is."""

    segment: str  # as written in the raw path
    kind: Literal["pool", "fresh", "garbage", "junk"]
    pool_index: int | None = None


@st.composite
def path_chat(draw: st.DrawFn, pool: Sequence[str], *, allow_pool: bool = True) -> Chat:
    kinds = ["pool", "fresh", "garbage", "junk"] if allow_pool else ["fresh", "garbage", "junk"]
    kind = draw(st.sampled_from(kinds))
    if kind == "pool":
        i = draw(st.integers(min_value=0, max_value=len(pool) - 1))
        return Chat(urllib.parse.quote(spell(pool[i], draw(st.sampled_from(PATH_SPELLINGS))), safe=":{}"), "pool", i)
    if kind == "fresh":
        # Never a pool chat, whatever hypothesis draws.
        u = draw(st.uuids())
        return Chat(urllib.parse.quote(spell(str(u), draw(st.sampled_from(PATH_SPELLINGS))), safe=":{}"), "fresh")
    if kind == "garbage":
        return Chat(urllib.parse.quote(draw(garbage_token(PATH_SAFE)), safe=PATH_SUBDELIMS), "garbage")
    junk = draw(
        st.one_of(
            st.sampled_from(
                ["%", "%zz", "%ff%fe", "%00", "%2F", "%2e%2e", "a%2Fb", "%C0%AF", "%25", "%E2%82", "%0d%0a", "%20"]
            ),
            st.text(min_size=1, max_size=40).map(lambda s: urllib.parse.quote(s, safe="")),
            st.integers(min_value=300, max_value=4_000).map(lambda n: "x" * n),
        )
    )
    return Chat(junk, "junk")


def bad_query() -> st.SearchStrategy[str]:
    """A junk query string (never a known parameter name)."""
    pair = st.tuples(st.text(min_size=1, max_size=12), st.text(max_size=20)).map(
        lambda kv: urllib.parse.quote("x" + kv[0], safe="") + "=" + urllib.parse.quote(kv[1], safe="")
    )
    return st.one_of(
        st.lists(pair, min_size=1, max_size=4).map("&".join),
        st.sampled_from(
            ["%", "%zz=%ff", "&&&", "=", "x=%00", "x=%E2%82", "x=" + "y" * 3_000, "a[]=1&a[]=2", "x=1;y=2"]
        ),
    )


def _case(
    method: str,
    path: str,
    a: Auth,
    hdrs: tuple[tuple[str, bytes], ...],
    body: bytes | None,
    expect: frozenset[int] | None,
    label: str,
    *,
    protected: bool,
    pool_delete: int | None = None,
) -> HttpCase:
    """The auth rule comes first: a protected route without a valid token is 401, whatever
    else is wrong with the request."""
    if protected and a.ok is False:
        expect = frozenset({401})
    elif protected and a.ok is None:
        expect = None
    return HttpCase(method, path, a.headers + hdrs, body, expect, label, pool_delete)


S = frozenset


@st.composite
def create_case(draw: st.DrawFn, pool: Sequence[str], token: str) -> HttpCase:
    seed = draw(st.booleans())
    route = f"{API}/create" if seed else f"{API}/sandboxes"
    i = draw(st.integers(min_value=0, max_value=len(pool) - 1))
    base: dict[str, Any] = {"chat_id": spell(pool[i], draw(st.sampled_from(BODY_SPELLINGS)))}
    ttl: int | None = None
    if not seed:
        if draw(st.booleans()):
            ttl = draw(st.one_of(SAFE_TTLS, st.integers(min_value=MAX_TTL + 1, max_value=SCHEMA_MAX_TTL)))
            base["ttl_seconds"] = ttl
        if draw(st.booleans()):
            base["labels"] = draw(
                st.dictionaries(
                    st.from_regex(r"[A-Za-z0-9][A-Za-z0-9_.\-]{0,20}", fullmatch=True),
                    st.text(
                        alphabet=st.characters(
                            min_codepoint=0x20, exclude_characters="\x7f", exclude_categories=["Cs"]
                        ),
                        max_size=50,
                    ),
                    max_size=5,
                )
            )
    valid_raw = dumps(base, ascii_only=draw(st.booleans()))
    wrongs: dict[str, Callable[[], st.SearchStrategy[object]]] = {"chat_id": required_id}
    if not seed:
        wrongs |= {"ttl_seconds": wrong_ttl, "labels": bad_labels}
    # idle_ttl_seconds is in the contract: never sent as an "unknown" field.
    allowed = HTTP_FIELDS["create" if seed else "sandboxes"]
    if chance(draw, 3):
        body = Body(valid_raw, "valid", ttl)
    elif chance(draw, 20):
        # RFC 8259: a parser MAY ignore a byte order mark. Either answer is fine, not a 5xx.
        body = Body(b"\xef\xbb\xbf" + valid_raw, "open")
    else:
        body = Body(draw(mutated_object(base, allowed, wrongs)), "invalid")
    a = draw(auth(token))
    hdrs, json_ct = draw(extra_headers(has_body=True))
    method = draw(st.sampled_from(["POST"] * 8 + ["PUT", "PATCH", "GET"]))
    query = draw(st.one_of(st.just(""), bad_query().map(lambda q: "?" + q))) if chance(draw, 6) else ""
    if method != "POST":
        expect: frozenset[int] | None = S({405}) if seed or method != "GET" else S({200, 400})
        protected = method == "GET" and not seed
        return _case(
            method,
            route + query,
            a,
            hdrs,
            body.raw,
            expect if not query else None,
            f"create/{method}",
            protected=protected,
        )
    if body.validity == "valid":
        ok = {200, 201, 202, 429} | ({422} if (body.ttl or 0) > MAX_TTL else set())
        expect = S(ok) if json_ct else None
    elif body.validity == "invalid":
        expect = S({400, 413, 415, 422})
    else:
        expect = None
    return _case(
        "POST",
        route + query,
        a,
        hdrs,
        body.raw,
        expect if not query else None,
        "create/seed" if seed else "create",
        protected=True,
    )


@st.composite
def keepalive_body(draw: st.DrawFn) -> Body:
    base: dict[str, Any] = {}
    ttl: int | None = None
    if draw(st.booleans()):
        ttl = draw(st.integers(min_value=1, max_value=SCHEMA_MAX_TTL))
        base["ttl_seconds"] = ttl
    if draw(st.booleans()):
        base["session_id"] = str(draw(st.uuids()))
    choice = draw(st.integers(min_value=0, max_value=3))
    if choice == 0:
        # No body is "the default TTL". A blank one is not JSON: the contract leaves it open.
        raw = draw(st.sampled_from([b"", b"  ", b"\r\n"]))
        return Body(raw, "valid" if raw == b"" else "open")
    if choice == 1:
        return Body(dumps(base, ascii_only=True), "valid", ttl)
    wrongs: dict[str, Callable[[], st.SearchStrategy[object]]] = {"ttl_seconds": wrong_ttl, "session_id": wrong_id}
    full = {"ttl_seconds": 600, "session_id": str(draw(st.uuids()))} | base
    raw = draw(mutated_object(full, HTTP_FIELDS["keepalive"], wrongs))
    # Some junk (an empty or blank body) is a valid keepalive: no body means "the default TTL".
    return Body(raw, "open" if not raw.strip() else "invalid")


@dataclass(frozen=True)
class Route:
    """One request to a chat's route, before auth and transport junk."""

    method: str
    native: str  # the method the route serves
    path: str
    ok: frozenset[int] | None
    body: bytes | None = None
    query: str = ""
    pool_delete: int | None = None


BAD_CHAT = frozenset({400, 422})
LIMIT_JUNK = ("0", "-1", "10001", "abc", "1.5", "1e3", "9" * 30, "0x10", "%00", "%ff", "1&limit=2")


def _limit_ok(limit: str | None) -> bool:
    return limit is None or (limit.isdigit() and 1 <= int(limit) <= 10_000)


@st.composite
def _get_route(draw: st.DrawFn, chat: Chat) -> Route:
    method = draw(st.sampled_from(["GET"] * 6 + ["PUT", "PATCH", "POST", "HEAD", "OPTIONS", "FROBNICATE"]))
    ok = BAD_CHAT if chat.kind == "garbage" else S({200, 404})
    return Route(method, "GET", f"{API}/sandboxes/{chat.segment}", ok)


@st.composite
def _delete_route(draw: st.DrawFn, chat: Chat) -> Route:
    method = draw(st.sampled_from(["DELETE"] * 6 + ["PUT", "POST"]))
    ok = BAD_CHAT if chat.kind == "garbage" else S({200, 202, 404})
    body = draw(st.binary(max_size=200)) if chance(draw, 5) else None
    pool_delete = chat.pool_index if method == "DELETE" else None
    return Route(method, "DELETE", f"{API}/sandboxes/{chat.segment}", ok, body, pool_delete=pool_delete)


@st.composite
def _keepalive_route(draw: st.DrawFn, chat: Chat) -> Route:
    method = draw(st.sampled_from(["POST"] * 6 + ["GET", "PUT", "DELETE"]))
    kb = draw(keepalive_body())
    ok: frozenset[int] | None = None
    if kb.validity == "invalid":
        ok = S({400, 413, 415, 422})
    elif chat.kind == "garbage":
        ok = BAD_CHAT
    elif kb.validity == "valid":
        ok = S({200, 202, 404, 409, 422})
    return Route(method, "POST", f"{API}/sandboxes/{chat.segment}/keepalive", ok, kb.raw)


@st.composite
def _events_route(draw: st.DrawFn, chat: Chat) -> Route:
    method = draw(st.sampled_from(["GET"] * 6 + ["POST", "DELETE"]))
    limit = draw(
        st.one_of(
            st.none(), st.integers(min_value=1, max_value=10_000).map(str), st.sampled_from(LIMIT_JUNK), st.just("")
        )
    )
    ok: frozenset[int] | None
    if limit in ("", "1e3", "1&limit=2"):
        ok = None  # absent, another spelling of a number, repeated: the contract leaves it open
    elif chat.kind == "garbage":
        ok = BAD_CHAT
    else:
        ok = S({200}) if _limit_ok(limit) else S({400})
    query = "" if limit is None else f"?limit={limit}"
    return Route(method, "GET", f"{API}/sandboxes/{chat.segment}/events", ok, query=query)


@st.composite
def _pause_resume_route(draw: st.DrawFn, chat: Chat) -> Route:
    """In the contract; the service may not have them yet: never a pool chat, no expectation."""
    verb = draw(st.sampled_from(["pause", "resume"]))
    method = draw(st.sampled_from(["POST", "POST", "GET"]))
    return Route(method, method, f"{API}/sandboxes/{chat.segment}/{verb}", None, b"{}")


_CHAT_ROUTES = {
    "get": _get_route,
    "delete": _delete_route,
    "keepalive": _keepalive_route,
    "events": _events_route,
    "pauseresume": _pause_resume_route,
}


@st.composite
def chat_route_case(draw: st.DrawFn, pool: Sequence[str], token: str) -> HttpCase:
    """GET/DELETE /sandboxes/{chat}, POST .../keepalive, GET .../events, .../pause|resume."""
    which = draw(st.sampled_from(["get", "delete", "keepalive", "events", "events", "pauseresume"]))
    chat = draw(path_chat(pool, allow_pool=which != "pauseresume"))
    route = draw(_CHAT_ROUTES[which](chat))
    a = draw(auth(token))
    hdrs, _ = draw(extra_headers(has_body=route.body is not None))
    ok, protected, pool_delete = route.ok, which != "pauseresume", route.pool_delete
    if route.method != route.native:
        ok = None if route.method in ("HEAD", "OPTIONS") else S({405})
        protected, pool_delete = False, None
    if chat.kind == "junk":  # percent junk may decode to '/' or worse: routing is open
        ok, protected = None, False
    query = route.query
    if chance(draw, 6):
        query = (query + "&" if query else "?") + draw(bad_query())
        ok = None
    label = f"chat/{which}/{chat.kind}"
    return _case(
        route.method, route.path + query, a, hdrs, route.body, ok, label, protected=protected, pool_delete=pool_delete
    )


@st.composite
def list_case(draw: st.DrawFn, token: str) -> HttpCase:
    params: list[str] = []
    ok: frozenset[int] | None = S({200})
    status = draw(
        st.one_of(
            st.none(),
            st.sampled_from(["running", "provisioning", "stopping", "stopped", "failed", "lost"]),
            st.text(max_size=20),
        )
    )
    if status is not None:
        params.append("status=" + urllib.parse.quote(status, safe=""))
        if status in ("", "paused"):
            ok = None  # empty: absent or refused; paused: in the contract, maybe not in the service yet
        elif status not in ("running", "provisioning", "stopping", "stopped", "failed", "lost"):
            ok = S({400})
    for name, values in (
        ("label", st.text(max_size=30)),
        ("limit", st.one_of(st.integers().map(str), st.text(max_size=10))),
        ("cursor", st.text(max_size=40)),
    ):
        if chance(draw, 4):
            params.append(f"{name}=" + urllib.parse.quote(draw(values), safe=""))
            ok = None  # in the contract (filter, paging); their error codes are not
    if chance(draw, 6):
        params.append(draw(bad_query()))
        ok = None
    method = draw(st.sampled_from(["GET"] * 6 + ["PUT", "DELETE", "PATCH"]))
    a = draw(auth(token))
    hdrs, _ = draw(extra_headers(has_body=False))
    if method not in ("GET", "POST"):
        ok = S({405})
    path = f"{API}/sandboxes" + ("?" + "&".join(params) if params else "")
    return _case(method, path, a, hdrs, None, ok, "list", protected=method == "GET")


SCHEMA_PAGES = (
    "",
    "/",
    "/openapi.yaml",
    "/openapi.yml",
    "/swagger",
    "/redoc",
    "/rapidoc",
    "/elements",
    "/oauth2-redirect.html",
    "/nope",
)


@st.composite
def meta_case(draw: st.DrawFn, token: str) -> HttpCase:
    """health, ready, status, metrics, the OpenAPI schema."""
    route, protected, native = draw(
        st.sampled_from(
            [
                (f"{API}/health", False, "GET"),
                (f"{API}/ready", False, "GET"),
                (f"{API}/status", True, "GET"),
                ("/metrics", False, "GET"),
                (f"{API}/metrics", False, None),
                (f"{API}/schema/openapi.json", False, "GET"),
                *((f"{API}/schema{p}", False, "") for p in SCHEMA_PAGES),
            ]
        )
    )
    method = draw(st.sampled_from(["GET"] * 6 + ["POST", "PUT", "DELETE", "PATCH", "HEAD", "OPTIONS", "TRACE"]))
    a = draw(auth(token))
    body = draw(st.one_of(st.none(), st.binary(max_size=100))) if method != "GET" else None
    hdrs, _ = draw(extra_headers(has_body=body is not None))
    query = ""
    expect: frozenset[int] | None = S({200})
    if chance(draw, 5):
        query = "?" + draw(bad_query())
        expect = None
    if native is None:
        expect = S({404, 405})
    elif native == "":
        expect = None  # Litestar's schema pages: served or not, never a 5xx
    elif method in ("HEAD", "OPTIONS"):
        expect = None
    elif method != native:
        expect = S({405})
    return _case(method, route + query, a, hdrs, body, expect, f"meta{route}", protected=protected and method == native)


@st.composite
def unknown_case(draw: st.DrawFn, token: str) -> HttpCase:
    """Paths no route serves, and odd methods anywhere."""
    segments = st.lists(
        st.one_of(
            st.text(alphabet=PATH_SAFE, min_size=1, max_size=20).map(
                lambda s: urllib.parse.quote(s, safe=PATH_SUBDELIMS)
            ),
            st.text(min_size=1, max_size=20).map(lambda s: urllib.parse.quote(s, safe="")),
            st.sampled_from(["%", "%zz", "%00", "%ff", "api", "v1", "v2", "sandboxes", "..", "%2e%2e", "events"]),
        ),
        min_size=1,
        max_size=5,
    )
    prefix = draw(st.sampled_from(["", "/api", API, f"{API}/sandboxes/{uuid.UUID(int=0)}", "/api/v2", "//"]))
    path = prefix + "/" + "/".join(draw(segments))
    method = draw(
        st.sampled_from(
            [
                "GET",
                "POST",
                "DELETE",
                "PUT",
                "PATCH",
                "HEAD",
                "OPTIONS",
                "TRACE",
                "PROPFIND",
                "MKCOL",
                "FOO",
                "get",
                "M-SEARCH",
                "BREW",
            ]
        )
    )
    a = draw(auth(token))
    body = draw(st.one_of(st.none(), st.binary(max_size=200), deep_json))
    hdrs, _ = draw(extra_headers(has_body=body is not None))
    return _case(method, path, a, hdrs, body, None, "unknown", protected=False)


HOST_JUNK = (b"", b"\xff\xfe", b"exa mple", b"[::1", b"a:b:c", b"x" * 300, b"localhost:99999", b"@evil", b"h/p?q#f")


@st.composite
def transport_junk(draw: st.DrawFn, base: st.SearchStrategy[HttpCase]) -> HttpCase:
    """Chunked bodies, a junk Host header, the odd body over Litestar's 10 MB limit."""
    case = draw(base)
    if case.body is not None and chance(draw, 8):
        case = replace(case, chunked=True)
    if chance(draw, 25):
        case = replace(case, headers=(*case.headers, ("Host", draw(st.sampled_from(HOST_JUNK)))), expect=None)
    if case.method == "POST" and chance(draw, 200):
        size = draw(st.integers(min_value=1_000_000, max_value=12_000_000))
        body = b'{"chat_id": "' + b"a" * size + b'"}'
        expect = case.expect if case.expect == S({401}) else S({400, 401, 404, 405, 413}) if case.expect else None
        case = replace(case, body=body, expect=expect, label=case.label + "/huge")
    return case


def regression_cases(token: str) -> list[HttpCase]:
    """Requests that found bugs before, sent on every run besides the generated ones: a Host
    header with a bad port meets a request Litestar itself refuses (it formats the URL into
    the error), and pages under the OpenAPI path that do not exist."""
    t = ((TOKEN_HEADER, token.encode()),)
    fresh = str(uuid.uuid4())
    requests: list[tuple[str, str, frozenset[int]]] = [
        ("GET", f"{API}/sandboxes?status=bogus", S({400})),
        ("GET", f"{API}/sandboxes/{fresh}/events?limit=0", S({400})),
        ("GET", f"{API}/sandboxes/{fresh}/events?limit=abc", S({400})),
        ("GET", f"{API}/sandboxes", S({200, 400})),  # a Host with a bad port is refused up front
        ("POST", f"{API}/sandboxes", S({400})),
    ]
    cases = [
        HttpCase(method, path, (*t, ("Host", host)), b"{" if method == "POST" else None, expect, "regression/host")
        for host in (b"a:b:c", b"localhost:99999", b"127.0.0.1:-1", b"[::1", b"h:0x10")
        for method, path, expect in requests
    ]
    cases += [
        HttpCase("GET", f"{API}/schema/{page}", (), None, None, "regression/schema")
        for page in ("nope", "openapi.json/x", "swagger/x", "%00")
    ]
    return cases


def http_cases(pool: Sequence[str], token: str) -> st.SearchStrategy[HttpCase]:
    return transport_junk(
        st.one_of(
            create_case(pool, token),
            create_case(pool, token),
            chat_route_case(pool, token),
            chat_route_case(pool, token),
            list_case(token),
            meta_case(token),
            unknown_case(token),
        )
    )


@dataclass
class Offender:
    case: HttpCase
    why: str
    status: int | None
    text: str

    def describe(self) -> str:
        return f"- {self.why}: got {self.status}\n    {self.case.describe()}\n    response={_short(self.text, 800)!r}"


@dataclass
class HttpFuzzer:
    """Sends cases from `workers` threads (a synchronous client each), checks and counts
    them. `submit` is called by the generating thread and blocks while every worker is busy."""

    base_url: str
    pool: Sequence[str]
    workers: int = 4
    delete_budget: int = 6
    sent: int = 0
    repeats: int = 0
    distinct: set[int] = field(default_factory=set)
    by_status: Counter[int] = field(default_factory=Counter)
    by_label: Counter[str] = field(default_factory=Counter)
    offenders: list[Offender] = field(default_factory=list)
    _lock: threading.Lock = field(default_factory=threading.Lock)
    _local: threading.local = field(default_factory=threading.local)
    _clients: list[httpx.Client] = field(default_factory=list)
    _pool: ThreadPoolExecutor = field(init=False)
    _slots: threading.BoundedSemaphore = field(init=False)

    def __post_init__(self) -> None:
        self._pool = ThreadPoolExecutor(self.workers, thread_name_prefix="http-fuzz")
        self._slots = threading.BoundedSemaphore(self.workers * 2)

    def submit(self, case: HttpCase) -> None:
        """Send `case` unless the same request was sent before (hypothesis repeats itself)."""
        key = hash((case.method, case.path, case.headers, case.body, case.chunked))
        with self._lock:
            if key in self.distinct:
                self.repeats += 1
                return
            self.distinct.add(key)
        case = self._budget(case)
        with self._lock:
            self.sent += 1
            self.by_label[case.label] += 1
        self._slots.acquire()
        self._pool.submit(self._send_guarded, case)

    def close(self) -> None:
        """Wait for every request in flight, then close the clients."""
        self._pool.shutdown(wait=True)
        for client in self._clients:
            client.close()

    def _client(self) -> httpx.Client:
        client: httpx.Client | None = getattr(self._local, "client", None)
        if client is None:
            client = httpx.Client(timeout=30)
            self._local.client = client
            with self._lock:
                self._clients.append(client)
        return client

    def _budget(self, case: HttpCase) -> HttpCase:
        """A DELETE of a live pool session costs a container stop and the next create a start:
        past the budget it names a fresh chat instead (404, no Docker work)."""
        if case.pool_delete is None:
            return case
        with self._lock:
            if self.delete_budget > 0:
                self.delete_budget -= 1
                return case
        fresh = str(uuid.uuid4())
        head, _, query = case.path.partition("?")
        path = head.rsplit("/", 1)[0] + "/" + fresh + ("?" + query if query else "")
        return replace(case, path=path, pool_delete=None, label=case.label.replace("/pool", "/fresh"))

    def _send_guarded(self, case: HttpCase) -> None:
        try:
            self._send(case)
        except Exception as exc:  # noqa: BLE001 - a bug in the checks must show, not vanish in a worker
            self._offend(Offender(case, f"the fuzzer itself failed ({type(exc).__name__})", None, repr(exc)))
        finally:
            self._slots.release()

    def _offend(self, offender: Offender) -> None:
        with self._lock:
            self.offenders.append(offender)

    def _send(self, case: HttpCase) -> None:
        client = self._client()
        url = httpx.URL(self.base_url).copy_with(raw_path=case.path.encode("ascii"))
        headers = [(k.encode("latin-1"), v) for k, v in case.headers]
        body = case.body
        content: bytes | Iterator[bytes] | None = body
        if body is not None and case.chunked:
            content = iter([body[i : i + 97] for i in range(0, len(body), 97)] or [b""])
        request = client.build_request(case.method, url, headers=headers, content=content)
        try:
            response = client.send(request)
        except httpx.HTTPError as exc:
            why = (
                "the client refused to send it (a generator bug)"
                if isinstance(exc, httpx.LocalProtocolError)
                else f"no response ({type(exc).__name__})"
            )
            self._offend(Offender(case, why, None, str(exc)))
            client.close()
            self._local.client = None
            return
        status = response.status_code
        with self._lock:
            self.by_status[status] += 1
        text = response.text
        if status >= 500:
            self._offend(Offender(case, "server error", status, text))
            return
        if 400 <= status < 500 and case.method.upper() != "HEAD" and not _has_detail(response):
            self._offend(Offender(case, "4xx without a JSON body with a non-empty `detail`", status, text))
        if case.expect is not None and status not in case.expect:
            self._offend(Offender(case, f"status outside the contract's {sorted(case.expect)}", status, text))


def _has_detail(response: httpx.Response) -> bool:
    try:
        body = response.json()
    except ValueError:
        return False
    return isinstance(body, dict) and isinstance(body.get("detail"), str) and bool(body["detail"].strip())


# --------------------------------------------------------------------------- NATS

CHAT_PH = "@CHAT@"
OTHER_PH = "@OTHER@"
CMD_PH = "@CMD@"
UNCHECKED = "<unchecked>"
MALFORMED_REASONS = frozenset(
    {"unknown_command", "invalid_subject", "invalid_json", "invalid_payload", "subject_mismatch"}
)


@dataclass(frozen=True)
class BadCommand:
    """A malformed command with placeholders: `@CHAT@` (its chat, spelled by `spelling` in the
    subject), `@OTHER@` (another chat), `@CMD@` (its command id)."""

    kind: str
    chat_token: str | None  # None: the subject ends after the kind; else a token (may hold placeholders)
    spelling: str  # of @CHAT@ in the subject
    payload: bytes
    category: str
    reasons: frozenset[str]
    causation: str | None  # CMD_PH, None, or UNCHECKED
    traceparent: bytes | None = None

    @property
    def names_chat(self) -> bool:
        return self.chat_token == CHAT_PH


@dataclass(frozen=True)
class Published:
    command: BadCommand
    subject: str
    payload: bytes
    chat: str | None  # canonical chat its rejection lands on; None: sandbox.events.invalid
    other: str
    command_id: str
    causation: str | None  # expected causation_id, or UNCHECKED

    @property
    def rejected_on(self) -> str:
        return INVALID_EVENTS_SUBJECT if self.chat is None else f"sandbox.events.{self.chat}"

    def describe(self) -> str:
        return f"[{self.command.category}] {self.subject} payload={_short(repr(self.payload), 300)}"


def materialize(bad: BadCommand, chat: str | None = None) -> Published:
    """Fresh ids for the placeholders (`chat`: a given chat instead of a fresh one)."""
    chat, other, cmd = chat or str(uuid.uuid4()), str(uuid.uuid4()), str(uuid.uuid4())

    def fill(text: str) -> str:
        return text.replace(CHAT_PH, chat).replace(OTHER_PH, other).replace(CMD_PH, cmd)

    if bad.chat_token is None:
        subject = f"sandbox.cmd.{bad.kind}"
    elif bad.names_chat:
        subject = f"sandbox.cmd.{bad.kind}.{spell(chat, bad.spelling)}"
    else:
        subject = f"sandbox.cmd.{bad.kind}.{fill(bad.chat_token)}"
    payload = bad.payload.replace(CHAT_PH.encode(), chat.encode())
    payload = payload.replace(OTHER_PH.encode(), other.encode()).replace(CMD_PH.encode(), cmd.encode())
    causation = cmd if bad.causation == CMD_PH else bad.causation
    return Published(bad, subject, payload, chat if bad.names_chat else None, other, cmd, causation)


@st.composite
def valid_command(draw: st.DrawFn, kind: str) -> dict[str, Any]:
    """A well-formed payload of `kind` for @CHAT@ (ids as placeholders)."""
    body: dict[str, Any] = {"command_id": CMD_PH, "chat_id": CHAT_PH}
    if draw(st.booleans()):
        body["requested_at"] = "2024-05-01T12:00:00Z"
    if draw(st.booleans()):
        body["requested_by"] = draw(st.text(max_size=20))
    if kind == "create":
        if draw(st.booleans()):
            body["ttl_seconds"] = draw(st.integers(min_value=1, max_value=SCHEMA_MAX_TTL))
        if draw(st.booleans()):
            body["labels"] = {"team": "qa"}
    if kind in ("stop", "keepalive") and draw(st.booleans()):
        body["session_id"] = str(uuid.uuid4())
    if kind == "stop" and draw(st.booleans()):
        body["reason"] = draw(st.from_regex(r"[a-z_]{1,20}", fullmatch=True))
    if kind == "keepalive" and draw(st.booleans()):
        body["ttl_seconds"] = draw(st.integers(min_value=1, max_value=SCHEMA_MAX_TTL))
    return body


def _command_wrongs(kind: str) -> dict[str, Callable[[], st.SearchStrategy[object]]]:
    wrongs: dict[str, Callable[[], st.SearchStrategy[object]]] = {
        "chat_id": required_id,
        "requested_at": lambda: st.sampled_from([123, "yesterday", "2024-13-45T00:00:00Z", [], {}, True]),
        "requested_by": lambda: st.one_of(st.sampled_from([123, [], {}, True]), st.just("x" * 129)),
    }
    if kind == "create":
        wrongs |= {"ttl_seconds": wrong_ttl, "labels": bad_labels}
    if kind in ("stop", "keepalive"):
        wrongs["session_id"] = wrong_id
    if kind == "stop":
        wrongs["reason"] = lambda: st.one_of(st.sampled_from(["", "has space", "x" * 65, 5, None, [], "é"]))
    if kind == "keepalive":
        wrongs["ttl_seconds"] = wrong_ttl
    return wrongs


@st.composite
def bad_command(draw: st.DrawFn) -> BadCommand:
    category = draw(
        st.sampled_from(
            ["payload", "payload", "payload", "missing_ids", "mismatch", "unknown_kind", "bad_subject", "command_id"]
        )
    )
    kind = draw(st.sampled_from(["create", "stop", "keepalive"]))
    spelling = draw(st.sampled_from(["canonical"] * 5 + list(PATH_SPELLINGS)))
    valid = draw(valid_command(kind))
    traceparent = draw(
        st.one_of(st.none(), st.sampled_from([b"garbage", b"00-" + b"f" * 32 + b"-" + b"f" * 16 + b"-01"]))
    )
    if category == "payload":
        payload = draw(mutated_object(valid, FIELDS[kind], _command_wrongs(kind)))
        return BadCommand(
            kind, CHAT_PH, spelling, payload, "payload", S({"invalid_json", "invalid_payload"}), UNCHECKED, traceparent
        )
    if category == "command_id":
        valid["command_id"] = draw(required_id())
        payload = dumps(valid, ascii_only=True)
        return BadCommand(kind, CHAT_PH, spelling, payload, "bad_command_id", S({"invalid_payload"}), None, traceparent)
    if category == "missing_ids":
        drop = draw(st.sampled_from([("command_id",), ("chat_id",), ("command_id", "chat_id")]))
        for name in drop:
            del valid[name]
        causation = None if "command_id" in drop else CMD_PH
        return BadCommand(
            kind,
            CHAT_PH,
            spelling,
            dumps(valid, ascii_only=True),
            "missing_ids",
            S({"invalid_payload"}),
            causation,
            traceparent,
        )
    if category == "mismatch":
        valid["chat_id"] = OTHER_PH
        return BadCommand(
            kind,
            CHAT_PH,
            spelling,
            dumps(valid, ascii_only=True),
            "mismatch",
            S({"subject_mismatch"}),
            CMD_PH,
            traceparent,
        )
    if category == "unknown_kind":
        unknown = draw(
            st.one_of(
                st.sampled_from(
                    ["frobnicate", "delete", "start", "kill", "exec", "créer", "x", "cmd", "events", "_create", "stop2"]
                ),
                st.from_regex(r"[a-z][a-z0-9_\-]{0,15}", fullmatch=True),
                st.integers(min_value=64, max_value=1_000).map(lambda n: "k" * n),
            ).filter(lambda k: k.lower() not in KNOWN_KINDS)
        )
        junk = draw(st.booleans())
        payload = draw(raw_junk(dumps(valid, ascii_only=True))) if junk else dumps(valid, ascii_only=True)
        return BadCommand(
            unknown,
            CHAT_PH,
            spelling,
            payload,
            "unknown_kind",
            S({"unknown_command"}),
            UNCHECKED if junk else CMD_PH,
            traceparent,
        )
    # bad_subject: the subject names no chat: its rejection goes to sandbox.events.invalid
    unknown_kind = draw(st.booleans())
    if unknown_kind:
        kind = draw(st.sampled_from(["frobnicate", "zap", "créer"]))
    token = draw(
        st.one_of(
            st.none(),
            garbage_token(SUBJECT_SAFE),
            st.just(CHAT_PH + ".extra"),
            st.just(CHAT_PH + "." + OTHER_PH),
            st.just("x." + CHAT_PH),
            st.integers(min_value=64, max_value=2_000).map(lambda n: "z" * n),
        )
    )
    reasons = S({"unknown_command", "invalid_subject"}) if unknown_kind else S({"invalid_subject"})
    junk = draw(st.booleans())
    payload = draw(raw_junk(dumps(valid, ascii_only=True))) if junk else dumps(valid, ascii_only=True)
    return BadCommand(
        kind, token, spelling, payload, "bad_subject", reasons, UNCHECKED if junk else CMD_PH, traceparent
    )


def deadline_loop(timeout: float) -> Callable[[], bool]:
    """`while more(): ...` until `timeout` seconds have passed."""
    end = time.monotonic() + timeout
    return lambda: time.monotonic() < end


def check_rejection(p: Published, event: dict[str, Any]) -> str | None:
    """What is wrong with the rejection a malformed command got, if anything."""
    problems = []
    if event.get("type") != "rejected":
        problems.append(f"type {event.get('type')!r}")
    reason = event.get("reason")
    if not reason or reason not in p.command.reasons:
        problems.append(f"reason {reason!r} (expected one of {sorted(p.command.reasons)})")
    if p.causation != UNCHECKED and event.get("causation_id") != p.causation:
        problems.append(f"causation_id {event.get('causation_id')!r} (expected {p.causation!r})")
    if p.chat is not None and (event.get("chat_id") != p.chat or event.get("session") is not None):
        problems.append(f"chat_id {event.get('chat_id')!r} / session {event.get('session')!r}")
    return f"{p.describe()}: {', '.join(problems)}" if problems else None


def rejection_problems(
    published: Sequence[Published], events: Sequence[tuple[str, dict[str, Any]]], stored: dict[str, int]
) -> list[str]:
    """Each malformed command has exactly one rejection on the subject it names (its chat, or
    sandbox.events.invalid), stored and seen; nothing else has events. `stored`: messages per
    subject in SANDBOX_EVENTS."""
    expected: dict[str, list[Published]] = {}
    for p in published:
        expected.setdefault(p.rejected_on, []).append(p)
    seen: dict[str, list[dict[str, Any]]] = {}
    for subject, event in events:
        seen.setdefault(subject, []).append(event)
    problems: list[str] = []
    for subject, commands in expected.items():
        problems += _subject_problems(subject, commands, seen.get(subject, []), stored.get(subject, 0))
    stray = {s: n for s, n in stored.items() if s not in expected}
    if stray:
        problems.append(f"events on subjects no malformed command named: {stray}")
    return problems


def _subject_problems(subject: str, commands: list[Published], events: list[dict[str, Any]], stored: int) -> list[str]:
    if stored != len(commands) or len(events) != len(commands):
        listed = "; ".join(p.describe() for p in commands[:5])
        return [f"{subject}: {stored} stored and {len(events)} seen event(s) for {len(commands)} command(s): {listed}"]
    if len(commands) == 1:
        problem = check_rejection(commands[0], events[0])
        return [problem] if problem else []
    by_cause: dict[str, list[dict[str, Any]]] = {}
    for event in events:
        by_cause.setdefault(str(event.get("causation_id")), []).append(event)
    problems: list[str] = []
    reasons = frozenset().union(*(p.command.reasons for p in commands))
    problems += [f"{subject}: {e}" for e in events if e.get("type") != "rejected" or e.get("reason") not in reasons]
    for p in commands:
        if p.causation in (UNCHECKED, None):
            continue
        got = by_cause.get(str(p.causation), [])
        if len(got) != 1:
            problems.append(f"{p.describe()}: {len(got)} rejection(s) with its causation_id on {subject}")
        elif problem := check_rejection(p, got[0]):
            problems.append(problem)
    return problems
