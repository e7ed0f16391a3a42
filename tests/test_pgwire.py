"""The committer's libpq driver (``gateway.pgwire``) against the real PostgreSQL server."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from typing import Any

import psycopg
import pytest

from gateway import pgarrays
from gateway.pgwire import Wire

pytestmark = pytest.mark.postgres


@pytest.fixture
async def conn(pg_url: str) -> AsyncIterator[psycopg.AsyncConnection[Any]]:
    c = await psycopg.AsyncConnection.connect(pg_url, autocommit=True)
    yield c
    await c.close()


@pytest.fixture
async def wire(conn: psycopg.AsyncConnection[Any]) -> AsyncIterator[Wire]:
    w = Wire(conn)
    yield w
    w.close()


async def _other(pg_url: str, query: str, *args: Any) -> Any:
    async with await psycopg.AsyncConnection.connect(pg_url, autocommit=True) as other:
        return await (await other.execute(query, args)).fetchall()


async def test_simple_returns_each_statements_result(wire: Wire) -> None:
    """A simple query of several statements gives one result per statement, in text."""
    begin, rows, end = await wire.simple(
        b"BEGIN; SELECT n, 'x' || n FROM generate_series(1, 3) n; COMMIT"
    )
    assert rows.ntuples == 3
    assert [(rows.get_value(i, 0), rows.get_value(i, 1)) for i in range(3)] == [
        (b"1", b"x1"), (b"2", b"x2"), (b"3", b"x3")]
    assert begin.command_status == b"BEGIN" and end.command_status == b"COMMIT"


async def test_a_failed_statement_raises_the_error_of_its_sqlstate(wire: Wire) -> None:
    """The server's error becomes psycopg's exception for its SQLSTATE, and the connection
    goes on answering once the failed transaction is rolled back."""
    with pytest.raises(psycopg.errors.DivisionByZero):
        await wire.simple(b"SELECT 1 / 0")
    await wire.simple(b"CREATE TEMP TABLE t (k int PRIMARY KEY); INSERT INTO t VALUES (1)")
    with pytest.raises(psycopg.IntegrityError) as caught:
        await wire.simple(b"BEGIN; INSERT INTO t VALUES (1)")
    assert caught.value.sqlstate == "23505"
    await wire.simple(b"ROLLBACK")
    (result,) = await wire.simple(b"SELECT count(*) FROM t")
    assert result.get_value(0, 0) == b"1"


async def test_prepared_is_prepared_once_per_connection(wire: Wire) -> None:
    """A prepared statement is prepared on first use, then only executed; binary array
    parameters reach the server intact."""
    query = b"SELECT array_length($1::bigint[], 1), $2::text[]"
    for n in (3, 1, 2):
        values = list(range(n))
        result = await wire.prepared(b"q", query, [pgarrays.int8s(values),
                                                   pgarrays.texts(["a", "é"])])
        assert result.get_value(0, 0) == str(n).encode()
        assert result.get_value(0, 1) == "{a,é}".encode()
    (names,) = await wire.simple(b"SELECT count(*) FROM pg_prepared_statements")
    assert names.get_value(0, 0) == b"1"


@pytest.mark.slow
async def test_a_parameter_bigger_than_the_socket_buffer_is_sent_whole(wire: Wire) -> None:
    """A commit of tens of MB waits for the socket to take it all (the writable wait)."""
    states = [bytes([i % 251]) * (1 << 20) for i in range(40)]
    result = await wire.prepared(
        b"big", b"SELECT sum(length(s)) FROM unnest($1::bytea[]) s", [pgarrays.byteas(states)]
    )
    assert result.get_value(0, 0) == str(40 << 20).encode()


async def test_a_connection_the_server_ends_while_idle_is_found_broken(
    conn: psycopg.AsyncConnection[Any], wire: Wire, pg_url: str
) -> None:
    """The server ending an idle session is seen from the loop (no busy reader), and the
    next query fails with OperationalError."""
    await _other(pg_url, "SELECT pg_terminate_backend(%s)", conn.pgconn.backend_pid)
    for _ in range(100):
        if wire.broken:
            break
        await asyncio.sleep(0.01)
    assert wire.broken
    with pytest.raises(psycopg.OperationalError):
        await wire.simple(b"SELECT 1")


async def test_close_ends_a_wait_in_progress(wire: Wire) -> None:
    """Closing the wire while a query is awaited ends that wait with OperationalError."""
    waiting = asyncio.ensure_future(wire.simple(b"SELECT pg_sleep(5)"))
    await asyncio.sleep(0.1)
    wire.close()
    with pytest.raises(psycopg.OperationalError):
        await waiting
    assert wire.broken
    with pytest.raises(psycopg.OperationalError):
        await wire.simple(b"SELECT 1")
