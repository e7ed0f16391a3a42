"""Faults end to end, with real server processes: a process killed mid-edit, a stalled reader,
Redis restarted under load, PostgreSQL stopped and started, SIGTERM with clients connected.

Every edit here inserts one unique marker character (nothing is deleted), so "every
acknowledged op exactly once" is a count of each acknowledged marker in the final text.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import os
import random
import shutil
import signal
import socket
import subprocess
import tempfile
from collections.abc import AsyncIterator, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from uuid import UUID

import aiohttp
import orjson
import pytest
import redis.asyncio as aioredis

from domain import ot
from gateway.store import Store, StoreConfig
from schema.frames import Codec
from tests.procs import ServerProcess, free_port
from tests.test_scaleout import (
    EDITORS,
    OWNER,
    clear_redis,
    connect,
    converged,
    create_doc,
    get_doc,
    make_servers,
    metric,
    poll,
    readyz,
    replay_log,
    start_all,
    stop_all,
    token,
    wait_presence,
)
from tests.wsclient import DocState, Message, WsClient

pytestmark = [pytest.mark.slow, pytest.mark.postgres, pytest.mark.redis]


# -- a client that survives its server -----------------------------------------------------------


class MarkedDoc(DocState):
    """A document state that tracks markers and can move to a new connection.

    ``acked`` holds the markers of every op the server acknowledged. After a reconnect an op
    in a catch-up carrying this client's id and the in-flight seq counts as the ack (as
    ShareDB's src/seq); a later ack of the same seq (a deduplicated resend) is not a problem.
    """

    def __init__(self, client: WsClient, doc: str, client_id: str) -> None:
        super().__init__(client, doc, None, -1)
        self.client_id = client_id
        self.acked: list[str] = []
        self.acked_seqs: set[int] = set()
        self.acked_ops: dict[int, tuple[int, ot.Op]] = {}
        """seq -> (version, op as committed) of every acked op."""
        self.made: list[str] = []
        self.resent = 0
        self.acked_by_catch_up = 0
        self.duplicate_acks = 0

    def insert(self, rng: random.Random, marker: str) -> None:
        """Insert ``marker`` at a random place."""
        assert self.text is not None
        self.made.append(marker)
        self.edit(ot.normalize([rng.randint(0, len(self.text)), marker]))

    def _acked(self, seq: int, v: int) -> None:
        assert self.inflight is not None
        self.acked_ops[seq] = (v, self.inflight[1])
        self.acked += [c for part in self.inflight[1] if isinstance(part, str) for c in part]
        self.acked_seqs.add(seq)

    def on_ops(self, msg: Message) -> None:
        """Remote ops; our own in-flight op among them is our ack."""
        for entry in msg["ops"]:
            mine = (
                self.inflight is not None
                and entry.get("client") == self.client_id
                and entry.get("seq") == self.inflight[0]
            )
            if mine:
                self.acked_by_catch_up += 1
                self.on_ack({"seq": entry["seq"], "v": entry["v"]})
            else:
                super().on_ops({**msg, "ops": [entry]})

    def on_ack(self, msg: Message) -> None:
        """An ack; one for a seq already acknowledged (by a catch-up) is a deduplicated resend."""
        if msg["seq"] in self.acked_seqs:
            self.duplicate_acks += 1
            return
        if self.inflight is not None and self.inflight[0] == msg["seq"]:
            self._acked(msg["seq"], msg["v"])
        super().on_ack(msg)


@dataclass
class Editor:
    """One user's client: its connection, its documents, and where it got its markers."""

    user: str
    client_id: str
    codec: Codec
    markers: Iterator[str]
    client: WsClient | None = None
    states: list[MarkedDoc] = field(default_factory=list)

    async def join(self, http: aiohttp.ClientSession, server: ServerProcess, docs: Sequence[str]
                   ) -> None:
        """Connect to ``server`` and subscribe to ``docs`` (snapshots)."""
        self.client = await connect(http, server, self.user, self.codec, self.client_id)
        for doc in docs:
            state = MarkedDoc(self.client, doc, self.client_id)
            self.client.docs[doc] = state
            await self._sub(state, None)
            self.states.append(state)

    async def move(self, http: aiohttp.ClientSession, server: ServerProcess) -> None:
        """Reconnect to ``server`` with the same client id, catch up, resend what is unacked."""
        old = self.client
        assert old is not None
        new = await connect(http, server, self.user, self.codec, self.client_id)
        new._seq = old._seq  # seqs keep counting: a resend keeps its seq, new ops get new ones
        await old.close()
        self.client = new
        for state in self.states:
            state.client = new
            new.docs[state.doc] = state
            await self._sub(state, state.version)
            if state.inflight is not None:
                seq, op = state.inflight
                state.resent += 1
                new.queue_send({"t": "op", "doc": state.doc, "v": state.version, "op": op,
                                "seq": seq})

    async def _sub(self, state: MarkedDoc, v: int | None) -> None:
        client = self.client
        assert client is not None
        for _ in range(50):
            mark = len(client.log)
            msg: Message = {"t": "sub", "doc": state.doc}
            if v is not None:
                msg["v"] = v
            await client.send(msg)
            reply = await client.wait_for(
                lambda m: m.get("doc") == state.doc and m["t"] in ("snapshot", "ops", "error"),
                since=mark,
            )
            if reply["t"] != "error":
                return
            # The new process may not have heard of our last ops yet: bad_version, retry.
            assert reply["code"] == "bad_version", reply
            state.errors.remove(reply)
            await asyncio.sleep(0.1)
        raise AssertionError(f"could not resubscribe to {state.doc} at v{v}")

    async def edit_for(self, rng: random.Random, seconds: float) -> None:
        """Insert markers into random documents for ``seconds``."""
        loop = asyncio.get_running_loop()
        end = loop.time() + seconds
        while loop.time() < end:
            rng.choice(self.states).insert(rng, next(self.markers))
            await asyncio.sleep(rng.choice([0, 0.002, 0.005, 0.01]))

    async def close(self) -> None:
        """Close the connection."""
        if self.client is not None:
            await self.client.close()


def markers(block: int) -> Iterator[str]:
    """Unique one-code-point markers (CJK), 4000 per block."""
    return iter(chr(0x4E00 + block * 4000 + i) for i in range(4000))


def check_exactly_once(text: str, states: Sequence[MarkedDoc], *, all_made: bool) -> None:
    """Every acked marker (and with ``all_made`` every marker made) is in ``text`` exactly once."""
    counts: dict[str, int] = {}
    for c in text:
        counts[c] = counts.get(c, 0) + 1
    acked = [m for s in states for m in s.acked]
    made = [m for s in states for m in s.made]
    assert len(acked) == len(set(acked)), "a marker was acked twice"
    missing = [m for m in acked if counts.get(m, 0) == 0]
    doubled = [m for m, n in counts.items() if n > 1]
    assert not missing, f"acked but lost: {missing}"
    assert not doubled, f"applied twice: {doubled}"
    assert set(counts) <= set(made), "text holds markers nobody made"
    if all_made:
        assert sorted(text) == sorted(made)


# -- shared fixtures -------------------------------------------------------------------------------


@pytest.fixture
async def http() -> AsyncIterator[aiohttp.ClientSession]:
    """An HTTP client session for REST calls and WebSockets."""
    async with aiohttp.ClientSession() as session:
        yield session


# -- kill -9 mid-edit ------------------------------------------------------------------------------


async def test_kill_9_mid_edit_loses_and_doubles_nothing(
    http: aiohttp.ClientSession,
    tmp_path: Path,
    pg_url: str,
    pg_schema: str,
    redis_url: str,
    redis_prefix: str,
) -> None:
    """Clients of a killed process resend their unacked op to the other; each op lands once."""
    servers = make_servers(tmp_path, 2, database_url=pg_url, database_schema=pg_schema,
                           redis_url=redis_url, redis_prefix=redis_prefix)
    a, b = servers
    editors = [Editor(OWNER, "c-olga", Codec.JSON, markers(0)),
               Editor("ulla", "c-ulla", Codec.MSGPACK, markers(1)),
               Editor("vera", "c-vera", Codec.JSON, markers(2))]
    try:
        await start_all(servers)
        docs = [await create_doc(http, a, editors=EDITORS) for _ in range(2)]
        for editor, server in zip(editors, (a, a, b), strict=True):
            await editor.join(http, server, docs)
        rng = random.Random(99)
        work = [asyncio.create_task(e.edit_for(random.Random(rng.random()), 2.5))
                for e in editors]
        await asyncio.sleep(1.0)
        await asyncio.to_thread(a.kill)
        unacked_at_kill = sum(not s.quiet for e in editors[:2] for s in e.states)
        first = editors[0].states[0]
        acked_on_a = dict(first.acked_ops)
        for editor in editors[:2]:
            assert editor.client is not None
            await editor.client.wait_closed()
            await editor.move(http, b)
        await asyncio.gather(*work)
        states = [s for e in editors for s in e.states]
        final = await converged(http, [b], states)
        for s in states:
            assert s.problems == [], s.problems
            assert s.errors == [], s.errors
        for doc in docs:
            text = final[doc]["text"]
            assert await replay_log(http, b, doc) == text
            check_exactly_once(text, [s for s in states if s.doc == doc], all_made=True)
        moved = [s for e in editors[:2] for s in e.states]
        recovered = sum(s.resent + s.acked_by_catch_up for s in moved)
        assert unacked_at_kill == 0 or recovered >= 1, "unacked ops must have been resent"
        assert sum(len(s.acked) for s in states) > 100

        # A late resend of an op committed by the dead process, with a catch-up before it.
        seq, (v, op) = max(acked_on_a.items())
        late = await connect(http, b, OWNER, Codec.MSGPACK, client_id=first.client_id)
        try:
            mark = len(late.log)
            await late.send({"t": "sub", "doc": first.doc, "v": v - 1})
            catch_up = await late.wait_for(lambda m: m["t"] == "ops", since=mark)
            own = catch_up["ops"][0]
            assert (own["v"], own["client"], own["seq"]) == (v, first.client_id, seq)
            await late.send({"t": "op", "doc": first.doc, "v": v - 1, "op": op, "seq": seq})
            ack = await late.wait_for(lambda m: m["t"] in ("ack", "error"), since=mark)
            assert ack == {"t": "ack", "doc": first.doc, "seq": seq, "v": v}
        finally:
            await late.close()
        after = await get_doc(http, b, first.doc)
        assert (after["text"], after["version"]) == (final[first.doc]["text"],
                                                    final[first.doc]["version"])
    finally:
        for editor in editors:
            await editor.close()
        await stop_all(servers)
        await clear_redis(redis_url, redis_prefix)


# -- a stalled reader ------------------------------------------------------------------------------


def _ws_frame(payload: bytes, opcode: int = 0x1) -> bytes:
    """A masked client frame (RFC 6455)."""
    mask = os.urandom(4)
    n = len(payload)
    if n < 126:
        head = bytes((0x80 | opcode, 0x80 | n))
    elif n < 1 << 16:
        head = bytes((0x80 | opcode, 0x80 | 126)) + n.to_bytes(2, "big")
    else:
        head = bytes((0x80 | opcode, 0x80 | 127)) + n.to_bytes(8, "big")
    return head + mask + bytes(b ^ mask[i % 4] for i, b in enumerate(payload))


async def _read_frame(reader: asyncio.StreamReader) -> tuple[int, bytes]:
    """One server frame: ``(opcode, payload)``."""
    b0, b1 = await reader.readexactly(2)
    n = b1 & 0x7F
    if n == 126:
        n = int.from_bytes(await reader.readexactly(2), "big")
    elif n == 127:
        n = int.from_bytes(await reader.readexactly(8), "big")
    return b0 & 0x0F, await reader.readexactly(n)


async def _stalled_reader(
    port: int, doc: str
) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
    """A raw WebSocket client with a tiny receive buffer, subscribed to ``doc``."""
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    sock.setblocking(False)
    await asyncio.get_running_loop().sock_connect(sock, ("127.0.0.1", port))
    reader, writer = await asyncio.open_connection(sock=sock)
    key = base64.b64encode(os.urandom(16)).decode()
    writer.write(
        (f"GET /v1/ws HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\nUpgrade: websocket\r\n"
         f"Connection: Upgrade\r\nSec-WebSocket-Key: {key}\r\nSec-WebSocket-Version: 13\r\n"
         "Sec-WebSocket-Protocol: coscribe.v1.json\r\n\r\n").encode()
    )
    head = await reader.readuntil(b"\r\n\r\n")
    assert head.split(b"\r\n")[0].split()[1] == b"101", head
    hello = [{"t": "hello", "token": token("vera")}, {"t": "sub", "doc": doc}]
    writer.write(_ws_frame(orjson.dumps(hello)))
    await writer.drain()
    seen: list[str] = []
    while "snapshot" not in seen:
        opcode, payload = await _read_frame(reader)
        assert opcode == 0x1, (opcode, payload[:200])
        seen += [m["t"] for m in orjson.loads(payload)]
    return reader, writer


def _rss_kib(pid: int) -> int:
    """VmRSS of ``pid`` in KiB."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    raise AssertionError("no VmRSS")


async def test_stalled_reader_is_disconnected_and_memory_stays_bounded(
    http: aiohttp.ClientSession, tmp_path: Path, pg_url: str, pg_schema: str
) -> None:
    """A subscriber that never reads is closed (4008) while a writer floods; RSS stays bounded."""
    (server,) = make_servers(tmp_path, 1, database_url=pg_url, database_schema=pg_schema)
    writer_client: WsClient | None = None
    stalled: asyncio.StreamWriter | None = None
    try:
        await start_all([server])
        assert server.proc is not None
        pid = server.proc.pid
        doc = await create_doc(http, server, editors=EDITORS)
        reader, stalled = await _stalled_reader(server.port, doc)
        writer_client = await connect(http, server, OWNER, Codec.MSGPACK, "c-flood")
        state = await writer_client.subscribe(doc)
        baseline = peak = _rss_kib(pid)
        big = 200_000
        flooded = 0
        for i in range(150):  # 30 MB of ops through a 16 MiB send buffer
            assert state.text is not None
            chunk = chr(0x61 + i % 26) * big
            state.edit(ot.normalize([{"d": len(state.text)}, chunk]) if state.text else [chunk])
            await writer_client.wait_until(lambda: state.quiet, within=20)
            flooded += big
            if i % 10 == 0:
                peak = max(peak, _rss_kib(pid))
        peak = max(peak, _rss_kib(pid))
        assert state.problems == [] and state.errors == []
        assert len(state.acks) == 150
        # Now read what the stalled client was sent: the server gave up on it.
        code: int | str | None = None
        async with asyncio.timeout(30):
            try:
                while code is None:
                    opcode, payload = await _read_frame(reader)
                    if opcode == 0x8:
                        code = int.from_bytes(payload[:2], "big")
            except (asyncio.IncompleteReadError, ConnectionResetError):
                code = "reset"
        assert code in (4008, "reset"), code
        grown_mib = (peak - baseline) / 1024
        assert grown_mib < 300, f"server RSS grew by {grown_mib:.0f} MiB"
        body = await get_doc(http, server, doc)
        assert body["version"] == 150 and body["text"] == state.text
        # The stalled session is gone from the server; the writer's is still there.
        await poll(lambda: _ready_where(http, server, lambda b: b["sessions"] == 1), within=15)
    finally:
        if stalled is not None:
            stalled.close()
        if writer_client is not None:
            await writer_client.close()
        await stop_all([server])


# -- Redis restarted during edits ------------------------------------------------------------------


class OwnRedis:
    """A throwaway ``redis-server`` on a free port, killed and restarted by the test."""

    def __init__(self) -> None:
        self.port = free_port()
        self.url = f"redis://127.0.0.1:{self.port}/0"
        self.proc: asyncio.subprocess.Process | None = None

    async def start(self) -> None:
        """Start it and wait until it answers PING."""
        self.proc = await asyncio.create_subprocess_exec(
            "redis-server", "--port", str(self.port), "--bind", "127.0.0.1", "--save", "",
            "--appendonly", "no", "--daemonize", "no",
            stdout=asyncio.subprocess.DEVNULL, stderr=asyncio.subprocess.DEVNULL,
        )
        client = aioredis.Redis.from_url(self.url)
        try:
            async with asyncio.timeout(10):
                while True:
                    with contextlib.suppress(Exception):
                        if await client.ping():
                            return
                    await asyncio.sleep(0.05)
        finally:
            await client.aclose()

    async def kill(self) -> None:
        """SIGKILL it and reap it."""
        if self.proc is not None and self.proc.returncode is None:
            self.proc.kill()
            await self.proc.wait()


@pytest.fixture
async def own_redis() -> AsyncIterator[OwnRedis]:
    """A Redis server of this test alone (never the shared one on 6379)."""
    if shutil.which("redis-server") is None:
        pytest.skip("redis-server is not installed")
    server = OwnRedis()
    await server.start()
    try:
        yield server
    finally:
        await server.kill()


async def test_redis_restart_during_edits(
    http: aiohttp.ClientSession, tmp_path: Path, pg_url: str, pg_schema: str, own_redis: OwnRedis
) -> None:
    """Redis killed and restarted mid-edit: /readyz shows it, no divergence, fan-out resumes."""
    servers = make_servers(tmp_path, 2, database_url=pg_url, database_schema=pg_schema,
                           redis_url=own_redis.url, redis_prefix="ft:")
    a, b = servers
    editors = [Editor(OWNER, "c-olga", Codec.JSON, markers(0)),
               Editor("ulla", "c-ulla", Codec.MSGPACK, markers(1))]
    try:
        await start_all(servers)
        for srv in servers:
            assert (await readyz(http, srv))[1]["hub"] is True
        doc = await create_doc(http, a, editors=EDITORS)
        await editors[0].join(http, a, [doc])
        await editors[1].join(http, b, [doc])
        rng = random.Random(5)
        work = [asyncio.create_task(e.edit_for(random.Random(rng.random()), 3.0))
                for e in editors]
        await asyncio.sleep(0.7)
        await own_redis.kill()
        for srv in servers:
            body = await poll(lambda s=srv: _hub_is(http, s, False), within=10)
            assert body["status"] == "degraded" and body["store"] is True
        await asyncio.sleep(0.8)  # edits go on without Redis
        await own_redis.start()
        for srv in servers:
            await poll(lambda s=srv: _hub_is(http, s, True), within=15)
        await asyncio.gather(*work)
        states = [s for e in editors for s in e.states]
        final = await converged(http, servers, states)
        check_exactly_once(final[doc]["text"], states, all_made=True)
        # What could not be published while Redis was down is counted.
        failed = [await metric(http, srv, "coscribe_hub_publish_failures_total") for srv in servers]
        assert sum(failed) > 0
        # Remote delivery resumed: an edit on A reaches B's client, which does nothing itself.
        olga, ulla = editors[0].states[0], editors[1].states[0]
        olga.insert(rng, "Z")
        async with asyncio.timeout(10):
            assert editors[1].client is not None
            await editors[1].client.wait_until(lambda: ulla.text is not None and "Z" in ulla.text)
        await converged(http, servers, states)
        for s in states:
            assert s.problems == [], s.problems
            assert s.errors == [], s.errors
    finally:
        for editor in editors:
            await editor.close()
        await stop_all(servers)


async def test_presence_is_right_again_after_redis_comes_back(
    http: aiohttp.ClientSession, tmp_path: Path, pg_url: str, pg_schema: str, own_redis: OwnRedis
) -> None:
    """While Redis is down one session on A leaves and another changes its presence: once
    Redis is back (empty, as after a restart), B's subscribers see both right, and a
    newcomer on B is told what holds now, not what held before the outage."""
    servers = make_servers(tmp_path, 2, database_url=pg_url, database_schema=pg_schema,
                           redis_url=own_redis.url, redis_prefix="ft:")
    a, b = servers
    clients: list[WsClient] = []
    try:
        await start_all(servers)
        doc = await create_doc(http, a, editors=EDITORS)
        gone, stays = await connect(http, a, "ulla"), await connect(http, a, "vera")
        watcher = await connect(http, b, OWNER, Codec.MSGPACK)
        clients += [gone, stays, watcher]
        for c in clients:
            await c.subscribe(doc)
        for c in (gone, stays):
            await c.send({"t": "presence", "doc": doc, "data": {"cursor": 1}})
            await wait_presence(watcher, c.session, {"cursor": 1})
        await own_redis.kill()
        for srv in servers:
            await poll(lambda s=srv: _hub_is(http, s, False), within=10)
        await gone.close()
        await stays.send({"t": "presence", "doc": doc, "data": {"cursor": 2}})
        await stays.ping()
        await own_redis.start()
        for srv in servers:
            await poll(lambda s=srv: _hub_is(http, s, True), within=15)
        await wait_presence(watcher, gone.session, None)
        await wait_presence(watcher, stays.session, {"cursor": 2})
        newcomer = await connect(http, b, "wim")
        clients.append(newcomer)
        mark = len(newcomer.log)
        await newcomer.subscribe(doc)
        await newcomer.ping()
        told = {m["session"]: m["data"] for m in newcomer.since(mark) if m["t"] == "presence"}
        assert told == {stays.session: {"cursor": 2}}, told
    finally:
        for c in clients:
            await c.close()
        await stop_all(servers)


async def test_presence_of_a_process_taken_for_dead_comes_back_with_it(
    http: aiohttp.ClientSession, tmp_path: Path, pg_url: str, pg_schema: str,
    redis_url: str, redis_prefix: str,
) -> None:
    """A process stopped past its liveness TTL is taken for dead (its sessions' presence is
    cleared elsewhere); once it runs again, it finds its key gone and publishes its
    sessions' presence anew, to the other process's subscribers and to newcomers there."""
    servers = make_servers(tmp_path, 2, database_url=pg_url, database_schema=pg_schema,
                           redis_url=redis_url, redis_prefix=redis_prefix)
    a, b = servers
    clients: list[WsClient] = []
    stopped = False
    try:
        await start_all(servers)
        doc = await create_doc(http, a, editors=EDITORS)
        ulla, watcher = await connect(http, a, "ulla"), await connect(http, b, OWNER)
        clients += [ulla, watcher]
        for c in clients:
            await c.subscribe(doc)
        await ulla.send({"t": "presence", "doc": doc, "data": {"cursor": 1}})
        await wait_presence(watcher, ulla.session, {"cursor": 1})
        assert a.proc is not None
        os.killpg(a.proc.pid, signal.SIGSTOP)
        stopped = True
        mark = len(watcher.log)
        await wait_presence(watcher, ulla.session, None, since=mark, within=20)
        os.killpg(a.proc.pid, signal.SIGCONT)
        stopped = False
        await wait_presence(watcher, ulla.session, {"cursor": 1}, since=mark, within=10)
        newcomer = await connect(http, b, "wim")
        clients.append(newcomer)
        await newcomer.subscribe(doc)
        await wait_presence(newcomer, ulla.session, {"cursor": 1})
    finally:
        if stopped and a.proc is not None:
            os.killpg(a.proc.pid, signal.SIGCONT)
        for c in clients:
            await c.close()
        await stop_all(servers)
        await clear_redis(redis_url, redis_prefix)


async def _hub_is(
    http: aiohttp.ClientSession, server: ServerProcess, flag: bool
) -> dict[str, Any] | None:
    status, body = await readyz(http, server)
    return body if status == 200 and body.get("hub") is flag else None


# -- PostgreSQL stopped and started ----------------------------------------------------------------


class OwnPostgres:
    """A throwaway PostgreSQL cluster in a temporary directory, run as the postgres user."""

    def __init__(self) -> None:
        self.port = free_port()
        self.root = Path(tempfile.mkdtemp(prefix="coscribe-ft-pg-"))
        self.data = self.root / "data"
        self.url = f"postgresql://postgres@127.0.0.1:{self.port}/postgres"

    def _as_postgres(self, *argv: str) -> None:
        subprocess.run(["runuser", "-u", "postgres", "--", *argv], check=True,
                       stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, timeout=60)

    def create(self) -> None:
        """initdb (trust auth, no fsync) into the temporary directory, owned by postgres."""
        shutil.chown(self.root, "postgres", "postgres")
        self._as_postgres("initdb", "-D", str(self.data), "-A", "trust", "-U", "postgres",
                          "-E", "UTF8", "--no-sync", "--no-instructions")

    def start(self) -> None:
        """Start and wait until it accepts connections.

        fsync=off is safe here: the "crash" is an immediate stop, not a power cut, so the OS
        still holds every write. synchronous_commit must stay on, or acked commits could be
        lost in the crash recovery.
        """
        opts = (f"-p {self.port} -k {self.root} -c listen_addresses=127.0.0.1 -c fsync=off "
                "-c full_page_writes=off")
        self._as_postgres("pg_ctl", "-D", str(self.data), "-o", opts,
                          "-l", str(self.root / "log"), "-w", "-t", "30", "start")

    def stop(self) -> None:
        """Stop at once (as a crash or a failover would)."""
        self._as_postgres("pg_ctl", "-D", str(self.data), "-m", "immediate", "-w", "stop")

    def destroy(self) -> None:
        """Stop if running and remove the directory."""
        with contextlib.suppress(subprocess.SubprocessError):
            self.stop()
        shutil.rmtree(self.root, ignore_errors=True)


@pytest.fixture
def own_postgres() -> Iterator[OwnPostgres]:
    """A PostgreSQL cluster of this test alone (never the shared one on 5432)."""
    if os.geteuid() != 0 or not all(shutil.which(t) for t in ("runuser", "initdb", "pg_ctl")):
        pytest.skip("needs root, runuser, initdb and pg_ctl to run a throwaway cluster")
    pg = OwnPostgres()
    try:
        pg.create()
        pg.start()
        yield pg
    finally:
        pg.destroy()


async def _pg_client(
    http: aiohttp.ClientSession, server: ServerProcess
) -> tuple[WsClient, str]:
    """A client subscribed to a new document whose first op ("a", seq 1) was acked."""
    doc = await create_doc(http, server)
    client = await connect(http, server, OWNER, Codec.JSON, "c-olga")
    await client.send({"t": "sub", "doc": doc})
    await client.wait_for(lambda m: m["t"] == "snapshot")
    await client.send({"t": "op", "doc": doc, "v": 0, "op": ["a"], "seq": 1})
    await client.wait_for(lambda m: m["t"] == "ack" and m["seq"] == 1)
    return client, doc


def _reply_to(seq: int) -> Any:
    return lambda m: m.get("seq") == seq and m["t"] in ("ack", "error")


async def test_postgres_down_acks_nothing_then_recovers(
    http: aiohttp.ClientSession, tmp_path: Path, own_postgres: OwnPostgres
) -> None:
    """Database down: /readyz 503 and no op is acked; back up: /readyz 200 and edits commit."""
    (server,) = make_servers(tmp_path, 1, database_url=own_postgres.url)
    client: WsClient | None = None
    try:
        await start_all([server])
        client, doc = await _pg_client(http, server)

        await asyncio.to_thread(own_postgres.stop)
        # Probed like a load balancer would (not in a tight loop).
        _, body = await poll(lambda: _ready_status(http, server, 503), within=20, every=1)
        assert body["store"] is False and body["status"] == "unavailable"
        await client.send({"t": "op", "doc": doc, "v": 1, "op": [1, "x"], "seq": 2})
        await asyncio.sleep(3)
        early = [m for m in client.log if m.get("seq") == 2]
        assert all(m["t"] == "error" and m["code"] == "unavailable" for m in early), early

        await asyncio.to_thread(own_postgres.start)
        await poll(lambda: _ready_status(http, server, 200), within=40, every=1)
        # The op queued during the outage is either committed now or refused, never both.
        pending = await client.wait_for(_reply_to(2), within=60)
        assert pending["t"] == "ack" or pending["code"] == "unavailable", pending
        expected = "ax" if pending["t"] == "ack" else "a"
        base = len(expected)
        await client.send({"t": "op", "doc": doc, "v": base, "op": [base, "b"], "seq": 3})
        assert (await client.wait_for(_reply_to(3), within=30))["t"] == "ack"
        body = await get_doc(http, server, doc)
        assert (body["text"], body["version"]) == (expected + "b", base + 1)
        assert await replay_log(http, server, doc) == expected + "b"
        assert [m["t"] for m in client.log if m.get("seq") == 2] == [pending["t"]]
    finally:
        if client is not None:
            await client.close()
        await stop_all([server])


async def test_postgres_down_refuses_ops_promptly(
    http: aiohttp.ClientSession, tmp_path: Path, own_postgres: OwnPostgres
) -> None:
    """With the database down an op is refused with `unavailable` within seconds."""
    (server,) = make_servers(tmp_path, 1, database_url=own_postgres.url)
    client: WsClient | None = None
    try:
        await start_all([server])
        client, doc = await _pg_client(http, server)
        await asyncio.to_thread(own_postgres.stop)
        await client.send({"t": "op", "doc": doc, "v": 1, "op": [1, "x"], "seq": 2})
        refusal = await client.wait_for(_reply_to(2), within=15)
        assert refusal["t"] == "error" and refusal["code"] == "unavailable", refusal
    finally:
        if client is not None:
            await client.close()
        await asyncio.to_thread(server.kill)  # its committer is stuck; nothing to drain here
        await stop_all([server])


async def _ready_where(
    http: aiohttp.ClientSession, server: ServerProcess, pred: Any
) -> dict[str, Any] | None:
    status, body = await readyz(http, server)
    return body if status == 200 and pred(body) else None


async def _ready_status(
    http: aiohttp.ClientSession, server: ServerProcess, want: int
) -> tuple[int, dict[str, Any]] | None:
    status, body = await readyz(http, server)
    return (status, body) if status == want else None


# -- SIGTERM with clients connected ----------------------------------------------------------------


async def test_sigterm_closes_with_1001_and_keeps_every_acked_op(
    http: aiohttp.ClientSession, tmp_path: Path, pg_url: str, pg_schema: str
) -> None:
    """SIGTERM mid-edit: clients get close code 1001 and every acknowledged op is in the store."""
    (server,) = make_servers(tmp_path, 1, database_url=pg_url, database_schema=pg_schema)
    editors = [Editor(OWNER, "c-olga", Codec.JSON, markers(0)),
               Editor("ulla", "c-ulla", Codec.MSGPACK, markers(1))]
    try:
        await start_all([server])
        doc = await create_doc(http, server, editors=EDITORS)
        for editor in editors:
            await editor.join(http, server, [doc])
        rng = random.Random(11)
        work = [asyncio.create_task(e.edit_for(random.Random(rng.random()), 2.0))
                for e in editors]
        await asyncio.sleep(0.8)
        await asyncio.to_thread(server.stop, signal.SIGTERM)
        assert server.proc is not None and server.proc.returncode == 0, server.proc.returncode
        for editor in editors:
            assert editor.client is not None
            assert await editor.client.wait_closed() == 1001
        await asyncio.gather(*work)
    finally:
        for editor in editors:
            await editor.close()
        await stop_all([server])
    states = [s for e in editors for s in e.states]
    assert sum(len(s.acked) for s in states) > 20
    cfg = StoreConfig(data_dir=tmp_path, database_url=pg_url, database_schema=pg_schema)
    text = await asyncio.to_thread(_stored_text, cfg, doc)
    check_exactly_once(text, states, all_made=False)


def _stored_text(cfg: StoreConfig, doc: str) -> str:
    store = Store(cfg)
    try:
        loaded = store.load(UUID(doc))
        assert loaded is not None
        return loaded.text
    finally:
        store.close()
