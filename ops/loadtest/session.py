"""One simulated collaborator: a WebSocket session on one document, driven by asyncio.

The protocol logic lives in :mod:`ops.loadtest.editor` (:class:`DocClient` for the full
clients, :class:`LightEditor` for the other writers); this module connects
(:mod:`ops.loadtest.wsclient`), sends ``hello`` + ``sub`` in one frame, handles every
incoming frame in the connection's callback, and runs an edit timer (writers) and a presence
timer (plain loop timers, no task each) until the worker closes it.

Receipt handling is the load generator's hot path: every op reaches every other session of
its document. Frames are decoded once per process (:class:`~ops.loadtest.receipts.FrameCache`,
the server sends the same bytes to all), and a light session (most of them) does no OT at
all: it checks the version sequence, updates its length, timestamps the stamps the run
carries into the process's sample log and counts.
"""

from __future__ import annotations

import asyncio
import hashlib
import random
import time
import traceback
from collections import Counter
from dataclasses import dataclass
from typing import Any

import msgpack
import orjson

from ops.loadtest import stamp, wsclient
from ops.loadtest.editor import DocClient, LightEditor, ProtocolViolation, delete_op, insert_op
from ops.loadtest.receipts import FrameCache, Malformed, OpsRun
from ops.loadtest.recorder import StepMetrics, Window
from ops.loadtest.wsclient import WsError, WsProtocol

SUBPROTOCOL = {"msgpack": "coscribe.v1.msgpack", "json": "coscribe.v1.json"}
"""The WebSocket subprotocol of each codec."""
WS_PATH = "/v1/ws"
CONNECT_TIMEOUT_S = 10.0
"""Longest a TCP connect plus WebSocket handshake may take."""
MAX_EXCEPTIONS = 5
"""Tracebacks of handler bugs kept per process for the report."""
_UNIT_NS = stamp.UNIT_NS


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
    callback; sends are synchronous writes; edits and presence run on loop timers.
    ``frames`` is the process's cache for this session's codec (see :func:`frame_caches`).
    """

    def __init__(
        self,
        spec: SessionSpec,
        plan: EditPlan,
        metrics: StepMetrics,
        server: tuple[str, int],
        connect_gate: asyncio.Semaphore,
        seed: int,
        frames: FrameCache,
    ) -> None:
        self.spec = spec
        self.plan = plan
        self.metrics = metrics
        self.server = server
        self.gate = connect_gate
        self.frames = frames
        self.rng = random.Random(seed)
        self.ws: WsProtocol | None = None
        self.client: DocClient | LightEditor | None = None
        self.full: DocClient | None = None
        """The same object as ``client`` for a full session, else None."""
        self.light: LightEditor | None = None
        """The same object as ``client`` for a light writer, else None."""
        self.version = -1
        self.join_version = -1
        self.ops_received = 0
        self.joined = asyncio.Event()
        self.ended = asyncio.Event()
        self.closing = False
        self.desynced = False
        self.outbox: list[dict[str, Any]] = []
        self._edit_timer: asyncio.TimerHandle | None = None
        self._presence_timer: asyncio.TimerHandle | None = None
        self._edit_at = 0.0
        self._edit_end = 0.0
        self._connect_started = 0
        self._binary = spec.codec == "msgpack"
        # Bound once: the receive path runs for every op of every other session.
        self._tally = metrics.tally
        self._kept = frames.frames.get
        self._log_run = metrics.fanout_log.log_run
        self._origin_ns = metrics.fanout_log.origin_ns
        self._start_ns = plan.window.start_ns
        self._end_ns = plan.window.end_ns

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
            self._cancel_timers()
            self.ended.set()

    async def close(self) -> None:
        """Close the connection (idempotent); :meth:`run` then returns."""
        self.closing = True
        self._cancel_timers()
        if self.ws is not None:
            await self.ws.close()

    def _cancel_timers(self) -> None:
        for timer in (self._edit_timer, self._presence_timer):
            if timer is not None:
                timer.cancel()
        self._edit_timer = self._presence_timer = None

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
        c = self.full
        if c is None or c.text is None or c.confirmed is None:
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
        # Join time counts from here: a wait for the gate is the server's slowness too.
        self._connect_started = time.time_ns()
        async with self.gate:
            try:
                async with asyncio.timeout(CONNECT_TIMEOUT_S):
                    self.ws = await wsclient.connect(
                        host,
                        port,
                        WS_PATH,
                        SUBPROTOCOL[self.spec.codec],
                        self._on_message,
                        self._on_exception,
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
        frame = self._kept(payload)  # the frame another session of this process decoded
        if frame is None:
            try:
                frame = self.frames.get(payload)
            except ValueError:
                self.metrics.errors["client:undecodable_frame"] += 1
                return
        self._tally.frames_rx += 1
        if frame.run is not None:
            if frame.presence:
                self._tally.presence_rx += frame.presence
            self._on_run(frame.run, now)
        else:
            self._on_frame(frame.messages, now)
        if self.outbox:
            self._flush()

    def _on_exception(self, exc: BaseException) -> None:
        m = self.metrics
        m.errors[f"client:{type(exc).__name__}"] += 1
        if len(m.exceptions) < MAX_EXCEPTIONS:
            m.exceptions.append("".join(traceback.format_exception(exc))[-3000:])

    # --- incoming -----------------------------------------------------------------------

    def _on_frame(self, frame: list[Any], now: int) -> None:
        for msg in frame:
            t = msg.get("t") if isinstance(msg, dict) else None
            if t == "ops":
                try:
                    run = self.frames.run([msg])
                except Malformed:
                    self.metrics.errors["client:bad_ops"] += 1
                    continue
                self._on_run(run, now)
            elif t == "ack":
                self._on_ack(msg, now)
            elif t == "presence":
                self._tally.presence_rx += 1
            elif t == "snapshot":
                self._on_snapshot(msg, now)
            elif t == "error":
                self._on_server_error(msg)
            elif t not in ("welcome", "pong"):
                self.metrics.errors["client:unknown_message"] += 1

    def _on_snapshot(self, msg: dict[str, Any], now: int) -> None:
        text = msg.get("text", "")
        version = msg.get("v", 0)
        if self.spec.full:
            self.client = self.full = DocClient(self.spec.doc, version, text)
        elif self.spec.writer:
            self.client = self.light = LightEditor(self.spec.doc, version, len(text), self.rng)
        else:
            self.version = version
        self.join_version = version
        m = self.metrics
        m.counters["joined"] += 1
        m.join.add((now - self._connect_started) // 1000)
        self.joined.set()
        loop = asyncio.get_running_loop()
        if self.spec.writer:
            interval = self.plan.interval_s
            self._edit_end = loop_time_at(self.plan.window.end_ns)
            self._edit_at = loop.time() + self.rng.random() * interval
            self._schedule_edit(loop)
        if self.plan.presence_interval_s > 0:
            delay = self.rng.random() * self.plan.presence_interval_s
            self._presence_timer = loop.call_later(delay, self._presence_tick)

    def _on_run(self, run: OpsRun, now: int) -> None:
        # The load generator's hot path: every receipt of every op by every session.
        c = self.client
        if run.count:
            if c is None:
                if self.version >= 0 and (run.first_v != self.version + 1 or not run.in_order):
                    self.metrics.errors["client:version_gap"] += 1
                self.version = run.last_v
            elif not self.desynced:
                light = self.light
                try:
                    if light is None or not light.remote_run(
                        run.first_v, run.last_v, run.delta, run.in_order
                    ):
                        for v, op in run.entries:
                            c.remote(v, op)
                except ProtocolViolation:
                    self.metrics.errors["client:version_gap"] += 1
                    self._desync()
        tally = self._tally
        n = run.count
        tally.ops_rx += n
        self.ops_received += n
        if self._start_ns <= now < self._end_ns:
            tally.ops_rx_window += n
        if run.stamps:  # ages are worked out after the window (SampleLog.fold)
            self._log_run(((now - self._origin_ns) // 1000, now // _UNIT_NS, run.stamps))

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
        us = (now - done.sent_ns) // 1000
        if self._start_ns <= done.sent_ns < self._end_ns:
            m.ack.add(us)
        m.ack_series.add(now, us)
        tally = self._tally
        tally.acks += 1
        m.acks_by_doc[self.spec.doc] += 1
        if self._start_ns <= now < self._end_ns:
            tally.acks_window += 1
            tally.acked_edits_window += done.edits
        if done.stamps:
            stamps = m.acked_stamps.get(self.spec.doc)
            if stamps is None:
                stamps = m.acked_stamps[self.spec.doc] = Counter()
            stamps.update(done.stamps)
        if done.send is not None:
            self.outbox.append(done.send)

    def _on_server_error(self, msg: dict[str, Any]) -> None:
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

    def _schedule_edit(self, loop: asyncio.AbstractEventLoop) -> None:
        if self._edit_at < self._edit_end and not self.closing:
            self._edit_timer = loop.call_at(self._edit_at, self._edit_tick)

    def _edit_tick(self) -> None:
        try:
            if self.desynced or self.closing or self.ws is None or not self.ws.open:
                return
            now = time.time_ns()
            self._edit(now)
            tally = self._tally
            tally.edits += 1
            if self._start_ns <= now < self._end_ns:
                tally.edits_window += 1
            if self.outbox and not self._flush():
                return
            plan = self.plan
            interval = plan.interval_s
            step = interval
            if plan.jitter:
                step *= 1.0 + plan.jitter * (2.0 * self.rng.random() - 1.0)
            self._edit_at += step
            loop = asyncio.get_running_loop()
            behind = loop.time() - self._edit_at
            if behind > interval:
                # The process fell behind; offer what it can rather than a burst.
                self.metrics.counters["edits_skipped"] += int(behind / interval)
                self._edit_at = loop.time()
            self._schedule_edit(loop)
        except Exception as exc:  # a bug here must not pass silently to the loop's handler
            self._on_exception(exc)

    def _edit(self, now: int) -> None:
        c = self.client
        assert c is not None
        light, full = self.light, self.full
        rng = self.rng
        length = c.length
        deleting = self.plan.delete_ratio and c.can_delete and length > 2 * stamp.WIDTH
        msg: dict[str, Any] | None
        if deleting and rng.random() < self.plan.delete_ratio:
            n = rng.randint(1, stamp.WIDTH)
            if light is not None:
                msg = light.delete(n, now)
            else:
                assert full is not None
                msg = full.edit(delete_op(rng.randrange(length - n + 1), n), now)
        else:
            text = stamp.encode(now)
            if light is not None:
                msg = light.insert(text, now)
            else:
                assert full is not None
                msg = full.edit(insert_op(rng.randrange(length + 1), text), now, (text[1:-1],))
        if msg is not None:
            self.outbox.append(msg)

    def _presence_tick(self) -> None:
        try:
            if self.closing or self.ws is None or not self.ws.open:
                return
            length = self.client.length if self.client is not None else 0
            data = {"cursor": self.rng.randrange(length + 1)}
            self.outbox.append({"t": "presence", "doc": self.spec.doc, "data": data})
            self.metrics.counters["presence_tx"] += 1
            if not self._flush():
                return
            loop = asyncio.get_running_loop()
            self._presence_timer = loop.call_later(
                self.plan.presence_interval_s, self._presence_tick
            )
        except Exception as exc:
            self._on_exception(exc)


def frame_caches() -> dict[str, FrameCache]:
    """One frame cache per codec, to be shared by every session of a load process."""
    return {"msgpack": FrameCache(msgpack.unpackb), "json": FrameCache(orjson.loads)}


def text_digest(text: str) -> str:
    """A short digest of a text, to compare texts across processes without shipping them."""
    return hashlib.blake2b(text.encode("utf-8"), digest_size=16).hexdigest()


def _error_name(exc: BaseException) -> str:
    if isinstance(exc, WsError):
        return "handshake"
    return type(exc).__name__
