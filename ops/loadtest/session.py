"""One simulated collaborator: a WebSocket session on one document, driven by asyncio.

The protocol logic lives in :class:`~ops.loadtest.editor.DocClient`; this module does the
awaiting: connect, ``hello`` + ``sub`` in one frame, then a receive loop, an edit loop
(writers) and a presence loop, until the worker closes it. Receipt handling is the load
generator's hot path, so a light session (most of them) does no OT at all: it checks the
version sequence, reads the stamps and counts.
"""

from __future__ import annotations

import asyncio
import hashlib
import random
import time
from collections import Counter
from dataclasses import dataclass
from typing import Any

import aiohttp
import msgpack
import orjson

from ops.loadtest import stamp
from ops.loadtest.editor import DocClient, ProtocolViolation, delete_op, insert_op
from ops.loadtest.recorder import StepMetrics, Window

SUBPROTOCOL = {"msgpack": "coscribe.v1.msgpack", "json": "coscribe.v1.json"}
"""The WebSocket subprotocol of each codec."""
_CONNECT_ERRORS = (aiohttp.ClientError, OSError, TimeoutError)


@dataclass(frozen=True, slots=True)
class SessionSpec:
    """Everything a load process needs to run one session (sent to it pickled)."""

    index: int
    doc: str
    writer: bool
    full: bool
    token: str
    codec: str
    arrival_ns: int
    client_id: str


@dataclass(frozen=True, slots=True)
class EditPlan:
    """How writers edit in this step, and the windows that bound them."""

    interval_s: float
    jitter: float
    delete_ratio: float
    presence_interval_s: float
    window: Window


def loop_time_at(wall_ns: int) -> float:
    """The event loop's clock reading at wall-clock ``wall_ns``."""
    return asyncio.get_running_loop().time() + (wall_ns - time.time_ns()) / 1e9


class Session:
    """A collaborator on one document. Call :meth:`run` once; :meth:`close` ends it."""

    def __init__(
        self,
        spec: SessionSpec,
        plan: EditPlan,
        metrics: StepMetrics,
        http: aiohttp.ClientSession,
        ws_url: str,
        connect_gate: asyncio.Semaphore,
        seed: int,
    ) -> None:
        self.spec = spec
        self.plan = plan
        self.metrics = metrics
        self.http = http
        self.ws_url = ws_url
        self.gate = connect_gate
        self.rng = random.Random(seed)
        self.ws: aiohttp.ClientWebSocketResponse | None = None
        self.client: DocClient | None = None
        self.version = -1
        self.joined = asyncio.Event()
        self.ended = asyncio.Event()
        self.closing = False
        self.desynced = False
        self.refused = False
        self.outbox: list[dict[str, Any]] = []
        self._tasks: list[asyncio.Task[None]] = []
        self._connect_started = 0
        self._binary = spec.codec == "msgpack"

    @property
    def pending(self) -> bool:
        """True while this session has an edit the server has not acknowledged."""
        return self.client is not None and self.client.pending and not self.ended.is_set()

    @property
    def known_version(self) -> int:
        """The last server version this session has seen (-1 before its snapshot)."""
        return self.client.version if self.client is not None else self.version

    async def run(self) -> None:
        """Connect at the planned time and serve the session until it is closed or dropped."""
        try:
            await asyncio.sleep(max(0.0, (self.spec.arrival_ns - time.time_ns()) / 1e9))
            if self.closing:
                return
            if not await self._connect():
                return
            await self._receive()
        finally:
            for task in self._tasks:
                task.cancel()
            self.ended.set()

    async def close(self) -> None:
        """Close the connection (idempotent); the receive loop then ends."""
        self.closing = True
        ws = self.ws
        if ws is not None and not ws.closed:
            try:
                await asyncio.wait_for(ws.close(), 5.0)
            except (*_CONNECT_ERRORS, RuntimeError):
                pass

    def report(self) -> dict[str, Any] | None:
        """A full session's final state for the convergence check, else None."""
        c = self.client
        if not self.spec.full or c is None or c.text is None:
            return None
        return {
            "doc": self.spec.doc,
            "session": self.spec.index,
            "version": c.version,
            "length": c.length,
            "digest": text_digest(c.text),
            "desynced": self.desynced,
            "ended": self.ended.is_set() and not self.closing,
        }

    # --- connection ---------------------------------------------------------------------

    async def _connect(self) -> bool:
        m = self.metrics
        async with self.gate:
            self._connect_started = time.time_ns()
            try:
                self.ws = await self.http.ws_connect(
                    self.ws_url,
                    protocols=(SUBPROTOCOL[self.spec.codec],),
                    max_msg_size=0,
                    compress=0,
                    autoping=True,
                    heartbeat=None,
                    decode_text=False,
                    timeout=aiohttp.ClientWSTimeout(ws_receive=None, ws_close=5.0),
                )
            except _CONNECT_ERRORS as exc:
                m.counters["connect_failed"] += 1
                m.errors[f"connect:{_error_name(exc)}"] += 1
                return False
        m.counters["connected"] += 1
        hello = {"t": "hello", "token": self.spec.token, "client": self.spec.client_id}
        self.outbox += [hello, {"t": "sub", "doc": self.spec.doc}]
        return await self._flush()

    async def _flush(self) -> bool:
        ws = self.ws
        if not self.outbox or ws is None or ws.closed:
            self.outbox.clear()
            return ws is not None and not ws.closed
        msgs, self.outbox = self.outbox, []
        try:
            if self._binary:
                await ws.send_bytes(msgpack.packb(msgs))
            else:
                await ws.send_str(orjson.dumps(msgs).decode())
        except (*_CONNECT_ERRORS, RuntimeError) as exc:
            self.metrics.errors[f"send:{_error_name(exc)}"] += 1
            return False
        return True

    async def _receive(self) -> None:
        ws = self.ws
        assert ws is not None
        decode = msgpack.unpackb if self._binary else orjson.loads
        data_types = (aiohttp.WSMsgType.BINARY, aiohttp.WSMsgType.TEXT)
        m = self.metrics
        while True:
            try:
                msg = await ws.receive()
            except (*_CONNECT_ERRORS, RuntimeError) as exc:
                m.errors[f"receive:{_error_name(exc)}"] += 1
                break
            if msg.type not in data_types:
                break
            now = time.time_ns()
            try:
                frame = decode(msg.data)
            except ValueError:
                m.errors["client:undecodable_frame"] += 1
                continue
            m.counters["frames_rx"] += 1
            self._on_frame(frame if isinstance(frame, list) else [frame], now)
            if self.refused:
                await self.close()  # a refused join is not a disconnect
                return
            if self.outbox and not await self._flush():
                break
        if not self.closing:
            m.counters["disconnected"] += 1

    # --- incoming -----------------------------------------------------------------------

    def _on_frame(self, frame: list[Any], now: int) -> None:
        for msg in frame:
            t = msg.get("t") if isinstance(msg, dict) else None
            if t == "ops":
                self._on_ops(msg.get("ops", ()), now)
            elif t == "ack":
                self._on_ack(msg, now)
            elif t == "presence":
                self.metrics.counters["presence_rx"] += 1
            elif t == "snapshot":
                self._on_snapshot(msg, now)
            elif t == "error":
                self._on_error(msg)
            elif t not in ("welcome", "pong"):
                self.metrics.errors["client:unknown_message"] += 1

    def _on_snapshot(self, msg: dict[str, Any], now: int) -> None:
        text = msg.get("text", "")
        version = msg.get("v", 0)
        if self.spec.writer or self.spec.full:
            self.client = DocClient(self.spec.doc, version, text, keep_text=self.spec.full)
        else:
            self.version = version
        m = self.metrics
        m.counters["joined"] += 1
        m.join.add((now - self._connect_started) // 1000)
        self.joined.set()
        if self.spec.writer:
            self._tasks.append(asyncio.create_task(self._edit_loop()))
        if self.plan.presence_interval_s > 0:
            self._tasks.append(asyncio.create_task(self._presence_loop()))

    def _on_ops(self, entries: list[dict[str, Any]], now: int) -> None:
        m = self.metrics
        window = self.plan.window
        in_window = window.start_ns <= now < window.end_ns
        client = self.client
        fanout, series = m.fanout, m.fanout_series
        for entry in entries:
            op = entry["op"]
            v = entry["v"]
            if client is not None:
                if not self.desynced:
                    try:
                        client.remote(v, op)
                    except ProtocolViolation:
                        m.errors["client:version_gap"] += 1
                        self._desync()
            elif v != self.version + 1 and self.version >= 0:
                m.errors["client:version_gap"] += 1
                self.version = v
            else:
                self.version = v
            for digits in stamp.in_op(op):
                age = stamp.age_ns(digits, now)
                if age < 0:
                    m.counters["clock_anomalies"] += 1
                    continue
                us = age // 1000
                if window.start_ns <= now - age < window.end_ns:
                    fanout.add(us)
                series.add(now, us)
        m.counters["ops_rx"] += len(entries)
        if in_window:
            m.counters["ops_rx_window"] += len(entries)

    def _on_ack(self, msg: dict[str, Any], now: int) -> None:
        client = self.client
        m = self.metrics
        if client is None or self.desynced:
            return
        try:
            done = client.ack(msg.get("seq", -1), msg.get("v", -1), now)
        except ProtocolViolation:
            m.errors["client:bad_ack"] += 1
            self._desync()
            return
        window = self.plan.window
        us = (now - done.sent_ns) // 1000
        if done.sent_ns in window:
            m.ack.add(us)
        m.ack_series.add(now, us)
        m.counters["acks"] += 1
        m.acks_by_doc[self.spec.doc] += 1
        if now in window:
            m.counters["acks_window"] += 1
            m.counters["acked_edits_window"] += done.edits
        if done.stamps:
            stamps = m.acked_stamps.get(self.spec.doc)
            if stamps is None:
                stamps = m.acked_stamps[self.spec.doc] = Counter()
            stamps.update(done.stamps)
        if done.send is not None:
            self.outbox.append(done.send)

    def _on_error(self, msg: dict[str, Any]) -> None:
        m = self.metrics
        code = str(msg.get("code", "unknown"))
        m.errors[code] += 1
        c = self.client
        seq = msg.get("seq")
        if c is not None and c.pending and seq is not None and seq == c.inflight_seq:
            self._desync()
        elif not self.joined.is_set() and code in ("unauthorized", "forbidden", "not_found"):
            m.counters["join_failed"] += 1
            self.refused = True

    def _desync(self) -> None:
        """Stop editing: this client no longer agrees with the server about the document."""
        if self.desynced:
            return
        self.desynced = True
        self.metrics.counters["desynced"] += 1
        if self.client is not None:
            self.metrics.counters["rejected_edits"] += self.client.reject()[1]

    # --- outgoing -----------------------------------------------------------------------

    async def _edit_loop(self) -> None:
        loop = asyncio.get_running_loop()
        plan = self.plan
        rng = self.rng
        m = self.metrics
        interval = plan.interval_s
        end = loop_time_at(plan.window.end_ns)
        at = loop.time() + rng.random() * interval
        while at < end:
            await asyncio.sleep(at - loop.time())
            if self.desynced or self.ws is None or self.ws.closed:
                return
            now = time.time_ns()
            self._edit(now)
            m.counters["edits"] += 1
            if now in plan.window:
                m.counters["edits_window"] += 1
            if self.outbox and not await self._flush():
                return
            step = interval
            if plan.jitter:
                step *= 1.0 + plan.jitter * (2.0 * rng.random() - 1.0)
            at += step
            behind = loop.time() - at
            if behind > interval:
                # The process fell behind; offer what it can rather than a burst.
                m.counters["edits_skipped"] += int(behind / interval)
                at = loop.time()

    def _edit(self, now: int) -> None:
        c = self.client
        assert c is not None
        rng = self.rng
        length = c.length
        deleting = self.plan.delete_ratio and c.can_delete and length > 2 * stamp.WIDTH
        if deleting and rng.random() < self.plan.delete_ratio:
            n = rng.randint(1, stamp.WIDTH)
            msg = c.edit(delete_op(rng.randrange(length - n + 1), n), now)
            if msg is not None:
                self.outbox.append(msg)
            return
        text = stamp.encode(now)
        msg = c.edit(insert_op(rng.randrange(length + 1), text), now, (text[1:-1],))
        if msg is not None:
            self.outbox.append(msg)

    async def _presence_loop(self) -> None:
        interval = self.plan.presence_interval_s
        await asyncio.sleep(self.rng.random() * interval)
        while not self.closing:
            length = self.client.length if self.client is not None else 0
            data = {"cursor": self.rng.randrange(length + 1)}
            self.outbox.append({"t": "presence", "doc": self.spec.doc, "data": data})
            self.metrics.counters["presence_tx"] += 1
            if not await self._flush():
                return
            await asyncio.sleep(interval)


def text_digest(text: str) -> str:
    """A short digest of a text, to compare texts across processes without shipping them."""
    return hashlib.blake2b(text.encode("utf-8"), digest_size=16).hexdigest()


def _error_name(exc: BaseException) -> str:
    if isinstance(exc, aiohttp.WSServerHandshakeError):
        return f"handshake_{exc.status}"
    return type(exc).__name__
