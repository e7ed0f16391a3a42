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

While the rebuild applies one page, the next is read, decoded and mapped to the models'
statements on a thread of its own (``ReadAhead``): that Python work fits in the time the
database spends on the page before.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

from projections.db import ReadDB
from projections.model import ReadModel
from projections.runner import EventSource, PreparedPage, Runner
from projections.sql import Renderer, iso

NEXT = "__next"
"""Suffix of the tables and the tracking row of a rebuild in progress."""
REPLAY_PAGE = 2000
"""Events per transaction during a rebuild."""

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


class ReadAhead:
    """An ``EventSource`` that reads and maps the page after the one it returns, on a thread.

    A read that asks for exactly the page read ahead gets it (waiting if need be); any other
    read goes to ``source`` directly. With ``models``, each page comes back as a
    ``PreparedPage``: the models' statements for it were computed on the thread too (page
    mappings are pure functions of the page), so that the Python work of page N+1 overlaps
    the database's work on page N. ``source`` must allow reads from two threads (the store's
    recorder has a connection per thread). ``close`` when done.
    """

    def __init__(self, source: EventSource, models: Sequence[ReadModel] = ()) -> None:
        self.source = source
        self.models = list(models)
        self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="replay-read")
        self._ahead: tuple[int, int, Future[list[tuple[int, Any]]]] | None = None

    def _read(self, after: int, limit: int) -> list[tuple[int, Any]]:
        page = self.source.read(after, limit)
        if not self.models or not page:
            return page
        return PreparedPage(page, {m.name: m.statements(page) for m in self.models})

    def read(self, after: int, limit: int) -> list[tuple[int, Any]]:
        """Up to ``limit`` events after ``after``; starts reading the next page."""
        ahead, self._ahead = self._ahead, None
        if ahead is not None and ahead[:2] == (after, limit):
            page = ahead[2].result()
        else:
            if ahead is not None:
                ahead[2].cancel()
            page = self._read(after, limit)
        if len(page) == limit:  # a full page: there is probably more
            last = page[-1][0]
            self._ahead = (last, limit, self._pool.submit(self._read, last, limit))
        return page

    def head(self) -> int:
        """The log's head, from ``source``."""
        return self.source.head()

    def close(self) -> None:
        """Stop the thread (a read in flight is waited for and dropped)."""
        self._ahead = None
        self._pool.shutdown(wait=True, cancel_futures=True)


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
    """Rebuild ``models`` in one pass over the log (each event decoded once), swap them in."""
    started = time.perf_counter()
    ahead = ReadAhead(source, models)
    runner = Runner(db, ahead, models, page_size=page_size, suffix=NEXT)
    try:
        runner.setup(fresh=True)
        events = 0
        while True:
            n = runner.step()
            events += n
            if progress is not None:
                progress(runner.seen(), max(source.head(), runner.seen()))
            if n == 0:
                break
    finally:
        ahead.close()
    # Built once over the finished tables: row by row they cost the rebuild a third of
    # the database's time. The live tables still serve reads meanwhile.
    runner.create_read_indexes()
    extra = {m.name: swap(db, source, runner, m) for m in models}
    seconds = time.perf_counter() - started
    return [
        RebuildResult(m.name, runner.tracks[m.name].position, events + extra[m.name], seconds)
        for m in models
    ]


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
