"""End to end over WebSocket and HTTP: concurrent editing converges, survives a restart,
catch-up delivers exactly the missed ops, and HTTP ops are transformed like WebSocket ones.

The convergence test runs real ``coscribe serve`` processes (PostgreSQL, and the SQLite
default); the others run the gateway in-process.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import random
import threading
from collections.abc import AsyncIterator, Sequence
from pathlib import Path
from typing import Any
from uuid import UUID

import aiohttp
import orjson
import pytest
from aiohttp.test_utils import TestClient, TestServer

from domain import ot
from gateway import keys, session
from gateway.app import Services, create_app
from gateway.auth import sign_token
from gateway.hub import Hub
from gateway.readmodels import Extension
from gateway.redis_hub import RedisHub
from gateway.store import Store, StoreConfig
from schema.frames import Codec, Encoded, OpsMessage
from tests.conftest import PG_URL
from tests.procs import TEST_SECRET, ServerProcess
from tests.test_hub import eventually
from tests.wsclient import DocState, WsClient

OWNER = "olga"
ALPHABET = ["a", "b", "c", " ", "\n", "é", "\u0301", "😀", "👍🏽", "中", "\U00010348", "x"]
"""Insert material, with code points outside the BMP and combining marks on purpose."""


class Api:
    """A tiny HTTP client for one gateway, acting as a user."""

    def __init__(
        self, http: aiohttp.ClientSession | TestClient[Any, Any], base: str, secret: bytes
    ):
        self.http = http
        self.base = base
        self.secret = secret

    def token(self, user: str = OWNER) -> str:
        """A token for ``user``."""
        return sign_token(self.secret, user)

    @property
    def ws_url(self) -> str:
        """The WebSocket endpoint."""
        return self.base.replace("http", "ws", 1) + "/v1/ws"

    @property
    def session(self) -> aiohttp.ClientSession:
        """The underlying aiohttp session (for WebSocket connections)."""
        return self.http.session if isinstance(self.http, TestClient) else self.http

    async def call(self, method: str, path: str, user: str = OWNER, **kw: Any) -> tuple[int, Any]:
        """``(status, JSON body)``."""
        headers = {"Authorization": f"Bearer {self.token(user)}"}
        async with self.session.request(method, self.base + path, headers=headers, **kw) as r:
            return r.status, await r.json()

    async def create(self, text: str, title: str = "e2e") -> str:
        """A new document's id."""
        status, body = await self.call("POST", "/v1/documents", json={"title": title, "text": text})
        assert status == 201, body
        assert body["version"] == 0 and body["text"] == text
        return str(body["id"])

    async def get(self, doc: str) -> tuple[str, int]:
        """``(text, version)``."""
        status, body = await self.call("GET", f"/v1/documents/{doc}")
        assert status == 200, body
        return body["text"], body["version"]

    async def ops(self, doc: str, start: int = 0, limit: int = 1000) -> list[dict[str, Any]]:
        """``GET .../ops?from=&limit=`` entries."""
        status, body = await self.call("GET", f"/v1/documents/{doc}/ops?from={start}&limit={limit}")
        assert status == 200, body
        return list(body["ops"])

    async def post_op(self, doc: str, v: int, op: Any, **extra: Any) -> int:
        """``POST .../ops``; the version it produced."""
        status, body = await self.call(
            "POST", f"/v1/documents/{doc}/ops", json={"v": v, "op": op, **extra}
        )
        assert status == 200, body
        return int(body["v"])

    async def connect(
        self, codec: Codec, user: str = OWNER, client_id: str | None = None
    ) -> WsClient:
        """A WebSocket client that said hello."""
        ws = await WsClient.connect(self.session, self.ws_url, codec, self.token(user), client_id)
        assert ws.user == user
        return ws


def random_edit(rng: random.Random, text: str) -> ot.Op:
    """A random insert, delete or replace at a random place of ``text``."""
    n = len(text)
    insert = "".join(rng.choice(ALPHABET) for _ in range(rng.randint(1, 4)))
    roll = rng.random()
    if n and roll < 0.3:
        pos = rng.randrange(n)
        return ot.normalize([pos, {"d": rng.randint(1, min(4, n - pos))}])
    if n and roll < 0.45:
        pos = rng.randrange(n)
        return ot.normalize([pos, {"d": rng.randint(1, min(3, n - pos))}, insert])
    return ot.normalize([rng.randint(0, n), insert])


def replay(initial: str, entries: list[dict[str, Any]]) -> str:
    """``initial`` with the ops of ``entries`` applied in order; checks the versions run 1..N."""
    assert [e["v"] for e in entries] == list(range(1, len(entries) + 1))
    text = initial
    for e in entries:
        text = ot.apply(text, e["op"])
    return text


async def settle(api: Api, doc: str, clients: list[WsClient]) -> tuple[str, int]:
    """Wait until nothing is in flight anywhere and every client has the server's version."""
    states = [c.docs[doc] for c in clients]
    for c, s in zip(clients, states, strict=True):
        await c.wait_until(lambda s=s: s.quiet, within=60)  # type: ignore[misc]
    text, v = await api.get(doc)
    for c, s in zip(clients, states, strict=True):
        await c.wait_until(lambda s=s: s.version >= v, within=60)  # type: ignore[misc]
        await c.ping()
    assert await api.get(doc) == (text, v), "still changing after every client was quiet"
    return text, v


async def edit_randomly(state: DocState, rng: random.Random, count: int) -> None:
    """Make ``count`` random local edits without waiting for acks, at random short intervals."""
    for _ in range(count):
        assert state.text is not None
        state.edit(random_edit(rng, state.text))
        await asyncio.sleep(rng.choice([0, 0.001, 0.002, 0.005, 0.01]))


# -- the real server -------------------------------------------------------------------------


@pytest.fixture(params=["postgres", "sqlite"])
def server(request: pytest.FixtureRequest, tmp_path: Path) -> ServerProcess:
    """A ``coscribe serve`` (not started) on PostgreSQL in a fresh schema, or the SQLite default."""
    if request.param == "sqlite":
        return ServerProcess(tmp_path / "data")
    schema = request.getfixturevalue("pg_schema")
    return ServerProcess(tmp_path / "data", database_url=PG_URL, database_schema=schema)


def stored_edits(server: ServerProcess, doc: str) -> int:
    """How many edits of ``doc`` are in the store the server was configured with."""
    cfg = StoreConfig(
        data_dir=server.data_dir,
        database_url=server.settings.get("database_url"),
        database_schema=server.settings.get("database_schema"),
    )
    if cfg.database_url is None:
        assert (server.data_dir / "events.sqlite").exists()
    store = Store(cfg)
    try:
        return len(store.edits_after(UUID(doc), 0, 10_000))
    finally:
        store.close()


@contextlib.asynccontextmanager
async def started(server: ServerProcess) -> AsyncIterator[ServerProcess]:
    """Start ``server`` (off the loop) and stop it with SIGTERM at the end."""
    await asyncio.to_thread(server.start)
    try:
        yield server
    finally:
        await asyncio.to_thread(server.stop)


@pytest.mark.slow
async def test_concurrent_clients_converge_and_survive_restart(server: ServerProcess) -> None:
    """Three clients (json, msgpack) make 200 concurrent edits; all converge; restart keeps it."""
    rng = random.Random(20240601)
    initial = "Hello, 世界! 😀\n"
    async with aiohttp.ClientSession() as http:
        api = Api(http, server.url, TEST_SECRET.encode())
        clients: list[WsClient] = []
        try:
            async with started(server):
                doc = await api.create(initial)
                for i, codec in enumerate([Codec.JSON, Codec.MSGPACK, Codec.JSON]):
                    clients.append(await api.connect(codec, client_id=f"client-{i}"))
                assert [c.ws.protocol for c in clients] == [c.codec.value for c in clients]
                states = [await c.subscribe(doc) for c in clients]
                counts = [67, 67, 66]
                await asyncio.gather(
                    *(
                        edit_randomly(s, random.Random(rng.random()), n)
                        for s, n in zip(states, counts, strict=True)
                    )
                )
                text, version = await settle(api, doc, clients)
                for s in states:
                    assert not s.problems, s.problems
                    assert (s.text, s.version) == (text, version)
                acked = sum(len(s.acks) for s in states)
                assert sum(s.transforms for s in states) > 0, "no op ever crossed another"
                assert acked == version, "every committed op was acked to exactly one client"
                entries = await api.ops(doc)
                assert len(entries) == version
                assert replay(initial, entries) == text
                for c in clients[1:]:
                    await c.close()
            # SIGTERM closed the connection still open with 1001 (going away).
            assert await clients[0].wait_closed() == 1001
        finally:
            for c in clients:
                await c.close()

        assert await asyncio.to_thread(stored_edits, server, doc) == version
        async with started(server):
            assert await api.get(doc) == (text, version)
            assert replay(initial, await api.ops(doc)) == text
            # A client that saw version K catches up from the store after the restart.
            k = max(0, version - 7)
            behind = replay(initial, entries[:k]) if k else initial
            late = await api.connect(Codec.MSGPACK)
            try:
                state = await late.subscribe(doc, v=k, text=behind)
                await late.wait_until(lambda: state.version == version)
                assert [e["v"] for e in state.remote] == list(range(k + 1, version + 1))
                assert state.text == text and not state.problems
                state.edit(["!"])
                await late.wait_until(lambda: state.quiet)
                assert await api.get(doc) == ("!" + text, version + 1)
            finally:
                await late.close()


# -- in-process gateway ----------------------------------------------------------------------


@pytest.fixture
def api(app_client: TestClient[Any, Any]) -> Api:
    """The in-process gateway of ``app_client``."""
    return Api(app_client, str(app_client.make_url("")).rstrip("/"), b"test-secret")


@contextlib.asynccontextmanager
async def second_gateway(
    store_config: StoreConfig, hub: Hub | None = None, extensions: Sequence[Any] = ()
) -> AsyncIterator[Api]:
    """Another gateway on the same database: a process whose rooms start from the store
    (with ``hub``, which it closes, it hears the other gateways on that hub; with
    ``extensions``, the read side say, it mounts them)."""
    app = create_app(Services(
        store=Store(store_config), secret=b"test-secret", hub=hub, extensions=list(extensions)
    ))
    client: TestClient[Any, Any] = TestClient(TestServer(app, host="127.0.0.1", port=0))
    await client.start_server()
    try:
        yield Api(client, str(client.make_url("")).rstrip("/"), b"test-secret")
    finally:
        await client.close()


async def _history(api: Api, doc: str, n: int) -> list[str]:
    """Make ``n`` acked edits over WebSocket; return the text at every version 0..n."""
    ws = await api.connect(Codec.JSON)
    try:
        state = await ws.subscribe(doc)
        assert state.text is not None
        texts = [state.text]
        rng = random.Random(n)
        for _ in range(n):
            state.edit(random_edit(rng, state.text))
            await ws.wait_until(lambda: state.quiet)
            texts.append(state.text)
        assert state.version == n
        return texts
    finally:
        await ws.close()


@pytest.mark.parametrize("k", [0, 4, 10], ids=["from-start", "middle", "up-to-date"])
async def test_catch_up_from_memory_then_live(api: Api, k: int) -> None:
    """sub with v=K gets exactly ops K+1..N in order, then the live ops (room in memory)."""
    doc = await api.create("catch up")
    texts = await _history(api, doc, 10)
    writer = await api.connect(Codec.JSON)
    reader = await api.connect(Codec.MSGPACK)
    try:
        w = await writer.subscribe(doc)
        r = await reader.subscribe(doc, v=k, text=texts[k])
        first = next(m for m in reader.log if m["t"] == "ops")
        assert [e["v"] for e in first["ops"]] == list(range(k + 1, 11))
        await reader.wait_until(lambda: r.version == 10)
        assert r.text == texts[10]
        w.edit(["live "])
        await writer.wait_until(lambda: w.quiet)
        await reader.wait_until(lambda: r.version == 11)
        assert [e["v"] for e in r.remote] == list(range(k + 1, 12))
        assert r.text == w.text == (await api.get(doc))[0]
        assert not r.problems and not w.problems
        stored = await api.ops(doc, start=k)
        assert [e["op"] for e in stored] == [e["op"] for e in r.remote]
    finally:
        await writer.close()
        await reader.close()


@pytest.mark.parametrize("where", ["memory", "store"])
async def test_catch_up_comes_in_messages_of_at_most_a_chunk(
    api: Api, store_config: StoreConfig, monkeypatch: pytest.MonkeyPatch, where: str
) -> None:
    """A catch-up longer than ``CATCH_UP_CHUNK`` ops is split, from memory and from the store."""
    monkeypatch.setattr(session, "CATCH_UP_CHUNK", 4)
    doc = await api.create("chunks")
    texts = await _history(api, doc, 10)
    async with contextlib.AsyncExitStack() as stack:
        gateway = api if where == "memory" else await stack.enter_async_context(
            second_gateway(store_config)
        )
        reader = await gateway.connect(Codec.JSON)
        stack.push_async_callback(reader.close)
        r = await reader.subscribe(doc, v=1, text=texts[1])
        await reader.wait_until(lambda: r.version == 10)
        sizes = [len(m["ops"]) for m in reader.log if m["t"] == "ops"]
        assert sizes == [4, 4, 1] and r.text == texts[10] and not r.problems


async def test_catch_up_from_the_store_then_live(api: Api, store_config: StoreConfig) -> None:
    """In a process that never saw the ops, catch-up reads them from the store, then goes live."""
    doc = await api.create("from the store")
    texts = await _history(api, doc, 12)
    async with second_gateway(store_config) as other:
        reader = await other.connect(Codec.JSON)
        writer = await other.connect(Codec.MSGPACK)
        try:
            w = await writer.subscribe(doc)
            r_mark = len(reader.log)
            reader.docs[doc] = r = DocState(reader, doc, texts[3], 3)
            await reader.send({"t": "sub", "doc": doc, "v": 3})
            # Live ops race the catch-up read: they must come after it, in order.
            for i in range(5):
                w.edit([f"{i}"])
            await writer.wait_until(lambda: w.quiet)
            await reader.wait_until(lambda: r.version == w.version)
            got = [e["v"] for m in reader.since(r_mark) if m["t"] == "ops" for e in m["ops"]]
            assert got == list(range(4, w.version + 1))
            assert r.text == w.text == (await other.get(doc))[0]
            assert not r.problems and not w.problems
            assert w.text is not None and w.text.endswith(texts[12])
        finally:
            await reader.close()
            await writer.close()


@pytest.mark.parametrize("loaded", [True, False], ids=["room-open", "room-loaded"])
async def test_the_answers_to_one_frame_leave_in_one_frame(
    api: Api, store_config: StoreConfig, loaded: bool
) -> None:
    """hello + sub + ping in one frame: welcome, snapshot and pong in one frame, although
    the sub waited for the store (reading its head, or loading the document)."""
    doc = await api.create("one frame")
    async with contextlib.AsyncExitStack() as stack:
        gateway = api if loaded else await stack.enter_async_context(
            second_gateway(store_config)
        )
        ws = await api.session.ws_connect(gateway.ws_url, protocols=["coscribe.v1.json"])
        stack.push_async_callback(ws.close)
        await ws.send_str(orjson.dumps(
            [{"t": "hello", "token": api.token()}, {"t": "sub", "doc": doc}, {"t": "ping"}]
        ).decode())
        frame = orjson.loads((await ws.receive(timeout=10)).data)
        assert [m["t"] for m in frame] == ["welcome", "snapshot", "pong"]


async def test_a_catch_up_from_the_store_comes_before_the_next_message_s_answer(
    api: Api, store_config: StoreConfig
) -> None:
    """hello + sub with v (the ops read from the store) + a bad message + ping in one frame:
    the catch-up comes first, then the error and the pong, in one frame."""
    doc = await api.create("ordered")
    await _history(api, doc, 3)
    async with second_gateway(store_config) as other:
        opener = await other.connect(Codec.JSON)
        try:
            await opener.subscribe(doc)  # the room is open there, without those ops in memory
            ws = await api.session.ws_connect(other.ws_url, protocols=["coscribe.v1.json"])
            try:
                await ws.send_str(orjson.dumps([
                    {"t": "hello", "token": api.token()}, {"t": "sub", "doc": doc, "v": 0},
                    {"t": "bogus"}, {"t": "ping"},
                ]).decode())
                frame = orjson.loads((await ws.receive(timeout=10)).data)
                assert [m["t"] for m in frame] == ["welcome", "ops", "error", "pong"]
                assert [e["v"] for e in frame[1]["ops"]] == [1, 2, 3]
            finally:
                await ws.close()
        finally:
            await opener.close()


@pytest.mark.postgres
async def test_sub_reads_what_the_hub_never_delivered(api: Api, store_config: StoreConfig) -> None:
    """A process that missed another's last commits (no message revealed them: the writer
    died before publishing, or Redis is down) reads the store for a ``sub`` with a version
    ahead of its copy: that client gets its catch-up, and the subscribers already here (and
    those after) the missed ops."""
    if store_config.database_url is None:
        pytest.skip("two gateways share a store only on PostgreSQL")
    doc = await api.create("missed")
    async with second_gateway(store_config) as other:  # its hub hears nothing from api's
        watcher = await other.connect(Codec.JSON)
        try:
            seen = await watcher.subscribe(doc)
            assert seen.version == 0
            texts = await _history(api, doc, 5)
            mover = await other.connect(Codec.MSGPACK)
            fresh = await other.connect(Codec.JSON)
            try:
                moved = await mover.subscribe(doc, v=5, text=texts[5])
                state = await fresh.subscribe(doc)
                assert (state.version, state.text) == (5, texts[5])
                moved.edit(["after "])
                await mover.wait_until(lambda: moved.quiet)
                assert moved.version == 6 and not moved.problems
                await watcher.wait_until(lambda: seen.version == 6)
                assert seen.text == moved.text == (await other.get(doc))[0]
                assert not seen.problems
            finally:
                await mover.close()
                await fresh.close()
        finally:
            await watcher.close()


@pytest.mark.postgres
async def test_an_http_op_on_a_version_committed_elsewhere_is_accepted(
    api: Api, store_config: StoreConfig
) -> None:
    """``POST .../ops`` on a version another process just committed (its publish not here
    yet: here never hears it) is transformed on it and committed, not ``bad_version``
    (audit 4: "base version 1 is not in 0..0"); a version past the store's head still is,
    before any commit tick."""
    if store_config.database_url is None:
        pytest.skip("two gateways share a store only on PostgreSQL")
    doc = await api.create("abc")  # the room is open here, at version 0
    assert isinstance(api.http, TestClient)
    stats = api.http.app[keys.ROOMS].committer.stats
    async with second_gateway(store_config) as other:  # its hub hears nothing from api's
        assert await other.post_op(doc, 0, [3, "!"]) == 1
        assert await api.post_op(doc, 1, ["<"]) == 2
        assert await api.get(doc) == ("<abc!", 2)
        assert await other.post_op(doc, 2, [5, ">"]) == 3
        locked_idle = stats.locked_idle
        status, body = await api.call(
            "POST", f"/v1/documents/{doc}/ops", json={"v": 4, "op": ["x"]}
        )
        assert status == 400, body
        assert body["error"] == {"code": "bad_version", "message": "base version 4 is not in 0..3"}
        assert stats.locked_idle == locked_idle
        assert await api.post_op(doc, 3, [6, "."]) == 4
        assert await api.get(doc) == ("<abc!>.", 4)
        assert replay("abc", await other.ops(doc)) == "<abc!>."  # the store's log


@pytest.mark.postgres
async def test_a_websocket_op_on_a_version_committed_elsewhere_is_accepted(
    api: Api, store_config: StoreConfig
) -> None:
    """A subscriber's ops on a version it saw committed through another process (whose
    publish never comes here) get the ops up to it, then their acks, in the order sent;
    a version past the store's head is ``bad_version``."""
    if store_config.database_url is None:
        pytest.skip("two gateways share a store only on PostgreSQL")
    doc = await api.create("abc")
    ws = await api.connect(Codec.JSON, client_id="c")
    try:
        await ws.subscribe(doc)  # a snapshot at version 0
        async with second_gateway(store_config) as other:
            assert await other.post_op(doc, 0, [3, "!"]) == 1
            mark = len(ws.log)
            await ws.send(
                {"t": "op", "doc": doc, "v": 1, "op": ["<"], "seq": 1},
                {"t": "op", "doc": doc, "v": 1, "op": [4, ">"], "seq": 2},
                {"t": "op", "doc": doc, "v": 9, "op": ["x"], "seq": 3},
            )
            await ws.wait_for(lambda m: m["t"] == "error", since=mark)
            await ws.wait_for(lambda m: m["t"] == "ack" and m["seq"] == 2, since=mark)
            await ws.ping()
            errors = [(m["seq"], m["code"]) for m in ws.since(mark) if m["t"] == "error"]
            assert errors == [(3, "bad_version")], ws.log
            seen = [m for m in ws.since(mark) if m["t"] not in ("error", "pong")]
            assert [(m["t"], m.get("seq"), m.get("v")) for m in seen] == [
                ("ops", None, None), ("ack", 1, 2), ("ack", 2, 3)
            ], ws.log
            assert [e["v"] for e in seen[0]["ops"]] == [1]
            assert await api.get(doc) == ("<abc!>", 3)
    finally:
        await ws.close()


@pytest.mark.postgres
@pytest.mark.redis
async def test_a_subscriber_gets_each_presence_once_where_the_room_opens(
    pg_schema: str, tmp_path: Path, redis_url: str, redis_prefix: str
) -> None:
    """Two gateways on one PostgreSQL and one Redis: a session subscribing where the
    document is not open yet (snapshot, catch-up from the store, or a second sub) gets the
    other process's session's presence exactly once (opening the room queued it for
    broadcast, and the sub sent it as well: twice, about 3 runs in 4)."""
    cfg = StoreConfig(data_dir=tmp_path, database_url=PG_URL, database_schema=pg_schema)
    here_hub, there_hub = RedisHub(redis_url, redis_prefix), RedisHub(redis_url, redis_prefix)
    async with second_gateway(cfg, here_hub) as here, second_gateway(cfg, there_hub) as there:
        setter = await here.connect(Codec.JSON)
        try:
            for i, v in enumerate([None, 0, None, 1, None, 0]):
                doc = await here.create("ab")
                if v is not None:
                    await here.post_op(doc, 0, ["x"])
                await setter.subscribe(doc)
                await setter.send({"t": "presence", "doc": doc, "data": {"cursor": i}})
                await eventually(functools.partial(there_hub.presence_of, UUID(doc)))
                ws = await there.connect(Codec.MSGPACK if i % 2 else Codec.JSON)
                try:
                    await ws.subscribe(doc, v=v, text=None if v is None else "ab")
                    await ws.send({"t": "sub", "doc": doc})  # again: unsub, then sub
                    await ws.ping()
                    seen = [m for m in ws.log if m["t"] == "presence"]
                    assert [m["data"] for m in seen] == [{"cursor": i}] * 2, (v, ws.log)
                    assert [m["t"] for m in ws.log].count("snapshot") == 1 + (v is None)
                finally:
                    await ws.close()
        finally:
            await setter.close()


@pytest.mark.postgres
@pytest.mark.redis
async def test_presence_changed_during_a_catch_up_from_the_store_comes_once(
    pg_schema: str, tmp_path: Path, redis_url: str, redis_prefix: str,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A presence change broadcast while a ``sub``'s catch-up is read from the store reaches
    the subscriber once, after the presence as it was (not the new one twice)."""
    cfg = StoreConfig(data_dir=tmp_path, database_url=PG_URL, database_schema=pg_schema)
    here_hub, there_hub = RedisHub(redis_url, redis_prefix), RedisHub(redis_url, redis_prefix)
    async with second_gateway(cfg, here_hub) as here, second_gateway(cfg, there_hub) as there:
        doc = await here.create("ab")
        await here.post_op(doc, 0, ["x"])
        setter = await here.connect(Codec.JSON)
        ws = await there.connect(Codec.JSON)
        entered, gate = threading.Event(), threading.Event()
        read = Store.edits_after

        def held(store: Store, *args: Any) -> Any:
            entered.set()
            gate.wait(10)
            return read(store, *args)

        try:
            await setter.subscribe(doc)
            await setter.send({"t": "presence", "doc": doc, "data": {"cursor": 0}})
            await eventually(lambda: there_hub.presence_of(UUID(doc)))
            monkeypatch.setattr(Store, "edits_after", held)
            await ws.send({"t": "sub", "doc": doc, "v": 0})
            await eventually(entered.is_set)
            await setter.send({"t": "presence", "doc": doc, "data": {"cursor": 1}})
            assert isinstance(there.http, TestClient)
            rooms = there.http.app[keys.ROOMS]

            def moved() -> bool:
                room = rooms.peek(UUID(doc))
                msg = room.presence.get(setter.session or "") if room else None
                return msg is not None and msg["data"] == {"cursor": 1}

            await eventually(moved)
            await asyncio.sleep(0.05)  # the broadcast's loop turn has passed
            gate.set()
            await ws.wait_for(lambda m: m["t"] == "ops")
            await ws.ping()
            seen = [m["data"] for m in ws.log if m["t"] == "presence"]
            assert seen == [{"cursor": 0}, {"cursor": 1}], ws.log
            assert [m["t"] for m in ws.log][1] == "ops", "presence before the catch-up"
        finally:
            gate.set()
            await setter.close()
            await ws.close()


@pytest.mark.postgres
@pytest.mark.redis
async def test_versions_committed_elsewhere_are_served_while_a_commit_here_is_in_flight(
    pg_schema: str, tmp_path: Path, redis_url: str, redis_prefix: str,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """While a process's commit of a document is in flight, its room holds back the events
    another process committed meanwhile: a ``sub`` with a version among them still gets the
    ops after it (from the store), then the live ops with nothing repeated or skipped, and
    reads naming it in ``at``/``from``/``to`` answer (both were ``bad_version``, audit D F4)."""
    cfg = StoreConfig(data_dir=tmp_path, database_url=PG_URL, database_schema=pg_schema)
    here_hub, there_hub = RedisHub(redis_url, redis_prefix), RedisHub(redis_url, redis_prefix)
    read_side = [Extension(run_projections=False, warm=False)]
    async with (
        second_gateway(cfg, here_hub) as here,
        second_gateway(cfg, there_hub, read_side) as there,
    ):
        doc = await here.create("ab")
        writer = await there.connect(Codec.JSON, client_id="w")
        movers = [await there.connect(Codec.MSGPACK), await there.connect(Codec.JSON)]
        entered, gate = asyncio.Event(), asyncio.Event()
        try:
            w = await writer.subscribe(doc)  # the room is open there, at version 0
            assert isinstance(there.http, TestClient)
            async_writer = there.http.app[keys.ROOMS].committer._async_writer
            save = async_writer.save_checked

            async def held(*args: Any, **kwargs: Any) -> Any:
                entered.set()
                await gate.wait()
                return await save(*args, **kwargs)

            monkeypatch.setattr(async_writer, "save_checked", held)
            w.edit([2, "!"])  # tentative version 1 there; its commit waits at the gate
            await eventually(entered.is_set)
            texts = ["ab"]
            for i in range(3):  # versions 1..3, committed here meanwhile
                op: ot.Op = [f"{i}"]
                assert await here.post_op(doc, i, op) == i + 1
                texts.append(ot.apply(texts[-1], op))
            states = []
            for ws, v in zip(movers, [1, 3], strict=True):  # seen committed elsewhere
                states.append(await ws.subscribe(doc, v=v, text=texts[v]))
                first = next(m for m in ws.log if m["t"] == "ops")
                # From the store up to what this process had heard of: all of 1..3, or
                # (the hub's delivery of 3 still on its way) up to 2; the rest comes live,
                # checked below with the whole of what each received.
                got = [e["v"] for e in first["ops"]]
                assert got == list(range(v + 1, v + 1 + len(got))) and len(got) <= 3 - v, got
            for path in ("?at=3", "/diff?from=1&to=3", "/blame?at=3"):
                status, body = await there.call("GET", f"/v1/documents/{doc}{path}")
                assert status == 200, (path, body)
            assert (await there.call("GET", f"/v1/documents/{doc}?at=3"))[1]["text"] == texts[3]
            assert entered.is_set() and not gate.is_set() and not w.acks  # still in flight
            gate.set()  # the held commit conflicts; the op is transformed and lands as v4
            await writer.wait_until(lambda: w.quiet)
            assert w.acks == [(1, 4)] and not w.problems
            for ws, state, v in zip(movers, states, [1, 3], strict=True):
                await ws.wait_until(lambda state=state: state.version == 4)
                await ws.ping()
                assert [e["v"] for e in state.remote] == list(range(v + 1, 5)), ws.log
                assert state.text == w.text == (await there.get(doc))[0]
                assert not state.problems
        finally:
            gate.set()
            for ws in (writer, *movers):
                await ws.close()




async def test_http_op_with_old_base_is_transformed(api: Api) -> None:
    """POST ops with an old base is transformed like a WebSocket op and broadcast to subscribers."""
    doc = await api.create("abc")
    ws = await api.connect(Codec.JSON)
    raw = await api.connect(Codec.MSGPACK)
    try:
        state = await ws.subscribe(doc)
        assert await api.post_op(doc, 0, [3, "X"]) == 1
        assert await api.post_op(doc, 0, [3, "Y"]) == 2  # a late insert at the same place first
        assert await api.get(doc) == ("abcYX", 2)
        # A WebSocket op made on version 0 too (sent raw: no client-side state).
        await raw.send({"t": "sub", "doc": doc})
        await raw.send({"t": "op", "doc": doc, "v": 0, "op": [3, "Z"], "seq": 1})
        ack = await raw.wait_for(lambda m: m["t"] == "ack")
        assert (ack["seq"], ack["v"]) == (1, 3)
        assert await api.get(doc) == ("abcZYX", 3)
        assert await api.post_op(doc, 1, [{"d": 1}, "A"]) == 4  # replace 'a', made on "abcX"
        assert await api.get(doc) == ("AbcZYX", 4)
        assert await api.post_op(doc, 0, [1, {"d": 2}]) == 5  # delete "bc" concurrently
        assert await api.get(doc) == ("AZYX", 5)
        await ws.wait_until(lambda: state.version == 5)
        assert [e["v"] for e in state.remote] == [1, 2, 3, 4, 5]
        assert all(e["by"] == OWNER for e in state.remote)
        assert (state.text, state.problems) == ("AZYX", [])
        entries = await api.ops(doc)
        assert replay("abc", entries) == "AZYX"
        assert all({"v", "op", "by", "at"} <= set(e) for e in entries)
    finally:
        await ws.close()
        await raw.close()


async def test_http_resend_with_client_and_seq_applies_once(api: Api) -> None:
    """POST ops with the same client and seq twice returns the first version, applied once."""
    doc = await api.create("")
    assert await api.post_op(doc, 0, ["a"], client="bot", seq=1) == 1
    assert await api.post_op(doc, 0, ["a"], client="bot", seq=1) == 1
    assert await api.post_op(doc, 1, ["b"], client="bot", seq=2) == 2
    assert await api.post_op(doc, 0, ["a"], client="bot", seq=1) == 1
    assert await api.get(doc) == ("ba", 2)
    entries = await api.ops(doc)
    assert [(e["client"], e["seq"]) for e in entries] == [("bot", 1), ("bot", 2)]


async def test_websocket_resend_after_reconnect_is_acked_once(api: Api) -> None:
    """A client that reconnects with its client id and resends its op gets the same version."""
    doc = await api.create("x")
    ws = await api.connect(Codec.MSGPACK, client_id="laptop")
    try:
        await ws.subscribe(doc)
        await ws.send({"t": "op", "doc": doc, "v": 0, "op": ["1"], "seq": 7})
        first = await ws.wait_for(lambda m: m["t"] == "ack")
    finally:
        await ws.close()
    again = await api.connect(Codec.JSON, client_id="laptop")
    try:
        await again.subscribe(doc)
        mark = len(again.log)
        await again.send({"t": "op", "doc": doc, "v": 0, "op": ["1"], "seq": 7})
        second = await again.wait_for(lambda m: m["t"] == "ack", since=mark)
        assert (second["seq"], second["v"]) == (7, first["v"]) == (7, 1)
    finally:
        await again.close()
    assert await api.get(doc) == ("1x", 1)
    assert [(e["client"], e["seq"]) for e in await api.ops(doc)] == [("laptop", 7)]


@pytest.mark.parametrize("client_id", [None, "laptop"], ids=["anonymous", "client-id"])
async def test_an_op_in_flight_at_unsub_is_acked_and_known_by_its_version(
    api: Api, client_id: str | None
) -> None:
    """An op in flight when its connection unsubscribes is still acked; subscribing again
    from the version held before it, the catch-up has it as the entry of the acked version
    (with the client's id and seq when it said hello with one)."""
    doc = await api.create("abc")
    ws = await api.connect(Codec.JSON, client_id=client_id)
    try:
        await ws.subscribe(doc)
        await ws.send(
            {"t": "op", "doc": doc, "v": 0, "op": [3, "!"], "seq": 1}, {"t": "unsub", "doc": doc}
        )
        await eventually(lambda: _version_is(api, doc, 1))
        await ws.ping()  # the ack was queued before the pong
        acks = [m for m in ws.log if m["t"] == "ack"]
        assert acks == [{"t": "ack", "doc": doc, "seq": 1, "v": 1}], ws.log
        mark = len(ws.log)
        await ws.send({"t": "sub", "doc": doc, "v": 0})
        await ws.ping()
        (entry,) = [e for m in ws.since(mark) if m["t"] == "ops" for e in m["ops"]]
        mine = {} if client_id is None else {"client": client_id, "seq": 1}
        assert entry == {"v": 1, "op": [3, "!"], "by": OWNER, **mine}
    finally:
        await ws.close()


async def test_an_ack_held_during_a_failed_catch_up_still_arrives(
    api: Api, store_config: StoreConfig, monkeypatch: pytest.MonkeyPatch
) -> None:
    """An op acked while its connection's new subscription reads its catch-up from the store
    waits behind that catch-up; when the read fails (``unavailable``, unsubscribed) the ack
    is sent all the same."""
    doc = await api.create("abc")
    for v in range(3):
        await api.post_op(doc, v, ["x"])
    entered, gate = threading.Event(), threading.Event()

    def failing(store: Store, *args: Any) -> Any:
        entered.set()
        gate.wait(10)
        raise RuntimeError("the store went away")

    async with second_gateway(store_config) as other:  # its room has none of the 3 in memory
        ws = await other.connect(Codec.JSON)
        try:
            await ws.subscribe(doc)
            monkeypatch.setattr(Store, "edits_after", failing)
            await ws.send(
                {"t": "op", "doc": doc, "v": 3, "op": ["!"], "seq": 1},
                {"t": "sub", "doc": doc, "v": 0},
            )
            await eventually(entered.is_set)
            await eventually(lambda: _version_is(other, doc, 4))
            gate.set()
            await ws.wait_for(lambda m: m["t"] == "error")
            await ws.ping()
            got = [(m["t"], m.get("code"), m.get("v")) for m in ws.log
                   if m["t"] in ("ack", "error")]
            assert got == [("error", "unavailable", None), ("ack", None, 4)], ws.log
        finally:
            gate.set()
            await ws.close()


async def test_a_sub_again_or_unsub_drops_the_ops_not_yet_sent(api: Api) -> None:
    """Ops queued for a subscription that is replaced or ended, and not written yet, are left
    out: ``[sub v=0, sub v=1]`` in one frame gets one catch-up, ``[sub v=0, unsub]`` none."""
    doc = await api.create("abc")
    for v in range(3):
        await api.post_op(doc, v, ["x"])
    ws = await api.connect(Codec.JSON)
    try:
        await ws.send({"t": "sub", "doc": doc, "v": 0}, {"t": "sub", "doc": doc, "v": 1})
        await ws.ping()
        assert [[e["v"] for e in m["ops"]] for m in ws.log if m["t"] == "ops"] == [[2, 3]]
        mark = len(ws.log)
        await ws.send({"t": "sub", "doc": doc, "v": 0}, {"t": "unsub", "doc": doc})
        await ws.ping()
        assert [m["t"] for m in ws.since(mark)] == ["pong"]
    finally:
        await ws.close()


def test_unsent_ops_before_an_ack_of_the_document_stay() -> None:
    """Dropping a document's unsent ops keeps those before its last ack (which must follow
    every op before it), its acks and errors, and everything of other documents."""
    def ops(doc: str, v: int) -> Encoded:
        return OpsMessage(doc, [Encoded({"v": v, "op": [], "by": OWNER})])

    catch_up = Encoded({"t": "ops", "doc": "d", "ops": []})
    out = [
        ops("d", 1), ops("e", 1), Encoded({"t": "ack", "doc": "d", "seq": 1, "v": 2}),
        ops("d", 3), catch_up, Encoded({"t": "error", "doc": "d", "code": "bad_op"}),
        Encoded({"t": "ack", "doc": "e", "seq": 1, "v": 2}), ops("e", 3),
    ]
    kept = session.without_unsent_ops(out, "d")
    assert kept == [out[0], out[1], out[2], out[5], out[6], out[7]]
    assert session.without_unsent_ops([ops("d", 1), catch_up], "d") == []


def test_the_reference_client_skips_repeats_only_after_subscribing_again() -> None:
    """``DocState`` skips entries at or below its version after a ``sub`` that replaced a
    subscription (the old one's ops on the wire, then the catch-up), and calls them a
    problem within one subscription."""
    def ops(*vs: int) -> dict[str, Any]:
        return {"t": "ops", "doc": "d", "ops": [{"v": v, "op": [str(v)], "by": OWNER} for v in vs]}

    again = DocState(None, "d", "", 0, again=True)  # type: ignore[arg-type]  # sends nothing
    again.on_ops(ops(1, 2))  # the old subscription's, written before the new sub was read
    again.on_ops(ops(1, 2, 3))  # the catch-up from 0
    assert (again.text, again.version, again.repeats, again.problems) == ("321", 3, 2, [])
    snap = DocState(None, "d", None, -1, again=True)  # type: ignore[arg-type]
    snap.on_ops(ops(4))  # before the new snapshot
    snap.on_snapshot({"t": "snapshot", "doc": "d", "v": 4, "text": "4321"})
    assert (snap.text, snap.version, snap.repeats, snap.problems) == ("4321", 4, 1, [])
    once = DocState(None, "d", "", 0)  # type: ignore[arg-type]
    once.on_ops(ops(1, 1))
    assert once.problems == ["op v1 repeated at v1"]


@pytest.mark.parametrize("v", [None, 0], ids=["snapshot", "catch-up"])
async def test_a_sub_again_keeps_the_session_s_presence(api: Api, v: int | None) -> None:
    """Subscribing again without an unsub keeps the session's presence: the others get no
    ``null`` for it, and a newcomer still gets it."""
    doc = await api.create("abc")
    setter, peer = await api.connect(Codec.JSON), await api.connect(Codec.MSGPACK)
    late = await api.connect(Codec.JSON)
    try:
        await setter.subscribe(doc)
        await peer.subscribe(doc)
        await setter.send({"t": "presence", "doc": doc, "data": {"cursor": 1}})
        await peer.wait_for(lambda m: m["t"] == "presence")
        await setter.subscribe(doc, v=v, text=None if v is None else "abc")
        await setter.ping()
        await peer.ping()
        assert [m["data"] for m in peer.log if m["t"] == "presence"] == [{"cursor": 1}]
        await late.subscribe(doc)
        await late.ping()
        seen = [(m["session"], m["data"]) for m in late.log if m["t"] == "presence"]
        assert seen == [(setter.session, {"cursor": 1})]
    finally:
        for ws in (setter, peer, late):
            await ws.close()


async def _version_is(api: Api, doc: str, v: int) -> bool:
    return (await api.get(doc))[1] == v


async def test_ops_paging(api: Api) -> None:
    """GET ops pages with from and limit, in version order, from the event store."""
    doc = await api.create("")
    for i in range(25):
        assert await api.post_op(doc, i, [i, "x"] if i else ["x"]) == i + 1
    assert [e["v"] for e in await api.ops(doc, 0, 10)] == list(range(1, 11))
    assert [e["v"] for e in await api.ops(doc, 10, 10)] == list(range(11, 21))
    assert [e["v"] for e in await api.ops(doc, 20, 10)] == list(range(21, 26))
    assert await api.ops(doc, 25, 10) == []
    status, body = await api.call("GET", f"/v1/documents/{doc}/ops")
    assert status == 200 and len(body["ops"]) == 25  # the default limit is 100


def test_server_process_closes_its_log(tmp_path: Path) -> None:
    """Starting and stopping a ServerProcess leaves no file handle open in the test process."""
    import gc
    import warnings

    server = ServerProcess(tmp_path / "data")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always", ResourceWarning)
        try:
            server.start()
        finally:
            server.stop()
        gc.collect()
    leaks = [w for w in caught if issubclass(w.category, ResourceWarning)]
    assert not leaks, [str(w.message) for w in leaks]
