"""The event store adapter: the ``eventsourcing`` application over PostgreSQL or SQLite.

Everything here is synchronous (the library has no asyncio API). Callers on the event loop
go through ``gateway.committer`` (writes, one dedicated thread) or ``Store.reader``
(reads, a small thread pool); nothing here may be called on the loop itself.

Foreign exceptions are translated once, here: a primary-key clash on
``(originator_id, originator_version)`` becomes ``VersionConflict``; a lost or refused
connection becomes ``StoreUnavailable``.
"""

from __future__ import annotations

import contextlib
import re
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar
from urllib.parse import parse_qs, unquote, urlsplit
from uuid import UUID

import psycopg
from eventsourcing.application import AggregateNotFoundError, Application
from eventsourcing.persistence import (
    IntegrityError,
    InterfaceError,
    MapperDeserialisationError,
    Notification,
    OperationalError,
    Recording,
    StoredEvent,
    Transcoder,
)
from eventsourcing.utils import get_topic, resolve_topic

from domain.document import Document
from gateway.recorders import (
    ClientOp,
    EventRow,
    PostgresClientOpsRecorder,
    SQLiteClientOpsRecorder,
)
from schema.transcoder import MsgpackTranscoder

T = TypeVar("T")

APP_NAME = "coscribe"
"""The application name: tables are ``coscribe_events`` (and later ``*_tracking``)."""


class StoreError(Exception):
    """Base of the store's own errors."""


class VersionConflict(StoreError):
    """Another writer appended to a document first; ``doc_id`` names it when known."""

    def __init__(self, message: str, doc_id: UUID | None) -> None:
        super().__init__(message)
        self.doc_id = doc_id


class StoreUnavailable(StoreError):
    """The database cannot be reached (after the library's own retries).

    Its text is the database's own (SQL, function and schema names): for the server log
    only. Clients are told ``UNAVAILABLE_MESSAGE``.
    """


UNAVAILABLE_MESSAGE = "event store unavailable; retry"
"""The one message clients get with ``unavailable`` when the store failed."""


class StoreRefused(StoreError):
    """The database refused a value it cannot hold (a bug: validation let it through)."""


_KEY_RE = re.compile(
    r"\((?:originator_id, originator_version|doc, client, seq)\)=\(([0-9a-fA-F-]{36}), "
)


def conflicting_doc(exc: Exception) -> UUID | None:
    """The document id named in a primary-key violation message, if it names one."""
    m = _KEY_RE.search(str(exc))
    return UUID(m.group(1)) if m else None


@dataclass(frozen=True, slots=True)
class StoreConfig:
    """Where events live: a ``postgresql://`` URL, or None for SQLite in ``data_dir``."""

    data_dir: Path
    database_url: str | None = None
    database_schema: str | None = None
    pool_size: int = 4


SQLITE_LOCK_SECONDS = 10
"""How long an SQLite connection of the store waits for another's write lock (its busy
timeout) before "database is locked"."""


def library_env(cfg: StoreConfig, *, writer: bool = False) -> dict[str, str]:
    """The ``eventsourcing`` environment for ``cfg`` (persistence module and connection).

    ``writer``: the committer's own application: one connection, tables already created.
    """
    env: dict[str, str] = {
        "TRANSCODER_TOPIC": "schema.transcoder:MsgpackTranscoder",
    }
    if writer:
        env["CREATE_TABLE"] = "n"
    if cfg.database_url:
        url = urlsplit(cfg.database_url)
        if url.scheme not in ("postgres", "postgresql"):
            raise ValueError(f"unsupported database URL scheme {url.scheme!r}")
        query = parse_qs(url.query)
        host = query.get("host", [url.hostname or "127.0.0.1"])[0]
        env.update(
            PERSISTENCE_MODULE="eventsourcing.postgres",
            POSTGRES_DBNAME=unquote(url.path.lstrip("/")) or "postgres",
            POSTGRES_HOST=host,
            POSTGRES_PORT=str(url.port or 5432),
            POSTGRES_USER=unquote(url.username or "postgres"),
            POSTGRES_PASSWORD=unquote(url.password or ""),
            POSTGRES_POOL_SIZE="1" if writer else str(cfg.pool_size),
            POSTGRES_MAX_OVERFLOW="1" if writer else str(cfg.pool_size),
            POSTGRES_CONNECT_TIMEOUT="2",
            POSTGRES_LOCK_TIMEOUT="5",
            APPLICATION_RECORDER_TOPIC="gateway.recorders:PostgresClientOpsRecorder",
        )
        if cfg.database_schema:
            env["POSTGRES_SCHEMA"] = cfg.database_schema
    else:
        # Only its owner may read the events (an existing directory is the operator's to set).
        cfg.data_dir.mkdir(mode=0o700, parents=True, exist_ok=True)
        env.update(
            PERSISTENCE_MODULE="eventsourcing.sqlite",
            SQLITE_DBNAME=str(cfg.data_dir / "events.sqlite"),
            SQLITE_LOCK_TIMEOUT=str(SQLITE_LOCK_SECONDS),
            APPLICATION_RECORDER_TOPIC="gateway.recorders:SQLiteClientOpsRecorder",
        )
    return env


SCHEMA_LOCK = 0x636F7363  # "cosc"
"""Advisory lock key held while a process creates the schema and tables."""


def _create_app(cfg: StoreConfig) -> CoscribeApplication:
    """The library application; on Postgres its tables are created under an advisory lock.

    The library's ``CREATE TYPE``/``CREATE TABLE IF NOT EXISTS`` are not safe when several
    processes start together on a fresh database (they clash in the catalog), so creation
    is serialised across processes with ``pg_advisory_lock``. The schema is created too.
    """
    env = library_env(cfg)
    if not cfg.database_url:
        return CoscribeApplication(env=env)
    import psycopg
    from psycopg import sql

    with psycopg.connect(cfg.database_url, autocommit=True, connect_timeout=5) as conn:
        conn.execute("SELECT pg_advisory_lock(%s)", (SCHEMA_LOCK,))
        try:
            if cfg.database_schema:
                conn.execute(
                    sql.SQL("CREATE SCHEMA IF NOT EXISTS {}").format(
                        sql.Identifier(cfg.database_schema)
                    )
                )
            return CoscribeApplication(env=env)
        finally:
            conn.execute("SELECT pg_advisory_unlock(%s)", (SCHEMA_LOCK,))


@contextlib.contextmanager
def _opening(cfg: StoreConfig) -> Iterator[None]:
    """On SQLite, one process at a time opens the file: setting its WAL journal does not
    wait for another connection's lock (seen: a worker of ``serve --workers 2`` exiting with
    "database is locked" at start, 1 start in 6). On PostgreSQL ``_create_app`` serialises."""
    if cfg.database_url:
        yield
        return
    import fcntl

    cfg.data_dir.mkdir(mode=0o700, parents=True, exist_ok=True)
    with open(cfg.data_dir / "events.sqlite.lock", "a") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # released when the file closes
        yield


class CoscribeApplication(Application[UUID]):
    """The library application that owns the ``coscribe_events`` table."""

    name = APP_NAME

    def construct_transcoder(self) -> Transcoder:
        """Msgpack for event state (the library's JSON transcoder is the slow default)."""
        return MsgpackTranscoder()


def plain_msgpack(mapper: Any) -> bool:
    """``mapper`` stores msgpack state with neither cipher nor compressor (the store's own):
    what ``EventDecoder`` and ``EventEncoder`` handle directly."""
    return (
        mapper.cipher is None
        and mapper.compressor is None
        and isinstance(mapper.transcoder, MsgpackTranscoder)
    )


class EventDecoder:
    """Stored rows to domain events: the library mapper's ``to_domain_event``, per page.

    The same objects (the event class from the topic, the decoded state as ``__dict__``, the
    originator's id and version, the class-version upcasts), without the per-event lookups:
    the topic's class and version are resolved once per topic. Only for a mapper with neither
    cipher nor compressor (the store's); anything else goes through the mapper.
    """

    def __init__(self, mapper: Any) -> None:
        self.mapper = mapper
        self.direct = plain_msgpack(mapper)
        self._classes: dict[str, tuple[type, int]] = {}

    def _resolve(self, topic: str) -> tuple[type, int]:
        cls = resolve_topic(topic)
        found = self._classes[topic] = (cls, int(getattr(cls, "class_version", 1)))
        return found

    def decode(self, rows: Sequence[EventRow]) -> list[tuple[int, Any]]:
        """``(notification id, event)`` for each row, in order."""
        if not self.direct:
            return [
                (nid, self.mapper.to_domain_event(StoredEvent(oid, ver, topic, bytes(state))))
                for nid, oid, ver, topic, state in rows
            ]
        classes = self._classes
        decode = self.mapper.transcoder.decode
        new = object.__new__
        setattr_ = object.__setattr__
        out: list[tuple[int, Any]] = []
        append = out.append
        for nid, oid, ver, topic, state in rows:
            found = classes.get(topic)
            cls, class_version = found if found is not None else self._resolve(topic)
            try:
                d = decode(state)
            except Exception as exc:
                raise MapperDeserialisationError(
                    f"Failed to deserialise state of stored event with topic {topic!r},"
                    f" originator_id {oid!s} and originator_version {ver}: {exc}"
                ) from exc
            d["originator_id"] = oid
            d["originator_version"] = ver
            if class_version != 1 or "class_version" in d:
                from_version = d.pop("class_version", 1)
                while from_version < class_version:
                    getattr(cls, f"upcast_v{from_version}_v{from_version + 1}")(d)
                    from_version += 1
            event = new(cls)
            setattr_(event, "__dict__", d)
            append((nid, event))
        return out


Columns = tuple[list[Any], list[int], list[str], list[bytes]]
"""Stored events as columns: ``(originator ids, originator versions, topics, states)``."""


class EventEncoder:
    """Domain events to stored columns: the library mapper's ``to_stored_event``, per batch.

    The same state bytes (the event's ``__dict__`` without its originator's id and version,
    plus ``class_version`` when above 1, through the transcoder), without a ``StoredEvent``
    per event and with each class's topic and version looked up once. Only for a mapper with
    neither cipher nor compressor (the store's); anything else goes through the mapper.
    """

    def __init__(self, mapper: Any) -> None:
        self.mapper = mapper
        self.direct = plain_msgpack(mapper)
        self._classes: dict[type, tuple[str, int]] = {}

    def _resolve(self, cls: type) -> tuple[str, int]:
        found = self._classes[cls] = (get_topic(cls), int(getattr(cls, "class_version", 1)))
        return found

    def columns(self, events: Sequence[Any]) -> Columns:
        """The columns of ``events``, in order."""
        ids: list[Any] = []
        versions: list[int] = []
        topics: list[str] = []
        states: list[bytes] = []
        if not self.direct:
            for stored in map(self.mapper.to_stored_event, events):
                ids.append(stored.originator_id)
                versions.append(stored.originator_version)
                topics.append(stored.topic)
                states.append(stored.state)
            return ids, versions, topics, states
        classes = self._classes
        encode = self.mapper.transcoder.encode
        for e in events:
            found = classes.get(type(e))
            topic, class_version = found if found is not None else self._resolve(type(e))
            d = dict(vars(e))
            ids.append(d.pop("originator_id"))
            versions.append(d.pop("originator_version"))
            if class_version > 1:
                d["class_version"] = class_version
            topics.append(topic)
            states.append(encode(d))
        return ids, versions, topics, states


def recordings_of(
    events: Sequence[Any], columns: Columns, notification_ids: Sequence[int], stale: set[UUID]
) -> list[Recording[UUID]]:
    """The recordings of a checked insert: the events not of ``stale`` documents, with ids.

    The library's frozen ``Recording`` and ``Notification``, given their ``__dict__`` at once
    (equal to constructed ones, a test checks): their generated ``__init__`` sets each field
    through ``object.__setattr__`` (measured: 1.6 + 0.7 µs per event, against 0.6 here).
    """
    new = object.__new__
    setattr_ = object.__setattr__
    out: list[Recording[UUID]] = []
    append = out.append
    nids = iter(notification_ids)
    for e, oid, ver, topic, state in zip(events, *columns, strict=True):
        if oid in stale:
            continue
        nid = next(nids, None)
        if nid is None:
            raise ValueError("fewer notification ids than recorded events")
        n = new(Notification)
        setattr_(n, "__dict__", {"originator_id": oid, "originator_version": ver,
                                 "topic": topic, "state": state, "id": nid})
        r = new(Recording)
        setattr_(r, "__dict__", {"domain_event": e, "notification": n})
        append(r)
    if next(nids, None) is not None:
        raise ValueError("more notification ids than recorded events")
    return out


class Store:
    """Synchronous access to the events of documents. Thread-safe; never call on the loop.

    ``save`` is one transaction for all the events given, in order: the group commit.
    """

    def __init__(self, cfg: StoreConfig) -> None:
        self.cfg = cfg
        with _opening(cfg):
            self.app = _create_app(cfg)
            """Reads (any thread): loads, catch-ups, lookups, the projection runner."""
            self._writer_app = CoscribeApplication(env=library_env(cfg, writer=True))
        """Writes only, from the committer's thread: its own connection, so that reads (even
        a burst of catch-ups, or the library's retries of a failing read) never hold the
        connection a commit needs."""
        self.is_postgres = bool(cfg.database_url)
        self.encode_seconds = 0.0
        """Writer thread: time spent turning events into stored events (mapper)."""
        self.insert_seconds = 0.0
        """Writer thread: time from the start of the insert transaction to its commit."""
        self.reader = ThreadPoolExecutor(max_workers=cfg.pool_size, thread_name_prefix="store-read")
        """Threads for reads, so that loading a document never waits behind a commit."""
        self.decoder = EventDecoder(self.app.mapper)

    def close(self) -> None:
        """Release the pool and the threads."""
        self.reader.shutdown(wait=True, cancel_futures=True)
        self._writer_app.close()
        self.app.close()

    # -- writes (the committer's thread) ---------------------------------------------------

    def save(
        self, events: Sequence[Any], client_ops: Sequence[ClientOp] = ()
    ) -> list[Recording[UUID]]:
        """Append ``events`` in one transaction; raise ``VersionConflict`` on a clash.

        ``client_ops`` rows are recorded in the same transaction; a ``(doc, client, seq)``
        that was recorded before is a conflict too.
        """
        try:
            return self._writer_app.save(*events, client_ops=client_ops)
        except IntegrityError as exc:
            raise VersionConflict(str(exc), conflicting_doc(exc)) from exc
        except (OperationalError, InterfaceError) as exc:
            raise StoreUnavailable(str(exc)) from exc

    # -- reads (any thread) -----------------------------------------------------------------

    def load(self, doc_id: UUID) -> Document | None:
        """The document with every stored event applied, or None if there is none."""
        try:
            doc = self.app.repository.get(doc_id)
        except AggregateNotFoundError:
            return None
        except (OperationalError, InterfaceError) as exc:
            raise StoreUnavailable(str(exc)) from exc
        return doc if isinstance(doc, Document) else None

    @property
    def writer_recorder(self) -> Any:
        """The recorder of the writer application (its SQL, for ``gateway.writer``)."""
        return self._writer_app.recorder

    @property
    def writer_mapper(self) -> Any:
        """The writer application's mapper (events to stored events)."""
        return self._writer_app.mapper

    @property
    def checks_heads(self) -> bool:
        """Whether checked commits are available (Postgres: ``gateway.writer``)."""
        return isinstance(self._writer_app.recorder, PostgresClientOpsRecorder)

    def ping(self) -> None:
        """Raise ``StoreUnavailable`` unless the database answers now (one attempt)."""
        recorder = self.app.recorder
        assert isinstance(recorder, (PostgresClientOpsRecorder, SQLiteClientOpsRecorder))
        try:
            recorder.ping()
        except Exception as exc:
            raise StoreUnavailable(str(exc)) from exc

    def log_id(self) -> str:
        """The identity of this event log: another database, or this one reset or restored
        from a dump, has another (the read cache's Redis keys are named by it)."""
        recorder = self.app.recorder
        assert isinstance(recorder, (PostgresClientOpsRecorder, SQLiteClientOpsRecorder))
        try:
            return recorder.log_id()
        except (OperationalError, InterfaceError) as exc:
            raise StoreUnavailable(str(exc)) from exc

    def find_client_op(self, doc_id: UUID, client: str, seq: int) -> int | None:
        """The version that ``client``'s op ``seq`` on the document produced, if committed."""
        return self._timed(lambda r: r.find_client_op(str(doc_id), client, seq))

    def bind_clients(self, wanted: dict[str, str]) -> dict[str, str]:
        """Bind the free client ids of ``wanted`` (``client -> user``) to those users, for
        ever; return every one's owner (``gateway.clients``). Idempotent."""
        return self._timed(lambda r: r.bind_clients(wanted))

    def _timed(
        self, call: Callable[[PostgresClientOpsRecorder | SQLiteClientOpsRecorder], T]
    ) -> T:
        """``call(recorder)`` for a statement with its own timeout: a second attempt at
        once for a connection that went stale (the server restarted), none for one whose
        time was over (a locked table); ``StoreUnavailable`` when it fails."""
        recorder = self.app.recorder
        assert isinstance(recorder, (PostgresClientOpsRecorder, SQLiteClientOpsRecorder))
        try:
            try:
                return call(recorder)
            except (OperationalError, InterfaceError) as exc:
                if isinstance(exc.__cause__, psycopg.errors.QueryCanceled):
                    raise
                return call(recorder)
        except (OperationalError, InterfaceError) as exc:
            raise StoreUnavailable(str(exc)) from exc

    def notifications(self, after: int, limit: int) -> list[tuple[int, Any]]:
        """Up to ``limit`` ``(notification id, event)`` after notification ``after``, in order.

        The log as the projections read it. On Postgres the rows are read by
        ``PostgresClientOpsRecorder.select_rows`` (a second attempt for a connection that went
        stale) and decoded by ``EventDecoder``: 4.8 CPU µs per event, where the library's
        ``select_notifications`` and mapper took 13.7 (``ops.bench.projections``).
        """
        recorder = self.app.recorder
        try:
            if isinstance(recorder, PostgresClientOpsRecorder):
                try:
                    rows = recorder.select_rows(after, limit)
                except (OperationalError, InterfaceError):
                    rows = recorder.select_rows(after, limit)
            else:
                rows = [
                    (n.id, n.originator_id, n.originator_version, n.topic, n.state)
                    for n in recorder.select_notifications(after, limit, inclusive_of_start=False)
                ]
        except (OperationalError, InterfaceError) as exc:
            raise StoreUnavailable(str(exc)) from exc
        return self.decoder.decode(rows)

    def events_after(self, doc_id: UUID, position: int, limit: int | None = None) -> list[Any]:
        """The document's events with aggregate version > ``position``, in order."""
        try:
            return list(self.app.events.get(doc_id, gt=position, limit=limit))
        except (OperationalError, InterfaceError) as exc:
            raise StoreUnavailable(str(exc)) from exc

    def edits_after(self, doc_id: UUID, v: int, limit: int) -> list[Document.Edited]:
        """Up to ``limit`` ``Edited`` events with document version > ``v``, in order.

        The edit that produced version ``v+1`` has aggregate version at least ``v+2`` (the
        creation is 1), so reading from position ``v+1`` never misses one.
        """
        out: list[Document.Edited] = []
        position = v + 1
        page = max(limit, 64)
        while len(out) < limit:
            batch = self.events_after(doc_id, position, page)
            if not batch:
                break
            for e in batch:
                if isinstance(e, Document.Edited) and e.v > v:
                    out.append(e)
                    if len(out) == limit:
                        break
            position = batch[-1].originator_version
            if len(batch) < page:
                break
        return out

    def iter_edits(self, doc_id: UUID, v: int) -> Iterator[Document.Edited]:
        """Every edit after version ``v`` (for catch-up that spans many pages)."""
        while True:
            page = self.edits_after(doc_id, v, 1000)
            yield from page
            if len(page) < 1000:
                return
            v = page[-1].v
