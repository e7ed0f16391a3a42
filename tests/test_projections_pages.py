"""Page mappings: a page applied set-based leaves the tables as its events one by one would."""

from __future__ import annotations

import dataclasses
from datetime import UTC, datetime, timedelta, timezone
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from domain import ot
from domain.document import Document
from gateway.store import Store
from projections.db import ReadDB
from projections.facts import chars
from projections.model import ReadModel
from projections.registry import MODELS
from projections.runner import Runner
from projections.sql import Dialect, Rows, Stmt, day_of, hour_of, iso, rows_source
from tests.test_projections import steps
from tests.test_projections_support import History, dump, source, store_and_db

PAGED = [m for m in MODELS if m.page_mapping is not None]
"""The models that have a page mapping."""

splits = st.lists(st.integers(1, 12), min_size=1, max_size=20)
"""Page sizes, used in turn (cycled) to cut the log into pages."""


def _one_by_one(model: ReadModel) -> ReadModel:
    return dataclasses.replace(model, page_mapping=None)


def _save(store: Store, history: list[Any], per_save: int = 7) -> None:
    h = History()
    for i in range(0, len(history), per_save):
        for step in history[i:i + per_save]:
            h.apply(step)
        events = h.collect()
        if events:
            store.save(events)


def _pages_equal_events(store: Store, db: ReadDB, sizes: list[int]) -> None:
    """Every paged model, applied in pages of ``sizes``, equals its events one by one."""
    for model in PAGED:
        one = Runner(db, source(store), [_one_by_one(model)], page_size=1, suffix="__one")
        one.setup()
        one.catch_up()
        paged = Runner(db, source(store), [model], suffix="__pages")
        paged.setup()
        k = 0
        while True:
            paged.page_size = sizes[k % len(sizes)]
            k += 1
            if paged.step() == 0:
                break
        assert paged.seen() == one.seen()
        assert dump(db, model, "__pages") == dump(db, model, "__one"), model.name


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(history=steps, sizes=splits)
def test_pages_equal_events_one_by_one_sqlite(history: list[Any], sizes: list[int]) -> None:
    """SQLite: random histories cut into random pages give the rows of one event at a time."""
    with store_and_db("sqlite") as (store, db):
        _save(store, history)
        _pages_equal_events(store, db, sizes)


@pytest.mark.slow
@settings(max_examples=15, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(history=steps, sizes=splits)
def test_pages_equal_events_one_by_one_postgres(history: list[Any], sizes: list[int]) -> None:
    """Postgres: random histories cut into random pages give the rows of one event at a time."""
    with store_and_db("postgres") as (store, db):
        _save(store, history)
        _pages_equal_events(store, db, sizes)


def _tricky_history() -> list[Any]:
    """Events whose page-level coalescing is easy to get wrong, in one document."""
    d = Document.create("first", "abc", "ann")
    d.add_member("bob", "editor", "ann")
    d.remove_member("bob", "ann")
    d.add_member("bob", "viewer", "ann")
    d.add_member("bob", "editor", "ann")
    d.rename("second", "ann")
    d.edit([1, "xy"], "bob")
    d.rename("third", "bob")
    d.rename("fourth", "ann")
    d.remove_member("bob", "ann")
    d.edit([{"d": 2}], "ann")
    d.add_member("cy", "viewer", "ann")
    d.add_context_item("note", "n", "body", "ann")
    d.rename("fifth \"quoted\" é", "ann")
    d.add_member("bob", "viewer", "ann")
    d.add_member("bob", "editor", "ann")
    d.edit(["z"], "bob")
    return d.collect_events()


@pytest.mark.parametrize("kind", ["sqlite", "postgres"])
@pytest.mark.parametrize("sizes", [[1], [2], [3], [5], [16], [1, 4], [4, 1, 2], [7, 9]])
def test_tricky_pages_equal_events_one_by_one(kind: str, sizes: list[int]) -> None:
    """Membership churn, renames and edits straddling page edges: pages equal one by one."""
    with store_and_db(kind) as (store, db):
        store.save(_tricky_history())
        other = Document.create("other", "", "bob")
        other.rename("other 2", "bob")
        store.save(other.collect_events())
        _pages_equal_events(store, db, sizes)


@settings(max_examples=300)
@given(ts=st.datetimes(min_value=datetime(1000, 1, 1), max_value=datetime(9000, 1, 1),
                       timezones=st.sampled_from([UTC, timezone(timedelta(hours=-7)),
                                                  timezone(timedelta(hours=5, minutes=30))])))
def test_stored_times_are_the_strftime_text(ts: datetime) -> None:
    """``iso``/``hour_of``/``day_of`` give the text strftime gives, so stored times keep."""
    u = ts.astimezone(UTC)
    assert iso(ts) == u.strftime("%Y-%m-%dT%H:%M:%S.%fZ")
    assert hour_of(ts) == u.strftime("%Y-%m-%dT%H:00:00.000000Z")
    assert day_of(ts) == u.strftime("%Y-%m-%dT00:00:00.000000Z")


def test_one_pass_char_counts_match_the_domain() -> None:
    """``facts.chars`` counts what ``ot.inserted_chars``/``ot.deleted_chars`` count."""
    for op in ([], [3], ["ab", 2, {"d": 4}, "😀é"], [{"d": 1}], [1, "x", {"d": 2}, 5]):
        assert chars(op) == (ot.inserted_chars(op), ot.deleted_chars(op))


def test_rows_source_renders_each_dialect() -> None:
    """``$rows`` is one JSON parameter on Postgres and one row of parameters on SQLite."""
    cols = (("id", "uuid"), ("n", "bigint"), ("name", "text"))
    assert rows_source(cols, Dialect.SQLITE) == "(SELECT ? AS id, ? AS n, ? AS name) AS r"
    pg = rows_source(cols, Dialect.POSTGRES)
    assert "jsonb_array_elements(CAST(? AS jsonb))" in pg
    assert "CAST(x.e->>0 AS uuid) AS id" in pg and "x.e->>2 AS name" in pg


def test_empty_rows_run_nothing() -> None:
    """A page mapping's empty ``Rows`` statements are skipped (no statement sent)."""
    with store_and_db("sqlite") as (_, db):
        with db.transaction() as tx:
            tx.execute("CREATE TABLE t (x INTEGER)")
        from projections.sql import Renderer

        render = Renderer(db.dialect, {})
        with db.transaction() as tx:
            tx.run([Rows("INSERT INTO nowhere SELECT r.x FROM $rows", (("x", "bigint"),), ()),
                    Stmt("INSERT INTO t VALUES (?)", (1,))], render)
        assert db.query("SELECT x FROM t") == [{"x": 1}]
