"""The runner: follows the event store's notification log and applies it to read models.

Exactly once, across crashes and competing runners:

- Each read model has a tracking row ``(name, position)`` in ``rm_tracking``, in the same
  database as its tables. A page of events is applied to every model in ONE transaction; each
  model's part first moves its tracking row with a compare-and-set (``UPDATE ... WHERE
  position = <what we read>``), then runs the model's statements for the page (its page
  mapping's: a handful of set-based statements, see ``projections.model``). A crash loses
  the whole transaction or none of it; a second runner that read the same page finds the
  position moved, leaves that model out, and re-reads it. So an event is never applied twice
  and never skipped (the log is read in notification order, and the store's commits are
  serialised, so no id appears behind one already read).
- ``seen`` is how far this runner has *observed* the log per model: events it applied, or
  saw applied by another runner. It only moves over events it has read and passed to
  ``observe`` (the cache invalidation hook), so a reader that waits for ``seen`` to reach a
  position also knows this process dropped every cache entry those events made stale.
  ``confirm`` is then told the position reached: after ``setup`` (before the first step:
  whatever was committed before may lack its invalidation) and after every step, idle ones
  too (a hook that keeps failed invalidations retries them from there).

Everything here is synchronous; the gateway drives ``step`` from a thread of its own.
"""

from __future__ import annotations

import logging
import secrets
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any, Protocol

from projections.db import ReadDB, Tx
from projections.model import ReadModel
from projections.sql import Renderer, Statement, iso

log = logging.getLogger(__name__)

PAGE_SIZE = 500
"""Events read, and applied per transaction, in one step of a live runner."""

TRACKING_DDL = """CREATE TABLE IF NOT EXISTS rm_tracking (
    name TEXT PRIMARY KEY,
    version INTEGER NOT NULL,
    position $bigint NOT NULL,
    gen TEXT NOT NULL,
    event_at $ts,
    updated_at $ts NOT NULL
)"""

Observer = Callable[[str, Sequence[tuple[int, Any]]], None]
"""``observe(model_name, [(position, event), ...])``: those events are now in the model."""

Confirm = Callable[[int], None]
"""``confirm(position)``: every model observed every event up to ``position``."""


class EventSource(Protocol):
    """The notification log, decoded: what a runner reads."""

    def read(self, after: int, limit: int) -> list[tuple[int, Any]]:
        """Up to ``limit`` ``(position, event)`` with position > ``after``, in order."""

    def head(self) -> int:
        """The highest position in the log (0 when empty)."""


class PreparedPage(list[tuple[int, Any]]):
    """A page with every model's statements for the whole of it, computed in advance.

    ``statements[model name]`` is ``model.statements(page)``: what the runner would compute,
    so it uses them for a model that takes the whole page in (a rebuild's read-ahead thread
    prepares pages while the database works on the one before).
    """

    def __init__(self, page: Sequence[tuple[int, Any]], statements: dict[str, list[Statement]]):
        super().__init__(page)
        self.statements = statements


@dataclass(slots=True)
class Track:
    """What a runner knows of one read model's tracking row."""

    position: int
    gen: str
    seen: int


def _now() -> str:
    return iso(datetime.now(UTC))


class Runner:
    """Applies the log to ``models`` in ``db``. Call ``setup`` once, then ``step`` repeatedly.

    ``suffix`` makes the runner work on a separate set of tables and tracking rows (a rebuild
    uses ``"__next"``). Not thread-safe: one thread drives one runner.
    """

    def __init__(
        self,
        db: ReadDB,
        source: EventSource,
        models: Sequence[ReadModel],
        *,
        page_size: int = PAGE_SIZE,
        suffix: str = "",
        observe: Observer | None = None,
        confirm: Confirm | None = None,
    ) -> None:
        self.db = db
        self.source = source
        self.models = list(models)
        self.page_size = page_size
        self.suffix = suffix
        self.observe = observe
        self.confirm = confirm
        self.tracks: dict[str, Track] = {}
        self._plain = Renderer(db.dialect, {})
        self._renderers: dict[str, Renderer] = {}
        self.last_error: str | None = None

    def tracking_name(self, model: ReadModel) -> str:
        """The tracking row of ``model`` for this runner's tables."""
        return model.name + self.suffix

    # -- setup ------------------------------------------------------------------------------

    def setup(self, fresh: bool = False) -> None:
        """Create missing tables and tracking rows; rebuild models of another version.

        ``fresh`` drops this runner's tables first (a rebuild starts from nothing) and leaves
        out the indexes only reads use: the rebuild makes them when it has caught up.
        """
        for model in self.models:
            with self.db.transaction() as tx:
                self.db.lock(tx, "coscribe-readmodels-setup")
                tx.execute(self._plain(TRACKING_DDL))
                self._setup_model(tx, model, fresh)
        self._confirm()

    def create_read_indexes(self) -> None:
        """Create every model's read indexes (after a ``fresh`` setup has caught up)."""
        for model in self.models:
            with self.db.transaction() as tx:
                create_read_indexes(tx, self.db, model, self.suffix, self.tracks[model.name].gen)

    def _setup_model(self, tx: Tx, model: ReadModel, fresh: bool) -> None:
        name = self.tracking_name(model)
        rows = tx.query(
            self._plain("SELECT version, position, gen FROM rm_tracking WHERE name = ?"), (name,)
        )
        tables = model.physical(self.suffix)
        present = all(self.db.table_exists(tx, t) for t in tables.values())
        row = rows[0] if rows else None
        if row is not None and present and not fresh and row["version"] == model.version:
            self._install(model, int(row["position"]), str(row["gen"]))
            return
        if row is not None and row["version"] != model.version:
            log.warning("read model %s changed (v%s -> v%s): rebuilding from the first event",
                        model.name, row["version"], model.version)
        gen = secrets.token_hex(3)
        create_tables(tx, self.db, model, self.suffix, gen, read_indexes=not fresh)
        tx.execute(self._plain("DELETE FROM rm_tracking WHERE name = ?"), (name,))
        tx.execute(
            self._plain(
                "INSERT INTO rm_tracking (name, version, position, gen, event_at, updated_at)"
                " VALUES (?, ?, 0, ?, NULL, ?)"
            ),
            (name, model.version, gen, _now()),
        )
        self._install(model, 0, gen)

    def _install(self, model: ReadModel, position: int, gen: str) -> None:
        self.tracks[model.name] = Track(position=position, gen=gen, seen=position)
        self._renderers[model.name] = Renderer(
            self.db.dialect, {**model.physical(self.suffix), "gen": gen}
        )

    # -- following the log ------------------------------------------------------------------

    def seen(self) -> int:
        """The lowest position every model has observed (applied or seen applied)."""
        return min((t.seen for t in self.tracks.values()), default=0)

    def step(self) -> int:
        """Read one page after the lowest ``seen`` and apply it; returns events read."""
        start = self.seen()
        page = self.source.read(start, self.page_size)
        if page:
            self._apply_page(page)
        self._confirm()
        return len(page)

    def apply_in(self, tx: Tx, model: ReadModel, page: Sequence[tuple[int, Any]]) -> int:
        """Apply ``page`` to ``model`` inside ``tx`` (the caller holds the tracking row).

        Returns the new position. Used by rebuilds, which must finish inside a swap.
        """
        track = self.tracks[model.name]
        todo = [(p, e) for p, e in page if p > track.position]
        if not todo:
            return track.position
        tx.run(model.statements(todo), self._renderers[model.name])
        last, event = todo[-1]
        tx.execute(
            self._plain(
                "UPDATE rm_tracking SET position = ?, event_at = ?, updated_at = ? WHERE name = ?"
            ),
            (last, _event_at(event), _now(), self.tracking_name(model)),
        )
        track.position = track.seen = last
        return last

    def _apply_page(self, page: Sequence[tuple[int, Any]]) -> None:
        """Apply ``page`` to every model that has not taken it in, in ONE transaction.

        Each model's part is guarded by its own compare-and-set of its tracking row: a model
        whose row moved (another runner applied the page) is left out of the transaction and
        follows the row afterwards; the others commit together. Rows are locked in the order
        of ``models`` (the registry's), the same in every runner.
        """
        plans: list[tuple[ReadModel, list[tuple[int, Any]], list[Statement]]] = []
        prepared = page.statements if isinstance(page, PreparedPage) else {}
        for model in self.models:
            track = self.tracks[model.name]
            if page[0][0] > track.position:  # the usual case: all of it is new
                stmts = prepared.get(model.name)
                plans.append((model, list(page),
                              model.statements(page) if stmts is None else stmts))
                continue
            fresh = [(p, e) for p, e in page if p > track.seen]
            if not fresh:
                continue
            done = [(p, e) for p, e in fresh if p <= track.position]
            todo = [(p, e) for p, e in fresh if p > track.position]
            if done:
                self._observed(model, done, done[-1][0])
            if todo:
                plans.append((model, todo, model.statements(todo)))
        if not plans:
            return
        cas = self._plain(
            "UPDATE rm_tracking SET position = ?, event_at = ?, updated_at = ?"
            " WHERE name = ? AND position = ?"
        )
        now = _now()
        with self.db.transaction() as tx:
            # Every compare-and-set in one round trip, then every statement in another.
            counts = tx.counts([
                (cas, (todo[-1][0], _event_at(todo[-1][1]), now, self.tracking_name(model),
                       self.tracks[model.name].position))
                for model, todo, _ in plans
            ])
            moved = [n == 1 for n in counts]
            tx.run_parts([(stmts, self._renderers[model.name])
                          for (model, _, stmts), ok in zip(plans, moved, strict=True) if ok])
        for (model, todo, _), ok in zip(plans, moved, strict=True):
            if ok:
                self.tracks[model.name].position = todo[-1][0]
                self._observed(model, todo, todo[-1][0])
                continue
            # Another runner got there first (or a rebuild swapped tables in): follow it.
            self._reload(model)
            track = self.tracks[model.name]
            done = [(p, e) for p, e in todo if p <= track.position]
            if done:
                self._observed(model, done, done[-1][0])

    def _reload(self, model: ReadModel) -> None:
        rows = self.db.query(
            self._plain("SELECT version, position, gen FROM rm_tracking WHERE name = ?"),
            (self.tracking_name(model),),
        )
        if not rows:
            raise RuntimeError(f"tracking row of {model.name} vanished")
        track = self.tracks[model.name]
        position, gen = int(rows[0]["position"]), str(rows[0]["gen"])
        if gen != track.gen:
            self._renderers[model.name] = Renderer(
                self.db.dialect, {**model.physical(self.suffix), "gen": gen}
            )
        if position < track.position:
            # Tables were rebuilt from behind us (a fresh rebuild swapped in at a lower
            # position cannot happen; a reset by a version bump can): start over from there.
            track.seen = position
        track.position, track.gen = position, gen

    def _observed(self, model: ReadModel, events: Sequence[tuple[int, Any]], upto: int) -> None:
        track = self.tracks[model.name]
        if self.observe is not None:
            try:
                self.observe(model.name, events)
            except Exception:  # a cache hook must never stop the projection
                log.exception("observer failed for %s", model.name)
        track.seen = max(track.seen, upto)

    def _confirm(self) -> None:
        if self.confirm is not None:
            try:
                self.confirm(self.seen())
            except Exception:  # like the observer: never stop the projection
                log.exception("confirm hook failed")

    def run_until(
        self,
        stop: threading.Event | None = None,
        caught_up: Callable[[], bool] | None = None,
        poll: float = 0.05,
    ) -> None:
        """Step until ``stop`` is set (or, with ``caught_up``, until it returns True when idle)."""
        while stop is None or not stop.is_set():
            if self.step() == 0:
                if caught_up is not None and caught_up():
                    return
                if stop is not None:
                    stop.wait(poll)
                else:
                    time.sleep(poll)

    def catch_up(self) -> int:
        """Step until the log is exhausted; returns the position reached."""
        while self.step():
            pass
        return self.seen()


def _event_at(event: Any) -> str | None:
    ts = getattr(event, "timestamp", None)
    return iso(ts) if isinstance(ts, datetime) else None


def create_tables(
    tx: Tx, db: ReadDB, model: ReadModel, suffix: str, gen: str, read_indexes: bool = True
) -> None:
    """Drop (if present) and create the tables of ``model`` with ``suffix``, in ``tx``.

    Without ``read_indexes`` the indexes only queries use are left for ``create_read_indexes``.
    """
    render = Renderer(db.dialect, {**model.physical(suffix), "gen": gen})
    for table in model.physical(suffix).values():
        tx.execute(f"DROP TABLE IF EXISTS {table}")
    for ddl in model.ddl:
        tx.execute(render(ddl))
    if read_indexes:
        create_read_indexes(tx, db, model, suffix, gen)


def create_read_indexes(tx: Tx, db: ReadDB, model: ReadModel, suffix: str, gen: str) -> None:
    """Create the ``read_indexes`` of ``model``'s tables with ``suffix`` (left out before)."""
    render = Renderer(db.dialect, {**model.physical(suffix), "gen": gen})
    for ddl in model.read_indexes:
        tx.execute(render(ddl))
