"""The projection runner: exactly once, competing runners, rebuilds, replay equals live."""

from __future__ import annotations

import json
import threading
from typing import Any
from uuid import UUID

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from domain.document import Document
from projections import analytics, audit, documents
from projections.model import ReadModel
from projections.registry import MODELS
from projections.replay import NEXT, rebuild
from projections.runner import Runner
from projections.sql import Stmt
from tests.test_projections_support import (
    COMMANDS,
    History,
    audit_positions,
    dump,
    make_history,
    positions,
    source,
    store_and_db,
)

KINDS = ["sqlite", "postgres"]


@pytest.mark.parametrize("kind", KINDS)
def test_runner_applies_every_event_once_and_resumes_where_it_stopped(kind: str) -> None:
    """Events go in once each; a new runner on the same tables starts where the last ended."""
    with store_and_db(kind) as (store, db):
        total = make_history(store, docs=5, edits=120)
        first = Runner(db, source(store), MODELS, page_size=7)
        first.setup()
        for _ in range(5):
            first.step()
        partway = first.seen()
        assert 0 < partway < total
        second = Runner(db, source(store), MODELS, page_size=50)
        second.setup()
        assert second.seen() == partway
        assert second.catch_up() == total
        assert audit_positions(db) == list(range(1, total + 1))
        assert set(positions(db).values()) == {total}
        assert second.step() == 0


@pytest.mark.parametrize("kind", KINDS)
def test_documents_rows_match_the_aggregates(kind: str) -> None:
    """Each documents row and its members equal the document loaded from the store."""
    with store_and_db(kind) as (store, db):
        make_history(store, docs=6, edits=200, seed=7)
        runner = Runner(db, source(store), MODELS)
        runner.setup()
        runner.catch_up()
        rows = {r["id"]: r for r in db.query("SELECT * FROM rm_documents")}
        members: dict[str, dict[str, str]] = {}
        for m in db.query("SELECT * FROM rm_members"):
            members.setdefault(m["document_id"], {})[m["user_id"]] = m["role"]
        assert len(rows) == 6
        for doc_id, row in rows.items():
            doc = store.load(UUID(doc_id))
            assert doc is not None
            assert (row["title"], row["version"], row["length"], row["owner"]) == (
                doc.title, doc.doc_version, len(doc.text), doc.owner)
            assert members[doc_id] == doc.members
            items = db.query(
                "SELECT item_id, title, body, position FROM rm_context_items"
                f" WHERE document_id = '{doc_id}'"
            )
            assert {i["item_id"]: (i["title"], i["body"], i["position"]) for i in items} == {
                k: (v["title"], v["body"], v["position"]) for k, v in doc.context_items.items()
            }


@pytest.mark.parametrize("kind", KINDS)
def test_two_runners_racing_never_double_apply(kind: str) -> None:
    """Two runners on one database while events arrive: every event lands exactly once."""
    with store_and_db(kind) as (store, db):
        make_history(store, docs=3, edits=30)
        runners = [Runner(db, source(store), MODELS, page_size=13) for _ in range(2)]
        for r in runners:
            r.setup()
        stop = threading.Event()
        errors: list[BaseException] = []

        def drive(r: Runner) -> None:
            try:
                r.run_until(stop, poll=0.001)
            except BaseException as exc:
                errors.append(exc)

        threads = [threading.Thread(target=drive, args=(r,)) for r in runners]
        for t in threads:
            t.start()
        total = 0
        for seed in range(4):
            total = make_history(store, docs=2, edits=60, seed=seed, chunk=9)
        head = source(store).head()
        for r in runners:
            while r.seen() < head:
                stop.wait(0.01)
        stop.set()
        for t in threads:
            t.join()
        assert not errors
        assert total > 0
        assert audit_positions(db) == list(range(1, head + 1))
        assert set(positions(db).values()) == {head}


def index_names(db: Any, kind: str, models: Any) -> set[str]:
    """The explicitly created indexes (not primary keys) on the live tables of ``models``."""
    tables = [t for m in models for t in m.physical().values()]
    if kind == "sqlite":
        rows = db.query("SELECT name, tbl_name FROM sqlite_master WHERE type = 'index'"
                        " AND sql IS NOT NULL")
        return {r["name"] for r in rows if r["tbl_name"] in tables}
    rows = db.query("SELECT indexname, tablename FROM pg_indexes"
                    " WHERE schemaname = current_schema()"
                    " AND indexname NOT LIKE '%%_pkey' AND indexname NOT LIKE '%%_key'")
    return {r["indexname"] for r in rows if r["tablename"] in tables}


@pytest.mark.parametrize("kind", KINDS)
def test_rebuild_swaps_in_while_a_live_runner_keeps_going(kind: str) -> None:
    """A rebuild during live traffic ends with the same rows as the live runner would have."""
    with store_and_db(kind) as (store, db):
        make_history(store, docs=4, edits=150)
        live = Runner(db, source(store), MODELS, page_size=20)
        live.setup()
        live.catch_up()
        make_history(store, docs=2, edits=40, seed=3)
        live.step()  # one page in: the live tables are now behind the head
        for model in MODELS:
            result = rebuild(db, source(store), model, page_size=33)
            assert result.position >= live.tracks[model.name].position
        make_history(store, docs=1, edits=20, seed=4)
        live.catch_up()
        after = {m.name: dump(db, m) for m in MODELS}
        tables = {r["name"] for r in db.query("SELECT name FROM rm_tracking")}
        assert not any(n.endswith(NEXT) for n in tables)
        for model in MODELS:
            fresh = Runner(db, source(store), [model], suffix="__check")
            fresh.setup()
            fresh.catch_up()
            assert dump(db, model, "__check") == after[model.name], model.name
        # The indexes a rebuild leaves out while it fills its tables are there once it swapped.
        want = sum(len(m.ddl) + len(m.read_indexes) - len(m.tables) for m in MODELS)
        assert want > len(MODELS)
        assert len(index_names(db, kind, MODELS)) == want


@pytest.mark.parametrize("kind", KINDS)
def test_a_new_model_version_rebuilds_its_tables(kind: str) -> None:
    """Tables made by another version of a model are rebuilt from the first event."""
    with store_and_db(kind) as (store, db):
        total = make_history(store, docs=2, edits=20)
        runner = Runner(db, source(store), [documents.MODEL])
        runner.setup()
        runner.catch_up()
        with db.transaction() as tx:
            tx.execute("DELETE FROM rm_members")
        bumped = ReadModel(**{**_fields(documents.MODEL), "version": documents.MODEL.version + 1})
        again = Runner(db, source(store), [bumped])
        again.setup()
        assert again.seen() == 0
        assert again.catch_up() == total
        assert db.query("SELECT COUNT(*) AS n FROM rm_members")[0]["n"] > 0


def _fields(model: ReadModel) -> dict[str, Any]:
    return {f: getattr(model, f)
            for f in ("name", "version", "tables", "ddl", "mapping", "page_mapping",
                      "read_indexes")}


def test_audit_rows_say_what_each_event_did() -> None:
    """Rename rows carry from/to, edits the chars inserted and deleted, members the role."""
    with store_and_db("sqlite") as (store, db):
        d = Document.create("Old", "abc", "ann")
        d.edit([1, "xy", {"d": 1}], "ann")
        d.rename("New", "ann")
        d.add_member("bob", "viewer", "ann")
        d.remove_member("bob", "ann")
        store.save(d.collect_events())
        runner = Runner(db, source(store), [audit.MODEL])
        runner.setup()
        runner.catch_up()
        rows = db.query("SELECT action, version, actor, summary FROM rm_audit ORDER BY position")
        got = [(r["action"], r["version"], json.loads(r["summary"])) for r in rows]
        assert got == [
            ("created", 0, {"title": "Old", "chars_inserted": 3}),
            ("edited", 1, {"chars_inserted": 2, "chars_deleted": 1}),
            ("renamed", 1, {"from": "Old", "to": "New"}),
            ("member_added", 1, {"user": "bob", "role": "viewer"}),
            ("member_removed", 1, {"user": "bob"}),
        ]


@pytest.mark.parametrize("kind", KINDS)
def test_analytics_totals_equal_the_edits_made(kind: str) -> None:
    """Hourly edits and chars sum to what the edits did; distinct editors are counted once."""
    with store_and_db(kind) as (store, db):
        d = Document.create("T", "", "ann")
        d.add_member("bob", "editor", "ann")
        inserted = deleted = 0
        for k in range(30):
            user = ("ann", "bob")[k % 2]
            if k % 3 == 2:
                d.edit([{"d": 1}], user)
                deleted += 1
            else:
                d.edit(["ab"], user)
                inserted += 2
        store.save(d.collect_events())
        runner = Runner(db, source(store), [analytics.MODEL])
        runner.setup()
        runner.catch_up()
        rows = db.query(
            "SELECT SUM(edits) AS e, SUM(chars_inserted) AS i, SUM(chars_deleted) AS d,"
            " MAX(distinct_editors) AS m FROM rm_analytics_hourly"
        )
        assert (rows[0]["e"], rows[0]["i"], rows[0]["d"], rows[0]["m"]) == (30, inserted,
                                                                             deleted, 2)


# -- replay equals live ---------------------------------------------------------------------

steps = st.lists(
    st.tuples(
        st.sampled_from(COMMANDS),
        st.integers(0, 5),
        st.text(alphabet="ab é\n😀", max_size=4),
        st.integers(0, 10_000),
    ),
    min_size=1,
    max_size=60,
)
"""Random command histories over a handful of documents and users."""

schedule = st.lists(st.tuples(st.integers(1, 12), st.integers(1, 9), st.integers(0, 3)),
                    min_size=1, max_size=12)
"""How the live runner is driven: (steps per save, page size, runner steps after a save)."""


def _replay_equals_live(kind: str, history: list[Any], plan: list[tuple[int, int, int]]) -> None:
    with store_and_db(kind) as (store, db):
        live = Runner(db, source(store), MODELS)
        live.setup()
        h = History()
        i = 0
        for per_save, page, runs in plan * (1 + len(history) // max(1, len(plan))):
            if i >= len(history):
                break
            for step in history[i:i + per_save]:
                h.apply(step)
            i += per_save
            events = h.collect()
            if events:
                store.save(events)
            live.page_size = page
            for _ in range(runs):
                live.step()
        live.catch_up()
        for model in MODELS:
            before = dump(db, model)
            rebuild(db, source(store), model, page_size=1000)
            assert dump(db, model) == before, model.name


@settings(max_examples=30, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(history=steps, plan=schedule)
def test_replay_equals_live_sqlite(history: list[Any], plan: list[tuple[int, int, int]]) -> None:
    """SQLite: rebuilding every model from scratch gives the rows following live gave."""
    _replay_equals_live("sqlite", history, plan)


@pytest.mark.slow
@settings(max_examples=10, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(history=steps, plan=schedule)
def test_replay_equals_live_postgres(
    history: list[Any], plan: list[tuple[int, int, int]]
) -> None:
    """Postgres: rebuilding every model from scratch gives the rows following live gave."""
    _replay_equals_live("postgres", history, plan)


def test_replay_command_rebuilds_and_reports_throughput(
    tmp_path: Any, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    """``coscribe replay`` rebuilds every model (or one), printing events/s; bad names exit."""
    from gateway.readmodels import read_db_config
    from gateway.store import Store, StoreConfig
    from ops.projections_cli import main
    from projections.db import open_db

    for name in ("DATABASE_URL", "DATABASE_SCHEMA", "DATA_DIR"):
        monkeypatch.delenv(f"COSCRIBE_{name}", raising=False)
    cfg = StoreConfig(data_dir=tmp_path)
    store = Store(cfg)
    try:
        total = make_history(store, docs=3, edits=50)
    finally:
        store.close()
    flags = ["--data-dir", str(tmp_path), "--quiet"]
    assert main(["replay", *flags]) == 0
    out = capsys.readouterr().out
    assert f"replayed {total} events into 4 read models" in out and "events/s" in out
    assert main(["replay", "--projection", "audit", *flags]) == 0
    assert "audit: swapped in at position" in capsys.readouterr().out
    db = open_db(read_db_config(cfg))
    try:
        assert audit_positions(db) == list(range(1, total + 1))
        assert set(positions(db).values()) == {total}
    finally:
        db.close()
    with pytest.raises(SystemExit) as stop:
        main(["replay", "--projection", "nope", *flags])
    assert stop.value.code == 2
    assert "no read model 'nope'" in capsys.readouterr().err


def test_runners_starting_together_on_a_new_sqlite_file_all_set_up(tmp_path: Any) -> None:
    """Several processes' first connections to a fresh read-model file never fail to start."""
    from projections.db import SQLiteReadDB

    path = tmp_path / "readmodels.sqlite"
    with store_and_db("sqlite") as (store, _):
        make_history(store, docs=2, edits=10)
        dbs = [SQLiteReadDB(path) for _ in range(6)]
        errors: list[BaseException] = []
        barrier = threading.Barrier(len(dbs))

        def start(db: Any) -> None:
            try:
                barrier.wait()
                runner = Runner(db, source(store), MODELS)
                runner.setup()
                runner.catch_up()
            except BaseException as exc:
                errors.append(exc)

        threads = [threading.Thread(target=start, args=(db,)) for db in dbs]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        try:
            assert not errors, errors
            assert audit_positions(dbs[0]) == list(range(1, source(store).head() + 1))
        finally:
            for db in dbs:
                db.close()


class _ListSource:
    """A log of ``n`` events (the event is its position) that can be told to fail."""

    def __init__(self, n: int) -> None:
        self.n = n
        self.fail_after: int | None = None
        self.reads: list[tuple[int, int]] = []

    def read(self, after: int, limit: int) -> list[tuple[int, Any]]:
        self.reads.append((after, limit))
        if self.fail_after is not None and after >= self.fail_after:
            raise RuntimeError("the log is gone")
        return [(p, p) for p in range(after + 1, min(self.n, after + limit) + 1)]

    def head(self) -> int:
        return self.n


def test_page_feed_serves_pages_in_order_and_falls_back_to_direct_reads() -> None:
    """The feed hands out the log's pages with every model's statements; a read it did not
    read ahead, or one after the end, goes to the source; a failure reaches the reader."""
    from projections.replay import PageFeed
    from projections.runner import PreparedPage

    model = ReadModel(name="m", version=1, tables=(), ddl=(), mapping=lambda e, p: [],
                      page_mapping=lambda page: [Stmt("x", (len(page),))])
    src = _ListSource(25)
    feed = PageFeed(src, [model], 0, 10)
    try:
        first = feed.read(0, 10)
        assert isinstance(first, PreparedPage) and first.statements == {"m": [Stmt("x", (10,))]}
        assert [p for p, _ in first] == list(range(1, 11))
        second = feed.read(10, 10)
        assert [p for p, _ in second] == list(range(11, 21))
        assert [p for p, _ in feed.read(20, 10)] == list(range(21, 26))  # the short last page
        src.n = 27  # the log grew after the feed ended: read directly
        assert feed.read(25, 10) == [(26, 26), (27, 27)]
    finally:
        feed.close()
    src = _ListSource(100)
    feed = PageFeed(src, [model], 0, 10)
    try:
        assert [p for p, _ in feed.read(0, 10)] == list(range(1, 11))
        assert feed.read(50, 10) == [(p, p) for p in range(51, 61)]  # off the feed's course
        assert not isinstance(feed.read(60, 10), PreparedPage)
    finally:
        feed.close()
    src = _ListSource(100)
    src.fail_after = 10
    feed = PageFeed(src, [model], 0, 10)
    try:
        feed.read(0, 10)
        with pytest.raises(RuntimeError, match="the log is gone"):
            feed.read(10, 10)
    finally:
        feed.close()


def test_a_second_replay_is_refused_while_one_runs(
    store_config: Any, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    """Two rebuilds would share the fresh tables: the second exits 3 and says why."""
    from gateway.readmodels import read_db_config
    from gateway.store import Store
    from ops.projections_cli import main
    from projections.db import Busy, open_db

    for name in ("DATABASE_URL", "DATABASE_SCHEMA", "DATA_DIR", "REDIS_URL"):
        monkeypatch.delenv(f"COSCRIBE_{name}", raising=False)
    store = Store(store_config)
    try:
        make_history(store, docs=1, edits=3)
    finally:
        store.close()
    flags = ["--data-dir", str(store_config.data_dir), "--quiet"]
    if store_config.database_url:
        flags += ["--database-url", store_config.database_url,
                  "--database-schema", store_config.database_schema]
    db = open_db(read_db_config(store_config))
    try:
        with db.exclusive("replay"):
            with pytest.raises(Busy), open_db(read_db_config(store_config)).exclusive("replay"):
                pass
            assert main(["replay", *flags]) == 3
            assert "another replay" in capsys.readouterr().err
            # One lock for all the read models: it said "another replay of these read models".
            assert main(["replay", "--projection", "audit", *flags]) == 3
            assert ("another replay is running on this read-model database (one at a time, "
                    "whichever read models each rebuilds)") in capsys.readouterr().err
        assert main(["replay", *flags]) == 0
    finally:
        db.close()


def _rebuild_leftovers(db: Any, kind: str) -> set[str]:
    """The ``__next`` tables and tracking rows in ``db``."""
    if kind == "sqlite":
        rows = db.query("SELECT name FROM sqlite_master WHERE type = 'table'")
    else:
        rows = db.query("SELECT table_name AS name FROM information_schema.tables"
                        " WHERE table_schema = current_schema()")
    tables = {r["name"] for r in rows if r["name"].endswith(NEXT)}
    tracking = {r["name"] for r in db.query("SELECT name FROM rm_tracking")}
    return tables | {n for n in tracking if n.endswith(NEXT)}


@pytest.mark.parametrize("kind", KINDS)
def test_an_interrupted_rebuild_leaves_nothing_behind(kind: str) -> None:
    """Ctrl-C mid-rebuild left its rm_*__next tables and <name>__next rows, which
    GET /v1/projections reported as "rebuilding" at a frozen position for good."""
    from projections.replay import rebuild_all

    with store_and_db(kind) as (store, db):
        total = make_history(store, docs=2, edits=60)
        live = Runner(db, source(store), MODELS)
        live.setup()
        live.catch_up()

        def ctrl_c(position: int, head: int) -> None:
            raise KeyboardInterrupt

        with pytest.raises(KeyboardInterrupt):
            rebuild_all(db, source(store), MODELS, page_size=10, progress=ctrl_c)
        assert _rebuild_leftovers(db, kind) == set()
        assert set(positions(db).values()) == {total}  # the live tables are untouched
        rebuild_all(db, source(store), MODELS, page_size=10)  # and a replay still works
        assert _rebuild_leftovers(db, kind) == set()


@pytest.mark.parametrize("kind", KINDS)
def test_held_tells_whether_a_replay_holds_its_lock(kind: str) -> None:
    """The status probe sees the replay lock of another connection without taking it (on
    SQLite it takes it shared for an instant, which a replay starting then waits out)."""
    from gateway.readmodels import read_db_config
    from projections.db import open_db
    from projections.replay import LOCK

    with store_and_db(kind) as (store, db):
        other = open_db(read_db_config(store.cfg))
        try:
            assert not db.held(LOCK)
            with other.exclusive(LOCK):
                assert db.held(LOCK)
                assert not db.held("another")
        finally:
            other.close()


def test_a_replay_starting_during_a_status_probe_waits_it_out(tmp_path: Any) -> None:
    """SQLite: ``held`` holds the lock file shared for an instant; a replay then got Busy."""
    import fcntl

    from projections.db import SQLiteReadDB
    from projections.replay import LOCK

    db = SQLiteReadDB(tmp_path / "readmodels.sqlite")
    probe = open(tmp_path / f"readmodels.sqlite.{LOCK}.lock", "a")  # noqa: SIM115 (the timer closes it)
    fcntl.flock(probe, fcntl.LOCK_SH)
    release = threading.Timer(0.1, probe.close)
    release.start()
    try:
        with db.exclusive(LOCK):
            pass
    finally:
        release.join()
        db.close()
