"""A minimal WebSocket client (RFC 6455) for the load generator, cheap per received frame.

Thousands of simulated sessions receive tens of thousands of small frames a second; a
general client resumes a coroutine per message, which costs more than the message. Here a
sans-I/O core (:class:`FrameParser`, :func:`encode_frame`, :func:`handshake_request`,
:func:`check_handshake`) turns bytes into messages, and :class:`WsProtocol`, an
``asyncio.Protocol``, hands every complete data message to a plain callback straight from
``data_received``: no task, no future per frame, sends are a synchronous ``write``.

Scope: client side, plain TCP (the tool only talks to loopback), no extensions (none is
offered, so the server must not use any), ping answered with pong, fragmented messages
reassembled, close handshake with a bounded wait.
"""

from __future__ import annotations

import asyncio
import base64
import hashlib
import os
import random
from collections.abc import Callable
from typing import cast

OP_CONT, OP_TEXT, OP_BINARY, OP_CLOSE, OP_PING, OP_PONG = 0x0, 0x1, 0x2, 0x8, 0x9, 0xA
_GUID = b"258EAFA5-E914-47DA-95CA-C5AB0DC85B11"
MAX_HEADER_BYTES = 16384
"""Longest handshake response accepted."""


class WsError(Exception):
    """The handshake failed or the server broke the framing rules."""


def handshake_request(host: str, port: int, path: str, subprotocol: str) -> tuple[bytes, str]:
    """The HTTP upgrade request and the ``Sec-WebSocket-Key`` it carries."""
    key = base64.b64encode(os.urandom(16)).decode()
    request = (
        f"GET {path} HTTP/1.1\r\n"
        f"Host: {host}:{port}\r\n"
        "Upgrade: websocket\r\n"
        "Connection: Upgrade\r\n"
        f"Sec-WebSocket-Key: {key}\r\n"
        "Sec-WebSocket-Version: 13\r\n"
        f"Sec-WebSocket-Protocol: {subprotocol}\r\n"
        "User-Agent: coscribe-loadtest\r\n"
        "\r\n"
    )
    return request.encode("ascii"), key


def accept_key(key: str) -> str:
    """The ``Sec-WebSocket-Accept`` a server must answer ``key`` with."""
    return base64.b64encode(hashlib.sha1(key.encode() + _GUID).digest()).decode()


def check_handshake(head: bytes, key: str, subprotocol: str) -> None:
    """Validate the response head (status line and headers, without the blank line).

    Raises :class:`WsError` unless it is ``101`` with the right accept key and the
    subprotocol asked for.
    """
    lines = head.decode("latin-1").split("\r\n")
    parts = lines[0].split(" ", 2)
    if len(parts) < 2 or parts[1] != "101":
        raise WsError(f"handshake refused: {lines[0][:80]!r}")
    headers = {}
    for line in lines[1:]:
        name, _, value = line.partition(":")
        headers[name.strip().lower()] = value.strip()
    if headers.get("sec-websocket-accept") != accept_key(key):
        raise WsError("handshake: wrong Sec-WebSocket-Accept")
    chosen = headers.get("sec-websocket-protocol")
    if chosen != subprotocol:
        raise WsError(f"handshake: server chose subprotocol {chosen!r}, not {subprotocol!r}")
    if headers.get("sec-websocket-extensions"):
        raise WsError("handshake: server enabled extensions nobody offered")


def mask(data: bytes, key: bytes) -> bytes:
    """XOR ``data`` with the repeated 4-byte ``key`` (one big-int operation, no Python loop)."""
    n = len(data)
    if not n:
        return b""
    pad = (key * (n // 4 + 1))[:n]
    return (int.from_bytes(data, "little") ^ int.from_bytes(pad, "little")).to_bytes(n, "little")


def encode_frame(opcode: int, payload: bytes, key: bytes | None = None) -> bytes:
    """One final, masked client frame. ``key`` is random when not given."""
    if key is None:
        key = random.randbytes(4)  # masking defeats proxy cache poisoning, not an adversary
    n = len(payload)
    first = 0x80 | opcode
    if n < 126:
        header = bytes((first, 0x80 | n))
    elif n < 1 << 16:
        header = bytes((first, 0x80 | 126)) + n.to_bytes(2, "big")
    else:
        header = bytes((first, 0x80 | 127)) + n.to_bytes(8, "big")
    return header + key + mask(payload, key)


class FrameParser:
    """Bytes in, complete messages out: ``feed(data) -> [(opcode, payload), ...]``.

    Data messages (text, binary) come out reassembled from their fragments; control frames
    (close, ping, pong) as they arrive, even between fragments. Raises :class:`WsError` on
    reserved bits, unknown opcodes or bad fragmentation.
    """

    __slots__ = ("_buf", "_frag_opcode", "_frags")

    def __init__(self) -> None:
        self._buf = bytearray()
        self._frags: list[bytes] = []
        self._frag_opcode = -1

    def feed(self, data: bytes) -> list[tuple[int, bytes]]:
        buf = self._buf
        buf += data
        out: list[tuple[int, bytes]] = []
        pos = 0
        size = len(buf)
        while size - pos >= 2:
            b0 = buf[pos]
            b1 = buf[pos + 1]
            n = b1 & 0x7F
            head = 2
            if n == 126:
                if size - pos < 4:
                    break
                n = int.from_bytes(buf[pos + 2 : pos + 4], "big")
                head = 4
            elif n == 127:
                if size - pos < 10:
                    break
                n = int.from_bytes(buf[pos + 2 : pos + 10], "big")
                head = 10
            masked = b1 & 0x80
            if masked:
                head += 4
            end = pos + head + n
            if end > size:
                break
            payload = bytes(buf[pos + head : end])
            if masked:
                payload = mask(payload, bytes(buf[pos + head - 4 : pos + head]))
            pos = end
            if b0 & 0x70:
                raise WsError("frame with reserved bits set")
            self._take(b0 & 0x80, b0 & 0x0F, payload, out)
        if pos:
            del buf[:pos]
        return out

    def _take(self, fin: int, opcode: int, payload: bytes, out: list[tuple[int, bytes]]) -> None:
        if opcode >= 0x8:
            if opcode not in (OP_CLOSE, OP_PING, OP_PONG) or not fin:
                raise WsError(f"bad control frame (opcode {opcode:#x})")
            out.append((opcode, payload))
        elif opcode == OP_CONT:
            if self._frag_opcode < 0:
                raise WsError("continuation without a first fragment")
            self._frags.append(payload)
            if fin:
                out.append((self._frag_opcode, b"".join(self._frags)))
                self._frags = []
                self._frag_opcode = -1
        elif opcode in (OP_TEXT, OP_BINARY):
            if self._frag_opcode >= 0:
                raise WsError("new message inside a fragmented one")
            if fin:
                out.append((opcode, payload))
            else:
                self._frag_opcode = opcode
                self._frags = [payload]
        else:
            raise WsError(f"unknown opcode {opcode:#x}")


_FINAL_DATA = frozenset((0x80 | OP_TEXT, 0x80 | OP_BINARY))
"""First bytes of a final, unfragmented text or binary frame without reserved bits."""

OnMessage = Callable[[int, bytes], None]
"""Called with (opcode, payload) for every complete text or binary message."""


class WsProtocol(asyncio.Protocol):
    """One client connection. Use :func:`connect`; then :meth:`send`, :meth:`close`.

    ``on_message`` runs inside ``data_received``; an exception from it is passed to
    ``on_error`` (the connection carries on). ``closed`` resolves when the TCP connection
    is gone, for whatever reason.
    """

    def __init__(
        self,
        key: str,
        subprotocol: str,
        on_message: OnMessage,
        on_error: Callable[[BaseException], None],
    ) -> None:
        loop = asyncio.get_running_loop()
        self.key = key
        self.subprotocol = subprotocol
        self.on_message = on_message
        self.on_error = on_error
        self.transport: asyncio.Transport | None = None
        self.upgraded: asyncio.Future[None] = loop.create_future()
        self.closed: asyncio.Future[None] = loop.create_future()
        self.close_sent = False
        self.close_code: int | None = None
        """The code of the server's close frame, once one arrived (1005: none given)."""
        self._head = bytearray()
        self._parser: FrameParser | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # uvloop's transports implement the interface without subclassing asyncio.Transport.
        self.transport = cast(asyncio.Transport, transport)

    def data_received(self, data: bytes) -> None:
        if self._parser is None:
            self._head += data
            end = self._head.find(b"\r\n\r\n")
            if end < 0:
                if len(self._head) > MAX_HEADER_BYTES:
                    self._fail(WsError("handshake response too long"))
                return
            try:
                check_handshake(bytes(self._head[:end]), self.key, self.subprotocol)
            except WsError as exc:
                self._fail(exc)
                return
            rest = bytes(self._head[end + 4 :])
            self._head = bytearray()
            self._parser = FrameParser()
            if not self.upgraded.done():
                self.upgraded.set_result(None)
            if not rest:
                return
            data = rest
        parser = self._parser
        idle = not parser._buf and parser._frag_opcode < 0  # between two messages
        if idle and len(data) >= 2 and data[0] in _FINAL_DATA:
            # The usual read: exactly one whole, unfragmented, unmasked data message.
            n = data[1]
            if n < 126:
                head = 2
            elif n == 126 and len(data) >= 4:
                n = (data[2] << 8) | data[3]
                head = 4
            else:
                head = -1
            if head > 0 and len(data) == head + n:
                try:
                    self.on_message(data[0] & 0x0F, data[head:])
                except Exception as exc:  # a bug in a handler must not kill the others
                    self.on_error(exc)
                return
        try:
            messages = parser.feed(data)
        except WsError as exc:
            self.on_error(exc)
            self.abort()
            return
        for opcode, payload in messages:
            if opcode in (OP_TEXT, OP_BINARY):
                try:
                    self.on_message(opcode, payload)
                except Exception as exc:  # a bug in a handler must not kill the others
                    self.on_error(exc)
            elif opcode == OP_PING:
                self._write(encode_frame(OP_PONG, payload))
            elif opcode == OP_CLOSE:
                self.close_code = int.from_bytes(payload[:2], "big") if len(payload) >= 2 else 1005
                if not self.close_sent:
                    self.close_sent = True
                    self._write(encode_frame(OP_CLOSE, payload[:2]))
                if self.transport is not None:
                    self.transport.close()

    def connection_lost(self, exc: Exception | None) -> None:
        if not self.upgraded.done():
            self.upgraded.set_exception(exc or WsError("connection closed during handshake"))
        if not self.closed.done():
            self.closed.set_result(None)

    def _fail(self, exc: BaseException) -> None:
        if not self.upgraded.done():
            self.upgraded.set_exception(exc)
        self.abort()

    def _write(self, data: bytes) -> None:
        if self.transport is not None and not self.transport.is_closing():
            self.transport.write(data)

    @property
    def open(self) -> bool:
        """True while messages can be sent."""
        return (
            self.transport is not None and not self.transport.is_closing() and not self.close_sent
        )

    def send(self, payload: bytes, text: bool = False) -> bool:
        """Send one message; False if the connection is closing (nothing is sent then)."""
        if not self.open:
            return False
        assert self.transport is not None
        self.transport.write(encode_frame(OP_TEXT if text else OP_BINARY, payload))
        return True

    async def close(self, grace_s: float = 2.0) -> None:
        """Close handshake: send close (1000), wait up to ``grace_s`` for the server to end it."""
        if self.open:
            self.close_sent = True
            self._write(encode_frame(OP_CLOSE, (1000).to_bytes(2, "big")))
        try:
            await asyncio.wait_for(asyncio.shield(self.closed), grace_s)
        except TimeoutError:
            self.abort()

    def close_now(self) -> None:
        """Send close (1000) and let the transport close once its buffer is written."""
        if self.open:
            self.close_sent = True
            self._write(encode_frame(OP_CLOSE, (1000).to_bytes(2, "big")))
        if self.transport is not None:
            self.transport.close()

    def abort(self) -> None:
        """Drop the connection now."""
        if self.transport is not None:
            self.transport.abort()


async def connect(
    host: str,
    port: int,
    path: str,
    subprotocol: str,
    on_message: OnMessage,
    on_error: Callable[[BaseException], None],
) -> WsProtocol:
    """Open a WebSocket; raises ``OSError`` or :class:`WsError`. Bound it with a timeout."""
    request, key = handshake_request(host, port, path, subprotocol)
    loop = asyncio.get_running_loop()
    _, proto = await loop.create_connection(
        lambda: WsProtocol(key, subprotocol, on_message, on_error), host, port
    )
    assert proto.transport is not None
    proto.transport.write(request)
    try:
        await proto.upgraded
    except BaseException:  # including cancellation by the caller's timeout
        proto.abort()
        raise
    return proto
