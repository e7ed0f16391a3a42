"""One WebSocket connection: parse frames, drive rooms, send batched frames back.

Reading: messages are handled one at a time in arrival order (a ``sub`` is complete before
the next message of the frame is looked at). A bad message gets an ``error`` and nothing
else changes: other subscriptions, and every op already accepted, are untouched.

Writing: everything queued for the session between two sends leaves as ONE frame (the
writer task joins the pre-encoded messages), so a tick's ops and presence for a session are
one frame. The queue is bounded in bytes: a session that cannot keep up is closed with
``CLOSE_SLOW_CONSUMER`` and catches up after reconnecting.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import secrets
import time
from dataclasses import dataclass
from typing import Any
from uuid import UUID

from aiohttp import WSMsgType, web

from domain.errors import Forbidden
from gateway import keys
from gateway.auth import BadToken, verify_token_until
from gateway.clients import ClientIds
from gateway.room import Rejected, Room, Submission
from gateway.rooms import Rooms
from gateway.store import UNAVAILABLE_MESSAGE, StoreUnavailable
from schema import frames, messages
from schema.codes import Code
from schema.frames import Codec, Encoded, is_message
from schema.messages import MessageError

log = logging.getLogger(__name__)

CLOSE_GOING_AWAY = 1001
"""Server shutting down: reconnect elsewhere."""
CLOSE_UNAUTHORIZED = 4001
"""The hello was refused (bad or missing token), or the session's token expired."""
CLOSE_SLOW_CONSUMER = 4008
"""The session's send buffer overflowed: reconnect and catch up with ``sub`` + ``v``."""
CATCH_UP_CHUNK = 1000
"""Most ops per ``ops`` message of a catch-up."""


@dataclass(frozen=True, slots=True)
class SessionLimits:
    """Per-connection limits (see ``schema/protocol.md``)."""

    max_frame_bytes: int = frames.MAX_FRAME_BYTES
    max_buffer_bytes: int = 16 << 20
    max_subscriptions: int = 1000
    messages_per_second: float = 1000.0
    """Sustained rate of incoming messages per connection (token bucket)."""
    message_burst: float = 2000.0
    """Messages a connection may send at once before the rate applies."""
    hello_seconds: float = 10.0
    """How long a connection may stay open without a successful ``hello``."""


class TokenBucket:
    """A token bucket: ``take`` is False once the burst is spent faster than ``rate``."""

    __slots__ = ("burst", "rate", "stamp", "tokens")

    def __init__(self, rate: float, burst: float) -> None:
        self.rate = rate
        self.burst = burst
        self.tokens = burst
        self.stamp = time.monotonic()

    def take(self, n: float = 1.0) -> bool:
        """Spend ``n`` tokens if there are that many."""
        now = time.monotonic()
        self.tokens = min(self.burst, self.tokens + (now - self.stamp) * self.rate)
        self.stamp = now
        if self.tokens < n:
            return False
        self.tokens -= n
        return True


class Session:
    """A connected client. Rooms call ``deliver``; everything else is internal."""

    def __init__(
        self,
        ws: web.WebSocketResponse,
        codec: Codec,
        rooms: Rooms,
        secret: bytes,
        limits: SessionLimits,
        transport: asyncio.Transport,
        clients: ClientIds,
    ) -> None:
        self.ws = ws
        self.codec = codec
        self.rooms = rooms
        self.clients = clients
        self.secret = secret
        self.limits = limits
        self.id = secrets.token_hex(8)
        self.user: str | None = None
        self.client: str | None = None
        self.subs: dict[UUID, Room] = {}
        self._out: list[Encoded] = []
        self._closing = False
        self._tasks: set[asyncio.Task[Any]] = set()
        self._loop = asyncio.get_running_loop()
        self._transport = transport
        self._bucket = TokenBucket(limits.messages_per_second, limits.message_burst)
        self._expiry: asyncio.TimerHandle | None = None
        self._dropped = 0
        """Messages left out of frames because the codec cannot encode them."""
        self._answering = False
        """A frame of the client's is being handled: its answers leave as one frame after it,
        even when handling awaited (a ``sub`` reads the store) and other loop turns ran."""

    # -- the room's side ---------------------------------------------------------------

    def deliver(self, msg: Encoded) -> None:
        """Queue an encoded message; it leaves with this loop turn's frame (or, while a
        frame of the client's is being handled, with the answers to it). Never blocks."""
        if self._closing:
            return
        if not self._out and not self._answering:
            self._loop.call_soon(self._flush)
        self._out.append(msg)

    def removed(self, doc: UUID) -> None:
        """The room dropped us: our user was removed from the document's members."""
        if self.subs.pop(doc, None) is not None:
            self.error(Code.NOT_FOUND, "no such document (you were removed from it)", str(doc))

    def send(self, msg: dict[str, Any]) -> None:
        """Queue a message meant for this session only."""
        self.deliver(Encoded(msg))

    def error(
        self, code: Code, message: str, doc: str | None = None, seq: int | None = None
    ) -> None:
        """Queue an ``error`` message."""
        self.send(messages.error(code, message, doc, seq))

    # -- driving the connection --------------------------------------------------------

    async def run(self) -> None:
        """Serve the connection until it closes; always leaves every room."""
        # An unauthenticated connection holds a socket and a session for nothing: it gets
        # until the deadline to say hello (its token's expiry then takes this timer's place).
        self._arm_hello_deadline()
        try:
            async for msg in self.ws:
                if msg.type in (WSMsgType.TEXT, WSMsgType.BINARY):
                    await self._on_frame(msg.data, msg.type)
                elif msg.type == WSMsgType.ERROR:
                    break
                if self._closing:
                    break
        finally:
            self._leave_all()
            self._closing = True
            for task in list(self._tasks):
                task.cancel()

    async def close(self, code: int, message: str) -> None:
        """Send what is queued, then close the connection with ``code``."""
        self._answering = False
        self._flush()
        self._closing = True
        with contextlib.suppress(Exception):
            await self.ws.close(code=code, message=message.encode())

    def _flush(self) -> None:
        """Write this loop turn's messages as one frame straight to the transport.

        The common case, one shared message, writes bytes built once for every subscriber.
        aiohttp's own writer (pings, close) also writes whole frames synchronously, so frames
        never interleave. The transport's buffer is the send buffer: over the limit, the
        session is closed (``CLOSE_SLOW_CONSUMER``) and memory stays bounded.
        """
        if self._answering:
            return  # the end of the frame being handled flushes
        parts, self._out = self._out, []
        transport = self._transport
        if not parts or transport.is_closing():
            return
        data, dropped = frames.frame_of(parts, self.codec)
        if dropped:
            self._unencodable(dropped)
        if not data:
            return
        if transport.get_write_buffer_size() + len(data) > self.limits.max_buffer_bytes:
            self._overflow()  # what the client has not read yet would pass the limit
            return
        transport.write(data)

    def _unencodable(self, dropped: list[Encoded]) -> None:
        """Count messages this session's codec cannot carry; the first is logged."""
        if not self._dropped:
            log.warning(
                "session %s: a %r message cannot be encoded in %s and is dropped"
                " (later ones on this session are dropped without a log)",
                self.id,
                dropped[0].msg.get("t"),
                self.codec.name,
            )
        self._dropped += len(dropped)

    def _overflow(self) -> None:
        self._out.clear()
        self._closing = True
        self._spawn(self._close_slow())

    async def _close_slow(self) -> None:
        """Try a 4008 close; a reader that never reads gets its connection aborted."""
        try:
            await asyncio.wait_for(
                self.ws.close(code=CLOSE_SLOW_CONSUMER, message=b"send buffer overflow"), 5
            )
        except (TimeoutError, Exception):
            self._transport.abort()

    def _spawn(self, coro: Any) -> None:
        task = asyncio.get_running_loop().create_task(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    # -- messages -------------------------------------------------------------------

    async def _on_frame(self, data: bytes, kind: WSMsgType) -> None:
        expected = WSMsgType.BINARY if self.codec is Codec.MSGPACK else WSMsgType.TEXT
        if kind != expected:
            self.error(Code.BAD_FRAME, f"{self.codec.value} uses {expected.name.lower()} frames")
            return
        try:
            items = frames.decode(data, self.codec, self.limits.max_frame_bytes)
        except frames.FrameError as exc:
            self.error(exc.code, exc.message)
            return
        self._answering = True
        try:
            await self._on_items(items)
        finally:
            self._answering = False
            if self._out:
                self._loop.call_soon(self._flush)

    async def _on_items(self, items: list[Any]) -> None:
        for item in items:
            try:
                if not self._bucket.take():
                    raise MessageError(
                        Code.RATE_LIMITED,
                        f"over {self.limits.messages_per_second:g} messages/s; slow down",
                        _field(item, "doc", str),
                        _field(item, "seq", int),
                    )
                await self._on_message(messages.parse(item))
            except MessageError as exc:
                self.error(exc.code, exc.message, exc.doc, exc.seq)
                refused_hello = isinstance(item, dict) and item.get("t") == "hello"
                if refused_hello and exc.code is Code.UNAUTHORIZED and self.user is None:
                    await self.close(CLOSE_UNAUTHORIZED, "unauthorized")
            if self._closing:
                return

    async def _on_message(self, msg: messages.Message) -> None:
        if isinstance(msg, messages.Ping):
            self.send({"t": "pong"})
            return
        if isinstance(msg, messages.Hello):
            await self._hello(msg)
            return
        if self.user is None:
            doc = getattr(msg, "doc", None)
            raise MessageError(
                Code.UNAUTHORIZED,
                "send hello with a token first",
                None if doc is None else str(doc),
                getattr(msg, "seq", None),
            )
        if isinstance(msg, messages.OpMsg):
            await self._op(msg)
        elif isinstance(msg, messages.Sub):
            await self._sub(msg)
        elif isinstance(msg, messages.Unsub):
            self._unsub(msg.doc)
        elif isinstance(msg, messages.Presence):
            self._presence(msg)

    async def _hello(self, msg: messages.Hello) -> None:
        if self.user is not None:
            raise MessageError(Code.BAD_MESSAGE, "hello was already accepted")
        try:
            user, expires = verify_token_until(self.secret, msg.token)
        except BadToken as exc:
            raise MessageError(Code.UNAUTHORIZED, str(exc)) from None
        if msg.client is not None:
            # Refused, the session stays unauthenticated: another hello may follow.
            try:
                await self.clients.claim(msg.client, user)
            except Forbidden as exc:
                raise MessageError(Code.FORBIDDEN, exc.message) from None
            except StoreUnavailable:  # logged once per batch by ClientIds
                # The time spent waiting for the store is not the client's: it gets the
                # whole hello deadline again for its next try.
                self._arm_hello_deadline()
                raise MessageError(Code.UNAVAILABLE, UNAVAILABLE_MESSAGE) from None
        self.user = user
        if self._expiry is not None:
            self._expiry.cancel()
            self._expiry = None
        if expires is not None:  # the session lasts as long as its token
            self._expiry = self._loop.call_later(max(0.0, expires - time.time()), self._expired)
        self.client = msg.client
        self.send({"t": "welcome", "user": self.user, "session": self.id})

    async def _op(self, msg: messages.OpMsg) -> None:
        """Queue an op. One on a version this process has not seen yet (the client saw it
        elsewhere) waits for a read of the store (``Rooms.submit``), and so do the
        connection's next messages: its ops reach the room in the order it sent them."""
        doc = str(msg.doc)
        room = self.subs.get(msg.doc)
        if room is None:
            raise MessageError(Code.NOT_SUBSCRIBED, "subscribe to the document first", doc, msg.seq)
        assert self.user is not None
        fut: asyncio.Future[Any] = asyncio.get_running_loop().create_future()
        sub = Submission(
            kind="edit",
            by=self.user,
            future=fut,
            base=msg.v,
            op=msg.op,
            client=self.client,
            seq=msg.seq,
            session=self,
        )
        fut.add_done_callback(lambda f: self._op_done(f, doc, msg.seq))
        await self.rooms.submit(room, sub)

    def _op_done(self, fut: asyncio.Future[Any], doc: str, seq: int) -> None:
        if fut.cancelled():
            return
        exc = fut.exception()
        if exc is None:
            return  # the ack travels in the room's ordered broadcast
        if isinstance(exc, Rejected):
            self.error(exc.code, exc.message, doc, seq)
        else:
            self.error(Code.INTERNAL, "internal error", doc, seq)

    async def _sub(self, msg: messages.Sub) -> None:
        doc = str(msg.doc)
        assert self.user is not None
        if msg.doc not in self.subs and len(self.subs) >= self.limits.max_subscriptions:
            raise MessageError(Code.TOO_LARGE, "too many subscriptions on one connection", doc)
        # The client may have seen a version, or a membership, that this process has not
        # (another process committed it and died before publishing, or Redis is down, or
        # its publish is still on the way): then the store is read first.
        try:
            room = await self.rooms.readable(msg.doc, self.user, msg.v)
        except StoreUnavailable:
            raise MessageError(Code.UNAVAILABLE, "the event store cannot be read; subscribe "
                               "again", doc) from None
        if room is None:
            raise MessageError(Code.NOT_FOUND, "no such document", doc)
        snap, head = room.snapshot, room.head
        if msg.v is not None and not 0 <= msg.v <= head:
            raise MessageError(Code.BAD_VERSION, f"v must be in 0..{head}", doc)
        old = self.subs.get(msg.doc)
        if old is not None:  # replaced: what the session set as presence there stays
            self._out = without_unsent_ops(self._out, doc)
            old.unsubscribe(self, keep_presence=old is room)
        self.subs[msg.doc] = room
        member = room.subscribe(self)
        if msg.v is None:
            self.deliver(room.snapshot_message())
            room.send_presence_to(self)
            return
        upto = snap.v
        if msg.v > upto:
            # The room holds back what other processes committed while a commit of its own
            # is in flight (or it re-reads the store): the store has it. The catch-up reads
            # it there up to the head, and the room leaves those ops out for this session.
            upto = head
            room.skip_to(self, head)
            records = None
        else:
            records = room.ops_since(msg.v)
        if records is not None:
            self._send_ops(doc, [r.entry() for r in records])
            room.send_presence_to(self)
            return
        # From the store, before the frame's next message: its answers (an error too) must
        # not overtake the catch-up. Ops committed and presence changed meanwhile wait in
        # the member until it is out, after the presence as it is now (sent before any
        # await: a change broadcast during the read must not come a second time).
        member.ready = False
        room.send_presence_to(self)
        await self._catch_up(room, msg.v, upto)

    async def _catch_up(self, room: Room, v: int, upto: int) -> bool:
        """Send the ops after ``v`` up to ``upto`` from the store; False if it could not (the
        client was told) or the session left the document meanwhile."""
        doc = str(room.id)
        member = room.members.get(self)
        try:
            loop = asyncio.get_running_loop()
            store = self.rooms.store
            edits = await loop.run_in_executor(
                store.reader, store.edits_after, room.id, v, upto - v
            )
            entries = [
                {"v": e.v, "op": e.op, "by": e.by}
                | ({"client": e.client, "seq": e.seq} if e.client is not None else {})
                for e in edits
            ]
        except Exception as exc:
            log.warning("catch-up of %s failed: %s", doc, exc)
            self.error(Code.UNAVAILABLE, "catch-up failed; subscribe again", doc)
            self._unsub(room.id)
            return False
        if member is None or room.members.get(self) is not member:
            return False  # removed from the document meanwhile: nothing to send
        self._send_ops(doc, entries)
        member.release()
        return True

    def _send_ops(self, doc: str, entries: list[dict[str, Any]]) -> None:
        """A catch-up: ``ops`` messages of at most ``CATCH_UP_CHUNK`` ops (one if none)."""
        for i in range(0, max(len(entries), 1), CATCH_UP_CHUNK):
            self.send({"t": "ops", "doc": doc, "ops": entries[i : i + CATCH_UP_CHUNK]})

    def _unsub(self, doc_id: UUID) -> None:
        room = self.subs.pop(doc_id, None)
        if room is not None:
            self._out = without_unsent_ops(self._out, str(doc_id))
            room.unsubscribe(self)

    def _presence(self, msg: messages.Presence) -> None:
        room = self.subs.get(msg.doc)
        if room is None:
            raise MessageError(Code.NOT_SUBSCRIBED, "subscribe to the document first", str(msg.doc))
        size = len(frames.encode_one(msg.data, Codec.MSGPACK)) if msg.data is not None else 0
        if size > messages.MAX_PRESENCE_BYTES:
            limit = messages.MAX_PRESENCE_BYTES
            raise MessageError(Code.TOO_LARGE, f"presence data over {limit} bytes", str(msg.doc))
        assert self.user is not None
        room.set_presence(self, self.id, self.user, msg.data)

    def _arm_hello_deadline(self) -> None:
        """Give the connection ``hello_seconds`` from now to say hello successfully."""
        if self._expiry is not None:
            self._expiry.cancel()
        self._expiry = self._loop.call_later(self.limits.hello_seconds, self._no_hello)

    def _no_hello(self) -> None:
        seconds = self.limits.hello_seconds
        self.error(Code.UNAUTHORIZED, f"no hello within {seconds:g} s; reconnect and send one")
        self._spawn(self.close(CLOSE_UNAUTHORIZED, "no hello"))

    def _expired(self) -> None:
        self.error(Code.UNAUTHORIZED, "token expired; reconnect with a new token")
        self._spawn(self.close(CLOSE_UNAUTHORIZED, "token expired"))

    def _leave_all(self) -> None:
        if self._expiry is not None:
            self._expiry.cancel()
        for room in self.subs.values():
            room.unsubscribe(self)
        self.subs.clear()


def without_unsent_ops(out: list[Encoded], doc: str) -> list[Encoded]:
    """``out`` (a session's queue, not written yet) without the ``ops`` of ``doc``, for a
    subscription that ends or is replaced: the client asked for no more, or the new snapshot
    or catch-up has them. Those before the last ``ack`` of ``doc`` stay, as acks, errors and
    everything else do: an ack follows every op before it."""
    last_ack = -1
    for i, msg in enumerate(out):
        if is_message(msg, "ack", doc):
            last_ack = i
    return out[: last_ack + 1] + [m for m in out[last_ack + 1 :]
                                  if not is_message(m, "ops", doc)]


def _field(item: Any, name: str, kind: type) -> Any:
    """``item[name]`` when ``item`` is a map and the value has type ``kind``, else None."""
    value = item.get(name) if isinstance(item, dict) else None
    return value if isinstance(value, kind) and not isinstance(value, bool) else None


async def handle_ws(request: web.Request) -> web.StreamResponse:
    """``GET /v1/ws``: upgrade and serve a session."""
    app = request.app
    limits: SessionLimits = app[keys.SESSION_LIMITS]
    ws = web.WebSocketResponse(
        protocols=frames.SUBPROTOCOLS,
        max_msg_size=frames.HARD_FRAME_BYTES + 1,  # aiohttp refuses at the size; we over it
        heartbeat=30.0,
        decode_text=False,
        compress=False,
    )
    transport = request.transport
    if transport is None or transport.is_closing():
        return ws  # the client left while its upgrade waited in line
    try:
        await ws.prepare(request)
    except ConnectionResetError:  # aiohttp raises its ClientConnectionResetError, a subclass
        # Under a connect storm a client may give up before its upgrade is answered: not an
        # error of ours, and a traceback per such client cost more than the handshake.
        log.debug("client left during the WebSocket upgrade")
        return ws
    codec = Codec(ws.ws_protocol) if ws.ws_protocol else Codec.JSON
    session = Session(
        ws, codec, app[keys.ROOMS], app[keys.SECRET], limits, transport, app[keys.CLIENTS]
    )
    sessions: set[Session] = app[keys.SESSIONS]
    sessions.add(session)
    try:
        await session.run()
    finally:
        sessions.discard(session)
        if not ws.closed:
            with contextlib.suppress(Exception):
                await ws.close()
    return ws
