"""The committer's writes to PostgreSQL, on the event loop.

The connection is psycopg's (``AsyncConnection``: connect, its timeouts and options,
close); its round trips are driven on its libpq handle by ``gateway.pgwire``, at well under
half psycopg's CPU per round trip. A commit is one statement in its own transaction: the
server-side function of
``gateway.recorders`` (``coscribe_append``: the library's table lock and NOTIFY, then the
checked insert) writes into the library's own table the events as the library's mapper
stores them (``gateway.store.EventEncoder``), sent as binary arrays (``gateway.pgarrays``).

Why not that thread: its work is Python (it holds the GIL whenever it runs), so it buys no
parallelism, and each time it comes back from the database it waits for the loop thread to
let go of the GIL (up to the interpreter's 5 ms switch interval, several times per commit).
Measured on the standard load: ~22 ms of wall time per commit in the thread, most of it
that wait. Here the loop goes on serving sessions while the database works, and the
result is handled the moment it arrives.

One connection, one commit at a time (the committer awaits each). A broken connection is
replaced once per commit; a database that does not answer fails the commit within
``COMMIT_TIMEOUT`` as ``StoreUnavailable`` (nothing was acked; clients resend with their
``seq``, and ``coscribe_client_ops`` keeps a resend of a commit that did land from being
applied twice).
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Sequence
from typing import Any
from uuid import UUID

import psycopg
from eventsourcing.persistence import Recording

from gateway.pgwire import Wire
from gateway.recorders import STATEMENT_TIMEOUT, ClientOp, EventRow, PostgresClientOpsRecorder
from gateway.store import (
    EventDecoder,
    EventEncoder,
    Store,
    StoreRefused,
    StoreUnavailable,
    VersionConflict,
    conflicting_doc,
    recordings_of,
)

log = logging.getLogger(__name__)

CONNECT_TIMEOUT = 2.0
"""Seconds to (re)connect, as the library's pool uses (``POSTGRES_CONNECT_TIMEOUT``)."""
COMMIT_TIMEOUT = 10.0
"""Longest wait for one commit's round trip before it counts as failed."""
SERVER_LIMITS = (
    f"-c statement_timeout={int(STATEMENT_TIMEOUT * 1000)}"
    f" -c idle_in_transaction_session_timeout={int(COMMIT_TIMEOUT * 1000)}"
    " -c bytea_output=hex"
)
"""The connection's own bounds, so that the server ends a commit (and releases the table
lock) that this process gave up on or can no longer finish (stopped, cut off): a statement
after ``STATEMENT_TIMEOUT``, a ``begin_locked`` transaction left idle after
``COMMIT_TIMEOUT``. Closing the connection does not stop a statement that is running."""
APPEND = b"coscribe_append"
"""Name of the checked insert's prepared statement on the writer's connection."""
MISSED_LIMIT = 1000
"""Most missed events read per document under the lock (a room further behind re-reads)."""


class AsyncWriter:
    """Checked group commits of ``store``'s events over one asyncio connection."""

    def __init__(self, store: Store) -> None:
        recorder = store.writer_recorder
        assert isinstance(recorder, PostgresClientOpsRecorder)
        assert store.cfg.database_url is not None
        self._store = store
        self._recorder = recorder
        self._mapper = store.writer_mapper
        self._encoder = EventEncoder(self._mapper)
        self._decoder = EventDecoder(self._mapper)
        self._url = store.cfg.database_url
        self._conn: psycopg.AsyncConnection[tuple[Any, ...]] | None = None
        self._wire: Wire | None = None
        self._locked = False

    async def close(self) -> None:
        """Close the connection (after the last commit)."""
        await self._discard()

    async def begin_locked(self, heads: dict[UUID, int]) -> dict[UUID, list[Any]]:
        """Open a transaction holding the table lock; return the events after each head.

        For documents other processes write too: under the lock (which every writer of the
        table takes) nobody can append, so once the caller has applied what it missed it
        prepares on the true head and its commit cannot conflict. ``save_checked(...,
        locked=True)`` then commits; ``abort`` ends the transaction without writing.
        """
        try:
            # asyncio.timeout, not wait_for: on 3.11 wait_for runs the coroutine as a task of
            # its own, and its result reaches this task one loop turn later, with the
            # table lock held (measured: 1-1.7 ms of a 6-11 ms locked tick).
            async with asyncio.timeout(COMMIT_TIMEOUT):
                rows = await self._begin(self._recorder.begin_missed(heads, MISSED_LIMIT))
        except TimeoutError as exc:  # an OSError too: first
            await self._discard()
            raise StoreUnavailable(
                f"could not lock the event table: no answer in {COMMIT_TIMEOUT} s") from exc
        except (psycopg.Error, OSError) as exc:
            await self._discard()
            raise StoreUnavailable(f"could not lock the event table: {exc}") from exc
        self._locked = True
        missed: dict[UUID, list[Any]] = {}
        decoded = self._decoder.decode(rows)
        for _, event in decoded:
            missed.setdefault(event.originator_id, []).append(event)
        return missed

    async def _begin(self, query: bytes) -> list[EventRow]:
        wire = await self._connection()
        _, result = await wire.simple(query)  # BEGIN; SELECT ...: the second is the rows
        return missed_rows(result)

    @property
    def backend_pid(self) -> int | None:
        """The PostgreSQL backend serving the connection, once there is one (diagnostics:
        ``ops.bench.tick`` reads its CPU)."""
        conn = self._conn
        return None if conn is None or conn.closed else conn.pgconn.backend_pid

    @property
    def in_transaction(self) -> bool:
        """A ``begin_locked`` transaction is open (holding the table lock)."""
        return self._locked

    async def abort(self) -> None:
        """End the transaction of ``begin_locked`` without writing anything."""
        if not self._locked:
            return
        self._locked = False
        wire = self._wire
        try:
            if wire is not None and not wire.broken:
                async with asyncio.timeout(COMMIT_TIMEOUT):
                    await wire.simple(b"ROLLBACK")
                return
        except (psycopg.Error, OSError, TimeoutError):
            log.info("rollback of the locked transaction failed; dropping the connection")
        await self._discard()

    async def save_checked(
        self,
        events: Sequence[Any],
        client_ops: Sequence[ClientOp],
        heads: dict[UUID, int],
        *,
        locked: bool = False,
    ) -> tuple[list[Recording[UUID]], set[UUID]]:
        """Append the events of the documents whose head is still ``heads[doc]``.

        Returns the recordings of what was appended and the ids of the stale documents
        (another process moved their head; nothing of theirs was written).

        ``locked``: inside the transaction of ``begin_locked`` (which this commits).
        """
        assert locked == self._locked, "locked commits go with begin_locked"
        t0 = time.perf_counter()
        # Encoding may raise (a value the columns cannot hold): the transaction is then
        # still open, and ``in_transaction`` says so, for the caller to ``abort``.
        columns = self._encoder.columns(events)
        params = self._recorder.checked_params(columns, client_ops, heads)
        self._locked = False
        t1 = time.perf_counter()
        try:
            async with asyncio.timeout(COMMIT_TIMEOUT):
                row = await self._run(params, locked)
        except psycopg.IntegrityError as exc:
            await self._discard()  # the transaction failed: closing rolls it back
            raise VersionConflict(str(exc), conflicting_doc(exc)) from exc
        except psycopg.DataError as exc:  # one room's value, not the database: isolate it
            await self._discard()
            raise StoreRefused(str(exc)) from exc
        except TimeoutError as exc:  # an OSError too: first
            await self._discard()
            raise StoreUnavailable(f"no answer from the database in {COMMIT_TIMEOUT} s") from exc
        except (psycopg.Error, OSError) as exc:
            await self._discard()
            raise StoreUnavailable(str(exc)) from exc
        self._store.encode_seconds += t1 - t0
        self._store.insert_seconds += time.perf_counter() - t1
        ids, stale = self._recorder.checked_result(*row)
        return recordings_of(events, columns, ids, stale), stale

    async def _run(self, params: tuple[Any, ...], locked: bool) -> Any:
        """The commit; a connection found broken is replaced and the commit sent again once.

        Sending again is safe: if the first attempt did commit, the head check finds those
        documents moved and leaves them out as stale (they re-read and find their ops).
        Inside a locked transaction there is nothing to resend: a lost connection lost it.
        """
        try:
            return await self._attempt(params, locked)
        except (psycopg.OperationalError, psycopg.InterfaceError) as exc:
            if locked or (self._wire is not None and not self._wire.broken):
                raise
            log.info("writer connection lost (%s); reconnecting", exc)
            await self._discard()
            return await self._attempt(params, False)

    async def _attempt(self, params: tuple[Any, ...], locked: bool) -> Any:
        if locked and (self._wire is None or self._wire.broken):
            # The server ended the locked transaction (seen while idle): a new connection
            # would append without the lock and the catch-up it was prepared on.
            raise psycopg.OperationalError("the connection holding the table lock was lost")
        wire = await self._connection()
        # Outside a locked transaction the statement is its own (autocommit).
        result = await wire.prepared(APPEND, self._recorder.checked_insert_numbered, params)
        if locked:
            await wire.simple(b"COMMIT")
        return checked_row(result)

    async def _connection(self) -> Wire:
        wire = self._wire
        if wire is None or wire.broken:
            await self._discard()
            conn = self._conn = await psycopg.AsyncConnection.connect(
                self._url, autocommit=True, connect_timeout=CONNECT_TIMEOUT,
                options=SERVER_LIMITS,
            )
            wire = self._wire = Wire(conn)
        return wire

    async def _discard(self) -> None:
        self._locked = False
        wire, self._wire = self._wire, None
        if wire is not None:
            wire.close()
        conn, self._conn = self._conn, None
        if conn is not None:
            try:
                await conn.close()
            except Exception:  # closing a broken connection may raise; it is gone either way
                log.debug("closing the writer connection failed", exc_info=True)


def missed_rows(result: Any) -> list[EventRow]:
    """The lock read's rows, from their text form (the simple protocol's): ``(0, originator
    id, version, topic, state)``, as ``EventDecoder.decode`` takes them."""
    get = result.get_value
    rows: list[EventRow] = []
    for i in range(result.ntuples):
        state = get(i, 3)
        rows.append((0, UUID(get(i, 0).decode()), int(get(i, 1)), get(i, 2).decode(),
                     bytes.fromhex(state[2:].decode())))  # bytea's text: \x then hex
    return rows


def checked_row(result: Any) -> tuple[list[bytes], list[str]]:
    """``coscribe_append``'s ``(ids, stale)`` from their text arrays (NULL when empty), for
    ``PostgresClientOpsRecorder.checked_result``."""
    ids, stale = result.get_value(0, 0), result.get_value(0, 1)
    return (
        ids[1:-1].split(b",") if ids else [],
        stale[1:-1].decode().split(",") if stale else [],
    )
