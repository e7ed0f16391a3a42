"""The hub's two hot Redis connections, spoken directly: a subscriber and a publisher.

Every commit publishes a message per document and every other process reads it. Through
redis-py's asyncio client each message costs 45-63 µs of CPU (published in a pipeline and
read with ``PubSub.get_message``: its retry, timing and parser layers run per message);
here a loop turn's publishes are one write whose replies are counted as they come, and a
read parses every message in the chunk it got. Everything else the hub does (presence
hashes, liveness keys) stays on redis-py.

The protocol is RESP2 (the default; no ``HELLO``): commands are arrays of bulk strings;
replies are simple strings (``+``), errors (``-``), integers (``:``), bulk strings (``$``)
and arrays (``*``). Connection settings come from the URL as redis-py reads it
(``redis.connection.parse_url``): host and port or a unix socket path, username and
password (``AUTH``), ``rediss://`` for TLS.
"""

from __future__ import annotations

import asyncio
import ssl
from typing import Any

from redis.connection import parse_url

CONNECT_TIMEOUT = 2.0
"""Seconds to connect (and authenticate), as the hub's redis-py client allows."""
READ_SIZE = 1 << 16
"""Bytes asked of the socket per read."""
BACKLOG_BYTES = 1 << 16
"""Send-buffer bytes above which a writer should ``drain`` (asyncio's default high-water)."""


class RespError(Exception):
    """An error reply, or a connection that broke or spoke something else than RESP."""


class _Incomplete(Exception):
    """The buffer ends inside a reply."""


def command(*args: str | bytes) -> bytes:
    """One command as RESP (an array of bulk strings)."""
    parts = [b"*%d\r\n" % len(args)]
    for a in args:
        b = a.encode() if isinstance(a, str) else a
        parts.append(b"$%d\r\n" % len(b))
        parts.append(b)
        parts.append(b"\r\n")
    return b"".join(parts)


def _parse(buf: bytes, pos: int) -> tuple[Any, int]:
    """The reply that starts at ``pos`` and where the next one starts."""
    end = buf.find(b"\r\n", pos)
    if end < 0:
        raise _Incomplete
    kind = buf[pos]
    if kind == 36:  # $ bulk string
        n = int(buf[pos + 1:end])
        if n < 0:
            return None, end + 2
        stop = end + 2 + n
        if len(buf) < stop + 2:
            raise _Incomplete
        return buf[end + 2:stop], stop + 2
    if kind == 42:  # * array
        n = int(buf[pos + 1:end])
        pos = end + 2
        if n < 0:
            return None, pos
        items = []
        for _ in range(n):
            item, pos = _parse(buf, pos)
            items.append(item)
        return items, pos
    if kind == 58:  # : integer
        return int(buf[pos + 1:end]), end + 2
    if kind == 43:  # + simple string
        return buf[pos + 1:end].decode(), end + 2
    if kind == 45:  # - error
        return RespError(buf[pos + 1:end].decode(errors="replace")), end + 2
    raise RespError(f"not a RESP reply: {buf[pos:pos + 20]!r}")


class Parser:
    """Replies out of a byte stream fed in arbitrary chunks."""

    def __init__(self) -> None:
        self._buf = b""

    def feed(self, data: bytes) -> list[Any]:
        """Every reply completed by ``data``, in order (error replies as ``RespError``)."""
        buf = self._buf + data if self._buf else data
        out: list[Any] = []
        pos = 0
        try:
            while pos < len(buf):
                reply, pos = _parse(buf, pos)
                out.append(reply)
        except _Incomplete:
            pass
        except ValueError as exc:  # a length or integer that is not a number
            raise RespError(f"not a RESP reply: {exc}") from exc
        self._buf = buf[pos:]
        return out


class Connection:
    """One connection to Redis: ``send`` commands, ``read`` replies as they arrive."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self._reader = reader
        self._writer = writer
        self._parser = Parser()

    @classmethod
    async def open(cls, url: str) -> Connection:
        """Connect (and ``AUTH`` when the URL has a password) within ``CONNECT_TIMEOUT``.

        ``asyncio.timeout``, not ``wait_for``: on 3.11 ``wait_for`` can swallow a
        cancellation that comes as the connection opens, and the hub's reader, cancelled at
        shutdown, would then read on for ever (``projections.follower`` met that bug).
        """
        async with asyncio.timeout(CONNECT_TIMEOUT):
            return await cls._open(url)

    @classmethod
    async def _open(cls, url: str) -> Connection:
        opts = parse_url(url)
        if "path" in opts:
            reader, writer = await asyncio.open_unix_connection(opts["path"])
        else:
            tls = ssl.create_default_context() if url[:7].lower() == "rediss:" else None
            reader, writer = await asyncio.open_connection(
                opts.get("host", "localhost"), int(opts.get("port", 6379)), ssl=tls
            )
        conn = cls(reader, writer)
        password = opts.get("password")
        if password:
            username = opts.get("username")
            conn.send(command("AUTH", *([username] if username else []), password))
            try:
                (reply,) = await conn.read()
            except BaseException:
                conn.close()
                raise
            if isinstance(reply, RespError):
                conn.close()
                raise reply
        return conn

    def send(self, data: bytes) -> None:
        """Queue ``data`` (commands) for writing; never blocks."""
        self._writer.write(data)

    def backlogged(self) -> bool:
        """More is waiting in the send buffer than a ``drain`` lets through at once."""
        return self._writer.transport.get_write_buffer_size() > BACKLOG_BYTES

    async def drain(self) -> None:
        """Wait while the send buffer is over its high-water mark."""
        await self._writer.drain()

    async def read(self) -> list[Any]:
        """The next replies (at least one); ``RespError`` once the connection is gone."""
        while True:
            data = await self._reader.read(READ_SIZE)
            if not data:
                raise RespError("connection closed by the server")
            replies = self._parser.feed(data)
            if replies:
                return replies

    def close(self) -> None:
        """Close the connection (without waiting)."""
        self._writer.close()
