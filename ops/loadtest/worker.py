"""A load process: runs the sessions and HTTP loops the coordinator deals it, step by step.

Started by :mod:`ops.loadtest.runner` with the ``spawn`` method; talks over one duplex pipe
of pickled dicts through a :class:`~ops.loadtest.channel.Channel`, so the loop never blocks
on it:

- coordinator -> worker: ``{"cmd": "step", ...}`` (see :func:`step_command`),
  ``{"cmd": "verify", "versions": {doc: v}, "deadline_ns": t}``, ``{"cmd": "exit"}``;
- worker -> coordinator: ``ready`` (with its pid), ``progress`` every 0.5 s, ``drained`` once
  its writers' last ops are acknowledged (or the drain timed out), ``result`` (the step's
  :class:`~ops.loadtest.recorder.StepMetrics`), ``closed``, or ``failed`` with a traceback.

Every wait has a deadline, so a silent coordinator or server cannot keep a worker alive.
"""

from __future__ import annotations

import asyncio
import gc
import os
import random
import resource
import time
import traceback
from collections.abc import Callable
from multiprocessing.connection import Connection
from typing import Any
from urllib.parse import urlsplit

from ops.loadtest.channel import Channel
from ops.loadtest.httpclient import HttpConnection, HttpError, open_connection, request_bytes
from ops.loadtest.recorder import StepMetrics, Window
from ops.loadtest.session import EditPlan, Session, SessionSpec, frame_caches, loop_time_at
from ops.runtime import tune_gc

PROGRESS_EVERY_S = 0.5
"""How often a worker reports its counters."""
CONNECT_GATE = 100
"""Most WebSocket handshakes one process has open at once. More only lengthens the
server's queue: past the connect timeout it answers clients that already gave up."""
CLOSE_TIMEOUT_S = 10.0
"""Longest all of a process's sessions get, together, for their close handshakes."""
COMMAND_TIMEOUT_S = 300.0
"""Longest a worker waits for the coordinator's next command within a step."""
HTTP_TIMEOUT_S = 30.0
"""Longest one HTTP read (with its connect) may take."""


def main(conn: Connection, index: int) -> None:
    """Process entry point: serve steps until told to exit or the coordinator goes away."""
    _raise_fd_limit()
    tune_gc()  # its own pauses would count as server latency
    with asyncio.Runner(loop_factory=_loop_factory()) as runner:
        runner.run(_Worker(conn, index).serve())


def step_command(
    *,
    step: int,
    base_url: str,
    sessions: list[SessionSpec],
    edit: EditPlan,
    origin_ns: int,
    drain_deadline_ns: int,
    seed: int,
    http_loops: int = 0,
    http_paths: tuple[str, ...] = (),
    http_weights: tuple[float, ...] = (),
    http_docs: tuple[str, ...] = (),
    http_token: str = "",
    http_pace_s: float = 0.0,
) -> dict[str, Any]:
    """The ``step`` command for one worker (a plain dict, so it pickles across ``spawn``)."""
    return {
        "cmd": "step",
        "step": step,
        "base_url": base_url,
        "sessions": sessions,
        "edit": edit,
        "origin_ns": origin_ns,
        "drain_deadline_ns": drain_deadline_ns,
        "seed": seed,
        "http_loops": http_loops,
        "http_paths": http_paths,
        "http_weights": http_weights,
        "http_docs": http_docs,
        "http_token": http_token,
        "http_pace_s": http_pace_s,
    }


class _Worker:
    def __init__(self, conn: Connection, index: int) -> None:
        self.conn = conn
        self.index = index
        self.inbox: asyncio.Queue[dict[str, Any]] = asyncio.Queue()
        self.channel: Channel | None = None

    def send(self, msg: dict[str, Any]) -> None:
        """Queue a message to the coordinator (the loop never waits on the pipe)."""
        assert self.channel is not None
        msg["worker"] = self.index
        self.channel.send(msg)

    async def send_wait(self, msg: dict[str, Any]) -> None:
        """Send a message and wait until it is written (results, failures)."""
        assert self.channel is not None
        msg["worker"] = self.index
        await self.channel.send_wait(msg)

    async def serve(self) -> None:
        self.channel = Channel(
            self.conn,
            self.inbox.put_nowait,
            lambda: self.inbox.put_nowait({"cmd": "exit"}),
            name=f"loadtest-{self.index}",
        )
        self.channel.start()
        self.send({"kind": "ready", "pid": os.getpid()})
        try:
            while True:
                cmd = await self.inbox.get()
                if cmd["cmd"] == "step":
                    try:
                        await self.run_step(cmd)
                    except _Abort:
                        return
                    except Exception:
                        await self.send_wait({"kind": "failed", "error": traceback.format_exc()})
                        return
                elif cmd["cmd"] == "exit":
                    return
        finally:
            await asyncio.to_thread(self.channel.close)

    async def next_command(self, expected: str) -> dict[str, Any]:
        try:
            cmd = await asyncio.wait_for(self.inbox.get(), COMMAND_TIMEOUT_S)
        except TimeoutError:
            raise _Abort from None
        if cmd["cmd"] != expected:
            raise _Abort
        return cmd

    async def run_step(self, cmd: dict[str, Any]) -> None:
        specs: list[SessionSpec] = cmd["sessions"]
        plan: EditPlan = cmd["edit"]
        window = plan.window
        metrics = StepMetrics(cmd["origin_ns"])
        metrics.counters["sessions"] = len(specs)
        base = cmd["base_url"].rstrip("/")
        url = urlsplit(base)
        server = (url.hostname or "127.0.0.1", url.port or 80)
        loops = cmd["http_loops"]
        gate = asyncio.Semaphore(CONNECT_GATE)
        seed = cmd["seed"]
        frames = frame_caches()
        sessions = [
            Session(s, plan, metrics, server, gate, seed * 1_000_003 + s.index, frames[s.codec])
            for s in specs
        ]
        tasks = [asyncio.create_task(s.run()) for s in sessions]
        rng = random.Random(seed)
        aux = [
            asyncio.create_task(self._progress(metrics)),
            asyncio.create_task(_loop_lag(metrics, window)),
        ]
        aux += [
            asyncio.create_task(
                _http_loop(server, cmd, metrics, window, random.Random(rng.random()))
            )
            for _ in range(loops)
        ]
        # No cyclic collections inside the measured window: this process's pauses would be
        # measured as the server's latency (a young-generation collection took 58-97 ms
        # here, the worst spikes of a standard run). Cycles wait until the window's ops are
        # in: the first collection after the window scans all it kept alive, and enabling
        # it at the window's end delayed the receipts of the last ops in flight (the last
        # half second of every standard run had a p50 of ~100 ms).
        gc_off = asyncio.get_running_loop().call_at(loop_time_at(window.start_ns), gc.disable)
        try:
            await _sleep_until(window.end_ns)
            drain_ns = cmd["drain_deadline_ns"] - window.end_ns
            await _wait_until(
                lambda: not any(s.pending for s in sessions), window.end_ns + drain_ns
            )
            if any(s.pending for s in sessions):
                # The server fell behind: stop feeding it, wait once more for the ops in flight.
                for s in sessions:
                    if s.client is not None:
                        metrics.counters["abandoned_edits"] += s.client.abandon_buffer()
                await _wait_until(
                    lambda: not any(s.pending for s in sessions), window.end_ns + 2 * drain_ns
                )
            pending = [s for s in sessions if s.pending]
            metrics.counters["pending_edits"] += sum(
                s.client.inflight_edits for s in pending if s.client is not None
            )
            metrics.freeze_lost_basis()  # before the coordinator reads the documents back
            self.send({"kind": "drained", "pending": len(pending)})
            verify = await self.next_command("verify")
            versions: dict[str, int] = verify["versions"]
            await _wait_until(
                lambda: all(
                    s.known_version >= versions.get(s.spec.doc, 0)
                    or s.ended.is_set()
                    or not s.joined.is_set()
                    or (s.desynced and s.client is not None)
                    for s in sessions
                ),
                verify["deadline_ns"],
            )
            metrics.full_reports = [_full_report(s) for s in sessions if s.spec.full]
            for s in sessions:
                if s.joined.is_set():
                    seen = metrics.max_version.get(s.spec.doc, -1)
                    metrics.max_version[s.spec.doc] = max(seen, s.known_version)
                d = s.delivery()
                if d is not None:
                    row = metrics.delivery.setdefault(s.spec.doc, [0, 0, 0, 0])
                    row[0] += 1
                    row[1] += d[0]
                    row[2] += d[1]
                    row[3] += d[2]
            for task in aux:
                task.cancel()
            gc.enable()
            metrics.settle(window)
            await self.send_wait({"kind": "result", "metrics": metrics.to_dict()})
        finally:
            gc_off.cancel()
            gc.enable()
            for task in aux:
                task.cancel()
            closing_started = time.monotonic()
            closes = [asyncio.create_task(s.close()) for s in sessions]
            if closes:
                await asyncio.wait(closes, timeout=CLOSE_TIMEOUT_S)
            for s in sessions:
                if s.ws is not None:
                    s.ws.abort()  # whatever did not finish its close handshake in time
            for task in (*tasks, *closes):
                task.cancel()
            await asyncio.gather(*tasks, *closes, *aux, return_exceptions=True)
            closing_s = time.monotonic() - closing_started
        self.send({"kind": "closed", "closing_s": round(closing_s, 3)})

    async def _progress(self, metrics: StepMetrics) -> None:
        log = metrics.fanout_log
        while True:
            await asyncio.sleep(PROGRESS_EVERY_S)
            recent = log.tail(time.time_ns() - int(PROGRESS_EVERY_S * 1e9))
            self.send(
                {
                    "kind": "progress",
                    "counters": metrics.counts(),
                    "errors": dict(metrics.errors),
                    "recent": recent.to_dict() if recent.count else None,
                }
            )


class _Abort(Exception):
    """The coordinator went away or broke the command sequence: stop quietly."""


def _full_report(s: Session) -> dict[str, Any]:
    report = s.report()
    if report is None:
        return {"doc": s.spec.doc, "session": s.spec.index, "joined": False}
    report["joined"] = True
    return report


async def _sleep_until(wall_ns: int) -> None:
    await asyncio.sleep(max(0.0, (wall_ns - time.time_ns()) / 1e9))


async def _wait_until(done: Callable[[], bool], deadline_ns: int, poll_s: float = 0.05) -> bool:
    """Poll ``done`` until it is true or the wall clock passes ``deadline_ns``."""
    while not done():
        if time.time_ns() >= deadline_ns:
            return False
        await asyncio.sleep(poll_s)
    return True


async def _loop_lag(metrics: StepMetrics, window: Window) -> None:
    """Record how late a 100 ms timer fires: the load process's own saturation."""
    loop = asyncio.get_running_loop()
    while True:
        t = loop.time()
        await asyncio.sleep(0.1)
        late = loop.time() - t - 0.1
        if time.time_ns() in window:
            metrics.lag.add(int(late * 1e6))


async def _http_loop(
    server: tuple[str, int],
    cmd: dict[str, Any],
    metrics: StepMetrics,
    window: Window,
    rng: random.Random,
) -> None:
    """Closed-loop reads on one keep-alive connection, from the step start to the window end."""
    await _sleep_until(cmd["origin_ns"])
    loop = asyncio.get_running_loop()
    end = loop_time_at(window.end_ns)
    host, port = server
    headers = {"Authorization": f"Bearer {cmd['http_token']}", "User-Agent": "coscribe-loadtest"}
    paths, weights, docs = cmd["http_paths"], cmd["http_weights"], cmd["http_docs"]
    raw: dict[tuple[str, str], bytes] = {}
    pace = cmd["http_pace_s"]
    at = loop.time() + rng.random() * pace
    counters = metrics.counters
    conn: HttpConnection | None = None
    try:
        while loop.time() < end:
            if pace:
                await asyncio.sleep(at - loop.time())
                at = max(at + pace, loop.time() - pace)
            key = (rng.choices(paths, weights)[0], rng.choice(docs))
            request = raw.get(key)
            if request is None:
                path = key[0].replace("{doc}", key[1])
                request = raw[key] = request_bytes("GET", host, port, path, headers)
            t0 = time.time_ns()
            try:
                async with asyncio.timeout(HTTP_TIMEOUT_S):
                    if conn is None or not conn.usable:
                        conn = await open_connection(host, port)
                    response = await conn.request(request)
            except (OSError, TimeoutError, HttpError) as exc:
                metrics.errors[f"http:{type(exc).__name__}"] += 1
                if conn is not None:
                    conn.close()
                conn = None
                await asyncio.sleep(0.05)
                continue
            t1 = time.time_ns()
            counters["http"] += 1
            if t1 in window:
                counters["http_window"] += 1
                metrics.http.add((t1 - t0) // 1000)
            if response.status >= 400:
                metrics.errors[f"http_{response.status}"] += 1
    finally:
        if conn is not None:
            conn.close()


def _loop_factory() -> Callable[[], asyncio.AbstractEventLoop] | None:
    try:
        import uvloop
    except ImportError:
        return None
    return uvloop.new_event_loop


def _raise_fd_limit() -> None:
    """Allow as many sockets as the hard limit permits (10,000 sessions need them)."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < hard:
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
