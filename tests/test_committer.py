"""The committer isolates failures: a bug around one room never strands another."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest

from domain.document import Document
from gateway.room import Rejected, Room, State, Submission
from gateway.rooms import Rooms
from gateway.store import Store, StoreConfig
from tests.conftest import PG_URL
from tests.running import running


@pytest.fixture
async def rooms(store_config: StoreConfig) -> AsyncIterator[Rooms]:
    """Rooms over each store (SQLite, PostgreSQL) with the committer running."""
    store = Store(store_config)
    r = Rooms(store)
    await r.start()
    task = asyncio.create_task(r.committer.run())
    try:
        yield r
    finally:
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)
        await r.close()
        await r.committer.aclose()
        store.close()


async def _room(rooms: Rooms, text: str) -> Room:
    doc = Document.create("t", text, "alice")
    await rooms.create(doc, "alice")
    room = rooms.peek(doc.id)
    assert room is not None
    return room


def _edit(
    room: Room, op: list[Any], base: int = 0, client: str | None = None, seq: int | None = None
) -> asyncio.Future[Any]:
    fut: asyncio.Future[Any] = asyncio.get_running_loop().create_future()
    room.submit(
        Submission(kind="edit", by="alice", future=fut, base=base, op=op, client=client, seq=seq)
    )
    return fut


async def test_a_failure_in_prepare_refuses_that_room_only(rooms: Rooms) -> None:
    """An exception around one room refuses its ops (internal); the others commit."""
    bad, good = await _room(rooms, "aaa"), await _room(rooms, "bbb")

    def boom() -> list[Any]:
        raise RuntimeError("injected")

    bad.prepare = boom  # type: ignore[method-assign]
    f_bad, f_good = _edit(bad, ["x"]), _edit(good, ["y"])
    assert await asyncio.wait_for(f_good, 5) == 1
    with pytest.raises(Rejected) as err:
        await asyncio.wait_for(f_bad, 5)
    assert err.value.code == "internal"
    assert not bad.inflight and not bad.inbox and bad.snapshot.text == "aaa"
    assert good.snapshot.text == "ybbb"


async def test_a_failure_after_commit_reloads_that_room(rooms: Rooms) -> None:
    """If resolving one committed room fails, the others resolve and it re-reads the store."""
    bad, good = await _room(rooms, "aaa"), await _room(rooms, "bbb")
    real = bad.committed
    calls = 0

    def flaky() -> None:
        nonlocal calls
        calls += 1
        if calls == 1:
            raise RuntimeError("injected")
        real()

    bad.committed = flaky  # type: ignore[method-assign]
    f_bad, f_good = _edit(bad, ["x"]), _edit(good, ["y"])
    assert await asyncio.wait_for(f_good, 5) == 1
    for _ in range(100):
        if bad.state is State.READY and bad.snapshot.v == 1:
            break
        await asyncio.sleep(0.02)
    assert (bad.snapshot.text, bad.snapshot.v, bad.inflight) == ("xaaa", 1, [])
    assert await asyncio.wait_for(f_bad, 5) == 1


async def test_a_room_whose_events_cannot_be_written_is_refused_alone(rooms: Rooms) -> None:
    """A value the store cannot hold (a seq past 64 bits, were it let through) refuses only
    its own room's op; the rest of the group commit goes through, and the room goes on."""
    bad, good = await _room(rooms, "aaa"), await _room(rooms, "bbb")
    f_bad = _edit(bad, ["x"], client="c", seq=1 << 63)
    f_good = _edit(good, ["y"], client="c", seq=1)
    assert await asyncio.wait_for(f_good, 5) == 1
    with pytest.raises(Rejected) as err:
        await asyncio.wait_for(f_bad, 5)
    assert err.value.code in ("internal", "unavailable")
    assert good.snapshot.text == "ybbb"
    assert await asyncio.wait_for(_edit(bad, ["z"], client="c", seq=2), 5) == 1
    assert await asyncio.wait_for(_edit(good, ["w"], base=1, client="c", seq=3), 5) == 2
    assert (bad.snapshot.text, good.snapshot.text) == ("zaaa", "wybbb")


@pytest.mark.postgres
async def test_drain_waits_for_a_room_that_lost_a_race(tmp_path: Path, pg_schema: str) -> None:
    """SIGTERM's drain returns only when an op whose commit lost a race (its room re-reading
    the store meanwhile, nothing queued in the committer) is committed too."""
    cfg = StoreConfig(data_dir=tmp_path, database_url=PG_URL, database_schema=pg_schema)
    store_a, store_b = Store(cfg), Store(cfg)
    try:
        async with running(store_a) as a, running(store_b) as b:  # no hub between them
            doc = Document.create("t", "abc", "alice")
            await a.create(doc, "alice")
            room_a, room_b = await a.get(doc.id), await b.get(doc.id)
            assert room_a is not None and room_b is not None
            assert await asyncio.wait_for(_edit(room_b, ["b"]), 5) == 1
            lost = _edit(room_a, ["a"])  # on version 0 again: its checked commit is stale
            await asyncio.wait_for(a.drain(), 5)
            assert lost.done() and lost.result() == 2
            assert a.committer.stats.conflicts >= 1
    finally:
        store_a.close()
        store_b.close()


async def test_a_value_the_database_refuses_is_refused_alone(rooms: Rooms) -> None:
    """A client id PostgreSQL's text cannot hold (U+0000, were it let through) refuses only
    its room's op, not the others of the group commit; SQLite stores it."""
    bad, good = await _room(rooms, "aaa"), await _room(rooms, "bbb")
    f_bad = _edit(bad, ["x"], client="ev\x00il", seq=1)
    f_good = _edit(good, ["y"], client="c", seq=1)
    assert await asyncio.wait_for(f_good, 5) == 1
    if rooms.store.checks_heads:  # PostgreSQL
        with pytest.raises(Rejected) as err:
            await asyncio.wait_for(f_bad, 5)
        assert err.value.code == "internal" and "\x00" not in err.value.message
    else:
        assert await asyncio.wait_for(f_bad, 5) == 1
    assert await asyncio.wait_for(_edit(good, ["w"], base=1, client="c", seq=2), 5) == 2
