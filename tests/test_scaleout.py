"""Scale-out end to end: real ``coscribe serve`` processes on one Postgres schema and one Redis
prefix, clients split across them. Edits converge everywhere; presence crosses processes and
is cleared on unsub, on disconnect and on process death.

The helpers at the top are shared with ``test_faults``.
"""

from __future__ import annotations

import asyncio
import random
import signal
import threading
import uuid
from collections.abc import AsyncIterator, Callable, Iterable, Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import aiohttp
import psycopg
import pytest
import redis.asyncio as aioredis
from psycopg import sql as psql

from domain import ot
from gateway.auth import sign_token
from gateway.store import Store, StoreConfig
from schema.frames import Codec
from tests.procs import TEST_SECRET, ServerProcess, free_port
from tests.wsclient import DocState, WsClient

pytestmark = [pytest.mark.slow, pytest.mark.postgres, pytest.mark.redis]

OWNER = "olga"
EDITORS = ("ulla", "vera", "wim")
ALPHABET = "abcdefghij é€😀"  # multi-byte and non-BMP code points travel in both codecs


# -- helpers (shared with test_faults) ---------------------------------------------------------


class _HeldLogPath(type(Path())):  # type: ignore[misc]
    """A log path that keeps the handles opened on it, so that they can be closed."""

    def open(self, *args: Any, **kwargs: Any) -> Any:
        handle = super().open(*args, **kwargs)
        _open_logs.append(handle)
        return handle


_open_logs: list[Any] = []


class Server(ServerProcess):
    """``ServerProcess`` that closes its log handle when stopped.

    ``tests/procs.py`` opens the log for the child and never closes the parent's copy, which
    ``filterwarnings = error`` turns into an unraisable ResourceWarning failing a later test.
    """

    def __init__(self, data_dir: Path, port: int | None = None, **settings: str) -> None:
        super().__init__(data_dir, port, **settings)
        self.log_path = _HeldLogPath(self.log_path)

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 20.0) -> None:
        """Stop (see ``ServerProcess.stop``), then close the parent's log handles."""
        super().stop(sig, timeout)
        for handle in [h for h in _open_logs if h.name == str(self.log_path)]:
            handle.close()
            _open_logs.remove(handle)


def token(user: str) -> str:
    """A token the test servers accept for ``user``."""
    return sign_token(TEST_SECRET.encode(), user)


def auth(user: str = OWNER) -> dict[str, str]:
    """The HTTP Authorization header for ``user``."""
    return {"Authorization": f"Bearer {token(user)}"}


def ws_url(server: ServerProcess) -> str:
    """The WebSocket endpoint of ``server``."""
    return f"ws://127.0.0.1:{server.port}/v1/ws"


def distinct_ports(n: int) -> list[int]:
    """``n`` different ports that were free a moment ago."""
    ports: set[int] = set()
    while len(ports) < n:
        ports.add(free_port())
    return sorted(ports)


async def start_all(servers: Sequence[ServerProcess]) -> None:
    """Start the processes (off the loop) and wait until all serve.

    The first one alone, then the others in parallel: processes creating the tables of a
    fresh schema at the same moment fail (see ``test_processes_start_together_on_a_fresh_schema``).
    """
    await asyncio.to_thread(servers[0].start)
    await asyncio.gather(*(asyncio.to_thread(s.start) for s in servers[1:]))


async def stop_all(servers: Iterable[ServerProcess]) -> None:
    """SIGTERM every process still running and wait for it (off the loop)."""
    await asyncio.gather(*(asyncio.to_thread(s.stop) for s in servers))


def make_servers(tmp_path: Path, n: int, **settings: str) -> list[ServerProcess]:
    """``n`` server processes (not started) with their own data dirs and ports."""
    return [
        Server(tmp_path / f"server{i}", port=port, **settings)
        for i, port in enumerate(distinct_ports(n))
    ]


async def create_doc(
    http: aiohttp.ClientSession, server: ServerProcess, text: str = "", editors: Sequence[str] = ()
) -> str:
    """Create a document owned by OWNER with ``editors`` as members; return its id."""
    async with http.post(
        f"{server.url}/v1/documents", json={"title": "T", "text": text}, headers=auth()
    ) as r:
        assert r.status == 201, await r.text()
        doc = str((await r.json())["id"])
    for user in editors:
        async with http.post(
            f"{server.url}/v1/documents/{doc}/members",
            json={"user": user, "role": "editor"},
            headers=auth(),
        ) as r:
            assert r.status == 201, await r.text()
    return doc


async def get_doc(http: aiohttp.ClientSession, server: ServerProcess, doc: str) -> dict[str, Any]:
    """``GET /v1/documents/{doc}`` on ``server``."""
    async with http.get(f"{server.url}/v1/documents/{doc}", headers=auth()) as r:
        assert r.status == 200, await r.text()
        body: dict[str, Any] = await r.json()
        return body


async def replay_log(
    http: aiohttp.ClientSession, server: ServerProcess, doc: str, initial: str = ""
) -> str:
    """``initial`` with every op of ``GET .../ops`` applied in order (the store's log)."""
    text, start = initial, 0
    while True:
        async with http.get(
            f"{server.url}/v1/documents/{doc}/ops",
            params={"from": str(start), "limit": "1000"},
            headers=auth(),
        ) as r:
            assert r.status == 200, await r.text()
            ops = (await r.json())["ops"]
        for entry in ops:
            assert entry["v"] == start + 1, f"log skips from v{start} to v{entry['v']}"
            text = ot.apply(text, entry["op"])
            start = entry["v"]
        if len(ops) < 1000:
            return text


async def metric(http: aiohttp.ClientSession, server: ServerProcess, name: str) -> float:
    """One counter of ``GET /metrics`` (Prometheus text format)."""
    async with http.get(f"{server.url}/metrics") as r:
        assert r.status == 200, await r.text()
        for line in (await r.text()).splitlines():
            if line.split(" ")[0] == name:
                return float(line.split(" ")[1])
    raise AssertionError(f"no metric {name}")


async def readyz(http: aiohttp.ClientSession, server: ServerProcess) -> tuple[int, dict[str, Any]]:
    """Status and body of ``GET /readyz`` (status 0 when the process does not answer)."""
    try:
        async with http.get(f"{server.url}/readyz", timeout=aiohttp.ClientTimeout(total=8)) as r:
            return r.status, await r.json()
    except (aiohttp.ClientError, TimeoutError):
        return 0, {}


async def poll(cond: Callable[[], Any], within: float, every: float = 0.05) -> Any:
    """Await ``cond()`` until it returns a true value; return it, or time out.

    Polling, not an event: what is waited for lives in other processes.
    """
    async with asyncio.timeout(within):
        while True:
            value = await cond()
            if value:
                return value
            await asyncio.sleep(every)


async def connect(
    http: aiohttp.ClientSession,
    server: ServerProcess,
    user: str,
    codec: Codec = Codec.JSON,
    client_id: str | None = None,
) -> WsClient:
    """A client that said hello to ``server`` as ``user``."""
    client = await WsClient.connect(http, ws_url(server), codec, token(user), client_id)
    assert client.session is not None, client.log
    return client


def random_op(rng: random.Random, text: str) -> ot.Op:
    """A random insert or delete on ``text``."""
    n = len(text)
    if n and rng.random() < 0.35:
        pos = rng.randrange(n)
        return ot.normalize([pos, {"d": rng.randint(1, min(4, n - pos))}])
    insert = "".join(rng.choice(ALPHABET) for _ in range(rng.randint(1, 4)))
    return ot.normalize([rng.randint(0, n), insert])


async def edit_randomly(
    states: Sequence[DocState], rng: random.Random, edits: int
) -> None:
    """Make ``edits`` random local edits on randomly chosen documents, at random pauses."""
    for _ in range(edits):
        state = rng.choice(states)
        assert state.text is not None
        state.edit(random_op(rng, state.text))
        await asyncio.sleep(rng.choice([0, 0.002, 0.005, 0.01, 0.02]))


async def converged(
    http: aiohttp.ClientSession,
    servers: Sequence[ServerProcess],
    states: Sequence[DocState],
    within: float = 30,
) -> dict[str, dict[str, Any]]:
    """Wait until every state is acked and equal to what every server returns; return that."""
    docs = sorted({s.doc for s in states})

    async def check() -> dict[str, dict[str, Any]] | None:
        if not all(s.quiet for s in states):
            return None
        out: dict[str, dict[str, Any]] = {}
        for doc in docs:
            seen = [await get_doc(http, srv, doc) for srv in servers]
            if any((b["text"], b["version"]) != (seen[0]["text"], seen[0]["version"])
                   for b in seen):
                return None
            out[doc] = seen[0]
        for s in states:
            if (s.text, s.version) != (out[s.doc]["text"], out[s.doc]["version"]):
                return None
        return out

    try:
        result: dict[str, dict[str, Any]] = await poll(check, within, every=0.1)
    except TimeoutError:
        detail = [(s.client.session, s.doc[:8], s.version, s.inflight, s.buffer, s.problems)
                  for s in states]
        raise AssertionError(f"no convergence: {detail}") from None
    return result


@pytest.fixture
async def http() -> AsyncIterator[aiohttp.ClientSession]:
    """An HTTP client session for REST calls and WebSockets."""
    async with aiohttp.ClientSession() as session:
        yield session


@pytest.fixture
async def two_servers(
    tmp_path: Path, pg_url: str, pg_schema: str, redis_url: str, redis_prefix: str
) -> AsyncIterator[list[ServerProcess]]:
    """Two gateway processes on different ports sharing one Postgres schema and Redis prefix."""
    servers = make_servers(
        tmp_path, 2, database_url=pg_url, database_schema=pg_schema,
        redis_url=redis_url, redis_prefix=redis_prefix,
    )
    try:
        await start_all(servers)
        yield servers
    finally:
        await stop_all(servers)
        await clear_redis(redis_url, redis_prefix)


async def clear_redis(url: str, prefix: str) -> None:
    """Delete every key under ``prefix``."""
    client = aioredis.Redis.from_url(url)
    try:
        keys = [k async for k in client.scan_iter(match=f"{prefix}*")]
        if keys:
            await client.delete(*keys)
    finally:
        await client.aclose()


# -- convergence --------------------------------------------------------------------------------


async def test_four_clients_on_two_processes_converge(
    http: aiohttp.ClientSession, two_servers: list[ServerProcess]
) -> None:
    """Hundreds of random concurrent edits on 3 documents via 2 processes converge everywhere."""
    a, b = two_servers
    docs = [await create_doc(http, a, text="seed", editors=EDITORS) for _ in range(3)]
    plan = [(a, OWNER, Codec.JSON), (a, "ulla", Codec.MSGPACK),
            (b, "vera", Codec.JSON), (b, "wim", Codec.MSGPACK)]
    clients = [await connect(http, srv, user, codec, client_id=f"c{i}")
               for i, (srv, user, codec) in enumerate(plan)]
    try:
        states = [await c.subscribe(doc) for c in clients for doc in docs]
        rng = random.Random(20240601)
        per_client = [[s for s in states if s.client is c] for c in clients]
        await asyncio.gather(
            *(edit_randomly(mine, random.Random(rng.random()), 100) for mine in per_client)
        )
        final = await converged(http, two_servers, states)
        for doc in docs:
            assert final[doc]["version"] > 20, "the edits must have reached the server"
            assert await replay_log(http, b, doc, "seed") == final[doc]["text"]
        assert sum(final[d]["version"] for d in docs) >= 150
        # The processes shared the documents: they raced on the store (and recovered) or,
        # once they knew, committed under the table lock after reading each other's events.
        shared = [await metric(http, s, name) for s in two_servers
                  for name in ("coscribe_commit_conflicts_total", "coscribe_commit_locked_total")]
        assert sum(shared) > 0, shared
        # Every client saw each version exactly once, in order (own ones as acks).
        for s in states:
            assert s.problems == [], s.problems
            assert s.errors == [], s.errors
            seen = sorted([e["v"] for e in s.remote] + [v for _, v in s.acks])
            assert seen == list(range(1, final[s.doc]["version"] + 1))
    finally:
        for c in clients:
            await c.close()


# -- presence -----------------------------------------------------------------------------------


async def wait_presence(
    client: WsClient, session: str | None, data: Any, since: int = 0, within: float = 10
) -> dict[str, Any]:
    """The first presence message about ``session`` with ``data``, from log index ``since``."""
    return await client.wait_for(
        lambda m: m["t"] == "presence" and m["session"] == session and m["data"] == data,
        since=since,
        within=within,
    )


async def test_presence_crosses_processes_and_is_cleared(
    http: aiohttp.ClientSession,
    two_servers: list[ServerProcess],
    redis_url: str,
    redis_prefix: str,
) -> None:
    """Presence set on one process reaches the other; unsub, disconnect and kill -9 clear it."""
    a, b = two_servers
    doc = await create_doc(http, a, editors=EDITORS)
    rc = aioredis.Redis.from_url(redis_url)
    clients: list[WsClient] = []
    try:
        ulla = await connect(http, a, "ulla")
        clients.append(ulla)
        await ulla.subscribe(doc)
        await ulla.send({"t": "presence", "doc": doc, "data": {"cursor": 1}})
        # Process B has not opened the document yet: a subscriber there reads Redis.
        await poll(lambda: rc.hexists(f"{redis_prefix}p:{doc}", ulla.session or ""), within=5)
        vera = await connect(http, b, "vera", Codec.MSGPACK)
        clients.append(vera)
        await vera.subscribe(doc)
        got = await wait_presence(vera, ulla.session, {"cursor": 1})
        assert got == {"t": "presence", "doc": doc, "session": ulla.session, "user": "ulla",
                       "data": {"cursor": 1}}

        # Live updates both ways; the latest of a burst wins.
        mark = len(vera.log)
        await ulla.send(*({"t": "presence", "doc": doc, "data": {"cursor": i}} for i in range(5)))
        await wait_presence(vera, ulla.session, {"cursor": 4}, since=mark)
        mark_u = len(ulla.log)
        await vera.send({"t": "presence", "doc": doc, "data": {"sel": [0, 0]}})
        got = await wait_presence(ulla, vera.session, {"sel": [0, 0]}, since=mark_u)
        assert got["user"] == "vera"
        await ulla.ping()
        assert not [m for m in ulla.since(mark_u)
                    if m["t"] == "presence" and m["session"] == ulla.session], "echoed to sender"

        # Unsub clears it on the other process.
        mark = len(vera.log)
        await ulla.send({"t": "unsub", "doc": doc})
        await wait_presence(vera, ulla.session, None, since=mark)

        # Disconnect clears it too.
        wim = await connect(http, a, "wim")
        clients.append(wim)
        await wim.subscribe(doc)
        mark = len(vera.log)
        await wim.send({"t": "presence", "doc": doc, "data": {"cursor": 2}})
        await wait_presence(vera, wim.session, {"cursor": 2}, since=mark)
        await wim.close()
        await wait_presence(vera, wim.session, None, since=mark)

        # Process death: cleared once the liveness key expired (PROC_TTL + a check).
        olga = await connect(http, a, OWNER)
        clients.append(olga)
        await olga.subscribe(doc)
        mark = len(vera.log)
        await olga.send({"t": "presence", "doc": doc, "data": {"cursor": 3}})
        await wait_presence(vera, olga.session, {"cursor": 3}, since=mark)
        await asyncio.to_thread(a.kill)
        await wait_presence(vera, olga.session, None, since=mark, within=20)

        # A newcomer on B hears of vera only: the dead process's sessions are gone.
        newcomer = await connect(http, b, "ulla")
        clients.append(newcomer)
        mark = len(newcomer.log)
        await newcomer.subscribe(doc)
        await newcomer.ping()
        sessions = {m["session"] for m in newcomer.since(mark) if m["t"] == "presence"}
        assert sessions == {vera.session}, sessions
    finally:
        for c in clients:
            await c.close()
        await rc.aclose()


# -- starting many processes at once -----------------------------------------------------------


def _start_together(cfg: StoreConfig, n: int) -> list[BaseException]:
    """Open ``n`` stores on ``cfg`` at the same moment (n processes starting); their errors."""
    barrier = threading.Barrier(n)

    def open_one() -> None:
        barrier.wait()
        Store(cfg).close()

    with ThreadPoolExecutor(n) as pool:
        futures = [pool.submit(open_one) for _ in range(n)]
    return [exc for f in futures if (exc := f.exception()) is not None]


def test_processes_start_together_on_a_fresh_schema(tmp_path: Path, pg_url: str) -> None:
    """Several gateway processes starting at the same moment on an empty schema all come up."""
    errors: list[BaseException] = []
    for _ in range(3):
        schema = f"t_{uuid.uuid4().hex[:12]}"
        cfg = StoreConfig(data_dir=tmp_path, database_url=pg_url, database_schema=schema)
        try:
            errors += _start_together(cfg, 4)
        finally:
            with psycopg.connect(pg_url, autocommit=True) as conn:
                conn.execute(
                    psql.SQL("DROP SCHEMA IF EXISTS {} CASCADE").format(psql.Identifier(schema))
                )
    assert errors == [], [f"{type(e).__name__}: {e}" for e in errors]


def test_processes_start_together_on_a_fresh_sqlite_store(tmp_path: Path) -> None:
    """The same on the embedded store: opening the file is serialised (setting its WAL
    journal does not wait for another connection's lock: "database is locked")."""
    errors: list[BaseException] = []
    for i in range(5):
        errors += _start_together(StoreConfig(data_dir=tmp_path / str(i)), 4)
    assert errors == [], [f"{type(e).__name__}: {e}" for e in errors]
