"""A minimal keep-alive HTTP/1.1 client for closed-loop reads: cheap per request.

The load generator must spend less per request than the server it measures; a general
client spends several times a cached read's server cost. Here :class:`ResponseParser`
(sans-I/O: bytes in, ``(status, body length)`` out, Content-Length, chunked or
until-close bodies) and :class:`HttpConnection` (an ``asyncio.Protocol`` with one request in
flight) do only what a GET loop needs. Bodies are counted, not kept.
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass
from typing import cast

MAX_HEAD_BYTES = 65536
"""Longest response head accepted."""

_HEAD, _BODY, _CHUNK_SIZE, _CHUNK_DATA, _CHUNK_END, _TRAILERS, _UNTIL_CLOSE = range(7)


class HttpError(Exception):
    """The server's response could not be parsed."""


@dataclass(frozen=True, slots=True)
class Response:
    """One response: status, body bytes received, and whether the server closes after it."""

    status: int
    length: int
    close: bool


def request_bytes(method: str, host: str, port: int, path: str, headers: dict[str, str]) -> bytes:
    """An HTTP/1.1 request without a body, for a keep-alive connection."""
    lines = [f"{method} {path} HTTP/1.1", f"Host: {host}:{port}"]
    lines += [f"{k}: {v}" for k, v in headers.items()]
    return ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1")


class ResponseParser:
    """Bytes of a response stream in, :class:`Response` values out, in order."""

    __slots__ = ("_buf", "_close", "_length", "_remaining", "_state", "_status")

    def __init__(self) -> None:
        self._buf = bytearray()
        self._state = _HEAD
        self._status = 0
        self._remaining = 0
        self._length = 0
        self._close = False

    def feed(self, data: bytes) -> list[Response]:
        buf = self._buf
        buf += data
        out: list[Response] = []
        while True:
            state = self._state
            if state == _HEAD:
                end = buf.find(b"\r\n\r\n")
                if end < 0:
                    if len(buf) > MAX_HEAD_BYTES:
                        raise HttpError("response head too long")
                    break
                head = bytes(buf[:end])
                del buf[: end + 4]
                self._start(head, out)
            elif state in (_BODY, _CHUNK_DATA):
                take = min(self._remaining, len(buf))
                if take:
                    del buf[:take]
                    self._remaining -= take
                    self._length += take
                if self._remaining:
                    break
                if state == _BODY:
                    self._emit(out)
                else:
                    self._state = _CHUNK_END
            elif state == _CHUNK_SIZE:
                end = buf.find(b"\r\n")
                if end < 0:
                    break
                try:
                    size = int(bytes(buf[:end]).split(b";", 1)[0], 16)
                except ValueError:
                    raise HttpError("bad chunk size") from None
                del buf[: end + 2]
                if size:
                    self._remaining = size
                    self._state = _CHUNK_DATA
                else:
                    self._state = _TRAILERS
            elif state == _CHUNK_END:
                if len(buf) < 2:
                    break
                del buf[:2]
                self._state = _CHUNK_SIZE
            elif state == _TRAILERS:
                end = buf.find(b"\r\n")
                if end < 0:
                    break
                del buf[: end + 2]
                if end == 0:
                    self._emit(out)
            else:  # _UNTIL_CLOSE
                self._length += len(buf)
                buf.clear()
                break
        return out

    def eof(self) -> Response | None:
        """The connection closed: a body delimited by the close is complete now."""
        if self._state == _UNTIL_CLOSE:
            out: list[Response] = []
            self._emit(out)
            return out[0]
        return None

    def _start(self, head: bytes, out: list[Response]) -> None:
        lines = head.decode("latin-1").split("\r\n")
        parts = lines[0].split(" ", 2)
        if len(parts) < 2 or not parts[0].startswith("HTTP/1.") or not parts[1].isdigit():
            raise HttpError(f"bad status line {lines[0][:60]!r}")
        status = int(parts[1])
        length = None
        chunked = False
        close = parts[0] == "HTTP/1.0"
        for line in lines[1:]:
            name, _, value = line.partition(":")
            name = name.strip().lower()
            value = value.strip().lower()
            if name == "content-length":
                length = int(value)
            elif name == "transfer-encoding":
                chunked = "chunked" in value
            elif name == "connection":
                close = "close" in value
        if 100 <= status < 200:
            return  # interim response: the real one follows
        self._status, self._length, self._close = status, 0, close
        if chunked:
            self._state = _CHUNK_SIZE
        elif length is not None:
            self._remaining = length
            self._state = _BODY
            if length == 0:
                self._emit(out)
        elif status in (204, 304):
            self._emit(out)
        else:
            self._close = True
            self._state = _UNTIL_CLOSE

    def _emit(self, out: list[Response]) -> None:
        out.append(Response(self._status, self._length, self._close))
        self._state = _HEAD
        self._remaining = 0


class HttpConnection(asyncio.Protocol):
    """One keep-alive connection with at most one request in flight. Use :func:`open_connection`."""

    def __init__(self) -> None:
        self.transport: asyncio.Transport | None = None
        self.parser = ResponseParser()
        self.pending: asyncio.Future[Response] | None = None
        self.closed = False

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.Transport, transport)  # uvloop's do not subclass it

    def data_received(self, data: bytes) -> None:
        try:
            responses = self.parser.feed(data)
        except HttpError as exc:
            self._fail(exc)
            return
        for r in responses:
            self._resolve(r)
            if r.close and self.transport is not None:
                self.transport.close()

    def eof_received(self) -> bool | None:
        r = self.parser.eof()
        if r is not None:
            self._resolve(r)
        return None

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = True
        self._fail(exc or ConnectionResetError("connection closed before the response"))

    def _resolve(self, r: Response) -> None:
        fut, self.pending = self.pending, None
        if fut is not None and not fut.done():
            fut.set_result(r)

    def _fail(self, exc: BaseException) -> None:
        fut, self.pending = self.pending, None
        if fut is not None and not fut.done():
            fut.set_exception(exc)
        if self.transport is not None:
            self.transport.abort()

    @property
    def usable(self) -> bool:
        """True while another request may be sent on this connection."""
        return not self.closed and self.transport is not None and not self.transport.is_closing()

    def request(self, raw: bytes) -> asyncio.Future[Response]:
        """Send a request made by :func:`request_bytes`; the future gets its response."""
        if self.pending is not None:
            raise RuntimeError("one request at a time on a connection")
        assert self.transport is not None
        fut: asyncio.Future[Response] = asyncio.get_running_loop().create_future()
        self.pending = fut
        self.transport.write(raw)
        return fut

    def close(self) -> None:
        """Close the connection."""
        if self.transport is not None:
            self.transport.close()


async def open_connection(host: str, port: int) -> HttpConnection:
    """Connect; raises ``OSError``. Bound it with a timeout."""
    loop = asyncio.get_running_loop()
    _, conn = await loop.create_connection(HttpConnection, host, port)
    return conn
