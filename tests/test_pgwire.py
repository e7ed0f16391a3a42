"""The committer's libpq driver (``gateway.pgwire``) against the real PostgreSQL server."""

from __future__ import annotations

import asyncio
import socket
import subprocess
import sys
import threading
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import psycopg
import pytest

from gateway import pgarrays
from gateway.pgwire import Wire

pytestmark = pytest.mark.postgres
ROOT = Path(__file__).resolve().parents[1]


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


class _StallingProxy:
    """A TCP relay to PostgreSQL that can stop reading from the client (``stall``), then
    end the client's side with a FIN (``half_close``): a peer that closes while a send to it
    is blocked."""

    def __init__(self, port: int) -> None:
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.port = self.listener.getsockname()[1]
        self.stall = threading.Event()
        self.pairs: list[tuple[socket.socket, socket.socket]] = []
        self._target = port
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        while True:
            try:
                client, _ = self.listener.accept()
            except OSError:
                return
            server = socket.create_connection(("127.0.0.1", self._target))
            self.pairs.append((client, server))
            threading.Thread(target=self._pump, args=(client, server, True), daemon=True).start()
            threading.Thread(target=self._pump, args=(server, client, False), daemon=True).start()

    def _pump(self, src: socket.socket, dst: socket.socket, from_client: bool) -> None:
        try:
            while True:
                if from_client and self.stall.is_set():
                    time.sleep(0.02)
                    continue
                data = src.recv(1 << 16)
                if not data:
                    return
                dst.sendall(data)
        except OSError:
            return

    def half_close(self) -> None:
        self.pairs[-1][0].shutdown(socket.SHUT_WR)

    def close(self) -> None:
        self.listener.close()
        for a, b in self.pairs:
            a.close()
            b.close()


async def _send_ended_by_peer(pg_url: str) -> None:
    """A 16 MB parameter is being sent when the peer stops reading and half-closes: the
    send fails at once, and the socket numbers the loop watches stay consistent."""
    proxy = _StallingProxy(psycopg.conninfo.conninfo_to_dict(pg_url).get("port") or 5432)
    url = f"postgresql://postgres@127.0.0.1:{proxy.port}/postgres"
    conn = await psycopg.AsyncConnection.connect(url, autocommit=True)
    wire = Wire(conn)
    try:
        await wire.simple(b"SELECT 1")
        proxy.stall.set()
        sending = asyncio.ensure_future(wire.prepared(
            b"big", b"SELECT 1 FROM unnest($1::bytea[])", [pgarrays.byteas([b"x" * (16 << 20)])]
        ))
        await asyncio.sleep(0.5)
        assert not sending.done()  # blocked: the proxy reads nothing
        proxy.half_close()
        with pytest.raises(psycopg.OperationalError):
            await asyncio.wait_for(sending, 3)
        wire.close()
        # the loop still serves new sockets, whatever number they get
        server = await asyncio.start_server(lambda r, w: w.close(), "127.0.0.1", 0)
        reader, writer = await asyncio.open_connection(*server.sockets[0].getsockname()[:2])
        assert await asyncio.wait_for(reader.read(), 2) == b""
        writer.close()
        server.close()
    finally:
        wire.close()
        proxy.close()
        await conn.close()


@pytest.mark.parametrize("loop", ["asyncio", "uvloop"])
def test_a_send_the_peer_ends_fails_without_harming_the_loop(loop: str, pg_url: str) -> None:
    """A peer that half-closes while a big send to it is blocked fails that send at once,
    with OperationalError; the process lives on (uvloop aborted on a watched socket libpq
    had closed) and its loop keeps serving other sockets. Run in a child process."""
    code = (
        "import asyncio, sys, uvloop; from tests import test_pgwire as t; "
        f"run = uvloop.run if {loop!r} == 'uvloop' else asyncio.run; "
        f"run(t._send_ended_by_peer({pg_url!r})); print('ok')"
    )
    done = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True,
                          text=True, timeout=60)
    assert (done.returncode, done.stdout.strip()) == (0, "ok"), done.stderr[-2000:]
