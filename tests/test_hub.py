"""The hub contract, run against every adapter (LocalHub on one broker, RedisHub on real Redis),
and two processes' rooms sharing one Postgres schema through one hub (in-process, no server).
"""

from __future__ import annotations

import asyncio
import contextlib
import inspect
import random
from collections.abc import AsyncIterator, Callable, Iterator
from pathlib import Path
from typing import Any
from uuid import UUID, uuid4

import psycopg
import pytest
import redis.asyncio as aioredis
from psycopg import sql

from domain import ot
from domain.document import Document
from gateway import resp
from gateway.hub import Hub, LocalBroker, LocalHub, pack
from gateway.redis_hub import RedisHub
from gateway.room import Rejected, Room, Submission
from gateway.store import Store, StoreConfig
from schema.codes import Code
from schema.frames import Encoded
from tests.running import running

OWNER = "olga"


class Inbox:
    """What one hub delivered: ``(doc, message)`` in arrival order, and resync calls."""

    def __init__(self) -> None:
        self.messages: list[tuple[UUID, dict[str, Any]]] = []
        self.resyncs = 0
        self.changed = asyncio.Event()

    def on_message(self, doc: UUID, msg: dict[str, Any]) -> None:
        """The hub's ``OnMessage``."""
        self.messages.append((doc, msg))
        self.changed.set()

    def on_resync(self) -> None:
        """The hub's ``OnResync``."""
        self.resyncs += 1
        self.changed.set()

    def of(self, doc: UUID) -> list[dict[str, Any]]:
        """Messages delivered for ``doc``."""
        return [m for d, m in self.messages if d == doc]


async def eventually(cond: Callable[[], Any], within: float = 5.0) -> Any:
    """Poll ``cond()`` (a value or an awaitable) until it is true; return it, or time out.

    Polling, not an event: the states waited for (rooms, Redis keys) signal nothing.
    """
    async with asyncio.timeout(within):
        while True:
            value = cond()
            if inspect.isawaitable(value):
                value = await value
            if value:
                return value
            await asyncio.sleep(0.01)


async def _clear_redis(url: str, prefix: str) -> None:
    client = aioredis.Redis.from_url(url)
    try:
        keys = [k async for k in client.scan_iter(match=f"{prefix}*")]
        if keys:
            await client.delete(*keys)
    finally:
        await client.aclose()


def _new_hub(kind: str, broker: LocalBroker, redis_url: str, prefix: str) -> Hub:
    if kind == "local":
        return LocalHub(broker)
    return RedisHub(redis_url, prefix=prefix)


@pytest.fixture(params=["local", pytest.param("redis", marks=pytest.mark.redis)])
def hub_kind(request: pytest.FixtureRequest) -> str:
    """Which adapter the contract runs against."""
    return str(request.param)


@pytest.fixture
async def hub_factory(
    hub_kind: str, redis_url: str, redis_prefix: str
) -> AsyncIterator[Callable[[], Hub]]:
    """Makes hubs that share one broker (local) or one Redis prefix; closed after the test."""
    broker = LocalBroker()
    made: list[Hub] = []

    def make() -> Hub:
        hub = _new_hub(hub_kind, broker, redis_url, redis_prefix)
        made.append(hub)
        return hub

    try:
        yield make
    finally:
        for hub in made:
            await hub.close()
        if hub_kind == "redis":
            await _clear_redis(redis_url, redis_prefix)


@pytest.fixture
async def pair(hub_factory: Callable[[], Hub]) -> tuple[Hub, Inbox, Hub, Inbox]:
    """Two started hubs on one broker: two processes."""
    out: list[Any] = []
    for _ in range(2):
        hub, inbox = hub_factory(), Inbox()
        await hub.start(inbox.on_message, inbox.on_resync)
        out += [hub, inbox]
    return out[0], out[1], out[2], out[3]


@pytest.fixture
async def redis_pair(
    redis_url: str, redis_prefix: str
) -> AsyncIterator[tuple[RedisHub, Inbox, RedisHub, Inbox]]:
    """Two started Redis hubs on one prefix (two processes); closed and cleared after."""
    a, b = RedisHub(redis_url, redis_prefix), RedisHub(redis_url, redis_prefix)
    inbox_a, inbox_b = Inbox(), Inbox()
    try:
        await a.start(inbox_a.on_message, inbox_a.on_resync)
        await b.start(inbox_b.on_message, inbox_b.on_resync)
        yield a, inbox_a, b, inbox_b
    finally:
        await a.close()
        await b.close()
        await _clear_redis(redis_url, redis_prefix)


def _events_msg(proc: str, *positions: int) -> dict[str, Any]:
    return {"k": "e", "p": proc, "e": [[p, "domain.document:Document.Edited", b"\x00\xffstate"]
                                        for p in positions]}


# -- the hub contract ------------------------------------------------------------------------


async def test_started_hubs_are_healthy_and_distinct(pair: tuple[Hub, Inbox, Hub, Inbox]) -> None:
    """After start a hub is healthy and has a process id of its own."""
    a, _, b, _ = pair
    assert a.healthy and b.healthy
    assert a.proc != b.proc


async def test_publish_reaches_the_other_hub_not_itself(
    pair: tuple[Hub, Inbox, Hub, Inbox],
) -> None:
    """A message published by one hub is delivered intact to another watching hub, not to itself."""
    a, inbox_a, b, inbox_b = pair
    doc = uuid4()
    await a.watch(doc)
    await b.watch(doc)
    a.publish(doc, _events_msg(a.proc, 2, 3))
    a.publish(doc, {"k": "p", "p": a.proc, "s": "s1", "u": "ulla", "d": {"cursor": 4}})
    await eventually(lambda: len(inbox_b.of(doc)) == 2)
    first, second = inbox_b.of(doc)
    assert first == _events_msg(a.proc, 2, 3)  # bytes state survives the wire
    assert second == {"k": "p", "p": a.proc, "s": "s1", "u": "ulla", "d": {"cursor": 4}}
    # b's own message goes to a, and a sees nothing of its own.
    b.publish(doc, _events_msg(b.proc, 4))
    await eventually(lambda: len(inbox_a.of(doc)) == 1)
    assert inbox_a.of(doc) == [_events_msg(b.proc, 4)]
    assert len(inbox_b.of(doc)) == 2


async def test_messages_keep_publish_order(pair: tuple[Hub, Inbox, Hub, Inbox]) -> None:
    """Messages of one publisher arrive in the order they were published."""
    a, _, b, inbox_b = pair
    doc = uuid4()
    await b.watch(doc)
    for i in range(1, 51):
        a.publish(doc, _events_msg(a.proc, i))
        if i % 10 == 0:
            await asyncio.sleep(0)  # spread over several loop turns (several pipelines)
    await eventually(lambda: len(inbox_b.of(doc)) == 50)
    assert [m["e"][0][0] for m in inbox_b.of(doc)] == list(range(1, 51))


async def test_watch_and_unwatch_select_documents(pair: tuple[Hub, Inbox, Hub, Inbox]) -> None:
    """Only watched documents are delivered; after unwatch a document's messages stop."""
    a, _, b, inbox_b = pair
    watched, unwatched, later = uuid4(), uuid4(), uuid4()
    await b.watch(watched)
    await b.watch(later)
    a.publish(unwatched, _events_msg(a.proc, 1))
    a.publish(watched, _events_msg(a.proc, 1))
    await eventually(lambda: inbox_b.of(watched))
    b.unwatch(later)
    a.publish(later, _events_msg(a.proc, 1))
    a.publish(watched, _events_msg(a.proc, 2))  # a marker: everything before it has arrived
    await eventually(lambda: len(inbox_b.of(watched)) == 2)
    assert inbox_b.of(unwatched) == []
    assert inbox_b.of(later) == []
    # Watching again resumes delivery.
    await b.watch(later)
    a.publish(later, _events_msg(a.proc, 2))
    await eventually(lambda: inbox_b.of(later))
    assert [m["e"][0][0] for m in inbox_b.of(later)] == [2]


async def test_presence_is_shared_and_cleared(pair: tuple[Hub, Inbox, Hub, Inbox]) -> None:
    """set_presence is visible to other hubs' presence_of (never one's own); None clears it."""
    a, _, b, _ = pair
    doc = uuid4()
    a.set_presence(doc, "s1", ["ulla", {"cursor": 1}, a.proc])
    a.set_presence(doc, "s2", ["vera", {"cursor": 2}, a.proc])
    b.set_presence(doc, "s3", ["wim", {"cursor": 3}, b.proc])
    seen = await eventually(lambda: _sized(b.presence_of(doc), 2))
    assert seen == {"s1": ["ulla", {"cursor": 1}, a.proc], "s2": ["vera", {"cursor": 2}, a.proc]}
    assert await eventually(lambda: _sized(a.presence_of(doc), 1)) == {
        "s3": ["wim", {"cursor": 3}, b.proc]
    }
    a.set_presence(doc, "s1", ["ulla", {"cursor": 9}, a.proc])  # the latest entry wins
    a.set_presence(doc, "s2", None)
    latest = {"s1": ["ulla", {"cursor": 9}, a.proc]}
    seen = await eventually(lambda: _where(b.presence_of(doc), lambda p: p == latest))
    assert seen == latest
    assert await b.presence_of(uuid4()) == {}


async def test_dead_process_is_not_live_and_its_presence_is_gone(
    pair: tuple[Hub, Inbox, Hub, Inbox],
) -> None:
    """live_procs reports live hubs only; presence of a hub that went away is not returned."""
    a, _, b, _ = pair
    doc = uuid4()
    assert await b.live_procs({a.proc, b.proc}) == {a.proc, b.proc}
    assert await b.live_procs(set()) == set()
    assert await b.live_procs({"nobody"}) == set()
    a.set_presence(doc, "s1", ["ulla", {"cursor": 1}, a.proc])
    await eventually(lambda: _sized(b.presence_of(doc), 1))
    await a.close()  # as a process death would, once its liveness expired
    assert await b.live_procs({a.proc, b.proc}) == {b.proc}
    assert await b.presence_of(doc) == {}


@pytest.mark.redis
async def test_redis_reconnect_request_resyncs_other_hubs(
    redis_pair: tuple[RedisHub, Inbox, RedisHub, Inbox],
) -> None:
    """A resync request on the Redis control channel makes every other hub resync its rooms."""
    a, inbox_a, _, inbox_b = redis_pair
    a.publish_raw(a._ctl, pack({"k": "r", "p": a.proc}))
    await eventually(lambda: inbox_b.resyncs == 1)
    await asyncio.sleep(0.1)
    assert inbox_a.resyncs == 0


async def test_reset_presence_replaces_the_process_entries_and_tells_the_others(
    pair: tuple[Hub, Inbox, Hub, Inbox],
) -> None:
    """reset_presence: the others read exactly the given sessions of this process (its other
    entries gone, another process's kept), and get a ``P`` message naming them all (on
    Redis twice: again once the hash is written)."""
    a, _, b, inbox_b = pair
    doc = uuid4()
    await b.watch(doc)
    a.set_presence(doc, "s1", ["ulla", {"cursor": 1}, a.proc])
    a.set_presence(doc, "s2", ["vera", {"cursor": 2}, a.proc])
    b.set_presence(doc, "s3", ["wim", {"cursor": 3}, b.proc])
    await eventually(lambda: _sized(b.presence_of(doc), 2))
    a.reset_presence(lambda: {doc: {"s2": ["vera", {"cursor": 5}]}})
    want = {"s2": ["vera", {"cursor": 5}, a.proc]}
    assert await eventually(lambda: _where(b.presence_of(doc), lambda p: p == want)) == want
    assert await eventually(lambda: _sized(a.presence_of(doc), 1)) == {
        "s3": ["wim", {"cursor": 3}, b.proc]
    }
    p_msg = {"k": "P", "p": a.proc, "all": {"s2": ["vera", {"cursor": 5}]}}
    if isinstance(a, RedisHub):  # again once the hash is written, as things are then
        await eventually(lambda: len(inbox_b.of(doc)) == 2)
        assert inbox_b.of(doc) == [p_msg, p_msg]
    else:
        await eventually(lambda: inbox_b.of(doc))
        assert inbox_b.of(doc) == [p_msg]


@pytest.mark.redis
async def test_the_second_p_of_a_reset_says_what_holds_once_the_hash_is_written(
    redis_pair: tuple[RedisHub, Inbox, RedisHub, Inbox],
) -> None:
    """A room opened elsewhere while the hash was being rewritten read it not yet right:
    the ``P`` published once it is written gives the presence as it is at that moment."""
    a, _, b, inbox_b = redis_pair
    doc = uuid4()
    states = iter([{doc: {"s1": ["ulla", {"cursor": 1}]}}, {doc: {"s1": ["ulla", {"cursor": 2}]}}])
    await b.watch(doc)
    a.reset_presence(lambda: next(states))
    await eventually(lambda: len(inbox_b.of(doc)) == 2)
    assert [m["all"]["s1"][1] for m in inbox_b.of(doc)] == [{"cursor": 1}, {"cursor": 2}]


@pytest.mark.redis
async def test_presence_writes_lost_while_redis_was_away_are_reset(
    redis_pair: tuple[RedisHub, Inbox, RedisHub, Inbox],
) -> None:
    """A presence clear that could not be written (the hub unhealthy) leaves its document to
    the next reset: it is cleared in the hash and announced, though no room holds it."""
    a, _, b, inbox_b = redis_pair
    doc = uuid4()
    await b.watch(doc)
    a.set_presence(doc, "s1", ["ulla", {"cursor": 1}, a.proc])
    await eventually(lambda: _sized(b.presence_of(doc), 1))
    a.healthy = False  # as between losing Redis and reconnecting
    a.set_presence(doc, "s1", None)
    await eventually(lambda: a.publish_failures)
    a.healthy = True
    assert await b.presence_of(doc) == {"s1": ["ulla", {"cursor": 1}, a.proc]}
    a.reset_presence(dict)

    async def cleared() -> bool:
        return await b.presence_of(doc) == {}

    await eventually(cleared)
    await eventually(lambda: len(inbox_b.of(doc)) == 2)
    assert inbox_b.of(doc) == [{"k": "P", "p": a.proc, "all": {}}] * 2


@pytest.mark.redis
async def test_a_hub_that_finds_its_liveness_key_gone_resyncs(
    redis_url: str, redis_prefix: str
) -> None:
    """Its key expired (the process was stopped past the TTL, or Redis lost its keys): the
    others took it for dead, so at its next heartbeat it resyncs (presence published anew)."""
    hub, inbox = RedisHub(redis_url, redis_prefix), Inbox()
    client = aioredis.Redis.from_url(redis_url)
    try:
        await hub.start(inbox.on_message, inbox.on_resync)
        await client.delete(f"{redis_prefix}proc:{hub.proc}")
        await eventually(lambda: inbox.resyncs == 1, within=10)
        assert await client.exists(f"{redis_prefix}proc:{hub.proc}")
    finally:
        await hub.close()
        await client.aclose()
        await _clear_redis(redis_url, redis_prefix)


async def _sized(coro: Any, n: int) -> Any:
    value = await coro
    return value if len(value) == n else None


async def _where(coro: Any, pred: Callable[[Any], bool]) -> Any:
    value = await coro
    return value if pred(value) else None


# -- two processes' rooms on one schema and one hub ------------------------------------------


class Collector:
    """A subscriber that keeps what a room sent it."""

    def __init__(self, user: str | None = None) -> None:
        self.user = user
        self.msgs: list[dict[str, Any]] = []

    def deliver(self, msg: Encoded) -> None:
        """The room's ``Subscriber.deliver``."""
        self.msgs.append(msg.msg)

    def removed(self, doc: Any) -> None:
        """The room's ``Subscriber.removed``."""
        self.msgs.append({"t": "removed", "doc": str(doc)})

    def presence(self) -> list[tuple[str, str, Any]]:
        """``(session, user, data)`` of every presence message received, in order."""
        return [(m["session"], m["user"], m["data"]) for m in self.msgs if m["t"] == "presence"]

    def versions(self) -> list[int]:
        """Versions of every op received, in order."""
        return [o["v"] for m in self.msgs if m["t"] == "ops" for o in m["ops"]]


@pytest.fixture
def pg_config(tmp_path: Path, pg_url: str, pg_schema: str) -> StoreConfig:
    """A store configuration on a fresh Postgres schema."""
    return StoreConfig(data_dir=tmp_path, database_url=pg_url, database_schema=pg_schema)


@pytest.fixture
def two_stores(pg_config: StoreConfig) -> Iterator[tuple[Store, Store]]:
    """Two stores on one schema: the connections of two processes."""
    a = Store(pg_config)
    b = Store(pg_config)
    try:
        yield a, b
    finally:
        a.close()
        b.close()


def _submit(room: Room, op: Any, base: int, client: str, seq: int) -> asyncio.Future[Any]:
    fut: asyncio.Future[Any] = asyncio.get_running_loop().create_future()
    room.submit(
        Submission(kind="edit", by=OWNER, future=fut, base=base, op=op, client=client, seq=seq)
    )
    return fut


def _saved(store: Store) -> Document:
    doc = Document.create(title="T", text="", owner=OWNER)
    store.save(list(doc.collect_events()))
    return doc


@pytest.mark.postgres
async def test_rooms_of_two_processes_converge_through_the_hub(
    two_stores: tuple[Store, Store], hub_factory: Callable[[], Hub]
) -> None:
    """Edits submitted to two processes' rooms commit once each and both rooms converge."""
    store_a, store_b = two_stores
    doc = await asyncio.to_thread(_saved, store_a)
    rng = random.Random(3)
    marks = iter(chr(0x4E00 + i) for i in range(10_000))
    subs: list[tuple[str, asyncio.Future[Any]]] = []
    async with running(store_a, hub_factory()) as a, running(store_b, hub_factory()) as b:
        room_a, room_b = await a.get(doc.id), await b.get(doc.id)
        assert room_a is not None and room_b is not None
        watch_a, watch_b = Collector(), Collector()
        room_a.subscribe(watch_a)
        room_b.subscribe(watch_b)
        seqs = {"a": 0, "b": 0}
        for _ in range(15):
            for name, room in (("a", room_a), ("b", room_b)):
                for _ in range(rng.randint(1, 4)):
                    snap = room.snapshot
                    mark = next(marks)
                    seqs[name] += 1
                    op = ot.normalize([rng.randint(0, len(snap.text)), mark])
                    subs.append((mark, _submit(room, op, snap.v, name, seqs[name])))
            await asyncio.sleep(rng.choice([0, 0.001, 0.005]))
        async with asyncio.timeout(15):
            versions = [await f for _, f in subs]
        n = len(subs)
        await eventually(lambda: room_a.snapshot.v == n and room_b.snapshot.v == n, within=10)
        assert sorted(versions) == list(range(1, n + 1))
        assert room_a.snapshot.text == room_b.snapshot.text
        assert sorted(room_a.snapshot.text) == sorted(m for m, _ in subs)
        # Each subscriber saw every version exactly once, in order.
        assert watch_a.versions() == list(range(1, n + 1))
        assert watch_b.versions() == list(range(1, n + 1))
    stored = await asyncio.to_thread(store_b.load, doc.id)
    assert stored is not None and stored.text == room_a.snapshot.text


@pytest.mark.postgres
async def test_dropped_hub_message_is_filled_from_the_store(
    two_stores: tuple[Store, Store], hub_factory: Callable[[], Hub]
) -> None:
    """A gap in remote events is filled from the store; duplicates are dropped; order holds."""
    store_a, store_b = two_stores
    doc = await asyncio.to_thread(_saved, store_a)
    hub_b = hub_factory()
    async with running(store_a, hub_factory()) as a, running(store_b, hub_b) as b:
        room_a, room_b = await a.get(doc.id), await b.get(doc.id)
        assert room_a is not None and room_b is not None
        watch_b = Collector()
        room_b.subscribe(watch_b)
        hub_b.unwatch(doc.id)  # from now on b misses every hub message about the document
        for i, text in enumerate("xyz"):
            assert await _submit(room_a, ot.normalize([i, text]), i, "a", i + 1) == i + 1
        await asyncio.sleep(0.2)
        assert room_b.snapshot.v == 0, "b must not have heard of the edits"
        events = await asyncio.to_thread(store_a.events_after, doc.id, 1)
        assert [e.v for e in events] == [1, 2, 3]
        room_b.remote_events([events[2]])  # v3 arrives, v1 and v2 were lost
        await eventually(lambda: room_b.snapshot.v == 3)
        assert room_b.snapshot.text == room_a.snapshot.text == "xyz"
        room_b.remote_events(list(events))  # a late duplicate of all three
        room_b.remote_events([events[0]])
        await asyncio.sleep(0.1)
        assert room_b.snapshot.text == "xyz"
        assert watch_b.versions() == [1, 2, 3]
        # b's own edit after the gap builds on the filled state.
        assert await _submit(room_b, [3, "!"], 3, "b", 1) == 4
        await eventually(lambda: room_a.snapshot.v == 4)
        assert room_a.snapshot.text == "xyz!"


@pytest.mark.postgres
async def test_presence_crosses_rooms_of_two_processes(
    two_stores: tuple[Store, Store], hub_factory: Callable[[], Hub]
) -> None:
    """A local session's presence reaches the other process's subscribers; a clear follows."""
    store_a, store_b = two_stores
    doc = await asyncio.to_thread(_saved, store_a)
    async with running(store_a, hub_factory()) as a, running(store_b, hub_factory()) as b:
        room_a, room_b = await a.get(doc.id), await b.get(doc.id)
        assert room_a is not None and room_b is not None
        here, there = Collector(), Collector()
        room_a.subscribe(here)
        room_b.subscribe(there)
        room_a.set_presence(here, "s1", "ulla", {"cursor": 1})
        await eventually(lambda: there.presence())
        assert there.presence() == [("s1", "ulla", {"cursor": 1})]
        assert here.presence() == []  # never echoed to its own session
        room_a.set_presence(here, "s1", "ulla", None)
        await eventually(lambda: len(there.presence()) == 2)
        assert there.presence()[1][::2] == ("s1", None)
        assert room_b.presence == {}


async def test_a_newcomer_gets_each_presence_once_and_repeats_are_dropped() -> None:
    """Presence queued for broadcast when a session subscribes (the room just read it from
    the hub) reaches the newcomer once, through ``send_presence_to``; a remote entry that
    comes again unchanged (read from Redis, then published) is not broadcast again."""
    room = Room(Document.create(title="T", text="", owner=OWNER), lambda room: None)
    old = Collector()
    room.subscribe(old)
    room.remote_presence("s1", "ulla", {"cursor": 1}, "p1")
    room.set_presence(old, "s0", OWNER, {"cursor": 0})
    new = Collector()
    room.subscribe(new)  # in the same loop turn, before the broadcast went out
    room.send_presence_to(new)
    await asyncio.sleep(0)
    assert sorted(new.presence()) == [("s0", OWNER, {"cursor": 0}), ("s1", "ulla", {"cursor": 1})]
    assert old.presence() == [("s1", "ulla", {"cursor": 1})]
    room.remote_presence("s1", "ulla", {"cursor": 1}, "p1")
    await asyncio.sleep(0)
    assert len(new.presence()) == 2 and len(old.presence()) == 1
    room.remote_presence("s1", "ulla", {"cursor": 2}, "p1")
    await asyncio.sleep(0)
    assert new.presence()[-1] == old.presence()[-1] == ("s1", "ulla", {"cursor": 2})


async def test_a_local_presence_sent_again_unchanged_goes_nowhere() -> None:
    """A session's presence sent again with the value it has is no change: not broadcast
    here, nor published to the other processes (which would not relay it either)."""
    published: list[Any] = []
    room = Room(
        Document.create(title="T", text="", owner=OWNER), lambda room: None,
        on_presence=lambda room, sid, user, data: published.append(data),
    )
    setter, peer = Collector(), Collector()
    room.subscribe(setter)
    room.subscribe(peer)
    for data in [{"cursor": 1}, {"cursor": 1}, {"cursor": 2}, {"cursor": 2}, None, None]:
        room.set_presence(setter, "s0", OWNER, data)
        await asyncio.sleep(0)
    changes = [{"cursor": 1}, {"cursor": 2}, None]
    assert [d for _, _, d in peer.presence()] == published == changes


async def test_presence_values_python_finds_equal_are_changes() -> None:
    """``1``, ``1.0`` and ``true`` are different JSON to clients: each is a change, from a
    local session or from another process (a JSON integer past 64 bits reads as a float,
    which can equal the integer before it)."""
    room = Room(Document.create(title="T", text="", owner=OWNER), lambda room: None)
    setter, peer = Collector(), Collector()
    room.subscribe(setter)
    room.subscribe(peer)
    values = [1, 1.0, True, -(2**63), float(-(2**63) - 1)]
    for data in values:
        room.set_presence(setter, "s0", OWNER, data)
        room.remote_presence("s1", "ulla", data, "p1")
        await asyncio.sleep(0)
    got = [(sid, d) for sid, _, d in peer.presence()]
    assert got == [(sid, d) for d in values for sid in ("s0", "s1")]
    assert [type(d) for _, d in got] == [type(d) for d in values for _ in "ab"]


def _command(room: Room, command: Callable[[Document], Any]) -> asyncio.Future[Any]:
    fut: asyncio.Future[Any] = asyncio.get_running_loop().create_future()
    room.submit(Submission(kind="command", by=OWNER, future=fut, command=command))
    return fut


@pytest.mark.postgres
async def test_a_resend_by_a_user_demoted_elsewhere_is_acked_a_new_op_forbidden(
    two_stores: tuple[Store, Store],
) -> None:
    """vic, an editor for a moment on another process, commits an op there and is made a
    viewer again; this process never heard of either (two hubs that never talk). vic's
    resend of that op here is acked with its version (the store is asked), not refused as
    a viewer's new op; a new op of vic's is ``forbidden``."""
    store_a, store_b = two_stores
    doc = Document.create(title="T", text="", owner=OWNER)
    doc.add_member("vic", "viewer", OWNER)
    await asyncio.to_thread(store_a.save, list(doc.collect_events()))
    async with running(store_a) as a, running(store_b) as b:
        room_a, room_b = await a.get(doc.id), await b.get(doc.id)
        assert room_a is not None and room_b is not None

        async def vic_op(rooms: Any, room: Room, seq: int) -> Any:
            fut: asyncio.Future[Any] = asyncio.get_running_loop().create_future()
            await rooms.submit(room, Submission(kind="edit", by="vic", future=fut, base=0,
                                                op=["v"], client="vic-1", seq=seq))
            return await asyncio.wait_for(fut, 10)

        await _command(room_b, lambda d: d.add_member("vic", "editor", OWNER))
        assert await vic_op(b, room_b, 1) == 1
        await _command(room_b, lambda d: d.add_member("vic", "viewer", OWNER))
        assert room_a.doc.version == 2 and not room_a.doc.can_write("vic")
        assert await vic_op(a, room_a, 1) == 1
        with pytest.raises(Rejected) as refused:
            await vic_op(a, room_a, 2)
        assert refused.value.code is Code.FORBIDDEN


@pytest.mark.postgres
@pytest.mark.slow
async def test_a_viewers_op_waits_no_longer_than_its_lookup_on_a_locked_table(
    two_stores: tuple[Store, Store], pg_config: StoreConfig
) -> None:
    """With ``coscribe_client_ops`` locked (a migration, a ``LOCK TABLE``), a viewer's op
    with a client id (looked up before it is refused) is ``unavailable`` within seconds,
    and the reader threads are free again: a read of another document is answered."""
    store_a, _ = two_stores
    doc = Document.create(title="T", text="", owner=OWNER)
    doc.add_member("vic", "viewer", OWNER)
    await asyncio.to_thread(store_a.save, list(doc.collect_events()))
    other = await asyncio.to_thread(_saved, store_a)
    table = sql.Identifier(str(pg_config.database_schema), "coscribe_client_ops")
    assert pg_config.database_url is not None
    async with running(store_a) as a:
        room = await a.get(doc.id)
        assert room is not None
        async with await psycopg.AsyncConnection.connect(pg_config.database_url) as holder:
            await holder.execute(sql.SQL("LOCK TABLE {} IN ACCESS EXCLUSIVE MODE").format(table))
            futs = []
            for seq in range(1, 2 + pg_config.pool_size):  # more than the reader threads
                fut: asyncio.Future[Any] = asyncio.get_running_loop().create_future()
                await a.submit(room, Submission(kind="edit", by="vic", future=fut, base=0,
                                                op=["v"], client="vic-1", seq=seq))
                futs.append(fut)
            started = asyncio.get_running_loop().time()
            for fut in futs:
                with pytest.raises(Rejected) as refused:
                    await asyncio.wait_for(fut, 10)
                assert refused.value.code is Code.UNAVAILABLE
            assert asyncio.get_running_loop().time() - started < 8
            assert await asyncio.wait_for(a.get(other.id), 5) is not None
            await holder.rollback()


@pytest.mark.postgres
async def test_a_removed_member_is_dropped_from_the_rooms_of_every_process(
    two_stores: tuple[Store, Store], hub_factory: Callable[[], Hub]
) -> None:
    """Removing a member drops their subscriptions here and in the other process (with
    ``removed``): the ops committed after the removal never reach them; others stay."""
    store_a, store_b = two_stores
    doc = await asyncio.to_thread(_saved, store_a)
    async with running(store_a, hub_factory()) as a, running(store_b, hub_factory()) as b:
        room_a, room_b = await a.get(doc.id), await b.get(doc.id)
        assert room_a is not None and room_b is not None
        await _command(room_a, lambda d: d.add_member("bob", "editor", OWNER))
        await eventually(lambda: room_b.doc.can_read("bob"))
        bob_here, bob_there, olga_there = Collector("bob"), Collector("bob"), Collector(OWNER)
        room_a.subscribe(bob_here)
        room_b.subscribe(bob_there)
        room_b.subscribe(olga_there)
        room_b.set_presence(bob_there, "s1", "bob", {"cursor": 0})
        await _submit(room_a, ["before"], 0, "c", 1)
        await _command(room_a, lambda d: d.remove_member("bob", OWNER))
        await _submit(room_a, ["after "], 1, "c", 2)
        await eventually(lambda: olga_there.versions() == [1, 2])
        for bob in (bob_here, bob_there):
            assert [m["t"] for m in bob.msgs if m["t"] != "presence"] == ["ops", "removed"]
            assert bob.versions() == [1]
        assert bob_here not in room_a.members and bob_there not in room_b.members
        assert room_b.presence == {}  # the removed session's presence went with it
        assert olga_there.presence()[-1] == ("s1", "bob", None)


@pytest.mark.postgres
async def test_a_writer_that_died_before_publishing_is_read_from_the_store(
    two_stores: tuple[Store, Store]
) -> None:
    """A process commits, dies before publishing: once it is found dead, the rooms it wrote
    re-read the store and their subscribers get the op no hub message carried."""
    store_a, store_b = two_stores
    doc = await asyncio.to_thread(_saved, store_a)
    broker = LocalBroker()
    hub_b = LocalHub(broker)
    async with running(store_a, LocalHub(broker)) as a, running(store_b, hub_b) as b:
        room_a, room_b = await a.get(doc.id), await b.get(doc.id)
        assert room_a is not None and room_b is not None
        watch = Collector()
        room_a.subscribe(watch)
        await _submit(room_b, ["published "], 0, "c", 1)
        await eventually(lambda: watch.versions() == [1])
        assert room_a.writers == {hub_b.proc}

        def commit_unpublished() -> None:  # what b committed last, before it died
            d = store_b.load(doc.id)
            assert d is not None
            d.edit(["lost? "], OWNER, "c", 2)
            store_b.save(list(d.collect_events()))

        await asyncio.to_thread(commit_unpublished)
        await hub_b.close()  # b is gone: off the broker, as its liveness key would expire
        liveness = asyncio.create_task(a.presence_forever(every=0.05))
        try:
            await eventually(lambda: watch.versions() == [1, 2])
        finally:
            liveness.cancel()
        assert room_a.snapshot.text == "lost? published " and not room_a.writers


@pytest.mark.postgres
async def test_remote_presence_clear_names_the_user(
    two_stores: tuple[Store, Store], hub_factory: Callable[[], Hub]
) -> None:
    """The clear that reaches another process says whose presence went, like a local clear."""
    store_a, store_b = two_stores
    doc = await asyncio.to_thread(_saved, store_a)
    async with running(store_a, hub_factory()) as a, running(store_b, hub_factory()) as b:
        room_a, room_b = await a.get(doc.id), await b.get(doc.id)
        assert room_a is not None and room_b is not None
        here, near, there = Collector(), Collector(), Collector()
        room_a.subscribe(here)
        room_a.subscribe(near)
        room_b.subscribe(there)
        room_a.set_presence(here, "s1", "ulla", {"cursor": 1})
        await eventually(lambda: there.presence())
        room_a.unsubscribe(here)
        await eventually(lambda: len(there.presence()) == 2)
        assert near.presence()[-1] == ("s1", "ulla", None)  # the local clear
        assert there.presence()[-1] == ("s1", "ulla", None)


async def test_a_resync_publishes_the_rooms_presence_whole(
    two_stores: tuple[Store, Store], hub_factory: Callable[[], Hub]
) -> None:
    """Presence changes the other process never heard of (their publishes were lost) are
    made right there by the next resync: the session that left is cleared, the one that
    changed is set, and one that did not change is not sent again."""
    store_a, store_b = two_stores
    doc = await asyncio.to_thread(_saved, store_a)
    async with running(store_a, hub_factory()) as a, running(store_b, hub_factory()) as b:
        room_a, room_b = await a.get(doc.id), await b.get(doc.id)
        assert room_a is not None and room_b is not None
        left, moved, still, there = Collector(), Collector(), Collector(), Collector()
        for c in (left, moved, still):
            room_a.subscribe(c)
        room_b.subscribe(there)
        room_a.set_presence(left, "s1", "ulla", {"cursor": 1})
        room_a.set_presence(moved, "s2", "vera", {"cursor": 2})
        room_a.set_presence(still, "s3", "wim", {"cursor": 3})
        await eventually(lambda: len(there.presence()) == 3)
        publish = room_a._on_presence
        room_a._on_presence = lambda room, sid, user, data: None  # lost on the way
        room_a.unsubscribe(left)
        room_a.set_presence(moved, "s2", "vera", {"cursor": 9})
        room_a._on_presence = publish
        await asyncio.sleep(0.05)
        assert len(there.presence()) == 3
        a._resync_all()
        await eventually(lambda: len(there.presence()) == 5)
        assert sorted(there.presence()[3:]) == [("s1", "ulla", None), ("s2", "vera", {"cursor": 9})]
        assert {sid: m["data"] for sid, m in room_b.presence.items()} == {
            "s2": {"cursor": 9}, "s3": {"cursor": 3}
        }


async def test_a_process_heard_from_while_its_liveness_was_asked_is_not_taken_for_dead(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The liveness answer can predate a message the process sent since (it had been taken
    for dead, came back and published its presence anew): its sessions are not cleared,
    which would be for good (it has no reason to publish them again)."""
    store = Store(StoreConfig(data_dir=tmp_path))
    try:
        doc = await asyncio.to_thread(_saved, store)
        async with running(store) as rooms:
            room = await rooms.get(doc.id)
            assert room is not None
            room.remote_presence("s1", "ulla", {"cursor": 1}, "other")

            async def stale_answer(procs: set[str]) -> set[str]:
                rooms._on_hub(doc.id, {"k": "P", "p": "other",
                                       "all": {"s1": ["ulla", {"cursor": 2}]}})
                return set()  # as read before the process refreshed its key

            monkeypatch.setattr(rooms.hub, "live_procs", stale_answer)
            task = asyncio.create_task(rooms.presence_forever(every=0.01))
            await asyncio.sleep(0.1)
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
            assert room.presence["s1"]["data"] == {"cursor": 2}
    finally:
        store.close()


async def test_publisher_to_a_server_that_stopped_reading_gives_up(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A Redis that accepts but never reads cannot hold the hub's outbox: after the send
    timeout the publishes count as failed and the connection is dropped (made anew next)."""
    import gateway.redis_hub as redis_hub

    monkeypatch.setattr(redis_hub, "SEND_TIMEOUT", 0.3)
    held: list[asyncio.StreamWriter] = []

    async def accept(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        held.append(writer)  # never reads

    server = await asyncio.start_server(accept, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    hub = RedisHub(f"redis://127.0.0.1:{port}/0", "stalled:")
    try:
        big = [resp.command("PUBLISH", "c", b"x" * 65536)] * 200  # 13 MB: past every buffer
        await asyncio.wait_for(hub._publish(big), 5)
        assert hub.publish_failures == 200 and hub.published == 0
        assert hub._pub is None
    finally:
        for w in held:
            w.close()
        server.close()
        await server.wait_closed()
