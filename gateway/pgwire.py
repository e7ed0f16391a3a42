"""The committer's round trips, driven on the connection's libpq handle (``psycopg.pq``).

A commit tick sends two or three statements, hundreds of ticks a second, and each round
trip through psycopg's ``AsyncConnection`` costs the loop ~70 µs of CPU: a cursor, the
query's conversion, a generator-driven wait, and a reader added to and removed from the loop
around every wait. Driven here, with the reader registered once for the connection's life,
the same round trip costs ~30 µs (measured: ``SELECT 1``, 3,000 in a row, 66–73 against
28–32 µs of thread CPU). psycopg still makes the connection (``connect``, its timeouts and
options) and closes it; libpq does the protocol.

Usage protocol: one ``Wire`` per connection, made right after it is connected, and from
then on the only thing that sends on it or waits for it until ``close``. One round trip at a
time (the caller awaits each). An error from the server raises the psycopg exception its
SQLSTATE maps to (``psycopg.errors``); any exception, a cancelled wait included, leaves the
connection in an unknown state, and the caller closes it and connects again.

libpq closes the socket itself when it finds the connection dead, in any call, and a
closed descriptor the loop still watches is fatal at the loop's next turn (libuv aborts the
process when it re-arms it; asyncio's selector keeps a number the next socket may get). So
the wire stops watching (``close``) the moment a libpq call fails or leaves the connection
bad, before anything else can run; and libpq is never called while the socket is watched
for writing: a readable socket during a send only wakes the send, which stops watching for
writing before it calls libpq again.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Callable, Sequence
from typing import Any

import psycopg
from psycopg import errors, pq

from gateway.pgarrays import PgArray

_FAILED = (pq.ExecStatus.FATAL_ERROR, pq.ExecStatus.BAD_RESPONSE, pq.ExecStatus.NONFATAL_ERROR)


class Wire:
    """Simple and prepared queries on one connection, awaited on its event loop."""

    def __init__(self, conn: psycopg.AsyncConnection[Any]) -> None:
        self._pg = conn.pgconn
        self._encoding = conn.info.encoding
        self._fd = self._pg.socket
        self._loop = asyncio.get_running_loop()
        self._waiter: asyncio.Future[None] | None = None
        """The wait in progress, for readable data or (``_writing``) for room to send."""
        self._writing = False
        self._prepared: set[bytes] = set()
        self._closed = False
        self._loop.add_reader(self._fd, self._readable)

    @property
    def broken(self) -> bool:
        """The connection can no longer be used (closed, or libpq found it bad)."""
        return self._closed or self._pg.status != pq.ConnStatus.OK

    def close(self) -> None:
        """Stop watching the socket (before the connection is closed); a wait in progress
        fails with OperationalError. Idempotent."""
        if not self._closed:
            self._closed = True
            if self._writing:
                self._writing = False
                self._loop.remove_writer(self._fd)
            self._loop.remove_reader(self._fd)
        waiter = self._waiter
        if waiter is not None and not waiter.done():
            waiter.set_exception(psycopg.OperationalError("the connection was closed"))

    async def simple(self, query: bytes) -> list[pq.abc.PGresult]:
        """Send ``query`` (one or more statements, the simple protocol: text results) and
        return every statement's result; the first failed one raises."""
        self._check_open()
        self._guard(self._pg.send_query, query)
        return await self._results()

    async def prepared(
        self, name: bytes, query: bytes, params: Sequence[PgArray]
    ) -> pq.abc.PGresult:
        """Run ``query`` (``$1``… placeholders) as the prepared statement ``name``, its
        parameters binary arrays, its result in text; prepared on this connection the
        first time (one round trip more, once)."""
        self._check_open()
        pg = self._pg
        if name not in self._prepared:
            self._guard(pg.send_prepare, name, query, param_types=[p.oid for p in params])
            await self._results()
            self._prepared.add(name)
        self._guard(pg.send_query_prepared, name, [p.data for p in params],
                    param_formats=[1] * len(params))
        (result,) = await self._results()
        return result

    def _check_open(self) -> None:
        if self._closed:
            raise psycopg.OperationalError("the connection was closed")

    def _guard(self, call: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
        """``call`` (a libpq call); if it fails, stop watching the socket it may have
        closed before the failure goes any further."""
        try:
            return call(*args, **kwargs)
        except psycopg.Error:
            self.close()
            raise

    async def _results(self) -> list[pq.abc.PGresult]:
        pg = self._pg
        guard = self._guard
        while guard(pg.flush):  # a big commit: wait until the socket takes the rest
            await self._writable()
        results: list[pq.abc.PGresult] = []
        while True:
            while pg.is_busy():
                await self._wait()
                guard(pg.consume_input)
            result = guard(pg.get_result)
            if result is None:
                break
            results.append(result)
        if pg.status != pq.ConnStatus.OK:  # an error result for a connection libpq dropped
            self.close()
        for result in results:
            if result.status in _FAILED:
                raise errors.error_from_result(result, encoding=self._encoding)
        return results

    async def _wait(self) -> None:
        waiter = self._waiter = self._loop.create_future()
        try:
            await waiter
        finally:
            self._waiter = None

    async def _writable(self) -> None:
        self._check_open()
        waiter = self._waiter = self._loop.create_future()
        self._writing = True
        self._loop.add_writer(self._fd, self._wake)
        try:
            await waiter
        finally:
            self._waiter = None
            if self._writing:  # not already undone by close()
                self._writing = False
                self._loop.remove_writer(self._fd)

    def _wake(self) -> None:
        waiter = self._waiter
        if waiter is not None and not waiter.done():
            waiter.set_result(None)

    def _readable(self) -> None:
        waiter = self._waiter
        if waiter is not None:  # a read, or a send the server answered (or ended): wake it
            if not waiter.done():
                waiter.set_result(None)
            return
        # Nothing is awaited: read what came (a notice, or the server ending the session)
        # so that a level-triggered reader does not fire again and again; a dead socket
        # stops it for good (the guard closes the wire; nobody waits to be told).
        with contextlib.suppress(psycopg.Error):
            self._guard(self._pg.consume_input)
