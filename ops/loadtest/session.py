"""One simulated collaborator: a WebSocket session on one document, driven by asyncio.

The protocol logic lives in :class:`~ops.loadtest.editor.DocClient`; this module connects
(:mod:`ops.loadtest.wsclient`), sends ``hello`` + ``sub`` in one frame, handles every
incoming frame in the connection's callback, and runs an edit timer (writers) and a presence
timer until the worker closes it. Receipt handling is the load generator's hot path, so a
light session (most of them) does no OT at all: it checks the version sequence, reads the
stamps and counts.
"""

from __future__ import annotations

import asyncio
import hashlib
import random
import time
import traceback
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import msgpack
import orjson

from ops.loadtest import stamp, wsclient
from ops.loadtest.editor import DocClient, ProtocolViolation, delete_op, insert_op
from ops.loadtest.recorder import StepMetrics, Window
from ops.loadtest.wsclient import WsError, WsProtocol

SUBPROTOCOL = {"msgpack": "coscribe.v1.msgpack", "json": "coscribe.v1.json"}
"""The WebSocket subprotocol of each codec."""
WS_PATH = "/v1/ws"
CONNECT_TIMEOUT_S = 10.0
"""Longest a TCP connect plus WebSocket handshake may take."""
MAX_EXCEPTIONS = 5
"""Tracebacks of handler bugs kept per process for the report."""
_STAMP_MASK = stamp.MODULUS - 1


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
    """A collaborator on one document. Call :meth:`run` once; :meth:`close` ends it.

    Everything the server sends is handled synchronously in the connection's receive
    callback; sends are synchronous writes. Only the timers (edits, presence) are tasks.
    """

    def __init__(
        self,
        spec: SessionSpec,
        plan: EditPlan,
        metrics: StepMetrics,
        server: tuple[str, int],
        connect_gate: asyncio.Semaphore,
        seed: int,
    ) -> None:
        self.spec = spec
        self.plan = plan
        self.metrics = metrics
        self.server = server
        self.gate = connect_gate
        self.rng = random.Random(seed)
        self.ws: WsProtocol | None = None
        self.client: DocClient | None = None
        self.version = -1
        self.join_version = -1
        self.ops_received = 0
        self.joined = asyncio.Event()
        self.ended = asyncio.Event()
        self.closing = False
        self.desynced = False
        self.outbox: list[dict[str, Any]] = []
        self._tasks: list[asyncio.Task[None]] = []
        self._connect_started = 0
        self._binary = spec.codec == "msgpack"
        self._decode: Callable[[bytes], Any] = msgpack.unpackb if self._binary else orjson.loads

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
            if self.closing or not await self._connect():
                return
            assert self.ws is not None
            await self.ws.closed
            if not self.closing:
                self.metrics.counters["disconnected"] += 1
                code = self.ws.close_code
                self.metrics.errors[f"close:{code}" if code is not None else "close:dropped"] += 1
        finally:
            for task in self._tasks:
                task.cancel()
            self.ended.set()

    async def close(self) -> None:
        """Close the connection (idempotent); :meth:`run` then returns."""
        self.closing = True
        if self.ws is not None:
            await self.ws.close()

    def delivery(self) -> tuple[int, int, int] | None:
        """``(join version, ops received, own acks)`` of a session still connected, else None.

        Such a session owes ``final version - join version - own acks`` received ops.
        """
        if not self.joined.is_set() or self.ended.is_set():
            return None
        acked = self.client.acked if self.client is not None else 0
        return self.join_version, self.ops_received, acked

    def report(self) -> dict[str, Any] | None:
        """A full session's final state for the convergence check, else None."""
        c = self.client
        if not self.spec.full or c is None or c.text is None or c.confirmed is None:
            return None
        pending = c.inflight_edits + c.buffer_edits
        return {
            "doc": self.spec.doc,
            "session": self.spec.index,
            "version": c.version,
            "length": len(c.confirmed),
            "digest": text_digest(c.confirmed),
            "pending_edits": pending,
            "local_consistent": pending > 0 or c.text == c.confirmed,
            "desynced": self.desynced,
            "ended": self.ended.is_set() and not self.closing,
        }

    # --- connection ---------------------------------------------------------------------

    async def _connect(self) -> bool:
        m = self.metrics
        host, port = self.server
        async with self.gate:
            self._connect_started = time.time_ns()
            try:
                async with asyncio.timeout(CONNECT_TIMEOUT_S):
                    self.ws = await wsclient.connect(
                        host,
                        port,
                        WS_PATH,
                        SUBPROTOCOL[self.spec.codec],
                        self._on_message,
                        self._on_error,
                    )
            except (OSError, TimeoutError, WsError) as exc:
                m.counters["connect_failed"] += 1
                m.errors[f"connect:{_error_name(exc)}"] += 1
                return False
        m.counters["connected"] += 1
        hello = {"t": "hello", "token": self.spec.token, "client": self.spec.client_id}
        self.outbox += [hello, {"t": "sub", "doc": self.spec.doc}]
        return self._flush()

    def _flush(self) -> bool:
        """Send the outbox as one frame; False when the connection is closing."""
        msgs, self.outbox = self.outbox, []
        ws = self.ws
        if ws is None or not ws.open:
            return False
        if not msgs:
            return True
        if self._binary:
            return ws.send(msgpack.packb(msgs))
        return ws.send(orjson.dumps(msgs), text=True)

    def _on_message(self, opcode: int, payload: bytes) -> None:
        now = time.time_ns()
        m = self.metrics
        try:
            frame = self._decode(payload)
        except ValueError:
            m.errors["client:undecodable_frame"] += 1
            return
        m.counters["frames_rx"] += 1
        self._on_frame(frame if isinstance(frame, list) else [frame], now)
        if self.outbox:
            self._flush()

    def _on_error(self, exc: BaseException) -> None:
        m = self.metrics
        m.errors[f"client:{type(exc).__name__}"] += 1
        if len(m.exceptions) < MAX_EXCEPTIONS:
            m.exceptions.append("".join(traceback.format_exception(exc))[-3000:])

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
        self.join_version = version
        m = self.metrics
        m.counters["joined"] += 1
        m.join.add((now - self._connect_started) // 1000)
        self.joined.set()
        if self.spec.writer:
            self._tasks.append(asyncio.create_task(self._edit_loop()))
        if self.plan.presence_interval_s > 0:
            self._tasks.append(asyncio.create_task(self._presence_loop()))

    def _on_ops(self, entries: list[dict[str, Any]], now: int) -> None:
        # The load generator's hot path: every receipt of every op by every session.
        m = self.metrics
        window = self.plan.window
        start, end = window.start_ns, window.end_ns
        in_window = start <= now < end
        client = self.client
        fanout, series = m.fanout, m.fanout_series
        now_units = now // stamp.UNIT_NS
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
            last = op[-1] if op else None
            if (
                type(last) is str
                and len(last) == stamp.WIDTH
                and last[0] == stamp.OPEN
                and last[-1] == stamp.CLOSE
                and len(op) <= 2
            ):
                found: list[str] | tuple[str] = (last[1:-1],)  # one edit: [pos, "[digits]"]
            else:
                found = stamp.in_op(op)
            for digits in found:
                try:
                    age = ((now_units - int(digits, 32)) & _STAMP_MASK) * stamp.UNIT_NS
                except ValueError:
                    continue  # eight characters that were not a stamp after all
                if age > stamp.MAX_AGE_NS:
                    m.counters["clock_anomalies"] += 1
                    continue
                us = age // 1000
                if start <= now - age < end:
                    fanout.add(us)
                series.add(now, us)
        m.counters["ops_rx"] += len(entries)
        self.ops_received += len(entries)
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
            self.closing = True  # a refused join is not a disconnect
            if self.ws is not None:
                self.ws.close_now()

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
            if self.desynced or self.ws is None or not self.ws.open:
                return
            now = time.time_ns()
            self._edit(now)
            m.counters["edits"] += 1
            if now in plan.window:
                m.counters["edits_window"] += 1
            if self.outbox and not self._flush():
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
            if not self._flush():
                return
            await asyncio.sleep(interval)


def text_digest(text: str) -> str:
    """A short digest of a text, to compare texts across processes without shipping them."""
    return hashlib.blake2b(text.encode("utf-8"), digest_size=16).hexdigest()


def _error_name(exc: BaseException) -> str:
    if isinstance(exc, WsError):
        return "handshake"
    return type(exc).__name__
