"""A small WebSocket test client for the coscribe protocol, with ShareDB-style client OT.

``WsClient`` speaks either codec over an aiohttp ``ClientSession`` and keeps every message it
received in ``log`` (``wait_for`` scans it, so nothing is consumed by looking). ``DocState``
is the client half of the OT protocol for one subscribed document:

- at most one op in flight (sent, not yet acked); later local edits are composed into a
  ``buffer`` that is sent when the ack arrives;
- a remote op ``r`` (version ``version + 1``) is transformed against the in-flight op ``a``
  and then the buffer ``b`` exactly as the server transforms a late op
  (``transform(client_op, applied, "left")``): ``a' = transform(a, r, "left")``,
  ``r' = transform(r, a, "right")``, then the same with ``b`` and ``r'``; ``r''`` is applied
  to the local text.

Protocol violations seen by the client (a gap or repeat in versions, an ack out of order, an
error for an op in flight) are recorded in ``DocState.problems`` rather than raised, so the
test can assert that there were none. After a ``sub`` that replaces a subscription (or follows
an ``unsub``) entries at or below the version held are repeats the protocol allows (what the
old subscription had on the wire): skipped and counted in ``DocState.repeats``.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Callable
from typing import Any

import aiohttp
import msgpack
import orjson

from domain import ot
from domain.errors import BadOp
from schema.frames import Codec

Message = dict[str, Any]
"""One decoded server-to-client message."""


class DocState:
    """One document as a client sees it: text, version, the op in flight and the buffer.

    ``text`` always includes the local edits (in flight and buffered); ``version`` is the
    server version that text is based on (before the in-flight op and the buffer).
    """

    def __init__(
        self, client: WsClient, doc: str, text: str | None, version: int, again: bool = False
    ) -> None:
        self.client = client
        self.again = again
        """This subscription replaced one of the same connection (or followed an ``unsub``)."""
        self.repeats = 0
        """Entries skipped as repeats (at or below ``version``) after subscribing ``again``."""
        self.doc = doc
        self.text = text
        self.version = version
        self.title: str | None = None
        self.inflight: tuple[int, ot.Op] | None = None
        self.buffer: ot.Op | None = None
        self.acks: list[tuple[int, int]] = []
        """``(seq, v)`` of every ack, in arrival order."""
        self.remote: list[Message] = []
        """Every op entry received from others, as sent, in arrival order."""
        self.problems: list[str] = []
        self.errors: list[Message] = []
        self.transforms = 0
        """How many remote ops arrived while an op of ours was in flight (concurrency seen)."""
        self.ready = asyncio.Event()

    @property
    def quiet(self) -> bool:
        """Nothing in flight and nothing buffered."""
        return self.inflight is None and self.buffer is None

    @property
    def sent_version(self) -> int:
        """The version the server has once everything local is acked (a lower bound)."""
        return self.version + (self.inflight is not None) + (self.buffer is not None)

    def edit(self, op: ot.Op) -> None:
        """Apply a local edit (made on ``text``) and send it, or buffer it behind the inflight."""
        assert self.text is not None, "not subscribed yet"
        op = ot.validate(op, len(self.text))
        if not op:
            return
        self.text = ot.apply(self.text, op)
        if self.inflight is None:
            self._send(op)
        elif self.buffer is None:
            self.buffer = op
        else:
            self.buffer = ot.compose(self.buffer, op)

    def _send(self, op: ot.Op) -> None:
        seq = self.client.next_seq()
        self.inflight = (seq, op)
        self.client.queue_send(
            {"t": "op", "doc": self.doc, "v": self.version, "op": op, "seq": seq}
        )

    # -- incoming ------------------------------------------------------------------------

    def on_snapshot(self, msg: Message) -> None:
        """A snapshot (re)starts the state."""
        self.text = msg["text"]
        self.version = msg["v"]
        self.title = msg.get("title")
        self.inflight = None
        self.buffer = None
        self.ready.set()

    def on_ops(self, msg: Message) -> None:
        """Remote ops: transform what is local past them and apply them."""
        for entry in msg["ops"]:
            v, r = entry["v"], entry["op"]
            if v <= self.version or self.text is None:
                if self.again:  # the old subscription's, written before the new sub was read
                    self.repeats += 1
                else:
                    self.problems.append(f"op v{v} repeated at v{self.version}")
                continue
            if v != self.version + 1:
                self.problems.append(f"op v{v} skipped ahead of v{self.version}")
            self.remote.append(entry)
            if self.inflight is not None:
                self.transforms += 1
                seq, a = self.inflight
                self.inflight = (seq, ot.transform(a, r, "left"))
                r = ot.transform(r, a, "right")
            if self.buffer is not None:
                b = self.buffer
                self.buffer = ot.transform(b, r, "left")
                r = ot.transform(r, b, "right")
            assert self.text is not None
            try:
                self.text = ot.apply(self.text, r)
            except BadOp as exc:  # diverged: keep reading, let the test report it
                self.problems.append(f"op v{v} does not fit the local text: {exc}")
            self.version = v
        self.ready.set()

    def on_ack(self, msg: Message) -> None:
        """Our op is committed at ``v``: send the buffer next."""
        seq, v = msg["seq"], msg["v"]
        self.acks.append((seq, v))
        if self.inflight is None or self.inflight[0] != seq:
            self.problems.append(f"ack of seq {seq} (v{v}) with {self.inflight} in flight")
            return
        if v != self.version + 1:
            self.problems.append(f"ack v{v} arrived at v{self.version}: an earlier op is missing")
        self.version = v
        self.inflight = None
        if self.buffer is not None:
            op, self.buffer = self.buffer, None
            self._send(op)

    def on_error(self, msg: Message) -> None:
        """An error about this document; one for the op in flight is a problem."""
        self.errors.append(msg)
        if self.inflight is not None and msg.get("seq") == self.inflight[0]:
            self.problems.append(f"op in flight refused: {msg}")


class WsClient:
    """One WebSocket connection. Build with ``connect``; ``close`` when done."""

    def __init__(self, ws: aiohttp.ClientWebSocketResponse, codec: Codec) -> None:
        self.ws = ws
        self.codec = codec
        self.log: list[Message] = []
        self.docs: dict[str, DocState] = {}
        self.user: str | None = None
        self.session: str | None = None
        self.close_code: int | None = None
        self.closed = asyncio.Event()
        self.frames = 0
        self._seq = 0
        self._changed = asyncio.Condition()
        self._outbox: list[Message] = []
        self._flush_scheduled = False
        self._tasks: set[asyncio.Task[None]] = set()
        self._reader = asyncio.get_running_loop().create_task(self._read_loop())

    @classmethod
    async def connect(
        cls,
        http: aiohttp.ClientSession,
        url: str,
        codec: Codec = Codec.JSON,
        token: str | None = None,
        client_id: str | None = None,
        offer_protocol: bool = True,
    ) -> WsClient:
        """Open ``url`` (the ``/v1/ws`` endpoint) with ``codec``; send hello if ``token``."""
        protocols = (codec.value,) if offer_protocol else ()
        ws = await http.ws_connect(url, protocols=protocols, max_msg_size=64 << 20)
        client = cls(ws, codec)
        if token is not None:
            await client.hello(token, client_id)
        return client

    async def close(self) -> None:
        """Close the connection and stop reading."""
        with contextlib.suppress(Exception):
            await self.ws.close()
        for task in [self._reader, *self._tasks]:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await task

    # -- sending -----------------------------------------------------------------------

    def next_seq(self) -> int:
        """A fresh client sequence number."""
        self._seq += 1
        return self._seq

    def encode(self, msgs: list[Message]) -> bytes:
        """The frame of ``msgs`` in this connection's codec."""
        if self.codec is Codec.MSGPACK:
            return bytes(msgpack.packb(msgs, use_bin_type=True))
        return orjson.dumps(msgs)

    async def send(self, *msgs: Message) -> None:
        """Send ``msgs`` as one frame."""
        await self.send_raw(self.encode(list(msgs)))

    async def send_raw(self, data: bytes | str, binary: bool | None = None) -> None:
        """Send ``data`` as it is; ``binary`` defaults to the codec's frame type."""
        if binary is None:
            binary = self.codec is Codec.MSGPACK
        if binary:
            await self.ws.send_bytes(data if isinstance(data, bytes) else data.encode())
        else:
            await self.ws.send_str(data if isinstance(data, str) else data.decode())

    def queue_send(self, msg: Message) -> None:
        """Send ``msg`` soon (from synchronous state-machine code); order is kept."""
        self._outbox.append(msg)
        if not self._flush_scheduled:
            self._flush_scheduled = True
            task = asyncio.get_running_loop().create_task(self._flush())
            self._tasks.add(task)
            task.add_done_callback(self._tasks.discard)

    async def _flush(self) -> None:
        self._flush_scheduled = False
        msgs, self._outbox = self._outbox, []
        if msgs and not self.ws.closed:
            with contextlib.suppress(ConnectionError):
                await self.send(*msgs)

    # -- requests ----------------------------------------------------------------------

    async def hello(self, token: str, client_id: str | None = None) -> Message:
        """Authenticate; return the ``welcome`` (or the ``error``)."""
        mark = len(self.log)
        msg: Message = {"t": "hello", "token": token}
        if client_id is not None:
            msg["client"] = client_id
        await self.send(msg)
        reply = await self.wait_for(lambda m: m["t"] in ("welcome", "error"), since=mark)
        if reply["t"] == "welcome":
            self.user = reply["user"]
            self.session = reply["session"]
        return reply

    async def subscribe(
        self, doc: str, v: int | None = None, text: str | None = None, within: float = 10
    ) -> DocState:
        """Subscribe to ``doc``: a snapshot, or catch-up after ``v`` (whose ``text`` is known).

        Returns when the first reply arrived; raises AssertionError on an ``error`` reply.
        Subscribing again, the reply is known by a ``ping`` sent with it (the old
        subscription's ops may still arrive first): then the whole answer has arrived.
        """
        again = doc in self.docs
        state = DocState(self, doc, text, v if v is not None else -1, again)
        self.docs[doc] = state
        mark = len(self.log)
        msg: Message = {"t": "sub", "doc": doc}
        if v is not None:
            msg["v"] = v
        if again:
            await self.send(msg, {"t": "ping"})
            await self.wait_for(lambda m: m["t"] == "pong", since=mark, within=within)
            replies = [
                m for m in self.log[mark:]
                if m["t"] == "error" and m.get("doc") == doc and "seq" not in m
            ]
            if replies:
                raise AssertionError(f"subscribe refused: {replies[0]}")
            return state
        await self.send(msg)
        reply = await self.wait_for(
            lambda m: m.get("doc") == doc and m["t"] in ("snapshot", "ops", "error"),
            since=mark,
            within=within,
        )
        if reply["t"] == "error":
            raise AssertionError(f"subscribe refused: {reply}")
        return state

    async def ping(self, within: float = 10) -> None:
        """Round trip a ping: every message the server sent before the pong has arrived."""
        mark = len(self.log)
        await self.send({"t": "ping"})
        await self.wait_for(lambda m: m["t"] == "pong", since=mark, within=within)

    # -- receiving ---------------------------------------------------------------------

    async def wait_for(
        self, pred: Callable[[Message], bool], since: int = 0, within: float = 10
    ) -> Message:
        """The first message at index >= ``since`` of ``log`` matching ``pred``."""

        def found() -> Message | None:
            for m in self.log[since:]:
                if pred(m):
                    return m
            return None

        async with asyncio.timeout(within), self._changed:
            while (m := found()) is None:
                if self.closed.is_set():
                    raise AssertionError(f"closed ({self.close_code}) while waiting: {self.log}")
                await self._changed.wait()
        return m

    async def wait_until(self, cond: Callable[[], bool], within: float = 30) -> None:
        """Wait until ``cond()`` holds, checked after every received frame."""
        async with asyncio.timeout(within), self._changed:
            while not cond():
                if self.closed.is_set():
                    raise AssertionError(f"closed ({self.close_code}) while waiting")
                await self._changed.wait()

    async def wait_closed(self, within: float = 10) -> int | None:
        """Wait for the server to close; return the close code."""
        async with asyncio.timeout(within):
            await self.closed.wait()
        return self.close_code

    def since(self, mark: int) -> list[Message]:
        """Messages received after index ``mark`` of ``log``."""
        return self.log[mark:]

    async def _read_loop(self) -> None:
        try:
            async for frame in self.ws:
                if frame.type is aiohttp.WSMsgType.TEXT:
                    batch = orjson.loads(frame.data)
                elif frame.type is aiohttp.WSMsgType.BINARY:
                    batch = msgpack.unpackb(frame.data, raw=False)
                else:
                    break
                self.frames += 1
                assert isinstance(batch, list), f"server frame is not a list: {batch!r}"
                for msg in batch:
                    self._dispatch(msg)
                async with self._changed:
                    self._changed.notify_all()
        finally:
            self.close_code = self.ws.close_code
            self.closed.set()
            async with self._changed:
                self._changed.notify_all()

    def _dispatch(self, msg: Message) -> None:
        self.log.append(msg)
        state = self.docs.get(msg.get("doc", ""))
        if state is None:
            return
        t = msg["t"]
        if t == "snapshot":
            state.on_snapshot(msg)
        elif t == "ops":
            state.on_ops(msg)
        elif t == "ack":
            state.on_ack(msg)
        elif t == "error":
            state.on_error(msg)
