"""The writers of the store benchmark: workloads, one-transaction-per-batch workers, timing.

``measure`` drives one or more workers in rounds: each worker ``prepare``s the events of a
round (untimed), then all ``execute`` at once (timed, one thread each). See
``ops/bench/store.py`` for the cases built from these.
"""

from __future__ import annotations

import asyncio
import random
import threading
import time
import uuid
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any, Protocol
from uuid import UUID

from eventsourcing.application import Application
from eventsourcing.domain import Aggregate, event

from domain import ot
from domain.document import Document
from gateway.recorders import ClientOp
from gateway.store import Store

DOCS_PER_WRITER = 8
"""Documents each writer edits round-robin."""
MAX_DOC_VERSION = 2000
"""A document is replaced by a new one after this many edits (keeps its text short)."""
ROUND_SECONDS = 0.5
"""Target length of one timed round (events for it are generated before it starts)."""
ROUND_CAP = 50_000
"""Most events one writer generates for one round (bounds memory)."""
TOPIC = "domain.document:Document.Edited"
"""The topic of the rows the raw COPY writes."""


class Counter(Aggregate):
    """The library baseline's aggregate: each command is one small event."""

    def __init__(self) -> None:
        self.count = 0

    @event("Incremented")
    def increment(self, by: int) -> None:
        """Add ``by`` (one ``Incremented`` event)."""
        self.count += by


# -- workloads -------------------------------------------------------------------------------


class EditStream:
    """Real ``Document`` events of a few documents edited round-robin, in store order.

    Consecutive ``take`` calls continue the same sequences, so saving the batches in the
    order taken never clashes. With ``client_ops`` each edit carries a client id and seq and
    the matching ``(doc, client, seq, v)`` row is returned with its batch.
    """

    def __init__(self, rng: random.Random, docs: int = DOCS_PER_WRITER, client_ops: bool = False):
        self.rng = rng
        self.client_ops = client_ops
        self.docs = [self._new() for _ in range(docs)]
        self._events = self._generate()

    def _new(self) -> Document:
        return Document.create("bench", "hello, world\n", "bench")

    def _generate(self) -> Iterator[tuple[Any, ClientOp | None]]:
        seq = 0
        while True:
            for i, doc in enumerate(self.docs):
                if doc.doc_version >= MAX_DOC_VERSION:
                    doc = self.docs[i] = self._new()
                op = ot.normalize([self.rng.randrange(len(doc.text) + 1), "xxxxxxxx"])
                if self.client_ops:
                    seq += 1
                    client = f"bench-{i}"
                    v = doc.edit(op, "bench", client=client, seq=seq)
                    row: ClientOp | None = (str(doc.id), client, seq, v)
                else:
                    doc.edit(op, "bench")
                    row = None
                for e in doc.collect_events():
                    yield e, (row if isinstance(e, Document.Edited) else None)

    def take(self, n: int) -> tuple[list[Any], list[ClientOp]]:
        """The next ``n`` events (and their client-op rows)."""
        events: list[Any] = []
        rows: list[ClientOp] = []
        for _ in range(n):
            e, row = next(self._events)
            events.append(e)
            if row is not None:
                rows.append(row)
        return events, rows


class Worker(Protocol):
    """One writer: ``prepare`` work for some batches (untimed), then ``execute`` it (timed)."""

    batch: int

    def prepare(self, batches: int) -> Any:
        """Generate the events of ``batches`` transactions."""

    def execute(self, work: Any) -> int:
        """Write them, one transaction per batch; returns the events written."""


class Timer:
    """Wraps a callable, adding the seconds spent in it (from any thread) to ``seconds``."""

    def __init__(self, fn: Callable[..., Any]) -> None:
        self.fn = fn
        self.seconds = 0.0
        self.calls = 0
        self._lock = threading.Lock()

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        start = time.perf_counter()
        try:
            return self.fn(*args, **kwargs)
        finally:
            spent = time.perf_counter() - start
            with self._lock:
                self.seconds += spent
                self.calls += 1

    def reset(self) -> None:
        """Forget what was timed so far."""
        with self._lock:
            self.seconds = 0.0
            self.calls = 0


def time_recorders(store: Store) -> dict[int, tuple[Application[UUID], Timer]]:
    """Wrap ``insert_events`` of every recorder of the store's library applications.

    The store may write through an application of its own beside the one it reads with;
    which one ``save`` uses is found by looking at which timer a save moved.
    """
    out: dict[int, tuple[Application[UUID], Timer]] = {}
    for value in vars(store).values():
        if isinstance(value, Application) and id(value.recorder) not in out:
            recorder = value.recorder
            timer = Timer(recorder.insert_events)
            recorder.insert_events = timer  # type: ignore[method-assign]
            out[id(recorder)] = (value, timer)
    return out


@dataclass
class LibraryWorker:
    """The library as-is: ``Application.save(*events)`` of ``Counter.Incremented`` events."""

    app: Application[UUID]
    batch: int
    counter: Counter = field(default_factory=Counter)

    def __post_init__(self) -> None:
        self.app.save(self.counter)  # the Created event, before timing

    def prepare(self, batches: int) -> list[list[Any]]:
        out = []
        for _ in range(batches):
            for _ in range(self.batch):
                self.counter.increment(1)
            out.append(list(self.counter.collect_events()))
        return out

    def execute(self, work: list[list[Any]]) -> int:
        for events in work:
            self.app.save(*events)
        return sum(len(w) for w in work)


@dataclass
class StoreWorker:
    """Our store: ``Store.save(events, client_ops)`` of real document events.

    ``direct`` calls the application's event store (``app.events.put``: the same mapper,
    recorder and transaction) instead, skipping what ``Application.save`` does per event
    first (a runtime-checkable ``Protocol`` isinstance in ``ProcessingEvent.collect_events``).
    Not a production path: it shows what that check costs.
    """

    store: Store
    stream: EditStream
    batch: int
    direct: Application[UUID] | None = None

    def prepare(self, batches: int) -> list[tuple[list[Any], list[ClientOp]]]:
        return [self.stream.take(self.batch) for _ in range(batches)]

    def execute(self, work: list[tuple[list[Any], list[ClientOp]]]) -> int:
        if self.direct is not None:
            put = self.direct.events.put
            for events, rows in work:
                put(events, client_ops=rows)
        else:
            for events, rows in work:
                self.store.save(events, rows)
        return sum(len(e) for e, _ in work)


class CommitWorker:
    """The server's commit: ``gateway.writer.AsyncWriter.save_checked`` (one statement,
    ``coscribe_append``: the table lock, NOTIFY, the head check and the inserts), awaited on
    an event loop of the worker's own, exactly as the committer calls it with each tick's
    events, client-op rows and the documents' heads before the batch."""

    def __init__(self, store: Store, stream: EditStream, batch: int) -> None:
        from gateway.writer import AsyncWriter

        self.store = store
        self.stream = stream
        self.batch = batch
        self.loop = asyncio.new_event_loop()
        self.writer = AsyncWriter(store)

    def prepare(self, batches: int) -> list[tuple[list[Any], list[ClientOp], dict[UUID, int]]]:
        work = []
        for _ in range(batches):
            events, rows = self.stream.take(self.batch)
            heads: dict[UUID, int] = {}
            for e in events:
                heads.setdefault(e.originator_id, e.originator_version - 1)
            work.append((events, rows, heads))
        return work

    def execute(self, work: list[tuple[list[Any], list[ClientOp], dict[UUID, int]]]) -> int:
        async def commit_all() -> int:
            n = 0
            for events, rows, heads in work:
                recordings, stale = await self.writer.save_checked(events, rows, heads)
                assert not stale and len(recordings) == len(events)
                n += len(events)
            return n

        return self.loop.run_until_complete(commit_all())

    def close(self) -> None:
        """Close the writer's connection and the loop."""
        self.loop.run_until_complete(self.writer.close())
        self.loop.close()


@dataclass
class CopyWorker:
    """Raw binary COPY of rows shaped like stored events, one committed transaction a batch."""

    conn: Any
    copy_sql: Any
    states: list[bytes]
    batch: int
    keys: list[list[Any]] = field(default_factory=list)

    def __post_init__(self) -> None:
        self.keys = [[uuid.uuid4(), 0] for _ in range(DOCS_PER_WRITER)]
        self._i = 0

    def _row(self) -> tuple[UUID, int, str, bytes]:
        key = self.keys[self._i % len(self.keys)]
        if key[1] >= MAX_DOC_VERSION:
            key[0], key[1] = uuid.uuid4(), 0
        key[1] += 1
        self._i += 1
        return key[0], key[1], TOPIC, self.states[self._i % len(self.states)]

    def prepare(self, batches: int) -> list[list[tuple[UUID, int, str, bytes]]]:
        return [[self._row() for _ in range(self.batch)] for _ in range(batches)]

    def execute(self, work: list[list[tuple[UUID, int, str, bytes]]]) -> int:
        conn = self.conn
        with conn.cursor() as cur:
            for rows in work:
                with conn.transaction(), cur.copy(self.copy_sql) as cp:
                    cp.set_types(["uuid", "int8", "text", "bytea"])
                    for row in rows:
                        cp.write_row(row)
        return sum(len(r) for r in work)


# -- timing ----------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Measured:
    """Events written and the wall-clock seconds the timed rounds took."""

    events: int
    transactions: int
    seconds: float


def measure(workers: Sequence[Worker], seconds: float) -> Measured:
    """Run rounds until ``seconds`` of timed writing: generate, then write in parallel.

    A round's size follows the rate measured so far (about ``ROUND_SECONDS`` of writing,
    at most ``ROUND_CAP`` events per writer), so generating never shows in the figure.
    """
    batch = workers[0].batch
    events = transactions = 0
    elapsed = 0.0
    per_worker = max(2, 100 // batch)
    with ThreadPoolExecutor(max_workers=len(workers)) as pool:
        while elapsed < seconds:
            work = [w.prepare(per_worker) for w in workers]
            start = time.perf_counter()
            if len(workers) == 1:
                done = [workers[0].execute(work[0])]
            else:
                futures = [pool.submit(w.execute, x) for w, x in zip(workers, work, strict=True)]
                done = [f.result() for f in futures]
            took = time.perf_counter() - start
            elapsed += took
            events += sum(done)
            transactions += per_worker * len(workers)
            rate = per_worker / max(took, 1e-6)  # batches per second per writer
            want = min(rate * ROUND_SECONDS, rate * max(seconds - elapsed, 0.0) + 1)
            per_worker = int(max(1, min(want, ROUND_CAP // batch or 1)))
    return Measured(events, transactions, elapsed)
