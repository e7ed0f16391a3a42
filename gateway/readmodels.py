"""The read side over HTTP: document lists, history, time travel, analytics, context items.

``extension`` (see ``gateway.app.Services.extensions``) mounts the routes and, unless told not
to, runs the projections in this process (``projections.follower``). Routes are listed in
``schema/read_models.md``. Handlers are thin: SQL lives in ``projections.queries``, history
arithmetic in ``projections.history``; both run on reader threads, never on the loop.

Read-your-writes: a handler that reads a read model first waits (up to ``FRESH_SECONDS``)
until the projections have taken in every event committed before the request arrived, so a
client sees its own writes. If they are further behind, the answer is served anyway with
header ``X-Projection-Lag`` (events not yet in it). "Committed before the request arrived"
is the log's head as read by a query that started after the request arrived; concurrent
requests share that query (``projections.cache.HeadProbe``).

Document list pages are kept rendered (``projections.cache.PageCache``) and served again,
with their ``ETag`` or as ``304``, while the log's head has not moved since they were read.

Access: list and analytics queries join ``rm_members`` on the caller; routes about one
document check the caller's role on the document itself (its room), like ``gateway.http``.
Non-members get 404.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import hashlib
import logging
import threading
import time
from collections.abc import AsyncIterator, Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any
from uuid import UUID

import orjson
from aiohttp import web
from eventsourcing.persistence import InterfaceError, OperationalError
from multidict import CIMultiDict

from domain.document import CONTEXT_FIELDS, Document, check_no_nul
from domain.errors import BadVersion, DomainError, Invalid, NotFound, TooLarge
from gateway import keys
from gateway.http import DOC_ROUTE, GATE, cached_response, parse_int, readable_room
from gateway.room import Rejected, Room, Submission
from gateway.rooms import Rooms
from gateway.store import Store, StoreConfig, StoreUnavailable
from projections import history, queries, replay
from projections.cache import HeadProbe, PageCache, ReadCache
from projections.db import ReadDB, ReadDBConfig, ReadDBError, open_db
from projections.follower import Follower
from projections.registry import MODELS
from projections.runner import Runner
from projections.sql import iso
from schema.codes import Code
from schema.messages import doc_id

log = logging.getLogger(__name__)

FRESH_SECONDS = 2.0
"""Longest a read waits for the projections to catch up with the request's writes."""
MAX_PAGE = 500
"""Most rows one page of a list returns."""
MAX_BULK = 1000
"""Most documents one ``POST /v1/documents:bulk`` creates."""
MAX_BATCH_GET = 100
"""Most ids one ``POST /v1/documents:batch-get`` reads."""
MAX_BUCKETS = 24 * 93
"""Most buckets one analytics series returns."""
STATIC = Path(__file__).parent / "static"


# -- wiring -------------------------------------------------------------------------------


class StoreSource:
    """The event store's notification log, decoded (``Store.notifications``)."""

    def __init__(self, store: Store) -> None:
        self.store = store
        self.recorder = store.app.recorder

    def read(self, after: int, limit: int) -> list[tuple[int, Any]]:
        """Up to ``limit`` events with notification id > ``after``, in order."""
        return self.store.notifications(after, limit)

    def head(self) -> int:
        """The highest notification id (0 for an empty store)."""
        try:
            return int(self.recorder.max_notification_id() or 0)
        except (OperationalError, InterfaceError) as exc:
            raise StoreUnavailable(str(exc)) from exc


def read_db_config(cfg: StoreConfig) -> ReadDBConfig:
    """Read models next to the events: the same Postgres schema, or ``readmodels.sqlite``."""
    if cfg.database_url:
        return ReadDBConfig(database_url=cfg.database_url, schema=cfg.database_schema or "public")
    return ReadDBConfig(sqlite_path=cfg.data_dir / "readmodels.sqlite")


class ReadModels:
    """The read side of one process: the read-model database, the runner, the caches."""

    def __init__(self, store: Store, db: ReadDB, cache: ReadCache, run: bool = True) -> None:
        self.store = store
        self.db = db
        self.cache = cache
        self.source = StoreSource(store)
        self.runner = Runner(db, self.source, MODELS)
        self.follower = Follower(self.runner, invalidate=cache.invalidate,
                                 confirm=cache.confirm)
        self.run = run
        self.reader = ThreadPoolExecutor(max_workers=4, thread_name_prefix="readmodels")
        self.heads = HeadProbe(self.head)
        """The log's head for requests: one store query shared by concurrent readers."""
        self.positions = HeadProbe(self.position)
        """The read models' position, likewise (polled when another process runs them)."""
        self.pages = PageCache()
        self._stop = threading.Event()
        self._listener: threading.Thread | None = None

    async def start(self) -> None:
        """Create the tables and start following the log (when running projections here).

        On Postgres a thread also LISTENs to the store's NOTIFY channel and wakes the runner
        at once; only a hint, the runner polls anyway (a lost NOTIFY must not stall it).
        """
        if not self.run:
            return
        await self.follower.start()
        channel = getattr(self.store.app.recorder, "channel_name", None)
        if self.store.cfg.database_url and channel:
            self._listener = threading.Thread(
                target=self._listen, args=(self.store.cfg.database_url, channel),
                name="projections-listen", daemon=True,
            )
            self._listener.start()

    def _listen(self, url: str, channel: str) -> None:
        import psycopg
        from psycopg import sql

        while not self._stop.is_set():
            try:
                with psycopg.connect(url, autocommit=True, connect_timeout=5) as conn:
                    conn.execute(sql.SQL("LISTEN {}").format(sql.Identifier(channel)))
                    while not self._stop.is_set():
                        for _ in conn.notifies(timeout=0.1, stop_after=1):
                            self.follower.nudge()
            except psycopg.Error:
                log.warning("LISTEN %s failed; polling only for now", channel, exc_info=True)
                self._stop.wait(2.0)

    async def close(self) -> None:
        """Stop the runner, then release connections and threads."""
        self._stop.set()
        if self.run:
            await self.follower.stop()
        if self._listener is not None:
            await asyncio.get_running_loop().run_in_executor(None, self._listener.join, 5)
        await asyncio.get_running_loop().run_in_executor(None, self._close_sync)

    def _close_sync(self) -> None:
        self.reader.shutdown(wait=True, cancel_futures=True)
        self.db.close()

    async def call(self, fn: Callable[..., Any], *args: Any) -> Any:
        """Run a synchronous read on a reader thread.

        A failing read-model database (down, or tables not made yet by a runner elsewhere)
        is answered as ``unavailable`` (503), like a failing event store.
        """
        try:
            return await asyncio.get_running_loop().run_in_executor(self.reader, fn, *args)
        except ReadDBError as exc:
            log.warning("read-model query failed: %s", exc)  # the SQL is for the log only
            if _no_table(exc):
                raise Rejected(
                    Code.UNAVAILABLE,
                    "read models not built yet: no projection runner has run on this database"
                    " (coscribe projections run, or serve with --projections inline)",
                ) from exc
            cause = type(exc.__cause__).__name__ if exc.__cause__ else "error"
            raise Rejected(Code.UNAVAILABLE, f"read models unavailable ({cause})") from exc

    async def head(self) -> int:
        """The store's latest notification id."""
        return int(await self.call(self.source.head))

    async def built(self) -> bool:
        """Whether every read model has its tables (its tracking row), asked quietly: at start
        the runner of another process may not have made them yet, and a poll for them is no
        failure to log."""
        loop = asyncio.get_running_loop()
        try:
            rows = await loop.run_in_executor(self.reader, queries.tracking, self.db)
        except ReadDBError:
            return False
        return {m.name for m in MODELS} <= {r["name"] for r in rows}

    async def position(self) -> int:
        """How far every read model got (this runner's view, or the tracking table's)."""
        if self.run:
            return self.follower.position
        rows = await self.call(queries.tracking, self.db)
        names = {m.name for m in MODELS}
        position = min((int(r["position"]) for r in rows if r["name"] in names), default=0)
        self.cache.reached(position)  # cached entries count only with raises that far
        return position

    async def fresh(self, response_headers: dict[str, str]) -> int:
        """Wait until the read models hold every event committed so far; returns the lag,
        also set as ``X-Projection-Lag`` in ``response_headers`` when not 0."""
        lag = await self.reach(await self.heads.read())
        if lag > 0:
            response_headers["X-Projection-Lag"] = str(lag)
        return lag

    async def reach(self, head: int) -> int:
        """Wait (up to ``FRESH_SECONDS``) until the read models hold every event up to
        ``head``; returns how many they still lack (0: caught up)."""
        if self.run:
            ok = await self.follower.wait_for(head, FRESH_SECONDS)
            lag = 0 if ok else head - self.follower.position
        else:
            # Another process runs the projections: poll its tracking rows.
            for _ in range(int(FRESH_SECONDS / 0.02)):
                lag = head - await self.positions.read()
                if lag <= 0:
                    break
                await asyncio.sleep(0.02)
        return max(lag, 0)


READMODELS = web.AppKey("readmodels", ReadModels)
"""The app's ``ReadModels`` (set while the app runs)."""


@dataclass(frozen=True, slots=True)
class Extension:
    """Mounts the read side on an app; an instance is what ``Services.extensions`` takes.

    ``run_projections=False`` serves the routes from tables another process keeps up to date
    (``coscribe projections run``). ``redis_url`` adds Redis as the cache's second level and
    carries invalidations across processes.
    """

    run_projections: bool = True
    redis_url: str | None = None
    redis_prefix: str = "coscribe:"
    warm: bool = True
    """Compute the busiest users' dashboards and open the busiest documents at start (in
    every process, with projections here or not: see ``warm``)."""

    def __call__(self, app: web.Application) -> None:
        """Add the routes, the dashboard and the runner's lifecycle to ``app``."""
        add_routes(app)
        app.router.add_get("/dashboard", dashboard)
        app.router.add_get("/dashboard/", dashboard)
        app[GATE].public.update(("/dashboard", "/dashboard/"))
        app.cleanup_ctx.append(self._lifecycle)

    async def _lifecycle(self, app: web.Application) -> AsyncIterator[None]:
        rooms: Rooms = app[keys.ROOMS]
        store = rooms.store
        loop = asyncio.get_running_loop()
        db = await loop.run_in_executor(None, open_db, read_db_config(store.cfg))
        log_id = await loop.run_in_executor(None, store.log_id)
        # Without a runner here, only Redis generations (raised by `coscribe projections run
        # --redis-url`) can tell this process that an entry went stale: no Redis, no cache.
        cache = ReadCache(redis_url=self.redis_url, prefix=self.redis_prefix,
                          enabled=self.run_projections or bool(self.redis_url), log_id=log_id)
        await cache.start()
        rm = ReadModels(store, db, cache, run=self.run_projections)
        app[READMODELS] = rm
        await rm.start()
        warming = asyncio.create_task(self._warm(rm, rooms), name="readmodels-warm")
        try:
            yield
        finally:
            warming.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await warming
            await rm.close()
            await cache.close()

    async def _warm(self, rm: ReadModels, rooms: Rooms) -> None:
        if not self.warm:
            return
        try:
            await warm(rm, rooms)
        except Exception:  # warming is an optimisation; never take the gateway down
            log.exception("warming the read caches failed")


extension = Extension()
"""The default: projections in this process, memory cache only."""


# -- request helpers ------------------------------------------------------------------------


def _json(data: Any, status: int = 200, headers: dict[str, str] | None = None) -> web.Response:
    return web.Response(
        body=orjson.dumps(data), status=status, content_type="application/json", headers=headers
    )


def _user(request: web.Request) -> str:
    """The authenticated caller (set by ``gateway.http``'s middleware)."""
    user: str = request[keys.USER]
    return user


def _rm(request: web.Request) -> ReadModels:
    return request.app[READMODELS]


def _doc_id(request: web.Request) -> UUID:
    try:
        return doc_id(request.match_info["id"])
    except ValueError:
        raise NotFound("no such document") from None


def _int(request: web.Request, name: str, default: int | None, lo: int, hi: int) -> int | None:
    raw = request.query.get(name)
    if raw is None or raw == "":
        return default
    try:
        value = parse_int(raw)
    except ValueError:
        raise Invalid(f"{name} must be an integer") from None
    if not lo <= value <= hi:
        raise Invalid(f"{name} must be in {lo}..{hi}")
    return value


MAX_VERSION_DIGITS = 19
"""Digits of the longest version (2**63 - 1)."""


def _digits(raw: str) -> bool:
    """``raw`` is ASCII digits only (``isdecimal`` alone takes other scripts' digits too)."""
    return raw.isascii() and raw.isdecimal()


def _version(request: web.Request, name: str, default: int, current: int) -> int:
    """Query parameter ``name`` as a version of a document now at ``current``: an integer
    ``>= 0`` (else ``bad_request``) and not past ``current`` (else ``bad_version``)."""
    raw = request.query.get(name) or str(default)
    if not _digits(raw):
        raise Invalid(f"{name} must be a version (an integer >= 0)")
    if len(raw) > MAX_VERSION_DIGITS:  # past any version (and past what int() parses)
        raise BadVersion(f"{name} is past the current version {current}")
    value = int(raw)
    if value > current:
        raise BadVersion(f"{name}={value} is past the current version {current}")
    return value


async def _body(request: web.Request) -> Any:
    raw = await request.read()
    try:
        return orjson.loads(raw) if raw else {}
    except orjson.JSONDecodeError as exc:
        raise Invalid(f"body is not JSON: {exc}") from None


async def _object(request: web.Request) -> dict[str, Any]:
    body = await _body(request)
    if not isinstance(body, dict):
        raise Invalid("body must be a JSON object")
    return body


def _scope_digest(scope: str) -> str:
    """What a cursor carries of its list's scope: short, whatever the scope's length."""
    return hashlib.blake2b(scope.encode(), digest_size=8).hexdigest()


def encode_cursor(kind: str, key: int, scope: str) -> str:
    """An opaque cursor for the next page after the row with ``key`` of the list ``kind``
    (the order, or ``history``) of ``scope`` (the list's ``q``, or the document's id)."""
    raw = orjson.dumps({"k": kind, "p": key, "s": _scope_digest(scope)})
    return base64.urlsafe_b64encode(raw).decode().rstrip("=")


def decode_cursor(cursor: str | None, kind: str, scope: str) -> int | None:
    """The key a cursor made by ``encode_cursor(kind, ..., scope)`` carries; raise if not one.

    A cursor of another order, ``q`` or document would page a list it was not made for: a
    mix of two filters, or nothing at all.
    """
    if not cursor:
        return None
    try:
        data = orjson.loads(base64.urlsafe_b64decode(cursor + "=" * (-len(cursor) % 4)))
        key = data["p"]
        if (data["k"] != kind or data["s"] != _scope_digest(scope)
                or not isinstance(key, int) or isinstance(key, bool)):
            raise ValueError(cursor)
        if not 0 <= key < 1 << 63:  # no list gives out a key a database integer cannot hold
            raise ValueError(cursor)
    except (ValueError, KeyError, TypeError, orjson.JSONDecodeError):
        raise Invalid("cursor is not one this list gave out") from None
    return int(key)


VERSION_PARAMS = ("at", "from", "to")
"""Query parameters that name a version of the document in the path."""


async def _readable_room(request: web.Request) -> Room:
    """The room, if the caller may read it, and knowing any version it asks for that the
    store has (its ``head``; these routes read the versions' events from the store)."""
    asked = [request.query.get(n, "") for n in VERSION_PARAMS]
    v = max((int(a) for a in asked if _digits(a) and len(a) <= MAX_VERSION_DIGITS),
            default=None)
    return await readable_room(request, v)


async def _command(room: Room, user: str, command: Callable[[Document], Any]) -> Any:
    fut: asyncio.Future[Any] = asyncio.get_running_loop().create_future()
    room.submit(Submission(kind="command", by=user, future=fut, command=command))
    return await fut


EVENTS_PAGE = 1000
"""Events read per store call when walking a document's history."""


def events_upto(
    store: Store, doc_id: UUID, version: int | None = None, when: datetime | None = None
) -> list[Any]:
    """The document's events, in order, stopping before the edit producing ``version + 1``
    or the first event after ``when``: only what time travel to there needs is read."""
    out: list[Any] = []
    position = 0
    while True:
        page = store.events_after(doc_id, position, EVENTS_PAGE)
        for e in page:
            if version is not None and isinstance(e, Document.Edited) and e.v > version:
                return out
            if when is not None and e.timestamp > when:
                return out
            out.append(e)
        if len(page) < EVENTS_PAGE:
            return out
        position = page[-1].originator_version


async def _events(
    request: web.Request, doc_id: UUID, version: int | None = None, when: datetime | None = None
) -> list[Any]:
    store: Store = request.app[keys.ROOMS].store
    loop = asyncio.get_running_loop()
    return await loop.run_in_executor(store.reader, events_upto, store, doc_id, version, when)


def parse_time(raw: str, name: str) -> datetime:
    """An ISO 8601 time (``Z`` or an offset; naive means UTC) as a datetime in UTC.

    Raises ``Invalid`` for text that is not one, and for an instant whose UTC leaves years
    1..9999 (``9999-12-31T23:59:59-01:00``): no answer or query could spell it.
    """
    # An unescaped "+" in a query string arrives as a space: "...T10:00:00 01:00".
    raw = raw.strip().replace(" ", "+") if "T" in raw else raw
    try:
        ts = datetime.fromisoformat(raw.replace("Z", "+00:00").replace("z", "+00:00"))
    except ValueError:
        raise Invalid(f"{name} must be an ISO 8601 time") from None
    if ts.tzinfo is None:
        return ts.replace(tzinfo=UTC)
    try:
        return ts.astimezone(UTC)
    except OverflowError:
        raise Invalid(f"{name} must be an instant within years 1..9999 in UTC") from None


def _doc_item(row: dict[str, Any]) -> dict[str, Any]:
    return {
        "id": row["id"],
        "title": row["title"],
        "owner": row["owner"],
        "role": row["role"],
        "version": int(row["version"]),
        "length": int(row["length"]),
        "created_at": row["created_at"],
        "updated_at": row["updated_at"],
        "last_editor": row["last_editor"],
    }


# -- documents ------------------------------------------------------------------------------


async def list_documents(request: web.Request) -> web.Response:
    """``GET /v1/documents?limit=&cursor=&q=&order=created|updated``: readable, newest first."""
    rm = _rm(request)
    order = request.query.get("order", "created")
    if order not in ("created", "updated"):
        raise Invalid("order must be 'created' or 'updated'")
    limit = _int(request, "limit", 50, 1, MAX_PAGE)
    assert limit is not None
    q = request.query.get("q") or None
    if q is not None and len(q) > 200:
        raise TooLarge("q is longer than 200 characters")
    if q is not None:
        check_no_nul("q", q)
    before = decode_cursor(request.query.get("cursor"), order, q or "")
    user = _user(request)
    key = ("documents", user, order, before, limit, q)
    head = await rm.heads.read()
    page = rm.pages.get(key, head)
    if page is None:
        lag = await rm.reach(head)
        rows = await rm.call(queries.list_documents, rm.db, user, order, before, limit + 1, q)
        more = len(rows) > limit
        rows = rows[:limit]
        pos = "created_pos" if order == "created" else "updated_pos"
        next_cursor = encode_cursor(order, int(rows[-1][pos]), q or "") if more else None
        data = {"items": [_doc_item(r) for r in rows], "next_cursor": next_cursor}
        if lag:  # not caught up: say so, and keep nothing
            return _json(data, headers={"X-Projection-Lag": str(lag)})
        page = rm.pages.put(key, head, orjson.dumps(data))
    headers = CIMultiDict({"Content-Type": "application/json", "ETag": page.etag})
    return cached_response(request, page.body, headers)


async def bulk_create(request: web.Request) -> web.Response:
    """``POST /v1/documents:bulk {"documents": [{"title", "text"?}]}``: one transaction."""
    body = await _object(request)
    specs = body.get("documents")
    if not isinstance(specs, list) or not specs:
        raise Invalid("'documents' must be a non-empty list")
    if len(specs) > MAX_BULK:
        raise TooLarge(f"at most {MAX_BULK} documents per request")
    user = _user(request)
    docs: list[Document] = []
    for i, spec in enumerate(specs):
        if not isinstance(spec, dict):
            raise Invalid(f"documents[{i}] must be an object")
        title, text = spec.get("title"), spec.get("text", "")
        if not isinstance(title, str) or not isinstance(text, str):
            raise Invalid(f"documents[{i}]: 'title' and 'text' must be strings")
        try:
            docs.append(Document.create(title=title, text=text, owner=user))
        except DomainError as exc:
            raise type(exc)(f"documents[{i}]: {exc.message}") from None
    events = [e for d in docs for e in d.collect_events()]
    store: Store = request.app[keys.ROOMS].store
    await asyncio.get_running_loop().run_in_executor(None, store.save, events)
    items = [
        {"id": str(d.id), "title": d.title, "version": 0, "owner": d.owner,
         "created_at": iso(d.created_at)}
        for d in docs
    ]
    return _json({"items": items}, status=201)


async def batch_get(request: web.Request) -> web.Response:
    """``POST /v1/documents:batch-get {"ids": [...]}``: each readable one, as GET returns it."""
    body = await _object(request)
    ids = body.get("ids")
    if not isinstance(ids, list) or not all(isinstance(i, str) for i in ids):
        raise Invalid("'ids' must be a list of strings")
    if len(ids) > MAX_BATCH_GET:
        raise TooLarge(f"at most {MAX_BATCH_GET} ids per request")
    rooms: Rooms = request.app[keys.ROOMS]
    user = _user(request)

    def canonical(raw: str) -> UUID | None:
        try:
            return doc_id(raw)
        except ValueError:
            return None

    async def one(doc_id: UUID) -> dict[str, Any] | None:
        room = await rooms.readable(doc_id, user)
        return None if room is None else dict(room.snapshot.as_json())

    # Each documented spelling of a UUID names the same document: it comes once, where
    # first named; an id is missing as it was sent (it was listed both ways, and items
    # came twice).
    named = {raw: canonical(raw) for raw in ids}
    wanted = list(dict.fromkeys(d for d in named.values() if d is not None))
    found = await asyncio.gather(*(one(d) for d in wanted))
    items = [f for f in found if f is not None]
    got = {f["id"] for f in items}
    missing = [raw for raw, d in named.items() if d is None or str(d) not in got]
    return _json({"items": items, "missing": missing})


# -- projections ----------------------------------------------------------------------------


async def projections_status(request: web.Request) -> web.Response:
    """``GET /v1/projections``: the log's head and each read model's position and lag."""
    rm = _rm(request)
    head = await rm.head()
    rows = {r["name"]: r for r in await rm.call(queries.tracking, rm.db)}
    out = []
    now = time.time()
    for model in MODELS:
        row = rows.get(model.name)
        position = int(row["position"]) if row else 0
        if rm.run and rm.follower.position > position:
            position = rm.follower.position
        lag = max(head - position, 0)
        lag_seconds = 0.0
        if lag:
            nxt = await rm.call(rm.source.read, position, 1)
            if nxt:
                lag_seconds = max(0.0, round(now - nxt[0][1].timestamp.timestamp(), 3))
        item: dict[str, Any] = {"name": model.name, "position": position, "lag": lag,
                                "lag_seconds": lag_seconds}
        if rm.run and rm.follower.last_error:
            item["error"] = rm.follower.last_error
        out.append(item)
    rebuilding = sorted(n for n in rows if n.endswith(replay.NEXT))
    data: dict[str, Any] = {"head": head, "projections": out}
    if rebuilding:
        # A killed replay leaves its rows: they are a rebuild only while one holds the lock.
        running = await rm.call(rm.db.held, replay.LOCK)
        data["rebuilding" if running else "interrupted"] = [
            {"name": n.removesuffix(replay.NEXT), "position": int(rows[n]["position"])}
            for n in rebuilding
        ]
    data["cache"] = rm.cache.stats()
    data["pages"] = {"hits": rm.pages.hits, "misses": rm.pages.misses,
                     "head_reads": rm.heads.calls}
    return _json(data)


# -- one document's past --------------------------------------------------------------------


async def time_travel(request: web.Request) -> web.Response:
    """``GET /v1/documents/{id}?at=V|ISO``: the document as it was at version V or that time.

    Called by ``gateway.http.get_document`` when ``at`` is present. Non-members get 404;
    ``at`` before the document existed is 404 too; a version past the current one is 400
    ``bad_version``. The answer's ``at`` is the version asked for, or the time in UTC.
    """
    room = await _readable_room(request)
    raw = request.query.get("at", "")
    version: int | None = None
    when: datetime | None = None
    if _digits(raw):
        version = _version(request, "at", 0, room.head)
    else:
        when = parse_time(raw, "at")
    rm = _rm(request)

    async def compute() -> dict[str, Any]:
        events = await _events(request, room.id, version, when)
        state = await rm.call(history.state_at, events, version, when)
        if state is None:
            raise NotFound("the document did not exist at that time")
        return {
            "id": state.id,
            "title": state.title,
            "text": state.text,
            "version": state.version,
            "owner": state.owner,
            "created_at": iso(state.created_at),
            "updated_at": iso(state.updated_at),
        }

    if version is not None and version < room.head:
        # Fixed for good once the edit after it exists (until then a rename or a member
        # change still lands in it): cache it.
        data = await rm.cache.fetch(f"tt:{room.id}:{version}", (), compute)
    else:
        data = await compute()
    return _json({**data, "at": version if when is None else iso(when)})


async def document_history(request: web.Request) -> web.Response:
    """``GET /v1/documents/{id}/history?cursor=&limit=``: audit rows, newest first."""
    room = await _readable_room(request)
    rm = _rm(request)
    limit = _int(request, "limit", 50, 1, MAX_PAGE)
    assert limit is not None
    before = decode_cursor(request.query.get("cursor"), "history", str(room.id))
    headers: dict[str, str] = {}
    await rm.fresh(headers)
    rows = await rm.call(queries.history, rm.db, str(room.id), before, limit + 1)
    more = len(rows) > limit
    rows = rows[:limit]
    items = [
        {"position": int(r["position"]), "at": r["at"], "actor": r["actor"],
         "action": r["action"], "version": int(r["version"]),
         "event_version": int(r["event_version"]), "summary": r["summary"], "hash": r["hash"]}
        for r in rows
    ]
    nxt = encode_cursor("history", items[-1]["position"], str(room.id)) if more else None
    return _json({"items": items, "next_cursor": nxt}, headers=headers)


async def document_diff(request: web.Request) -> web.Response:
    """``GET /v1/documents/{id}/diff?from=V1&to=V2``: composed op and a readable diff."""
    room = await _readable_room(request)
    head = room.head
    v1 = _version(request, "from", 0, head)
    v2 = _version(request, "to", room.snapshot.v, head)
    if v1 > v2:
        raise Invalid("from must not be after to")
    rm = _rm(request)

    async def compute() -> dict[str, Any]:
        events = await _events(request, room.id, v2)
        result: dict[str, Any] = await rm.call(_diff, events, v1, v2)
        return result

    return _json(await rm.cache.fetch(f"diff:{room.id}:{v1}:{v2}", (), compute))


def _diff(events: Sequence[Any], v1: int, v2: int) -> dict[str, Any]:
    before = history.state_at(events, v1)
    assert before is not None
    op = history.compose_all([e.op for e in history.edits_between(events, v1, v2)])
    return {"from": v1, "to": v2, "op": op, "diff": history.readable_diff(before.text, op)}


async def document_blame(request: web.Request) -> web.Response:
    """``GET /v1/documents/{id}/blame[?at=V]``: the text as spans with author and version."""
    room = await _readable_room(request)
    v = _version(request, "at", room.snapshot.v, room.head)
    rm = _rm(request)

    async def compute() -> dict[str, Any]:
        events = await _events(request, room.id, v)
        spans = await rm.call(history.blame, events)
        return {"version": v, "spans": [{"text": s.text, "by": s.by, "v": s.v} for s in spans]}

    return _json(await rm.cache.fetch(f"blame:{room.id}:{v}", (), compute))


# -- context items --------------------------------------------------------------------------


def _item(row: dict[str, Any]) -> dict[str, Any]:
    return {
        "id": row["item_id"],
        "kind": row["kind"],
        "title": row["title"],
        "body": row["body"],
        "position": int(row["position"]),
        "created_by": row["created_by"],
        "created_at": row["created_at"],
        "updated_by": row["updated_by"],
        "updated_at": row["updated_at"],
    }


def _committed_item(doc: Document, item: str) -> dict[str, Any]:
    """``item`` as the aggregate holds it after a command: what the ``context`` read model
    shows once it has taken in the command's event (a write never waits for it)."""
    fields = doc.context_items[item]
    return _item({**fields, "item_id": item, "created_at": iso(fields["created_at"]),
                  "updated_at": iso(fields["updated_at"])})


async def _context_fields(request: web.Request) -> dict[str, Any]:
    """The body of a context write: an object with no fields but an item's own."""
    body = await _object(request)
    unknown = sorted(set(body) - set(CONTEXT_FIELDS))
    if unknown:
        raise Invalid(f"unknown fields: {', '.join(unknown)}")
    return body


async def add_context(request: web.Request) -> web.Response:
    """``POST /v1/documents/{id}/context {"kind", "title"?, "body"?, "position"?}`` -> 201."""
    room = await _readable_room(request)
    body = await _context_fields(request)
    user = _user(request)
    # The aggregate checks every field (types included) and answers with a domain error.
    kind: Any = body.get("kind")
    title: Any = body.get("title", "")
    text: Any = body.get("body", "")
    position: Any = body.get("position")
    item = await _command(
        room, user,
        lambda d: _committed_item(d, d.add_context_item(kind, title, text, user, position)),
    )
    return _json(item, status=201)


async def list_context(request: web.Request) -> web.Response:
    """``GET /v1/documents/{id}/context``: ``{"items": [...]}`` in position order."""
    room = await _readable_room(request)
    rm = _rm(request)
    headers: dict[str, str] = {}
    await rm.fresh(headers)
    rows = await rm.call(queries.context_items, rm.db, str(room.id))
    return _json({"items": [_item(r) for r in rows]}, headers=headers)


async def update_context(request: web.Request) -> web.Response:
    """``PATCH /v1/documents/{id}/context/{item}`` with any of kind, title, body, position.

    A PATCH that changes nothing records no event and answers with the item as it is.
    """
    room = await _readable_room(request)
    fields = await _context_fields(request)
    item = request.match_info["item"]
    user = _user(request)
    if any(v is None for v in fields.values()):
        raise Invalid("fields cannot be set to null")

    def update(d: Document) -> dict[str, Any]:
        d.update_context_item(item, user, **fields)
        return _committed_item(d, item)

    return _json(await _command(room, user, update))


async def remove_context(request: web.Request) -> web.Response:
    """``DELETE /v1/documents/{id}/context/{item}`` -> 204."""
    room = await _readable_room(request)
    item = request.match_info["item"]
    user = _user(request)
    await _command(room, user, lambda d: d.remove_context_item(item, user))
    return web.Response(status=204)


# -- analytics ------------------------------------------------------------------------------


def _floor(ts: datetime, bucket: str) -> datetime:
    ts = ts.astimezone(UTC).replace(minute=0, second=0, microsecond=0)
    return ts.replace(hour=0) if bucket == "day" else ts


def _step(bucket: str) -> timedelta:
    return timedelta(hours=1) if bucket == "hour" else timedelta(days=1)


def bucket_range(
    bucket: str, start: datetime | None = None, end: datetime | None = None
) -> tuple[datetime, datetime]:
    """``[start, end)`` widened to whole buckets; defaults: the last 24 hours or 30 days
    before ``end`` (default: now).

    Raises ``Invalid`` unless ``start`` is before ``end``, as given (once widened, an
    inverted range inside one bucket was one bucket long), and ``OverflowError`` for whole
    buckets past year 1 or 9999.
    """
    end = end or datetime.now(UTC)
    start = start or end - (timedelta(hours=24) if bucket == "hour" else timedelta(days=30))
    if start >= end:
        raise Invalid("from must be before to")
    start = _floor(start, bucket)
    end = _floor(end, bucket) + _step(bucket) if _floor(end, bucket) != end else end
    return start, end


def _range(request: web.Request, bucket: str) -> tuple[datetime, datetime]:
    raw_to, raw_from = request.query.get("to"), request.query.get("from")
    try:
        start, end = bucket_range(
            bucket,
            parse_time(raw_from, "from") if raw_from else None,
            parse_time(raw_to, "to") if raw_to else None,
        )
    except OverflowError:  # whole buckets past year 1 or 9999
        raise Invalid("from and to must be whole buckets within years 1..9999") from None
    if (end - start) / _step(bucket) > MAX_BUCKETS:
        raise Invalid(f"at most {MAX_BUCKETS} buckets per series")
    return start, end


def _bucket(request: web.Request) -> str:
    bucket = request.query.get("bucket", "hour")
    if bucket not in ("hour", "day"):
        raise Invalid("bucket must be 'hour' or 'day'")
    return bucket


FIGURES = ("edits", "chars_inserted", "chars_deleted", "active_users", "documents_created")
"""The figures of each bucket of an analytics series."""


async def series(
    rm: ReadModels, scope: queries.Scope, bucket: str, start: datetime, end: datetime
) -> dict[str, Any]:
    """An analytics series (every bucket of ``[start, end)``), through the cache."""
    key = f"an:{scope.user}:{scope.document}:{bucket}:{iso(start)}:{iso(end)}"
    tag = f"an-doc:{scope.document}" if scope.document else "an-all"

    async def compute() -> dict[str, Any]:
        found = await rm.call(queries.series, rm.db, scope, bucket, iso(start), iso(end))
        out = []
        t = start
        while t < end:
            at = iso(t)
            row = found.get(at, {})
            out.append({"at": at, **{f: int(row.get(f, 0)) for f in FIGURES}})
            t += _step(bucket)
        return {"bucket": bucket, "from": iso(start), "to": iso(end), "series": out}

    return dict(await rm.cache.fetch(key, (tag,), compute))


async def top(rm: ReadModels, user: str, start: datetime, end: datetime,
              limit: int) -> dict[str, Any]:
    """The documents ``user`` may read ranked by edits in ``[start, end)``, through the cache."""
    key = f"top:{user}:{iso(start)}:{iso(end)}:{limit}"

    async def compute() -> dict[str, Any]:
        rows = await rm.call(queries.top_documents, rm.db, user, iso(start), iso(end), limit)
        return {"from": iso(start), "to": iso(end), "items": rows}

    return dict(await rm.cache.fetch(key, ("an-all",), compute))


async def analytics_overview(request: web.Request) -> web.Response:
    """``GET /v1/analytics/overview?from=&to=&bucket=hour|day`` over readable documents."""
    rm = _rm(request)
    bucket = _bucket(request)
    start, end = _range(request, bucket)
    headers: dict[str, str] = {}
    await rm.fresh(headers)
    data = await series(rm, queries.Scope(_user(request)), bucket, start, end)
    return _json(data, headers=headers)


async def analytics_document(request: web.Request) -> web.Response:
    """``GET /v1/analytics/documents/{id}?from=&to=&bucket=``: one document's series."""
    room = await _readable_room(request)
    rm = _rm(request)
    bucket = _bucket(request)
    start, end = _range(request, bucket)
    headers: dict[str, str] = {}
    await rm.fresh(headers)
    scope = queries.Scope(_user(request), str(room.id))
    data = {**await series(rm, scope, bucket, start, end), "document": str(room.id)}
    return _json(data, headers=headers)


async def analytics_top(request: web.Request) -> web.Response:
    """``GET /v1/analytics/top-documents?from=&to=&limit=``: most edited readable documents."""
    rm = _rm(request)
    start, end = _range(request, "hour")
    limit = _int(request, "limit", 10, 1, 100)
    assert limit is not None
    headers: dict[str, str] = {}
    await rm.fresh(headers)
    return _json(await top(rm, _user(request), start, end, limit), headers=headers)


WARM_USERS = 20
"""How many of the most active users' dashboards are computed at start."""
WARM_DOCUMENTS = 10
"""How many of the most edited documents are opened (rooms loaded) at start."""
WARM_WAIT_SECONDS = 60.0
"""Longest the warm-up waits at start for the read models to catch up."""
WARM_LOCK_SECONDS = 60.0
"""Longest one process's warm-up keeps the others' waiting (``ReadCache.exclusive``)."""


async def caught_up(rm: ReadModels, within: float) -> bool:
    """Whether, within ``within`` seconds, every read model has its tables, they reach the
    log's head (read anew at each try) and the cache may rely on its generations that far
    (``ReadCache.complete``: the runner's raises are in Redis). Tables that no runner has
    made yet (another process runs them and has just started) and a store or read-model
    database that does not answer yet count as not yet."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + within
    while True:
        try:
            if (await rm.built() and await rm.reach(await rm.head()) == 0
                    and await rm.cache.complete()):
                return True
        except (Rejected, StoreUnavailable):
            pass
        if loop.time() >= deadline:
            return False
        await asyncio.sleep(0.1)


async def warm(rm: ReadModels, rooms: Rooms) -> None:
    """Fill the cache with the dashboards of the most active users of the last day and open
    the most edited documents, once the read models have caught up. Best effort.

    Every process warms, whether it runs the projections or not (``serve --workers N``:
    none of the gateways does): its rooms and the cache's memory level are its own. With
    Redis, the dashboards are warmed by one process at a time (``ReadCache.exclusive``): the
    first computes them and stores them in both levels, the others then find them in Redis
    and copy them into their memory, so N processes starting together query the database
    for them once, not N times.
    """
    if not await caught_up(rm, WARM_WAIT_SECONDS):
        log.info("caches not warmed: the read models did not catch up within %g s",
                 WARM_WAIT_SECONDS)
        return
    since = iso(datetime.now(UTC) - timedelta(hours=24))
    users: list[str] = []
    if rm.cache.enabled:  # else nothing would be kept
        async with rm.cache.exclusive("warm", WARM_LOCK_SECONDS):
            users = await rm.call(queries.most_active, rm.db, "user_id", since, WARM_USERS)
            for user in users:
                for bucket in ("hour", "day"):
                    await series(rm, queries.Scope(user), bucket, *bucket_range(bucket))
                await top(rm, user, *bucket_range("hour"), 10)
    docs = await rm.call(queries.most_active, rm.db, "document_id", since, WARM_DOCUMENTS)
    for doc in docs:
        await rooms.get(UUID(doc))
    log.info("warmed %d dashboards and %d documents", len(users), len(docs))


# -- dashboard ------------------------------------------------------------------------------


async def dashboard(request: web.Request) -> web.FileResponse:
    """``GET /dashboard``: the static dashboard page, without a token (its API calls send
    one; the page itself holds no data). A public path of ``gateway.http.Gate``."""
    return web.FileResponse(STATIC / "dashboard.html")


def add_routes(app: web.Application) -> None:
    """Register the routes of this module (see ``schema/read_models.md``)."""
    r = app.router
    r.add_get("/v1/documents", list_documents)
    r.add_post("/v1/documents:bulk", bulk_create)
    r.add_post("/v1/documents:batch-get", batch_get)
    r.add_get("/v1/projections", projections_status)
    r.add_get(DOC_ROUTE + "/history", document_history)
    r.add_get(DOC_ROUTE + "/diff", document_diff)
    r.add_get(DOC_ROUTE + "/blame", document_blame)
    r.add_get(DOC_ROUTE + "/context", list_context)
    r.add_post(DOC_ROUTE + "/context", add_context)
    r.add_patch(DOC_ROUTE + "/context/{item:[^/]+}", update_context)
    r.add_delete(DOC_ROUTE + "/context/{item:[^/]+}", remove_context)
    r.add_get("/v1/analytics/overview", analytics_overview)
    r.add_get("/v1/analytics/documents/{id:[^/]+}", analytics_document)
    r.add_get("/v1/analytics/top-documents", analytics_top)


def _no_table(exc: ReadDBError) -> bool:
    """The read-model tables do not exist (PostgreSQL's 42P01, SQLite's "no such table")."""
    cause = exc.__cause__
    return getattr(cause, "sqlstate", None) == "42P01" or "no such table" in str(cause)


__all__ = ["READMODELS", "Extension", "ReadModels", "extension", "time_travel"]

