"""The JSON HTTP API (thin handlers: rooms and the store do the work).

Errors are ``{"error": {"code", "message"}}`` with the status of ``schema.codes.HTTP_STATUS``.
Non-members get ``404 not_found`` for a document (its existence is not revealed); members
whose role does not allow the request get ``403 forbidden``.

The hot read, ``GET /v1/documents/{id}``, serves bytes rendered once per committed snapshot
of the room (``Bodies``), with a strong ``ETag`` (a hash of those bytes) and ``304`` for a
matching ``If-None-Match``. A room replaces its snapshot before it acks a write, so a read
after an acknowledged write renders again and shows it. The caller's token and role are
still checked on every request; only verified tokens are remembered (``TokenCache``).
"""

from __future__ import annotations

import asyncio
import logging
import weakref
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any
from uuid import UUID

import orjson
from aiohttp import web
from aiohttp.http_exceptions import HttpProcessingError
from aiohttp.web_protocol import RequestPayloadError
from multidict import CIMultiDict

from domain.document import Document
from domain.errors import DomainError
from gateway import keys
from gateway.auth import BadToken, TokenCache
from gateway.room import Rejected, Room, Snapshot, Submission, iso_time
from gateway.rooms import Rooms
from gateway.store import UNAVAILABLE_MESSAGE, StoreUnavailable
from projections.cache import Bounded, etag_of
from schema.codes import HTTP_STATUS, Code
from schema.messages import MAX_CLIENT_ID_CHARS, MAX_SEQ, doc_id, valid_client, valid_seq

log = logging.getLogger(__name__)

MAX_BODY_BYTES = 16 << 20
"""Largest request body accepted (413 ``too_large`` above it)."""
MAX_OPS_PAGE = 1000
"""Most ops one ``GET .../ops`` returns."""

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


class ApiError(Exception):
    """An error response with a stable code (and its headers, if it needs any)."""

    def __init__(self, code: Code, message: str, headers: dict[str, str] | None = None) -> None:
        super().__init__(message)
        self.code = code
        self.message = message
        self.headers = headers


CHALLENGE = 'Bearer realm="coscribe"'
"""``WWW-Authenticate`` of a 401 without a token (RFC 6750 section 3: a 401 names the scheme)."""
INVALID_TOKEN = f'{CHALLENGE}, error="invalid_token"'
"""``WWW-Authenticate`` of a 401 for a token that is malformed, forged or expired."""


def json_response(data: Any, status: int = 200) -> web.Response:
    """A JSON response encoded with orjson."""
    return web.Response(body=orjson.dumps(data), status=status, content_type="application/json")


def error_response(
    code: Code, message: str, headers: dict[str, str] | None = None
) -> web.Response:
    """The error envelope with the status that goes with ``code``."""
    resp = json_response({"error": {"code": code.value, "message": message}}, HTTP_STATUS[code])
    if headers:
        resp.headers.update(headers)
    return resp


PUBLIC_PATHS = frozenset({"/healthz", "/readyz", "/v1/ws", "/metrics"})
"""Paths served without a token (the WebSocket authenticates in its first frame)."""


@dataclass(slots=True)
class Gate:
    """What ``errors_middleware`` checks a request against: one per app (``GATE``)."""

    public: set[str] = field(default_factory=lambda: set(PUBLIC_PATHS))
    """Paths served without a token; extensions may add theirs before the app starts."""
    tokens: TokenCache | None = None
    """Made on the first request, from the app's secret (set by then, not before routes)."""


GATE = web.AppKey("gate", Gate)
"""The app's ``Gate`` (set by ``add_routes``)."""


class MalformedRequests(logging.Filter):
    """aiohttp logs a request its parser refuses (a control character in a header, a line
    over 8190 bytes, broken chunking) at ERROR with a traceback, before any handler: any
    client could fill the log. Such a record becomes one INFO line naming the error."""

    def filter(self, record: logging.LogRecord) -> bool:
        exc = record.exc_info[1] if record.exc_info else None
        if not isinstance(exc, HttpProcessingError | RequestPayloadError):
            return True  # (the latter: a body that did not decode, drained after our 400)
        if not logging.getLogger(record.name).isEnabledFor(logging.INFO):
            return False
        code = getattr(exc, "code", 400)
        record.msg = f"{record.getMessage()}: refused ({code}): {type(exc).__name__}"
        record.args = ()
        record.exc_info = record.exc_text = None
        record.levelno, record.levelname = logging.INFO, "INFO"
        return True


def install_log_filters() -> None:
    """Add :class:`MalformedRequests` to aiohttp's server logger (once per process)."""
    server = logging.getLogger("aiohttp.server")
    if not any(isinstance(f, MalformedRequests) for f in server.filters):
        server.addFilter(MalformedRequests())


@web.middleware
async def errors_middleware(request: web.Request, handler: Handler) -> web.StreamResponse:
    """Turn every failure into the error envelope; nothing else leaks out."""
    try:
        gate = request.app[GATE]
        # No route (404) or no such method (400) is said without a token: it reveals nothing.
        routed = request.match_info.http_exception is None
        if routed and request.path not in gate.public:
            request[keys.USER] = _authenticate(gate, request)
        return await handler(request)
    except ApiError as exc:
        return error_response(exc.code, exc.message, exc.headers)
    except (DomainError, Rejected) as exc:
        return error_response(Code(exc.code), exc.message)
    except StoreUnavailable as exc:
        log.warning("%s %s: event store unavailable: %s", request.method, request.path, exc)
        return error_response(Code.UNAVAILABLE, UNAVAILABLE_MESSAGE)
    except web.HTTPRequestEntityTooLarge:
        return error_response(Code.TOO_LARGE, f"request body over {MAX_BODY_BYTES} bytes")
    except web.HTTPNotFound:
        return error_response(Code.NOT_FOUND, f"no route {request.method} {request.path}")
    except web.HTTPMethodNotAllowed:
        return error_response(Code.BAD_REQUEST, f"{request.method} not allowed here")
    except web.HTTPBadRequest as exc:  # aiohttp's own, e.g. /v1/ws without an upgrade
        return error_response(Code.BAD_REQUEST, exc.text or exc.reason)
    except (RequestPayloadError, HttpProcessingError):
        # A body its Content-Encoding or chunked framing cannot decode (it was a 500). Where
        # it ends is unknown, so the connection cannot carry another request: say so.
        resp = error_response(Code.BAD_REQUEST, "the request body cannot be decoded "
                              "(Content-Encoding or chunked framing)")
        resp.force_close()
        return resp
    except web.HTTPException:
        raise
    except Exception:
        log.exception("unhandled error in %s %s", request.method, request.path)
        return error_response(Code.INTERNAL, "internal error")


def _authenticate(gate: Gate, request: web.Request) -> str:
    header = request.headers.get("Authorization", "")
    scheme, _, token = header.partition(" ")
    if scheme.lower() != "bearer" or not token:
        raise ApiError(Code.UNAUTHORIZED, "send Authorization: Bearer <token>",
                       {"WWW-Authenticate": CHALLENGE})
    tokens = gate.tokens
    if tokens is None:
        tokens = gate.tokens = TokenCache(request.app[keys.SECRET])
    try:
        return tokens.verify(token.strip())
    except BadToken as exc:
        raise ApiError(Code.UNAUTHORIZED, str(exc),
                       {"WWW-Authenticate": INVALID_TOKEN}) from None


async def _body(request: web.Request) -> dict[str, Any]:
    raw = await request.read()
    try:
        body = orjson.loads(raw) if raw else {}
    except orjson.JSONDecodeError as exc:
        raise ApiError(Code.BAD_REQUEST, f"body is not JSON: {exc}") from None
    if not isinstance(body, dict):
        raise ApiError(Code.BAD_REQUEST, "body must be a JSON object")
    return body


def _doc_id(request: web.Request) -> UUID:
    try:
        return doc_id(request.match_info["id"])
    except ValueError:
        raise ApiError(Code.NOT_FOUND, "no such document") from None


def parse_int(raw: str) -> int:
    """A query parameter as an integer: ASCII digits, an optional leading ``-``; else
    ValueError (``int`` alone would also take ``1_0``, ``+1``, spaces and other scripts'
    digits)."""
    digits = raw[1:] if raw.startswith("-") else raw
    if not (digits.isascii() and digits.isdigit()) or len(digits) > 19:
        raise ValueError(raw)
    return int(raw)


def _int_query(request: web.Request, name: str, default: int, lo: int, hi: int) -> int:
    raw = request.query.get(name)
    if raw is None:
        return default
    try:
        value = parse_int(raw)
    except ValueError:
        raise ApiError(Code.BAD_REQUEST, f"{name} must be an integer") from None
    if not lo <= value <= hi:
        raise ApiError(Code.BAD_REQUEST, f"{name} must be in {lo}..{hi}")
    return value


async def readable_room(request: web.Request, v: int | None = None) -> Room:
    """The room of the document in the path, if the caller may read it (else 404); with
    ``v``, a version the caller asks for (``Rooms.readable``)."""
    rooms: Rooms = request.app[keys.ROOMS]
    room = await rooms.readable(_doc_id(request), request[keys.USER], v)
    if room is None:
        raise ApiError(Code.NOT_FOUND, "no such document")
    return room


def not_modified(request: web.Request, etag: str) -> bool:
    """Whether the request's ``If-None-Match`` names ``etag`` (weak comparison, or ``*``)."""
    header = request.headers.get("If-None-Match")
    if header is None:
        return False
    if header.strip() == "*":
        return True
    return any(t.strip().removeprefix("W/") == etag for t in header.split(","))


def cached_response(
    request: web.Request, body: bytes, headers: CIMultiDict[str], status: int = 200
) -> web.Response:
    """``body`` with ``headers`` (``Content-Type`` and ``ETag`` among them), or ``304`` with
    the headers but no body when the client already holds that ETag."""
    if not_modified(request, headers["ETag"]):
        return web.Response(status=304, headers={"ETag": headers["ETag"]})
    return web.Response(body=body, status=status, headers=headers)


@dataclass(frozen=True, slots=True)
class Rendered:
    """A document's ``GET`` response as bytes, for one committed snapshot of one room.

    The room is held weakly: a swept room is freed even while its rendering is kept."""

    room: weakref.ref[Room]
    snapshot: Snapshot
    body: bytes
    headers: CIMultiDict[str]

    def current(self, rooms: Rooms) -> Room | None:
        """The room, if this is still what a fresh render would give: the room is the one
        open here and its committed snapshot has not moved on."""
        room = self.room()
        if room is None or room.snapshot is not self.snapshot or rooms.peek(room.id) is not room:
            return None
        return room


class Bodies:
    """Rendered document bodies by the id as written in the path; one app's, on its loop.

    An entry is used only while ``Rendered.current`` holds, so nothing is ever invalidated
    explicitly: a commit, a remote event or a re-read replaces the room's snapshot, a swept
    room is no longer the open one, and either makes the next read render again. At most
    ``size`` entries and about ``max_bytes`` of bodies (``projections.cache.Bounded``).
    """

    def __init__(self, size: int = 4096, max_bytes: int = 128 << 20) -> None:
        self._kept: Bounded[Rendered] = Bounded(size, max_bytes)

    def get(self, key: str, rooms: Rooms) -> tuple[Room, Rendered] | None:
        """The room and its current rendering stored under ``key``, if any."""
        hit = self._kept.get(key)
        if hit is None:
            return None
        room = hit.current(rooms)
        return None if room is None else (room, hit)

    def render(self, key: str, room: Room) -> Rendered:
        """Render ``room``'s committed snapshot and keep it under ``key``."""
        snapshot = room.snapshot
        body = orjson.dumps(snapshot.as_json())
        headers = CIMultiDict({"Content-Type": "application/json", "ETag": etag_of(body)})
        out = Rendered(weakref.ref(room), snapshot, body, headers)
        # The old snapshot's text stays alive with the entry: count it as well as the body.
        self._kept.put(key, out, 2 * len(body))
        return out


BODIES = web.AppKey("bodies", Bodies)
"""The app's ``Bodies`` (set by ``add_routes``)."""


async def _run(room: Room, user: str, command: Callable[[Document], Any]) -> Any:
    fut: asyncio.Future[Any] = asyncio.get_running_loop().create_future()
    room.submit(Submission(kind="command", by=user, future=fut, command=command))
    return await fut


# -- handlers ------------------------------------------------------------------------


async def healthz(request: web.Request) -> web.Response:
    """``GET /healthz``: the process is up."""
    return json_response({"status": "ok"})


async def readyz(request: web.Request) -> web.Response:
    """``GET /readyz``: 200 when the store answers; reports the hub (Redis) too."""
    rooms: Rooms = request.app[keys.ROOMS]
    store = rooms.store
    loop = asyncio.get_running_loop()
    try:
        await asyncio.wait_for(loop.run_in_executor(store.reader, store.ping), 5)
        store_ok = True
    except Exception:
        store_ok = False
    hub_ok = rooms.hub.healthy
    body = {
        "status": "ok" if store_ok and hub_ok else ("degraded" if store_ok else "unavailable"),
        "store": store_ok,
        "hub": hub_ok,
        "rooms": len(rooms),
        "sessions": len(request.app[keys.SESSIONS]),
    }
    return json_response(body, status=200 if store_ok else 503)


async def metrics(request: web.Request) -> web.Response:
    """``GET /metrics``: Prometheus text format counters of this process."""
    rooms: Rooms = request.app[keys.ROOMS]
    st = rooms.committer.stats
    hub = rooms.hub
    lines = [
        "# TYPE coscribe_commits_total counter",
        f"coscribe_commits_total {st.commits}",
        "# TYPE coscribe_committed_events_total counter",
        f"coscribe_committed_events_total {st.events}",
        "# TYPE coscribe_commit_conflicts_total counter",
        f"coscribe_commit_conflicts_total {st.conflicts}",
        "# TYPE coscribe_commit_locked_total counter",
        f"coscribe_commit_locked_total {st.locked}",
        "# TYPE coscribe_commit_locked_idle_total counter",
        f"coscribe_commit_locked_idle_total {st.locked_idle}",
        "# TYPE coscribe_commit_caught_up_events_total counter",
        f"coscribe_commit_caught_up_events_total {st.caught_up}",
        "# TYPE coscribe_commit_failures_total counter",
        f"coscribe_commit_failures_total {st.failures}",
        "# TYPE coscribe_commit_seconds_total counter",
        f"coscribe_commit_seconds_total {st.commit_seconds:.6f}",
        "# TYPE coscribe_store_encode_seconds_total counter",
        f"coscribe_store_encode_seconds_total {rooms.store.encode_seconds:.6f}",
        "# TYPE coscribe_store_insert_seconds_total counter",
        f"coscribe_store_insert_seconds_total {rooms.store.insert_seconds:.6f}",
        "# TYPE coscribe_commit_max_batch gauge",
        f"coscribe_commit_max_batch {st.max_batch}",
        "# TYPE coscribe_rooms gauge",
        f"coscribe_rooms {len(rooms)}",
        "# TYPE coscribe_sessions gauge",
        f"coscribe_sessions {len(request.app[keys.SESSIONS])}",
        "# TYPE coscribe_hub_healthy gauge",
        f"coscribe_hub_healthy {int(hub.healthy)}",
        "# TYPE coscribe_hub_published_total counter",
        f"coscribe_hub_published_total {hub.published}",
        "# TYPE coscribe_hub_publish_failures_total counter",
        f"coscribe_hub_publish_failures_total {hub.publish_failures}",
    ]
    return web.Response(text="\n".join(lines) + "\n", content_type="text/plain")


async def create_document(request: web.Request) -> web.Response:
    """``POST /v1/documents {"title", "text"?}`` -> 201 with the document at version 0."""
    body = await _body(request)
    title, text = body.get("title"), body.get("text", "")
    if not isinstance(title, str):
        raise ApiError(Code.BAD_REQUEST, "'title' must be a string")
    if not isinstance(text, str):
        raise ApiError(Code.BAD_REQUEST, "'text' must be a string")
    user = request[keys.USER]
    doc = Document.create(title=title, text=text, owner=user)
    rooms: Rooms = request.app[keys.ROOMS]
    await rooms.create(doc, user)
    room = rooms.peek(doc.id)
    assert room is not None
    return json_response(room.snapshot.as_json(), status=201)


async def get_document(request: web.Request) -> web.Response:
    """``GET /v1/documents/{id}``: the committed text and version (``?at=`` time travel).

    With an ``ETag``; ``304`` when ``If-None-Match`` names it. The role is checked on the
    room's document each time, cached body or not.
    """
    if request.query_string and "at" in request.query:
        from gateway.readmodels import time_travel  # the read side lives above this module

        return await time_travel(request)
    key = request.match_info["id"]
    rooms: Rooms = request.app[keys.ROOMS]
    bodies = request.app[BODIES]
    found = bodies.get(key, rooms)
    if found is not None and found[0].doc.can_read(request[keys.USER]):
        hit = found[1]
    else:  # not rendered, or the copy here says no (it may lag): the full check
        hit = bodies.render(key, await readable_room(request))
    return cached_response(request, hit.body, hit.headers)


async def post_op(request: web.Request) -> web.Response:
    """``POST /v1/documents/{id}/ops {"v", "op", "client"?, "seq"?}`` -> ``{"v"}``."""
    room = await readable_room(request)
    body = await _body(request)
    v, op = body.get("v"), body.get("op")
    client, seq = body.get("client"), body.get("seq")
    if not isinstance(v, int) or isinstance(v, bool):
        raise ApiError(Code.BAD_REQUEST, "'v' must be an integer")
    if (client is None) != (seq is None) or (
        client is not None and not (valid_client(client) and valid_seq(seq))
    ):
        raise ApiError(
            Code.BAD_REQUEST,
            f"'client' (1..{MAX_CLIENT_ID_CHARS} characters, none U+0000) and 'seq' (an integer in"
            f" 0..{MAX_SEQ}) go together",
        )
    user = request[keys.USER]
    if client is not None:
        await request.app[keys.CLIENTS].claim(client, user)  # another user's: 403
    fut: asyncio.Future[Any] = asyncio.get_running_loop().create_future()
    await request.app[keys.ROOMS].submit(
        room,
        Submission(
            kind="edit", by=user, future=fut, base=v, op=op, client=client, seq=seq
        ),
    )
    return json_response({"v": await fut})


async def list_ops(request: web.Request) -> web.Response:
    """``GET /v1/documents/{id}/ops?from=K&limit=L``: ops with v > K, from the store."""
    room = await readable_room(request)
    start = _int_query(request, "from", 0, 0, 1 << 62)
    limit = _int_query(request, "limit", 100, 1, MAX_OPS_PAGE)
    store = request.app[keys.ROOMS].store
    loop = asyncio.get_running_loop()
    edits = await loop.run_in_executor(store.reader, store.edits_after, room.id, start, limit)
    ops = []
    for e in edits:
        at = iso_time(e.timestamp.timestamp())
        item: dict[str, Any] = {"v": e.v, "op": e.op, "by": e.by, "at": at}
        if e.client is not None:
            item["client"] = e.client
            item["seq"] = e.seq
        ops.append(item)
    return json_response({"ops": ops})


async def add_member(request: web.Request) -> web.Response:
    """``POST /v1/documents/{id}/members {"user", "role"}`` (owner only)."""
    room = await readable_room(request)
    body = await _body(request)
    user, role = body.get("user"), body.get("role")
    if not isinstance(user, str) or not isinstance(role, str):
        raise ApiError(Code.BAD_REQUEST, "'user' and 'role' must be strings")
    by = request[keys.USER]
    await _run(room, by, lambda d: d.add_member(user, role, by))
    return json_response({"user": user, "role": role}, status=201)


async def remove_member(request: web.Request) -> web.Response:
    """``DELETE /v1/documents/{id}/members/{user}`` (owner only)."""
    room = await readable_room(request)
    user = request.match_info["user"]
    by = request[keys.USER]
    await _run(room, by, lambda d: d.remove_member(user, by))
    return web.Response(status=204)


async def list_members(request: web.Request) -> web.Response:
    """``GET /v1/documents/{id}/members``: every member with a role."""
    room = await readable_room(request)
    items = [{"user": u, "role": r} for u, r in sorted(room.doc.members.items())]
    return json_response({"members": items})


async def rename_document(request: web.Request) -> web.Response:
    """``PATCH /v1/documents/{id} {"title"}`` (owner and editors)."""
    room = await readable_room(request)
    body = await _body(request)
    title = body.get("title")
    if not isinstance(title, str):
        raise ApiError(Code.BAD_REQUEST, "'title' must be a string")
    by = request[keys.USER]
    await _run(room, by, lambda d: d.rename(title, by))
    return json_response(room.snapshot.as_json())


DOC_ROUTE = "/v1/documents/{id:[^/]+}"
"""The path of a document. Each documented spelling of its UUID names it, ``{…}`` too: aiohttp's
default pattern for ``{id}`` refuses braces, and the route would be missing for it."""


def add_routes(app: web.Application) -> None:
    """Register the routes of this module, and the ``GATE`` and ``BODIES`` they use."""
    app[GATE] = Gate()
    app[BODIES] = Bodies()
    app.router.add_get("/healthz", healthz)
    app.router.add_get("/readyz", readyz)
    app.router.add_get("/metrics", metrics)
    app.router.add_post("/v1/documents", create_document)
    app.router.add_get(DOC_ROUTE, get_document)
    app.router.add_patch(DOC_ROUTE, rename_document)
    app.router.add_post(DOC_ROUTE + "/ops", post_op)
    app.router.add_get(DOC_ROUTE + "/ops", list_ops)
    app.router.add_get(DOC_ROUTE + "/members", list_members)
    app.router.add_post(DOC_ROUTE + "/members", add_member)
    app.router.add_delete(DOC_ROUTE + "/members/{user:[^/]+}", remove_member)
