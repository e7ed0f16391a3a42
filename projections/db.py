"""Where read models live: one adapter for SQLite (the embedded default), one for Postgres.

Both are synchronous and give each thread its own connection, so the runner's thread and the
reader threads never share one. Nothing here may be called on the event loop.

- SQLite: a file of its own (``<data dir>/readmodels.sqlite``), WAL mode; a write
  transaction starts with ``BEGIN IMMEDIATE`` so that two runners serialise up front.
  ``lower()`` is Python's ``str.lower`` on our connections (SQLite's own lowers ASCII only),
  so that case-insensitive matches agree with Postgres's for any script.
- Postgres: the database and schema of the event store (``search_path`` is set on connect), so
  analysts find ``rm_*`` tables next to ``coscribe_events``. Commits do not wait for the WAL
  flush (``synchronous_commit = off``): read models are derived, and a server crash can only
  lose their last few commits whole (data and tracking row together), which the runner then
  applies again. A runner's commit costs no fsync wait, so its step is shorter.

Foreign exceptions are translated here: anything the driver raises becomes ``ReadDBError``.
"""

from __future__ import annotations

import sqlite3
import threading
import time
from abc import ABC, abstractmethod
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import orjson

from projections.sql import Dialect, Param, Renderer, Rows, Statement, plain

Row = dict[str, Any]
"""A result row by column name, values made plain (``projections.sql.plain``)."""


class ReadDBError(Exception):
    """The read-model database failed (connection, constraint, syntax)."""


@dataclass(frozen=True, slots=True)
class ReadDBConfig:
    """A SQLite file, or a Postgres URL with the schema the tables go in."""

    sqlite_path: Path | None = None
    database_url: str | None = None
    schema: str | None = None


class Tx(ABC):
    """A write transaction: statements run in order, all or nothing."""

    @abstractmethod
    def execute(self, sql: str, params: Sequence[Param] = ()) -> int:
        """Run rendered ``sql``; returns the affected row count."""

    @abstractmethod
    def query(self, sql: str, params: Sequence[Param] = ()) -> list[Row]:
        """Run a rendered query inside the transaction."""

    @abstractmethod
    def counts(self, stmts: Sequence[tuple[str, Sequence[Param]]]) -> list[int]:
        """Run rendered statements in order (one round trip); their affected row counts."""

    def run(self, stmts: Sequence[Statement], render: Renderer) -> None:
        """Run mapping statements, rendered by ``render``, in order."""
        self.run_parts([(stmts, render)])

    @abstractmethod
    def run_parts(self, parts: Sequence[tuple[Sequence[Statement], Renderer]]) -> None:
        """Run each part's statements, rendered by its renderer, in order (one round trip)."""


class ReadDB(ABC):
    """A read-model database. Thread-safe: each thread uses its own connection."""

    dialect: Dialect

    @abstractmethod
    def transaction(self) -> Any:
        """A context manager yielding a ``Tx``; commits on success, rolls back on error."""

    @abstractmethod
    def query(self, sql: str, params: Sequence[Param] = ()) -> list[Row]:
        """Run a rendered read-only query (outside any transaction)."""

    @abstractmethod
    def table_exists(self, tx: Tx, name: str) -> bool:
        """Whether table ``name`` exists (inside ``tx``)."""

    @abstractmethod
    def lock(self, tx: Tx, key: str) -> None:
        """Serialise ``tx`` against other transactions locking ``key`` (until it ends)."""

    @abstractmethod
    def exclusive(self, name: str) -> Any:
        """A context manager holding lock ``name`` of this database while it is open, taken
        without waiting: raise ``Busy`` if another process (or connection) holds it."""

    @abstractmethod
    def held(self, name: str) -> bool:
        """Whether a process holds lock ``name`` of ``exclusive`` now (a status probe; it may
        take the lock for an instant, which ``exclusive`` waits out)."""

    @abstractmethod
    def close(self) -> None:
        """Close every connection."""


class Busy(ReadDBError):
    """``ReadDB.exclusive``: another holds the lock."""


def open_db(cfg: ReadDBConfig) -> ReadDB:
    """The adapter for ``cfg``."""
    if cfg.database_url:
        return PostgresReadDB(cfg.database_url, cfg.schema or "public")
    assert cfg.sqlite_path is not None
    return SQLiteReadDB(cfg.sqlite_path)


def _runs(stmts: Sequence[Statement]) -> Iterator[Rows | tuple[str, list[tuple[Param, ...]]]]:
    """Consecutive ``Stmt`` of the same text grouped, for ``executemany``; ``Rows`` as they are
    (empty ones left out)."""
    current: str | None = None
    batch: list[tuple[Param, ...]] = []
    for s in stmts:
        if isinstance(s, Rows):
            if current is not None:
                yield current, batch
                current, batch = None, []
            if s.rows:
                yield s
            continue
        if s.sql != current:
            if current is not None:
                yield current, batch
            current, batch = s.sql, []
        batch.append(s.params)
    if current is not None:
        yield current, batch


# -- SQLite ---------------------------------------------------------------------------------


class _SQLiteTx(Tx):
    def __init__(self, conn: sqlite3.Connection) -> None:
        self.conn = conn

    def execute(self, sql: str, params: Sequence[Param] = ()) -> int:
        try:
            return self.conn.execute(sql, tuple(params)).rowcount
        except sqlite3.Error as exc:
            raise ReadDBError(f"{exc} in {sql[:200]}") from exc

    def query(self, sql: str, params: Sequence[Param] = ()) -> list[Row]:
        return _sqlite_rows(self.conn, sql, params)

    def counts(self, stmts: Sequence[tuple[str, Sequence[Param]]]) -> list[int]:
        return [self.execute(sql, params) for sql, params in stmts]

    def run_parts(self, parts: Sequence[tuple[Sequence[Statement], Renderer]]) -> None:
        for stmts, render in parts:
            for run in _runs(stmts):
                if isinstance(run, Rows):
                    text, batch = render.rows(run), run.rows
                else:
                    text, batch = render(run[0]), run[1]
                try:
                    if len(batch) == 1:
                        self.conn.execute(text, batch[0])
                    else:
                        self.conn.executemany(text, batch)
                except sqlite3.Error as exc:
                    raise ReadDBError(f"{exc} in {text[:200]}") from exc


def _sqlite_rows(conn: sqlite3.Connection, sql: str, params: Sequence[Param]) -> list[Row]:
    try:
        cur = conn.execute(sql, tuple(params))
        names = [d[0] for d in cur.description or ()]
        return [dict(zip(names, r, strict=True)) for r in cur.fetchall()]
    except sqlite3.Error as exc:
        raise ReadDBError(f"{exc} in {sql[:200]}") from exc


PROBE_WAIT = 0.5
"""Seconds ``SQLiteReadDB.exclusive`` tries for its lock file before ``Busy``: ``held`` takes
it shared for an instant."""

WAL_ATTEMPTS = 100
"""Tries to switch a new file to WAL while other processes hold it (about 5 s in all)."""


def _use_wal(conn: sqlite3.Connection) -> None:
    """Put the file in WAL mode (persistent), waiting out other processes doing the same.

    Changing the journal mode answers "database is locked" at once, without the busy
    timeout, while another connection holds the file (two workers starting together).
    """
    for attempt in range(WAL_ATTEMPTS):
        try:
            mode = conn.execute("PRAGMA journal_mode").fetchone()[0]
            if str(mode).lower() != "wal":
                conn.execute("PRAGMA journal_mode=WAL")
            return
        except sqlite3.OperationalError as exc:
            if "locked" not in str(exc) or attempt == WAL_ATTEMPTS - 1:
                raise
            time.sleep(0.05)


def _lower(value: Any) -> Any:
    return value.lower() if isinstance(value, str) else value


class SQLiteReadDB(ReadDB):
    """Read models in a SQLite file (WAL; one connection per thread)."""

    dialect = Dialect.SQLITE

    def __init__(self, path: Path) -> None:
        self.path = path
        path.parent.mkdir(parents=True, exist_ok=True)
        self._local = threading.local()
        self._all: list[sqlite3.Connection] = []
        self._lock = threading.Lock()
        self._closed = False

    def _lock_file(self, name: str) -> Path:
        return self.path.with_name(f"{self.path.name}.{name}.lock")

    @contextmanager
    def exclusive(self, name: str) -> Iterator[None]:
        # A lock file beside the database; the kernel releases it when the process dies.
        import fcntl

        with open(self._lock_file(name), "a") as f:
            deadline = time.monotonic() + PROBE_WAIT
            while True:
                try:
                    fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
                    break
                except BlockingIOError:
                    if time.monotonic() > deadline:
                        raise Busy(f"{name} is held by another process") from None
                    time.sleep(0.01)
            yield

    def held(self, name: str) -> bool:
        import fcntl

        path = self._lock_file(name)
        if not path.exists():
            return False  # no replay ever ran here (the file is never removed)
        with open(path, "rb") as f:
            try:
                fcntl.flock(f, fcntl.LOCK_SH | fcntl.LOCK_NB)
            except BlockingIOError:
                return True
            fcntl.flock(f, fcntl.LOCK_UN)
            return False

    def _conn(self) -> sqlite3.Connection:
        conn: sqlite3.Connection | None = getattr(self._local, "conn", None)
        if conn is None:
            if self._closed:
                raise ReadDBError("read-model database is closed")
            try:
                conn = sqlite3.connect(
                    self.path, isolation_level=None, check_same_thread=False, timeout=30
                )
                _use_wal(conn)
                conn.execute("PRAGMA synchronous=NORMAL")
                conn.create_function("lower", 1, _lower, deterministic=True)
            except sqlite3.Error as exc:
                raise ReadDBError(str(exc)) from exc
            self._local.conn = conn
            with self._lock:
                self._all.append(conn)
        return conn

    @contextmanager
    def transaction(self) -> Iterator[Tx]:
        conn = self._conn()
        try:
            conn.execute("BEGIN IMMEDIATE")
        except sqlite3.Error as exc:
            raise ReadDBError(str(exc)) from exc
        try:
            yield _SQLiteTx(conn)
        except BaseException:
            conn.rollback()
            raise
        try:
            conn.commit()
        except sqlite3.Error as exc:
            raise ReadDBError(str(exc)) from exc

    def query(self, sql: str, params: Sequence[Param] = ()) -> list[Row]:
        return _sqlite_rows(self._conn(), sql, params)

    def table_exists(self, tx: Tx, name: str) -> bool:
        rows = tx.query(
            "SELECT 1 AS x FROM sqlite_master WHERE type = 'table' AND name = ?", (name,)
        )
        return bool(rows)

    def lock(self, tx: Tx, key: str) -> None:
        """``BEGIN IMMEDIATE`` already holds the database's write lock."""

    def close(self) -> None:
        with self._lock:
            self._closed = True
            conns, self._all = self._all, []
        for conn in conns:
            conn.close()


# -- Postgres -------------------------------------------------------------------------------


class _PostgresTx(Tx):
    def __init__(self, conn: Any) -> None:
        self.conn = conn

    def execute(self, sql: str, params: Sequence[Param] = ()) -> int:
        import psycopg

        try:
            cur = self.conn.execute(sql, tuple(params))
            return int(cur.rowcount)
        except psycopg.Error as exc:
            raise ReadDBError(f"{exc} in {sql[:200]}") from exc

    def query(self, sql: str, params: Sequence[Param] = ()) -> list[Row]:
        return _pg_rows(self.conn, sql, params)

    def counts(self, stmts: Sequence[tuple[str, Sequence[Param]]]) -> list[int]:
        import psycopg

        try:
            with self.conn.pipeline():
                cursors = [self.conn.execute(sql, tuple(params)) for sql, params in stmts]
            return [int(c.rowcount) for c in cursors]
        except psycopg.Error as exc:
            raise ReadDBError(str(exc)) from exc

    def run_parts(self, parts: Sequence[tuple[Sequence[Statement], Renderer]]) -> None:
        import psycopg

        if not any(stmts for stmts, _ in parts):
            return
        try:
            # One round trip for the whole page instead of one per statement.
            with self.conn.pipeline(), self.conn.cursor() as cur:
                for stmts, render in parts:
                    for run in _runs(stmts):
                        if isinstance(run, Rows):
                            # The whole set as one JSON array (``$rows`` unpacks it).
                            cur.execute(render.rows(run), (orjson.dumps(run.rows).decode(),))
                        elif len(run[1]) == 1:
                            cur.execute(render(run[0]), run[1][0])
                        else:
                            cur.executemany(render(run[0]), run[1])
        except (psycopg.Error, orjson.JSONEncodeError) as exc:
            raise ReadDBError(str(exc)) from exc


def _pg_rows(conn: Any, sql: str, params: Sequence[Param]) -> list[Row]:
    import psycopg

    try:
        cur = conn.execute(sql, tuple(params))
        if cur.description is None:
            return []
        names = [d.name for d in cur.description]
        return [{k: plain(v) for k, v in zip(names, r, strict=True)} for r in cur.fetchall()]
    except psycopg.Error as exc:
        raise ReadDBError(f"{exc} in {sql[:200]}") from exc


class PostgresReadDB(ReadDB):
    """Read models in a Postgres schema (one autocommit connection per thread)."""

    dialect = Dialect.POSTGRES

    def __init__(self, url: str, schema: str) -> None:
        self.url = url
        self.schema = schema
        self._local = threading.local()
        self._all: list[Any] = []
        self._lock = threading.Lock()
        self._closed = False

    def _conn(self) -> Any:
        import psycopg
        from psycopg import sql

        conn = getattr(self._local, "conn", None)
        if conn is not None and (conn.closed or conn.broken):
            conn = None
        if conn is None:
            if self._closed:
                raise ReadDBError("read-model database is closed")
            try:
                conn = psycopg.connect(self.url, autocommit=True, connect_timeout=5)
                conn.execute(sql.SQL("SET search_path TO {}").format(sql.Identifier(self.schema)))
                conn.execute("SET TIME ZONE 'UTC'")
                conn.execute("SET synchronous_commit TO off")
            except psycopg.Error as exc:
                raise ReadDBError(str(exc)) from exc
            self._local.conn = conn
            with self._lock:
                self._all.append(conn)
        return conn

    @contextmanager
    def transaction(self) -> Iterator[Tx]:
        import psycopg

        conn = self._conn()
        try:
            with conn.transaction():
                yield _PostgresTx(conn)
        except psycopg.Error as exc:
            raise ReadDBError(str(exc)) from exc

    def query(self, sql: str, params: Sequence[Param] = ()) -> list[Row]:
        return _pg_rows(self._conn(), sql, params)

    def table_exists(self, tx: Tx, name: str) -> bool:
        rows = tx.query(
            "SELECT 1 AS x FROM information_schema.tables"
            " WHERE table_schema = current_schema() AND table_name = %s",
            (name,),
        )
        return bool(rows)

    def lock(self, tx: Tx, key: str) -> None:
        tx.query("SELECT pg_advisory_xact_lock(hashtext(%s)) AS x", (key,))

    @contextmanager
    def exclusive(self, name: str) -> Iterator[None]:
        # A session lock on a connection of its own, held until it closes (or its process
        # dies: the server then ends the session and frees the lock).
        import psycopg

        key = f"{self.schema}:{name}"
        try:
            conn = psycopg.connect(self.url, autocommit=True, connect_timeout=5)
        except psycopg.Error as exc:
            raise ReadDBError(str(exc)) from exc
        with conn:
            row = conn.execute("SELECT pg_try_advisory_lock(hashtext(%s))", (key,)).fetchone()
            if not (row and row[0]):
                raise Busy(f"{name} is held by another process")
            yield

    def held(self, name: str) -> bool:
        # The lock of ``exclusive``, looked up without taking it: a one-bigint advisory lock
        # is listed with the key's high 32 bits as classid and its low ones as objid.
        key = f"{self.schema}:{name}"
        rows = self.query(
            "SELECT count(*) AS n FROM pg_locks WHERE locktype = 'advisory' AND granted"
            " AND objsubid = 1 AND database ="
            " (SELECT oid FROM pg_database WHERE datname = current_database())"
            " AND classid::bigint = (hashtext(%s)::bigint >> 32) & 4294967295"
            " AND objid::bigint = hashtext(%s)::bigint & 4294967295",
            (key, key),
        )
        return int(rows[0]["n"]) > 0

    def close(self) -> None:
        with self._lock:
            self._closed = True
            conns, self._all = self._all, []
        for conn in conns:
            conn.close()
