"""The event store on both adapters: append, read back, conflicts, and rooms that recover.

Two ``Store`` objects on one database stand for two gateway processes: each has its own
connections, and neither sees the other's in-memory state.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import random
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit, urlunsplit
from uuid import UUID, uuid4

import pytest

from domain import ot
from domain.document import Document
from gateway.room import Rejected, Room, Submission
from gateway.rooms import Rooms
from gateway.store import Store, StoreConfig, StoreUnavailable, VersionConflict
from gateway.writer import AsyncWriter
from schema.codes import Code
from tests.conftest import PG_URL, every_kind_of_event, fresh_pg_schema
from tests.running import running

OWNER = "olga"


def _saved(store: Store, text: str = "", **members: str) -> Document:
    """A new document (with ``members`` as user=role) saved through ``store``."""
    doc = Document.create(title="T", text=text, owner=OWNER)
    for user, role in members.items():
        doc.add_member(user, role, by=OWNER)
    store.save(doc.collect_events())
    return doc


@pytest.fixture
def other_store(store_config: StoreConfig, store: Store) -> Iterator[Store]:
    """A second store on the same database as ``store``: another process."""
    s = Store(store_config)
    try:
        yield s
    finally:
        s.close()


def submit(
    room: Room,
    op: Any,
    base: int,
    by: str = OWNER,
    client: str | None = None,
    seq: int | None = None,
) -> asyncio.Future[Any]:
    """Queue an edit in ``room``; the future resolves to the version it produced."""
    fut: asyncio.Future[Any] = asyncio.get_running_loop().create_future()
    room.submit(
        Submission(kind="edit", by=by, future=fut, base=base, op=op, client=client, seq=seq)
    )
    return fut


async def submit_through(rooms: Rooms, room: Room, op: Any, base: int) -> asyncio.Future[Any]:
    """Queue an edit as the handlers do (``Rooms.submit``: a version past the room's head is
    looked up in the store first); the future resolves to the version it produced."""
    fut: asyncio.Future[Any] = asyncio.get_running_loop().create_future()
    await rooms.submit(room, Submission(kind="edit", by=OWNER, future=fut, base=base, op=op))
    return fut


async def result(fut: asyncio.Future[Any]) -> Any:
    """The future's result, within a few seconds."""
    async with asyncio.timeout(10):
        return await fut


# -- append and read back --------------------------------------------------------------


def test_save_load_and_read_back(store: Store) -> None:
    """Saved events load back into an equal document; edits read back in version order."""
    doc = Document.create(title="Tïtle", text="héllo 😀", owner=OWNER)
    doc.edit([7, " wörld"], by=OWNER, client="c", seq=1)
    doc.rename("New", by=OWNER)
    doc.add_member("ed", "editor", by=OWNER)
    doc.edit([{"d": 1}, "H"], by="ed")
    doc.edit([13, "!"], by=OWNER, client="c", seq=2)
    recordings = store.save(doc.collect_events())
    assert len(recordings) == 6

    loaded = store.load(doc.id)
    assert loaded is not None
    assert (loaded.text, loaded.title, loaded.doc_version, loaded.version) == (
        "Héllo 😀 wörld!",
        "New",
        3,
        6,
    )
    assert loaded.members == {OWNER: "owner", "ed": "editor"}
    assert loaded.clients == {"c": (2, 3)}
    assert loaded.created_at == doc.created_at

    edits = store.edits_after(doc.id, 0, 100)
    assert [(e.v, e.op, e.by, e.client, e.seq) for e in edits] == [
        (1, [7, " wörld"], OWNER, "c", 1),
        (2, [{"d": 1}, "H"], "ed", None, None),
        (3, [13, "!"], OWNER, "c", 2),
    ]
    assert [e.v for e in store.edits_after(doc.id, 1, 100)] == [2, 3]
    assert [e.v for e in store.edits_after(doc.id, 0, 2)] == [1, 2]
    assert store.edits_after(doc.id, 3, 100) == []
    events = store.events_after(doc.id, 0)
    assert [e.originator_version for e in events] == [1, 2, 3, 4, 5, 6]


def test_notifications_decode_as_the_library_mapper_does(store: Store) -> None:
    """The log as projections read it: the events the library's own read and mapper give."""
    store.save(every_kind_of_event(OWNER))

    recorder, mapper = store.app.recorder, store.app.mapper
    expected = [(n.id, mapper.to_domain_event(n))
                for n in recorder.select_notifications(0, 100, inclusive_of_start=False)]
    got = store.notifications(0, 100)
    assert len(got) == 9
    assert [(p, type(e), e.__dict__) for p, e in got] == [
        (p, type(e), e.__dict__) for p, e in expected
    ]
    first = got[0][0]
    assert [p for p, _ in store.notifications(first + 2, 3)] == [first + 3, first + 4, first + 5]
    assert store.notifications(got[-1][0], 10) == []


def test_log_id_names_one_log(store_config: StoreConfig, store: Store, tmp_path: Path) -> None:
    """Every store on one log gives the same id; a new log (a reset database) another."""
    again = Store(store_config)
    try:
        assert again.log_id() == store.log_id() != ""
    finally:
        again.close()
    if store_config.database_url:
        with fresh_pg_schema() as other:
            fresh = Store(dataclasses.replace(store_config, database_schema=other))
            try:
                assert fresh.log_id() != store.log_id()
            finally:
                fresh.close()
    else:
        fresh = Store(StoreConfig(data_dir=tmp_path / "other"))
        try:
            assert fresh.log_id() != store.log_id()
        finally:
            fresh.close()


def test_load_unknown_document_is_none(store: Store) -> None:
    """Loading or reading an id that was never saved gives None and no events."""
    assert store.load(uuid4()) is None
    assert store.edits_after(uuid4(), 0, 10) == []


def test_edits_after_pages_past_other_events(store: Store) -> None:
    """edits_after skips renames and membership events and spans many store pages."""
    doc = Document.create(title="T", text="", owner=OWNER)
    for i in range(150):
        doc.edit([i, "x"] if i else ["x"], by=OWNER)
        if i % 2:
            doc.rename(f"t{i}", by=OWNER)
    store.save(doc.collect_events())
    assert [e.v for e in store.edits_after(doc.id, 0, 1000)] == list(range(1, 151))
    assert [e.v for e in store.edits_after(doc.id, 70, 45)] == list(range(71, 116))
    assert [e.v for e in store.iter_edits(doc.id, 140)] == list(range(141, 151))


def test_one_save_spans_many_documents(store: Store) -> None:
    """One save commits the events of several documents together."""
    docs = [Document.create(title=f"d{i}", text="", owner=OWNER) for i in range(5)]
    for i, d in enumerate(docs):
        d.edit([str(i)], by=OWNER)
    store.save([e for d in docs for e in d.collect_events()])
    for i, d in enumerate(docs):
        loaded = store.load(d.id)
        assert loaded is not None
        assert (loaded.text, loaded.doc_version) == (str(i), 1)


@pytest.mark.slow
@pytest.mark.timeout(60)
def test_a_save_of_fifteen_megabytes_completes(store: Store, other_store: Store) -> None:
    """Two documents of 7.5 MB each (with a client op) commit in one save, and the table is
    free for the next writer (in psycopg's pipeline mode this hung holding the lock)."""
    big = [Document.create(title=f"b{i}", text=str(i) * 7_500_000, owner=OWNER)
           for i in range(2)]
    big[0].edit([7_500_000, "!"], by=OWNER, client="c", seq=1)
    store.save([e for d in big for e in d.collect_events()], [(str(big[0].id), "c", 1, 1)])
    _saved(other_store, "after")
    loaded = other_store.load(big[0].id)
    assert loaded is not None
    assert (len(loaded.text), loaded.doc_version) == (7_500_001, 1)
    assert other_store.find_client_op(big[0].id, "c", 1) == 1


async def test_the_writer_connection_is_bounded_by_the_server(store: Store) -> None:
    """The committer's connection has a statement and an idle-in-transaction timeout, so a
    commit the process gave up on (or cannot finish) does not hold the table lock for ever."""
    if not store.checks_heads:
        pytest.skip("the asyncio writer is PostgreSQL's")
    writer = AsyncWriter(store)
    try:
        wire = await writer._connection()
        got = [(await wire.simple(f"SHOW {name}".encode()))[0].get_value(0, 0).decode()
               for name in ("statement_timeout", "idle_in_transaction_session_timeout")]
    finally:
        await writer.close()
    assert got == ["10s", "10s"]


async def test_a_locked_commit_whose_session_the_server_ended_is_not_sent_again(
    store: Store,
) -> None:
    """If the server ends the writer's session inside ``begin_locked``'s transaction (the
    lock released, seen while the connection is idle), the locked commit fails
    ``StoreUnavailable`` and appends nothing: sent again on a new connection it would run
    without the lock it was prepared under."""
    if not store.checks_heads:
        pytest.skip("the asyncio writer is PostgreSQL's")
    import psycopg

    doc = _saved(store)
    head = doc.version
    doc.edit(["x"], OWNER, "c", 1)
    events = doc.collect_events()
    writer = AsyncWriter(store)
    try:
        await writer.begin_locked({doc.id: head})
        with psycopg.connect(PG_URL, autocommit=True) as other:
            other.execute("SELECT pg_terminate_backend(%s)", (writer.backend_pid,))
        for _ in range(200):  # the wire's reader sees the session end
            if writer._wire is None or writer._wire.broken:
                break
            await asyncio.sleep(0.01)
        with pytest.raises(StoreUnavailable, match="table lock was lost"):
            await writer.save_checked(events, [(str(doc.id), "c", 1, 1)], {doc.id: head},
                                      locked=True)
        assert not writer.in_transaction
    finally:
        await writer.close()
    loaded = store.load(doc.id)
    assert loaded is not None and loaded.doc_version == 0


def test_the_data_dir_it_makes_is_private(tmp_path: Path) -> None:
    """The embedded store makes its data directory 0700 (the SQLite files in it are 0644),
    and leaves the mode of a directory the operator made alone."""
    made, given = tmp_path / "made" / "data", tmp_path / "given"
    given.mkdir(mode=0o755)
    given.chmod(0o755)
    for d in (made, given):
        Store(StoreConfig(data_dir=d)).close()
    assert (made.stat().st_mode & 0o777, given.stat().st_mode & 0o777) == (0o700, 0o755)


# -- conflicts ---------------------------------------------------------------------------


def test_second_writer_gets_version_conflict(store: Store, other_store: Store) -> None:
    """Two processes edit the same loaded version: the second save raises VersionConflict."""
    doc = _saved(store, "base")
    mine, theirs = store.load(doc.id), other_store.load(doc.id)
    assert mine is not None and theirs is not None
    mine.edit([4, " mine"], by=OWNER)
    theirs.edit([4, " theirs"], by=OWNER)
    store.save(mine.collect_events())
    with pytest.raises(VersionConflict) as info:
        other_store.save(theirs.collect_events())
    if store.is_postgres:
        assert info.value.doc_id == doc.id  # the committer uses it to retry the rest at once
    else:
        assert info.value.doc_id in (doc.id, None)
    loaded = other_store.load(doc.id)
    assert loaded is not None
    assert (loaded.text, loaded.doc_version) == ("base mine", 1)


def test_conflict_rolls_back_the_whole_save(store: Store, other_store: Store) -> None:
    """A conflict in one document leaves every other event of that save unwritten."""
    clash = _saved(store)
    bystander = _saved(store)
    first, late = store.load(clash.id), other_store.load(clash.id)
    fine = other_store.load(bystander.id)
    assert first is not None and late is not None and fine is not None
    first.edit(["1"], by=OWNER)
    store.save(first.collect_events())
    fine.edit(["ok"], by=OWNER)
    late.edit(["2"], by=OWNER)
    with pytest.raises(VersionConflict):
        other_store.save([*fine.collect_events(), *late.collect_events()])
    reread = store.load(bystander.id)
    assert reread is not None
    assert (reread.text, reread.doc_version) == ("", 0)


# -- rooms recover -------------------------------------------------------------------------


async def test_two_rooms_on_one_database_converge(store: Store, other_store: Store) -> None:
    """Concurrent edits through two processes' rooms all commit once, with distinct versions."""
    rng = random.Random(7)
    doc = _saved(store)
    markers = iter(chr(0x4E00 + i) for i in range(10_000))
    submitted: list[tuple[str, int, str, asyncio.Future[Any]]] = []
    async with running(store) as a, running(other_store) as b:
        room_a, room_b = await a.get(doc.id), await b.get(doc.id)
        assert room_a is not None and room_b is not None
        seqs = {"a": 0, "b": 0}
        for _ in range(6):
            for name, room in (("a", room_a), ("b", room_b)):
                for _ in range(rng.randint(1, 6)):
                    snap = room.snapshot
                    mark = next(markers)
                    op = ot.normalize([rng.randint(0, len(snap.text)), mark])
                    seqs[name] += 1
                    fut = submit(room, op, snap.v, client=name, seq=seqs[name])
                    submitted.append((name, seqs[name], mark, fut))
            await asyncio.sleep(rng.choice([0, 0, 0.001, 0.01]))
        versions = [await result(f) for *_, f in submitted]
        conflicts = a.committer.stats.conflicts + b.committer.stats.conflicts

    n = len(submitted)
    assert sorted(versions) == list(range(1, n + 1))
    assert conflicts >= 1, "the test must exercise the conflict path"
    final = store.load(doc.id)
    assert final is not None
    assert final.doc_version == n
    # Nothing lost or doubled: every marker exactly once.
    assert sorted(final.text) == sorted(mark for _, _, mark, _ in submitted)
    edits = store.edits_after(doc.id, 0, 1000)
    replayed = ""
    for e in edits:
        replayed = ot.apply(replayed, e.op)
    assert replayed == final.text
    # Each future resolved with the version of its own op.
    by_v = {e.v: e for e in edits}
    for (client, seq, mark, _), v in zip(submitted, versions, strict=True):
        assert (by_v[v].client, by_v[v].seq) == (client, seq)
        assert mark in "".join(c for c in by_v[v].op if isinstance(c, str))


async def test_contended_rooms_commit_under_the_lock_without_conflicts(
    store: Store, other_store: Store
) -> None:
    """Once two processes know they share a document, their commits stop clashing.

    Each takes the table lock, reads what the other committed, prepares on the true head
    and commits in the same transaction (``Committer._lock_contended``). No hub here: a
    room learns of the other's commits only from the store.
    """
    if not store.checks_heads:
        pytest.skip("the lock-first commit is PostgreSQL's (SQLite has one writer process)")
    rng = random.Random(11)
    doc = _saved(store)
    markers = iter(chr(0x4E00 + i) for i in range(10_000))
    marks: list[str] = []
    async with running(store) as a, running(other_store) as b:
        room_a, room_b = await a.get(doc.id), await b.get(doc.id)
        assert room_a is not None and room_b is not None
        seqs = {"a": 0, "b": 0}

        async def edit(name: str, room: Room) -> asyncio.Future[Any]:
            snap = room.snapshot
            mark = next(markers)
            marks.append(mark)
            seqs[name] += 1
            op = ot.normalize([rng.randint(0, len(snap.text)), mark])
            return submit(room, op, snap.v, client=name, seq=seqs[name])

        # Warm-up: each side loses a race once, which marks the document contended.
        await result(await edit("a", room_a))
        await result(await edit("b", room_b))
        await result(await edit("a", room_a))
        assert room_a.contended and room_b.contended
        before = a.committer.stats.conflicts + b.committer.stats.conflicts
        futs = []
        for _ in range(30):
            futs.append(await edit("a", room_a))
            futs.append(await edit("b", room_b))
            await asyncio.sleep(rng.choice([0, 0.002]))
        versions = [await result(f) for f in futs]
        after = a.committer.stats.conflicts + b.committer.stats.conflicts
        locked = a.committer.stats.locked + b.committer.stats.locked
        caught_up = a.committer.stats.caught_up + b.committer.stats.caught_up

    assert after == before, "contended commits must not conflict"
    assert locked > 0 and caught_up > 0
    assert len(set(versions)) == len(versions)
    final = store.load(doc.id)
    assert final is not None
    assert final.doc_version == len(marks)
    assert sorted(final.text) == sorted(marks)


async def _contended(a: Rooms, b: Rooms, doc_id: UUID) -> tuple[Room, Room]:
    """The document's rooms in two processes, after 3 edits that made ``b``'s contended (its
    first commit conflicted with ``a``'s)."""
    room_a, room_b = await a.get(doc_id), await b.get(doc_id)
    assert room_a is not None and room_b is not None
    await result(submit(room_a, ["x"], 0))
    await result(submit(room_b, ["y"], 0))  # conflicts once: now contended
    await result(submit(room_a, ["z"], room_a.snapshot.v))
    assert room_b.contended
    return room_a, room_b


async def test_a_failure_under_the_lock_releases_it(store: Store, other_store: Store) -> None:
    """A bug between the lock-first read and the commit must not leave the table locked."""
    if not store.checks_heads:
        pytest.skip("the lock-first commit is PostgreSQL's")
    doc = _saved(store)
    async with running(store) as a, running(other_store) as b:
        room_a, room_b = await _contended(a, b, doc.id)
        real = room_b.client_ops

        def boom() -> list[tuple[str, str, int, int]]:
            raise RuntimeError("injected")

        room_b.client_ops = boom  # type: ignore[method-assign]
        idle = b.committer.stats.locked_idle
        with pytest.raises(Rejected):
            await result(submit(room_b, ["w"], room_b.snapshot.v))
        assert b.committer.stats.locked_idle == idle + 1  # took the lock, committed nothing
        room_b.client_ops = real  # type: ignore[method-assign]
        # The other process can still commit (the lock was released), and so can this one.
        v = await result(submit(room_a, ["q"], room_a.snapshot.v))
        assert v == 4
        await result(submit(room_b, ["r"], room_b.snapshot.v))


async def test_ops_refused_on_a_known_version_never_take_the_lock(
    store: Store, other_store: Store
) -> None:
    """On a contended document, an op that does not fit its base (a version this process
    holds: the head, or older, the op then transformed or not) is refused on submission,
    without a tick or the table lock; a valid one is committed under the lock as before,
    and an op on a version only the other process has seen is checked once the store was
    read for it (``Rooms.submit``), on submission too."""
    if not store.checks_heads:
        pytest.skip("the lock-first commit is PostgreSQL's")
    doc = _saved(store, "abc", vic="viewer")
    async with running(store) as a, running(other_store) as b:
        room_a, room_b = await _contended(a, b, doc.id)
        await result(submit(room_b, ["w"], room_b.snapshot.v))
        assert room_b.contended and room_b.snapshot.v == 4
        stats = b.committer.stats
        before = (stats.commits, stats.locked, stats.locked_idle)
        for i, (op, base) in enumerate([
            ([99, "x"], 4),  # the head: 7 code points
            ([9999], 4),
            ([5, "x"], 0),  # fits the head, not its base "abc": refused, not transformed
            ("nope", 2),
            ([{"d": 8}], 4),
        ] * 6):
            with pytest.raises(Rejected) as info:
                await result(submit(room_b, op, base, client="b", seq=100 + i))
            assert info.value.code is Code.BAD_OP
        assert (stats.commits, stats.locked, stats.locked_idle) == before
        b.committer.mark(room_b)  # dirty with nothing queued: a tick, but no lock
        await b.committer.drain()
        assert stats.locked_idle == before[2]
        # Refusal on submission does not overtake the answers prepare gives first (those
        # need the catch-up: the other process may have changed the roles).
        with pytest.raises(Rejected) as info:
            await result(submit(room_b, [99, "x"], 4, by="vic"))
        assert info.value.code is Code.FORBIDDEN
        with pytest.raises(Rejected) as info:
            await result(submit(room_b, [99, "x"], 4, by="eve"))
        assert info.value.code is Code.NOT_FOUND
        assert stats.locked_idle == before[2] + 2
        # Valid ops, transformed or not, commit under the lock.
        assert await result(submit(room_b, [3, "!"], 0)) == 5
        assert await result(submit(room_b, ["?"], 5)) == 6
        assert stats.locked == before[1] + 2 and stats.commits == before[0] + 2
        # The other process moves on; an op on its version reads the store first.
        v = await result(submit(room_a, ["ab"], room_a.snapshot.v))
        assert room_b.head < v  # no hub here: b learns of it from the store
        with pytest.raises(Rejected) as info:
            await result(await submit_through(b, room_b, [99, "x"], v))
        assert info.value.code is Code.BAD_OP
        assert stats.locked_idle == before[2] + 2
        assert await result(submit(room_b, ["."], v)) == v + 1
    final = store.load(doc.id)
    assert final is not None and final.doc_version == 8


async def test_an_op_on_a_version_committed_elsewhere_reads_the_store_first(
    store: Store, other_store: Store
) -> None:
    """An op on a version another process committed, which this one has not heard of, is
    transformed on it and committed (it was ``bad_version``: audit 4); one past the store's
    head is ``bad_version`` at once, without a tick."""
    doc = _saved(store, "abc")
    async with running(store) as a, running(other_store) as b:  # no hub between them
        room_a, room_b = await a.get(doc.id), await b.get(doc.id)
        assert room_a is not None and room_b is not None
        assert await result(submit(room_b, [3, "!"], 0)) == 1
        assert room_a.head == 0
        assert await result(await submit_through(a, room_a, ["<"], 1)) == 2
        assert await result(submit(room_b, [4, ">"], 1)) == 3  # b re-reads: a race lost
        commits = a.committer.stats.commits
        with pytest.raises(Rejected) as info:
            await result(await submit_through(a, room_a, ["x"], 4))
        assert (info.value.code, info.value.message) == (
            Code.BAD_VERSION, "base version 4 is not in 0..3"
        )
        assert a.committer.stats.commits == commits and not room_a.inbox
    final = store.load(doc.id)
    assert final is not None
    assert (final.text, final.doc_version) == ("<abc!>", 3)


async def test_an_op_on_a_version_waiting_behind_a_gap_is_not_refused(
    store: Store, other_store: Store
) -> None:
    """An op on a version the hub delivered past a gap (the message before it was lost)
    waits for the room's read of the store, then commits on that version: not
    ``bad_version``, also where the tick takes no lock (SQLite) and the read is not done
    before the tick."""
    doc = _saved(store, "abc")
    async with running(store) as rooms:
        room = await rooms.get(doc.id)
        assert room is not None

        def commit_elsewhere() -> list[Any]:
            theirs = other_store.load(doc.id)
            assert theirs is not None
            theirs.edit([3, "!"], OWNER, None, None)
            theirs.edit(["<"], OWNER, None, None)
            events = list(theirs.collect_events())
            other_store.save(events)
            return events

        events = await asyncio.to_thread(commit_elsewhere)
        room.remote_events(events[1:])  # version 2 came; version 1's message was lost
        assert (room.snapshot.v, room.head) == (0, 2)
        fut = submit(room, [5, ">"], 2)  # in the same loop turn: before the gap is filled
        assert await result(fut) == 3
    final = store.load(doc.id)
    assert final is not None
    assert (final.text, final.doc_version) == ("<abc!>", 3)


class Outage:
    """A TCP path to the database that the test can cut: the network fails, not a double of
    the database. Every connection made through it is dropped at once by ``cut``, and no
    new one gets through."""

    def __init__(self, host: str, port: int) -> None:
        self.host, self.port = host, port
        self.listen_port = 0
        self._server: asyncio.Server | None = None
        self._writers: list[asyncio.StreamWriter] = []
        self._tasks: set[asyncio.Task[None]] = set()

    async def start(self) -> None:
        """Listen on a free port of 127.0.0.1 (``listen_port``)."""
        self._server = await asyncio.start_server(self._accept, "127.0.0.1", 0)
        self.listen_port = self._server.sockets[0].getsockname()[1]

    async def _accept(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        up_reader, up_writer = await asyncio.open_connection(self.host, self.port)
        self._writers += [writer, up_writer]
        for src, dst in ((reader, up_writer), (up_reader, writer)):
            task = asyncio.get_running_loop().create_task(self._pipe(src, dst))
            self._tasks.add(task)
            task.add_done_callback(self._tasks.discard)

    @staticmethod
    async def _pipe(src: asyncio.StreamReader, dst: asyncio.StreamWriter) -> None:
        try:
            while data := await src.read(1 << 16):
                dst.write(data)
                await dst.drain()
        except OSError:
            pass
        finally:
            dst.transport.abort()

    async def cut(self) -> None:
        """Drop every connection and refuse new ones."""
        if self._server is not None:
            self._server.close()
            await self._server.wait_closed()
            self._server = None
        for writer in self._writers:
            writer.transport.abort()
        for task in list(self._tasks):
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task


@pytest.mark.slow
@pytest.mark.postgres
async def test_an_op_on_an_unseen_version_is_unavailable_while_the_store_is_down(
    tmp_path: Path, pg_schema: str
) -> None:
    """With the store out of reach, an op on a version past the room's head (only the store
    could tell whether it was committed elsewhere) is refused with ``unavailable`` at once,
    not ``bad_version``, nor left waiting (about 12 s: the library's read retries); so is a
    sub's or a read's version past it (it was ``bad_version``)."""
    url = urlsplit(PG_URL)
    outage = Outage(url.hostname or "127.0.0.1", url.port or 5432)
    await outage.start()
    via = url._replace(netloc=f"{url.username or 'postgres'}@127.0.0.1:{outage.listen_port}")
    cfg = StoreConfig(data_dir=tmp_path, database_url=urlunsplit(via), database_schema=pg_schema)
    store = await asyncio.to_thread(Store, cfg)
    try:
        doc = await asyncio.to_thread(_saved, store, "abc")
        async with running(store) as rooms:
            room = await rooms.get(doc.id)
            assert room is not None
            await outage.cut()
            # A sub's or a read's version past the copy too (one read of the store for both).
            read = asyncio.ensure_future(rooms.readable(doc.id, "ann", 1))
            with pytest.raises(Rejected) as info:
                await result(await submit_through(rooms, room, ["x"], 1))
            assert info.value.code is Code.UNAVAILABLE
            with pytest.raises(StoreUnavailable):
                await read
            assert not room.busy and room.head == 0
    finally:
        await outage.cut()
        await asyncio.to_thread(store.close)


async def test_late_op_is_transformed_after_conflict(store: Store, other_store: Store) -> None:
    """An op made on an old version and clashing in the store is transformed like a late op."""
    doc = _saved(store, "abc")
    async with running(store) as a, running(other_store) as b:
        room_a, room_b = await a.get(doc.id), await b.get(doc.id)
        assert room_a is not None and room_b is not None
        assert await result(submit(room_a, [3, "X"], 0)) == 1
        # Room B has not seen v1: its commit clashes, it re-reads and transforms.
        assert await result(submit(room_b, [3, "Y"], 0)) == 2
        assert room_b.snapshot.text == "abcYX"  # the late insert at the same place goes first
    final = store.load(doc.id)
    assert final is not None
    assert (final.text, final.doc_version) == ("abcYX", 2)


async def test_resend_is_acked_with_original_version(store: Store) -> None:
    """A resent (client, seq) resolves to its first version and is not applied again."""
    doc = _saved(store, "")
    async with running(store) as rooms:
        room = await rooms.get(doc.id)
        assert room is not None
        assert await result(submit(room, ["a"], 0, client="c", seq=1)) == 1
        assert await result(submit(room, ["a"], 0, client="c", seq=1)) == 1  # latest seq
        assert await result(submit(room, ["b"], 1, client="c", seq=2)) == 2
        assert await result(submit(room, ["a"], 0, client="c", seq=1)) == 1  # older seq
        # The same seq from another client is a different op.
        assert await result(submit(room, ["z"], 2, client="d", seq=1)) == 3
        assert (room.snapshot.text, room.snapshot.v) == ("zba", 3)
    # A fresh process (empty room history) still recognises both seqs.
    async with running(store) as rooms:
        room = await rooms.get(doc.id)
        assert room is not None
        assert await result(submit(room, ["b"], 1, client="c", seq=2)) == 2
        assert await result(submit(room, ["a"], 0, client="c", seq=1)) == 1
        assert (room.snapshot.text, room.snapshot.v) == ("zba", 3)
    final = store.load(doc.id)
    assert final is not None
    assert (final.text, final.doc_version) == ("zba", 3)


async def test_resend_after_the_author_became_a_viewer_is_acked(store: Store) -> None:
    """A committed op resent by an author demoted since is acked, not refused (it was
    applied); a new op of theirs is refused."""
    doc = _saved(store, "", vic="editor")
    async with running(store) as rooms:
        room = await rooms.get(doc.id)
        assert room is not None
        assert await result(submit(room, ["a"], 0, by="vic", client="c", seq=1)) == 1
        fut: asyncio.Future[Any] = asyncio.get_running_loop().create_future()
        room.submit(Submission(kind="command", by=OWNER, future=fut,
                               command=lambda d: d.add_member("vic", "viewer", by=OWNER)))
        await result(fut)
    async with running(store) as rooms:  # and in a process that only has the store's word
        room = await rooms.get(doc.id)
        assert room is not None
        assert await result(submit(room, ["a"], 0, by="vic", client="c", seq=1)) == 1
        with pytest.raises(Rejected) as refused:
            await result(submit(room, ["b"], 1, by="vic", client="c", seq=2))
        assert refused.value.code is Code.FORBIDDEN
        assert room.snapshot.text == "a"


async def test_a_resend_from_another_user_is_refused(store: Store) -> None:
    """A (client, seq) of alice's submitted by bob (past the gateway's binding check) is
    refused, not acked as hers: latest, older, and in flight in the same tick."""
    doc = _saved(store, "", bob="editor")
    async with running(store) as rooms:
        room = await rooms.get(doc.id)
        assert room is not None
        assert await result(submit(room, ["a"], 0, client="c", seq=1)) == 1
        assert await result(submit(room, ["b"], 1, client="c", seq=2)) == 2
        first = submit(room, ["c"], 2, client="c", seq=3)
        twin = submit(room, ["c"], 2, by="bob", client="c", seq=3)
        assert await result(first) == 3
        for fut in (twin, submit(room, ["x"], 0, by="bob", client="c", seq=3),
                    submit(room, ["x"], 0, by="bob", client="c", seq=2),
                    submit(room, ["x"], 0, by="bob", client="c", seq=1)):
            with pytest.raises(Rejected) as refused:
                await result(fut)
            assert refused.value.code is Code.FORBIDDEN
        assert room.snapshot.text == "cba"


def test_a_client_id_is_bound_to_its_first_user(store: Store, other_store: Store) -> None:
    """``bind_clients`` binds the free ids and returns the owner of each, also through
    another store on the same database (another process)."""
    assert store.bind_clients({"a": "alice", "b": "bob"}) == {"a": "alice", "b": "bob"}
    assert other_store.bind_clients({"a": "bob", "c": "carol"}) == {"a": "alice", "c": "carol"}
    assert store.bind_clients({"c": "alice", "b": "bob"}) == {"c": "carol", "b": "bob"}


def test_processes_binding_the_same_ids_at_once_agree(store: Store, other_store: Store) -> None:
    """Two processes' recorders binding the same 300 ids for two users at once, in opposite
    orders, both return the same owner for every id: never a deadlock (which the store's
    one retry would hide, after the server's deadlock_timeout), nor an id unanswered."""
    for _ in range(10):
        ids = [uuid4().hex for _ in range(300)]
        with ThreadPoolExecutor(2) as pool:
            mine = pool.submit(store.app.recorder.bind_clients, dict.fromkeys(ids, "alice"))
            theirs = pool.submit(
                other_store.app.recorder.bind_clients, dict.fromkeys(ids[::-1], "bob")
            )
            a, b = mine.result(), theirs.result()
        assert sorted(a) == sorted(ids) and a == b


async def test_resend_twice_in_one_tick_applies_once(store: Store) -> None:
    """Two copies of one (client, seq) queued together produce one op and the same version."""
    doc = _saved(store, "")
    async with running(store) as rooms:
        room = await rooms.get(doc.id)
        assert room is not None
        first = submit(room, ["a"], 0, client="c", seq=1)
        second = submit(room, ["a"], 0, client="c", seq=1)
        assert (await result(first), await result(second)) == (1, 1)
    final = store.load(doc.id)
    assert final is not None
    assert (final.text, final.doc_version) == ("a", 1)


async def test_resend_to_another_process_is_not_applied_again(
    store: Store, other_store: Store
) -> None:
    """A client that resends to another gateway (stale copy) gets its original version."""
    doc = _saved(store, "abc")
    async with running(store) as a, running(other_store) as b:
        room_a, room_b = await a.get(doc.id), await b.get(doc.id)
        assert room_a is not None and room_b is not None
        assert await result(submit(room_a, [3, "!"], 0, client="c", seq=9)) == 1
        # The connection dropped before the ack; the client resends to process B.
        assert await result(submit(room_b, [3, "!"], 0, client="c", seq=9)) == 1
        assert await result(submit(room_b, ["<"], 1, client="c", seq=10)) == 2
    final = store.load(doc.id)
    assert final is not None
    assert (final.text, final.doc_version) == ("<abc!", 2)


async def test_room_refuses_bad_submissions_and_keeps_going(store: Store) -> None:
    """Bad ops, bad versions and viewers are refused with codes; good edits still commit."""
    doc = _saved(store, "abc", vic="viewer")
    async with running(store) as rooms:
        room = await rooms.get(doc.id)
        assert room is not None
        bad = [
            (submit(room, [4, "x"], 0), Code.BAD_OP),
            (submit(room, [True], 0), Code.BAD_OP),
            (submit(room, ["x"], -1), Code.BAD_VERSION),
            (submit(room, ["x"], 1), Code.BAD_VERSION),
            (submit(room, ["x"], 0, by="vic"), Code.FORBIDDEN),
            (submit(room, ["x"], 0, by="stan"), Code.NOT_FOUND),
        ]
        good = submit(room, ["ok "], 0)
        for fut, code in bad:
            with pytest.raises(Rejected) as info:
                await result(fut)
            assert info.value.code is code
        assert await result(good) == 1
    final = store.load(doc.id)
    assert final is not None
    assert (final.text, final.doc_version) == ("ok abc", 1)


def test_event_decoder_goes_through_a_mapper_that_compresses() -> None:
    """A mapper with a compressor (or cipher) is not decoded directly: the decoder asks it."""
    from eventsourcing.compressor import ZlibCompressor
    from eventsourcing.persistence import Mapper

    from gateway.store import EventDecoder
    from schema.transcoder import MsgpackTranscoder

    mapper: Mapper[Any] = Mapper(transcoder=MsgpackTranscoder(), compressor=ZlibCompressor())
    doc = Document.create(title="T", text="abc", owner=OWNER)
    doc.edit([3, "d"], by=OWNER)
    stored = [mapper.to_stored_event(e) for e in doc.collect_events()]
    decoder = EventDecoder(mapper)
    assert not decoder.direct
    got = decoder.decode([(i + 1, s.originator_id, s.originator_version, s.topic, s.state)
                          for i, s in enumerate(stored)])
    assert [(p, type(e), e.__dict__) for p, e in got] == [
        (i + 1, type(e), e.__dict__) for i, e in enumerate(map(mapper.to_domain_event, stored))
    ]
    assert EventDecoder(Mapper(transcoder=MsgpackTranscoder())).direct
