"""Rebuild a read model from the first event, into fresh tables swapped in when caught up.

Reads keep working during a rebuild: the live tables (``rm_documents``) are untouched while
the rebuild fills ``rm_documents__next`` under its own tracking row (``documents__next``).
Once it has caught up with the log, one transaction:

1. takes the setup lock and the live tracking row (so no live runner commits meanwhile);
2. applies whatever the live runner got to beyond the rebuild (the rebuild must not be behind
   the tables it replaces);
3. drops the live tables, renames the fresh ones into their place, and moves the live
   tracking row to the rebuild's position.

A live runner then finds its tracking row moved (its compare-and-set fails), re-reads it and
carries on from there on the new tables.

A rebuild that fails or is interrupted (Ctrl-C, SIGTERM) drops its fresh tables and tracking
rows; one killed outright leaves them (``GET /v1/projections`` lists them as
``interrupted``) until the next rebuild starts them afresh.

While the rebuild applies one page, the next ones are read, decoded and mapped to the
models' statements on a thread of its own (``PageFeed``): that Python work fits in the time
the database spends on the pages before.
"""

from __future__ import annotations

import contextlib
import gc
import queue
import sys
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

from projections.db import ReadDB, ReadDBError
from projections.model import ReadModel
from projections.runner import EventSource, PreparedPage, Runner
from projections.sql import Renderer, iso

NEXT = "__next"
"""Suffix of the tables and the tracking row of a rebuild in progress."""
LOCK = "replay"
"""The ``ReadDB.exclusive`` lock a replay holds while it runs: one for every read model of
the database, since rebuilds share the setup of the fresh tables. Tables and tracking rows
with ``NEXT`` while no process holds it are the leftovers of a replay that was killed."""
REPLAY_PAGE = 2000
"""Events per transaction during a rebuild."""
AHEAD_PAGES = 3
"""Pages a rebuild keeps read, decoded and mapped ahead of the one the database applies."""
SWITCH_SECONDS = 0.0005
"""The interpreter's switch interval during a rebuild (``sys.setswitchinterval``)."""

Progress = Callable[[int, int], None]
"""``progress(position, head)``: called after every page."""


@dataclass(frozen=True, slots=True)
class RebuildResult:
    """What a rebuild did: events applied and how long it took."""

    name: str
    position: int
    events: int
    seconds: float

    @property
    def rate(self) -> float:
        """Events per second."""
        return self.events / self.seconds if self.seconds > 0 else float("inf")


_END = object()
"""What a feed's queue holds after the last page it read ahead."""


class PageFeed:
    """An ``EventSource`` whose pages are read, decoded and mapped ahead, on a thread.

    The thread reads the log in order from position ``start`` (``limit`` events a page),
    turns each page into a ``PreparedPage`` (every model's statements, computed there: page
    mappings are pure functions of the page) and keeps up to ``depth`` of them ready, so
    that the Python work of the next pages overlaps the database's work on this one. It
    stops after the first page shorter than ``limit`` (the head of the log then).

    A read that asks for the feed's next page gets it (waiting if need be); any other read,
    or any read after the feed has ended, goes to ``source`` directly. ``source`` must allow
    reads from two threads (the store's recorder has a connection per thread). ``close``
    when done.
    """

    def __init__(
        self,
        source: EventSource,
        models: Sequence[ReadModel],
        start: int,
        limit: int,
        depth: int = AHEAD_PAGES,
    ) -> None:
        self.source = source
        self.models = list(models)
        self.limit = limit
        self._queue: queue.Queue[Any] | None = queue.Queue(depth)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, args=(start, self._queue),
                                        name="replay-read", daemon=True)
        self._thread.start()

    def _run(self, after: int, q: queue.Queue[Any]) -> None:
        try:
            while not self._stop.is_set():
                page = self.source.read(after, self.limit)
                if page:
                    page = PreparedPage(page, {m.name: m.statements(page) for m in self.models})
                    self._put(q, (after, page))
                    after = page[-1][0]
                if len(page) < self.limit:
                    break
        except BaseException as exc:  # handed to the reader, which raises it
            self._put(q, exc)
            return
        self._put(q, _END)

    def _put(self, q: queue.Queue[Any], item: Any) -> None:
        while not self._stop.is_set():
            try:
                q.put(item, timeout=0.1)
                return
            except queue.Full:
                continue

    def read(self, after: int, limit: int) -> list[tuple[int, Any]]:
        """The feed's next page if it is the one asked for, else a direct read."""
        q = self._queue
        if q is not None and limit == self.limit:
            item = q.get()
            if isinstance(item, BaseException):
                self._queue = None
                raise item
            if item is not _END:
                start, page = item
                if start == after:
                    return page  # type: ignore[no-any-return]
            self._queue = None  # off the feed's course, or past its end: read directly now
        return self.source.read(after, limit)

    def head(self) -> int:
        """The log's head, from ``source``."""
        return self.source.head()

    def close(self) -> None:
        """Stop the thread; pages not taken are dropped."""
        self._stop.set()
        self._thread.join()


def rebuild(
    db: ReadDB,
    source: EventSource,
    model: ReadModel,
    *,
    page_size: int = REPLAY_PAGE,
    progress: Progress | None = None,
) -> RebuildResult:
    """Rebuild ``model`` from event 1 and swap it in; returns the counts."""
    return rebuild_all(db, source, [model], page_size=page_size, progress=progress)[0]


def rebuild_all(
    db: ReadDB,
    source: EventSource,
    models: Sequence[ReadModel],
    *,
    page_size: int = REPLAY_PAGE,
    progress: Progress | None = None,
) -> list[RebuildResult]:
    """Rebuild ``models`` in one pass over the log (each event decoded once), swap them in.

    The pages come from a ``PageFeed`` (read, decoded and mapped on its thread). That thread
    and this one share the GIL; while the rebuild runs, the interpreter's switch interval is
    ``SWITCH_SECONDS`` so that this thread gets it back as soon as the database answers
    (with the default 5 ms, the database waited for the feed's Python), and the cyclic
    garbage collector is off (pages hold no cycles: reference counting frees them).
    """
    started = time.perf_counter()
    runner = Runner(db, source, models, page_size=page_size, suffix=NEXT)
    try:
        events = _fill(runner, source, models, page_size, progress)
        # Built once over the finished tables: row by row they cost the rebuild a third of
        # the database's time. The live tables still serve reads meanwhile.
        runner.create_read_indexes()
        extra = {m.name: swap(db, source, runner, m) for m in models}
    except BaseException:  # Ctrl-C, or a failure: leave no half-built tables behind
        with contextlib.suppress(ReadDBError):  # the database may be what failed
            discard(db, models)
        raise
    seconds = time.perf_counter() - started
    return [
        RebuildResult(m.name, runner.tracks[m.name].position, events + extra[m.name], seconds)
        for m in models
    ]


def _fill(
    runner: Runner,
    source: EventSource,
    models: Sequence[ReadModel],
    page_size: int,
    progress: Progress | None,
) -> int:
    """Set up ``runner``'s fresh tables and apply the log to them; returns events applied."""
    runner.setup(fresh=True)
    feed = PageFeed(source, models, runner.seen(), page_size)
    runner.source = feed
    switch = sys.getswitchinterval()
    sys.setswitchinterval(SWITCH_SECONDS)
    collecting = gc.isenabled()
    gc.disable()  # every page is freed by reference counting; the collector only rescanned it
    try:
        events = 0
        while True:
            n = runner.step()
            events += n
            if progress is not None:
                progress(runner.seen(), max(source.head(), runner.seen()))
            if n == 0:
                return events
    finally:
        if collecting:
            gc.enable()
        sys.setswitchinterval(switch)
        feed.close()
        runner.source = source


def discard(db: ReadDB, models: Sequence[ReadModel]) -> None:
    """Drop what a rebuild of ``models`` made and has not swapped in: its fresh tables and
    tracking rows. Only for the holder of the replay lock (``LOCK``)."""
    plain = Renderer(db.dialect, {})
    with db.transaction() as tx:
        db.lock(tx, "coscribe-readmodels-setup")
        for model in models:
            for table in model.physical(NEXT).values():
                tx.execute(f"DROP TABLE IF EXISTS {table}")
            if db.table_exists(tx, "rm_tracking"):
                tx.execute(plain("DELETE FROM rm_tracking WHERE name = ?"), (model.name + NEXT,))


def swap(db: ReadDB, source: EventSource, runner: Runner, model: ReadModel) -> int:
    """Put the rebuilt tables in place of the live ones; returns events applied meanwhile."""
    plain = Renderer(db.dialect, {})
    live_names = model.physical()
    next_names = model.physical(NEXT)
    track = runner.tracks[model.name]
    applied = 0
    with db.transaction() as tx:
        db.lock(tx, "coscribe-readmodels-setup")
        # A no-op update takes the row lock on Postgres (SQLite holds the write lock already).
        tx.execute(plain("UPDATE rm_tracking SET name = name WHERE name = ?"), (model.name,))
        rows = tx.query(plain("SELECT position FROM rm_tracking WHERE name = ?"), (model.name,))
        live_pos = int(rows[0]["position"]) if rows else 0
        while track.position < live_pos:
            page = [(p, e) for p, e in source.read(track.position, runner.page_size)
                    if p <= live_pos]
            if not page:
                break
            runner.apply_in(tx, model, page)
            applied += len(page)
        for logical, live in live_names.items():
            tx.execute(f"DROP TABLE IF EXISTS {live}")
            tx.execute(f"ALTER TABLE {next_names[logical]} RENAME TO {live}")
        last = tx.query(
            plain("SELECT event_at FROM rm_tracking WHERE name = ?"), (runner.tracking_name(model),)
        )
        event_at = last[0]["event_at"] if last else None
        tx.execute(plain("DELETE FROM rm_tracking WHERE name = ?"), (model.name,))
        tx.execute(plain("DELETE FROM rm_tracking WHERE name = ?"), (runner.tracking_name(model),))
        tx.execute(
            plain(
                "INSERT INTO rm_tracking (name, version, position, gen, event_at, updated_at)"
                " VALUES (?, ?, ?, ?, ?, ?)"
            ),
            (model.name, model.version, track.position, track.gen, event_at, _now_iso()),
        )
    return applied


def _now_iso() -> str:
    return iso(datetime.now(UTC))
