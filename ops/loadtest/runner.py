"""The coordinator: provisions each step, deals sessions to load processes, measures, verifies.

One step, in order: create the documents (HTTP); plan the sessions and their arrival times;
send each load process its share; open the CPU window ``warmup_s`` after the last arrival
and close it ``measure_s`` later, sampling ``/proc`` meanwhile; wait until every process has
drained; read every document back; let the full clients catch up and report; close.

Every wait is bounded. The run fails (:class:`RunFailed`) when a load process dies or misses
a deadline, or the server refuses setup; a slow or lossy server is a result, not a failure.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import multiprocessing
import os
import platform
import statistics
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any, TypeVar
from urllib.parse import urlsplit

from ops.loadtest import plan, worker
from ops.loadtest.channel import Channel
from ops.loadtest.convergence import check
from ops.loadtest.procstat import CpuAccount, find_servers
from ops.loadtest.progress import Progress
from ops.loadtest.provision import (
    Provisioner,
    ProvisionError,
    client_id,
    filler_text,
    user_name,
)
from ops.loadtest.recorder import StepMetrics, Window
from ops.loadtest.report import SERVER_GROUPS, Cost, StepOutcome, run_report
from ops.loadtest.scenario import Scenario, Step
from ops.loadtest.session import EditPlan, SessionSpec

START_DELAY_S = 1.0
"""Between sending a step and its first arrival: time for every process to set up."""
READY_TIMEOUT_S = 60.0
"""Longest a load process may take to start."""
VERIFY_S = 10.0
"""Longest the full clients get to catch up with the final version."""
SAMPLE_EVERY_S = 1.0
"""How often ``/proc`` is read for memory (and new processes)."""
LOOPBACK = {"127.0.0.1", "localhost", "::1"}
"""The only hosts the tool sends traffic to."""


LAG_EVERY_S = 0.25
"""How often the read models' lag is sampled during a measured window."""
GONE_AFTER = 2
"""Refused connections in a row (one a second) after which the server is taken as gone."""

_T = TypeVar("_T")


class RunFailed(Exception):
    """The run itself failed (not the server's figures): setup, a load process, a deadline."""


@dataclass(frozen=True, slots=True)
class RunOptions:
    """How to run a scenario."""

    url: str
    procs: int
    secret: bytes
    server_pids: tuple[int, ...] = ()
    live: bool = True


def check_url(url: str) -> str:
    """Return ``url`` without a trailing slash; refuse anything but http(s) on loopback."""
    parts = urlsplit(url)
    try:
        parts.port  # noqa: B018 (parsed on access: a bad port raises here, not mid-run)
    except ValueError as exc:
        raise ValueError(f"--url {url!r}: {exc}") from None
    if parts.scheme not in ("http", "https") or parts.hostname not in LOOPBACK:
        raise ValueError(f"--url must be http://127.0.0.1:PORT (loopback only), got {url!r}")
    return url.rstrip("/")


def sign_tokens(secret: bytes, users: int) -> dict[str, str]:
    """A token for each load-test user, signed as the server's ``coscribe token`` would."""
    from gateway.auth import sign_token  # the server's own signer, so the formats agree

    return {user_name(i): sign_token(secret, user_name(i)) for i in range(users)}


class _Procs:
    """The load processes and the pipe messages coming from them."""

    def __init__(self, count: int) -> None:
        self.count = count
        self.channels: list[Channel] = []
        self.procs: list[multiprocessing.process.BaseProcess] = []
        self.pids: list[int] = []
        self.inbox: asyncio.Queue[dict[str, Any]] = asyncio.Queue()
        self.early: list[dict[str, Any]] = []  # arrived while another kind was awaited

    async def start(self) -> None:
        ctx = multiprocessing.get_context("spawn")
        for i in range(self.count):
            parent, child = ctx.Pipe(duplex=True)
            p = ctx.Process(target=worker.main, args=(child, i), name=f"loadtest-{i}", daemon=True)
            p.start()
            child.close()
            channel = Channel(
                parent,
                self.inbox.put_nowait,
                functools.partial(self._gone, i),
                name=f"coordinator-{i}",
            )
            channel.start()
            self.channels.append(channel)
            self.procs.append(p)
        ready = await self.gather("ready", READY_TIMEOUT_S)
        self.pids = [ready[i]["pid"] for i in range(self.count)]

    def _gone(self, index: int) -> None:
        self.inbox.put_nowait({"kind": "failed", "worker": index, "error": "load process exited"})

    async def send(self, index: int, msg: dict[str, Any]) -> None:
        try:
            await self.channels[index].send_wait(msg)
        except OSError as exc:
            raise RunFailed(f"load process {index} is gone: {exc}") from exc

    async def gather(
        self,
        kind: str,
        timeout_s: float,
        on_progress: Callable[[dict[str, Any]], None] | None = None,
    ) -> dict[int, dict[str, Any]]:
        """Wait for one ``kind`` message from every process; progress goes to the callback.

        A process may run ahead of the others (send ``closed`` while another is still on its
        ``result``): messages of a kind not awaited now are kept for the call that wants them.
        """
        got: dict[int, dict[str, Any]] = {}
        for msg in [m for m in self.early if m["kind"] == kind]:
            self.early.remove(msg)
            got[msg["worker"]] = msg
        deadline = time.monotonic() + timeout_s
        while len(got) < self.count:
            left = deadline - time.monotonic()
            if left <= 0:
                raise RunFailed(f"load processes missed the deadline for {kind!r}")
            try:
                msg = await asyncio.wait_for(self.inbox.get(), left)
            except TimeoutError:
                continue
            if msg["kind"] == "failed":
                raise RunFailed(f"load process {msg['worker']} failed: {msg['error']}")
            if msg["kind"] == kind:
                got[msg["worker"]] = msg
            elif msg["kind"] == "progress":
                if on_progress is not None:
                    on_progress(msg)
            else:
                self.early.append(msg)
        return got

    async def stop(self, grace_s: float = 10.0) -> None:
        """Tell every process to exit; kill one still running ``grace_s`` later (a process
        mid-step reads no commands: after a failure the run does not wait for it long)."""
        for channel in self.channels:
            with contextlib.suppress(OSError):
                await channel.send_wait({"cmd": "exit"})
        for p in self.procs:
            await asyncio.to_thread(p.join, grace_s)
            if p.is_alive():
                p.kill()  # our own child, by its handle
                await asyncio.to_thread(p.join, 5.0)
        for channel in self.channels:
            await asyncio.to_thread(channel.close)


class Runner:
    """Runs one scenario against one server. Create, then ``await run()`` once."""

    def __init__(self, scenario: Scenario, options: RunOptions, progress: Progress) -> None:
        self.scenario = scenario
        self.options = options
        self.base = check_url(options.url)
        self.port = urlsplit(self.base).port or (443 if self.base.startswith("https") else 80)
        self._host = urlsplit(self.base).hostname or "127.0.0.1"
        self.progress = progress
        self.outcomes: list[StepOutcome] = []
        self._started = datetime.now(UTC)
        self._probe_before = 0.0

    async def run(self) -> dict[str, Any]:
        """Run every step; return the report (see :func:`ops.loadtest.report.run_report`).

        Raises ``RunFailed``; ``report`` then gives the steps that finished before it."""
        self._started = datetime.now(UTC)
        users = max(s.distinct_users for s in self.scenario.steps)
        tokens = sign_tokens(self.options.secret, users)
        procs = _Procs(self.options.procs)
        self._probe_before = cpu_probe_us()
        async with Provisioner(self.base, tokens) as http:
            try:
                await http.health()
            except ProvisionError as exc:
                raise RunFailed(f"server at {self.base} is not healthy: {exc}") from exc
            await procs.start()
            grace_s = 1.0
            try:
                for i, step in enumerate(self.scenario.steps):
                    self.outcomes.append(await self._step(i, step, http, procs, tokens))
                grace_s = 10.0
            except ProvisionError as exc:  # making documents, or reading them back after
                raise RunFailed(f"a request to the server failed: {exc}") from exc
            finally:
                await procs.stop(grace_s)
        return self.report()

    def report(self, failed: str | None = None) -> dict[str, Any]:
        """The report of the steps run so far; ``failed``: why the run stopped before the
        end (the report then says so, and covers only the steps that finished)."""
        meta: dict[str, Any] = {
            "url": self.base,
            "procs": self.options.procs,
            "started_at": self._started.isoformat(timespec="seconds"),
            "machine": _machine(self._probe_before, cpu_probe_us()),
        }
        if failed is not None:
            meta["failed"] = failed
        return run_report(self.scenario, self.outcomes, meta)

    async def _step(
        self, index: int, step: Step, http: Provisioner, procs: _Procs, tokens: dict[str, str]
    ) -> StepOutcome:
        seed = self.scenario.seed * 7919 + index
        users = [user_name(i) for i in range(step.distinct_users)]
        self.progress.stage(step, index, len(self.scenario.steps), "creating documents")
        text = filler_text(step.text_size, seed)
        title = f"loadtest {self.scenario.name}/{step.name}"
        initial = await http.create_many(step.documents, title, text, users[1:])
        doc_ids = [d.id for d in initial]

        sessions = plan.sessions(step)
        offsets = plan.arrival_offsets(step.phases, len(sessions))
        arrivals_s = plan.arrivals_end(step.phases, len(sessions))
        origin = time.time_ns() + int(START_DELAY_S * 1e9)
        window = Window(
            origin + int((arrivals_s + step.warmup_s) * 1e9),
            origin + int((arrivals_s + step.warmup_s + step.measure_s) * 1e9),
        )
        drain_deadline = window.end_ns + int(step.drain_s * 1e9)
        edit = EditPlan(
            interval_s=step.op_interval_ms / 1000,
            jitter=step.jitter,
            delete_ratio=step.delete_ratio,
            presence_interval_s=step.presence_interval_s,
            window=window,
        )
        specs = [
            SessionSpec(
                index=s.index,
                doc=doc_ids[s.doc],
                writer=s.writer,
                full=s.full,
                token=tokens[user_name(s.user)],
                codec=s.codec,
                arrival_ns=origin + int(offsets[s.index] * 1e9),
                client_id=client_id(s.user, index, s.index),
            )
            for s in sessions
        ]
        shares = [specs[i :: procs.count] for i in range(procs.count)]
        loops = _http_shares(step, procs.count)
        for i in range(procs.count):
            http_args: dict[str, Any] = {}
            if step.http is not None:
                http_args = {
                    "http_loops": loops[i],
                    "http_paths": tuple(r.path for r in step.http.requests),
                    "http_weights": tuple(r.weight for r in step.http.requests),
                    "http_docs": tuple(doc_ids),
                    "http_token": tokens[user_name(0)],
                    "http_pace_s": (
                        step.http.concurrency / step.http.rate if step.http.rate else 0.0
                    ),
                }
            await procs.send(
                i,
                worker.step_command(
                    step=index,
                    base_url=self.base,
                    sessions=shares[i],
                    edit=edit,
                    origin_ns=origin,
                    drain_deadline_ns=drain_deadline,
                    seed=seed * 31 + i,
                    **http_args,
                ),
            )

        roots = {"gateway": self._server_roots(), "loadgen": {os.getpid()}}
        account = CpuAccount(roots=roots)
        stop_sampling = asyncio.Event()
        sampler = asyncio.create_task(self._sample(account, window, stop_sampling))
        lags = asyncio.create_task(self._sample_lag(http, window))
        watch = asyncio.create_task(_watch_server(self._host, self.port))
        self.progress.begin_step(step, index, len(self.scenario.steps), origin, window, arrivals_s)
        try:
            timeout = (drain_deadline - time.time_ns()) / 1e9 + 30.0
            await _unless_gone(procs.gather("drained", timeout, self.progress.update), watch)
            self.progress.stage(step, index, len(self.scenario.steps), "verifying")
            read = await http.fetch_many(doc_ids)
            versions = {d.id: d.version for d in read}
            verify_deadline = time.time_ns() + int(VERIFY_S * 1e9)
            for i in range(procs.count):
                await procs.send(
                    i, {"cmd": "verify", "versions": versions, "deadline_ns": verify_deadline}
                )
            results = await _unless_gone(
                procs.gather("result", VERIFY_S + 60.0, self.progress.update), watch
            )
            final = await http.fetch_many(doc_ids)  # the same, unless late ops still landed
            await procs.gather("closed", 60.0, self.progress.update)
        except BaseException:
            sampler.cancel()  # the run failed: no figures to finish
            lags.cancel()
            raise
        finally:
            watch.cancel()
        stop_sampling.set()
        cost = await _cost_of(sampler, account)
        projection_lag = await lags
        metrics = StepMetrics(origin)
        for i in range(procs.count):
            metrics.merge(StepMetrics.from_dict(results[i]["metrics"]))
        convergence = check(initial, read, final, metrics, stamps_exact=step.delete_ratio == 0)
        self.progress.end_step()
        return StepOutcome(step, metrics, window.seconds, cost, convergence, procs.count,
                           projection_lag)

    async def _sample_lag(self, http: Provisioner, window: Window) -> list[tuple[float, int]]:
        """The read models' lag every ``LAG_EVERY_S`` through ``window`` (empty if the server
        does not tell): how far the projections trail the edits of the load."""
        samples: list[tuple[float, int]] = []
        await asyncio.sleep(max(0.0, (window.start_ns - time.time_ns()) / 1e9))
        while time.time_ns() < window.end_ns:
            lag = await http.projection_lag()
            if lag is None and not samples:
                return samples
            if lag is not None:
                samples.append(lag)
            await asyncio.sleep(LAG_EVERY_S)
        return samples

    def _server_roots(self) -> set[int]:
        if self.options.server_pids:
            return set(self.options.server_pids)
        return find_servers(self.port)

    async def _sample(self, account: CpuAccount, window: Window, stop: asyncio.Event) -> Cost:
        """Read ``/proc`` until ``stop``; the CPU figures cover exactly ``window``.

        The window's edges are read on time even when ``stop`` comes early, so a step that
        ends right after its window still gets its closing reading.
        """
        frozen: dict[str, float] | None = None
        busy = 0.0
        while True:
            now = time.time_ns()
            if not account.started and now >= window.start_ns:
                await asyncio.to_thread(account.begin)
            elif account.started and frozen is None and now >= window.end_ns:
                await asyncio.to_thread(account.sample)
                frozen = account.cpu_seconds()
                busy = account.machine_busy_seconds()
            else:
                await asyncio.to_thread(account.sample)
            if stop.is_set() and (frozen is not None or time.time_ns() < window.start_ns):
                return Cost(cpu_s=frozen or {}, machine_busy_s=busy)
            nxt = now + int(SAMPLE_EVERY_S * 1e9)
            for edge in (window.start_ns, window.end_ns):
                if now < edge < nxt:
                    nxt = edge
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stop.wait(), max(0.0, (nxt - time.time_ns()) / 1e9))


async def _watch_server(host: str, port: int) -> None:
    """Raise :class:`RunFailed` once the server's port has refused ``GONE_AFTER``
    connections in a row, one a second: the server is gone. A slow answer is not."""
    refused = 0
    while True:
        await asyncio.sleep(SAMPLE_EVERY_S)
        try:
            _, writer = await asyncio.wait_for(asyncio.open_connection(host, port), 5.0)
        except ConnectionRefusedError:
            refused += 1
            if refused >= GONE_AFTER:
                raise RunFailed(f"the server is gone: {host}:{port} refuses connections") from None
            continue
        except (TimeoutError, OSError):
            refused = 0
            continue
        refused = 0
        writer.close()
        with contextlib.suppress(OSError):
            await writer.wait_closed()


async def _unless_gone(aw: Awaitable[_T], watch: asyncio.Task[None]) -> _T:
    """``aw``'s result, or the watcher's :class:`RunFailed` as soon as it has one."""
    task = asyncio.ensure_future(aw)
    await asyncio.wait({task, watch}, return_when=asyncio.FIRST_COMPLETED)
    if not task.done():
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task
        watch.result()  # raises: the watcher ends only by failing
    return task.result()


async def _cost_of(sampler: asyncio.Task[Cost], account: CpuAccount) -> Cost:
    cost = await sampler
    cost.peak_rss = dict(account.peak_rss)
    cost.peak_server_rss = account.peak_of(SERVER_GROUPS)
    cost.peak_server_vmrss = account.peak_of(SERVER_GROUPS, vmrss=True)
    cost.pids = {g: sorted(p) for g, p in account.pids.items()}
    cost.server_found = bool(account.roots["gateway"]) and "gateway" in account.peak_rss
    return cost


def _http_shares(step: Step, procs: int) -> list[int]:
    """How many HTTP loops each process runs (the step's concurrency dealt evenly)."""
    n = step.http.concurrency if step.http is not None else 0
    return [n // procs + (1 if i < n % procs else 0) for i in range(procs)]


PROBE_ROUNDS = 7
"""Rounds of :func:`cpu_probe_us`'s workload; the median is reported."""


def cpu_probe_us(rounds: int = PROBE_ROUNDS) -> float:
    """Median wall time, in µs, of a fixed single-threaded Python workload (~8 ms a round).

    On a virtual machine the same code runs up to twice as fast or slow from one hour to
    the next; a report that carries this figure, read before and after its steps, says in
    which phase it was measured. Blocks the loop for ~0.1 s, outside every step.
    """
    times = []
    for _ in range(rounds):
        t0 = time.perf_counter()
        _probe_work()
        times.append(time.perf_counter() - t0)
    return round(statistics.median(times) * 1e6, 1)


def _probe_work() -> int:
    """Interpreter work of the kinds the gateway does: arithmetic, dicts, slicing, joins."""
    table: dict[int, int] = {}
    acc = 0
    text = "coscribe " * 64
    for i in range(100_000):
        acc = (acc * 31 + i) & 0xFFFF
        table[acc & 1023] = i
        if i % 50 == 0:
            text = text[7:] + text[:7]
    return acc + len(table) + len("".join(text.split()))


def _machine(probe_before: float, probe_after: float) -> dict[str, Any]:
    try:
        import uvloop  # noqa: F401  (only asking whether the load processes will use it)

        loop = "uvloop"
    except ImportError:
        loop = "asyncio"
    try:
        load = os.getloadavg()
    except OSError:
        load = (0.0, 0.0, 0.0)
    return {
        "cpus": os.cpu_count(),
        "python": platform.python_version(),
        "loop": loop,
        "loadavg_1m": round(load[0], 2),
        "cpu_probe_us": {"before": probe_before, "after": probe_after},
    }
