"""Cached read models after a Redis outage: raises that failed are kept and sent again, and
nothing is served stale meanwhile, from either cache level, nor after Redis comes back with
its old keys (AOF) or after a runner was killed between its commit and its raise."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import pytest
import redis

from domain.document import Document
from gateway.readmodels import READMODELS, StoreSource, read_db_config
from gateway.store import Store, StoreConfig
from projections import generations
from projections.cache import ReadCache, RedisRaiser, redis_keys
from projections.db import open_db
from projections.registry import MODELS
from projections.runner import Runner
from tests.procs import free_port
from tests.readside import Api, gateway

pytestmark = [pytest.mark.redis]


class OwnRedis:
    """A ``redis-server`` of this test alone on a free port, with an AOF written at every
    command, so that a SIGKILL and a restart bring every key back as it was."""

    def __init__(self) -> None:
        self.port = free_port()
        self.url = f"redis://127.0.0.1:{self.port}/0"
        self.dir = tempfile.mkdtemp(prefix="coscribe-own-redis-")
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        """Start it and wait until it answers PING."""
        self.proc = subprocess.Popen(
            ["redis-server", "--port", str(self.port), "--bind", "127.0.0.1", "--save", "",
             "--appendonly", "yes", "--appendfsync", "always", "--dir", self.dir],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
        )
        client = redis.Redis.from_url(self.url)
        try:
            deadline = time.monotonic() + 10
            while True:
                with contextlib.suppress(redis.RedisError):
                    if client.ping():
                        return
                assert time.monotonic() < deadline, "redis-server did not start"
                time.sleep(0.05)
        finally:
            client.close()

    def kill(self) -> None:
        """SIGKILL it and reap it."""
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()


@pytest.fixture
def own_redis() -> Iterator[OwnRedis]:
    """A persistent Redis server that the test may kill and restart (never the shared one)."""
    if shutil.which("redis-server") is None:
        pytest.skip("redis-server is not installed")
    server = OwnRedis()
    server.start()
    try:
        yield server
    finally:
        server.kill()
        shutil.rmtree(server.dir, ignore_errors=True)


@pytest.fixture
def retry_at_once(monkeypatch: pytest.MonkeyPatch) -> None:
    """Runners retry failed raises at every chance rather than once a second."""
    monkeypatch.setattr(generations, "RETRY_SECONDS", 0.0)


async def _edits(api: Api, doc: str) -> tuple[int, str | None]:
    """The edits in the document's daily analytics, and its X-Projection-Lag header."""
    r = await api.client.get(f"/v1/analytics/documents/{doc}?bucket=day",
                             headers=api.headers("ann"))
    assert r.status == 200, await r.text()
    body = await r.json()
    return sum(b["edits"] for b in body["series"]), r.headers.get("X-Projection-Lag")


async def _edit(api: Api, doc: str, v: int, n: int) -> int:
    for _ in range(n):
        v = await api.edit(doc, v, ["a"])
    return v


async def _poll(cond: Any, within: float = 15.0) -> None:
    deadline = time.monotonic() + within
    while not await cond():
        assert time.monotonic() < deadline, "condition not reached in time"
        await asyncio.sleep(0.05)


async def test_a_gateways_runner_sends_its_failed_raises_once_redis_is_back(
    store_config: StoreConfig, own_redis: OwnRedis, redis_prefix: str
) -> None:
    """Projections in the gateway: analytics cached before a Redis outage are recomputed after
    it (Redis restored from its AOF with the old generations); during one, an answer computed
    is not served again after another edit; cached again once the raises are in."""
    async with gateway(store_config, redis_url=own_redis.url, redis_prefix=redis_prefix,
                       warm=False) as api:
        cache = api.client.app[READMODELS].cache
        doc = await api.create("outage")
        v = await _edit(api, doc, 0, 3)
        assert await _edits(api, doc) == (3, None)
        assert await _edits(api, doc) == (3, None)
        assert cache.stats_.hits >= 1
        own_redis.kill()
        v = await _edit(api, doc, v, 3)  # projected, but the raise cannot reach Redis
        own_redis.start()
        assert await _edits(api, doc) == (6, None)  # the old code served 3 for 10 minutes
        own_redis.kill()
        v = await _edit(api, doc, v, 1)
        assert await _edits(api, doc) == (7, None)
        v = await _edit(api, doc, v, 1)
        assert await _edits(api, doc) == (8, None)  # the old code kept serving 7
        own_redis.start()
        assert await _edits(api, doc) == (8, None)
        hits = cache.stats_.hits

        async def cached_again() -> bool:
            return await _edits(api, doc) == (8, None) and cache.stats_.hits > hits

        await _poll(cached_again)


def _run(args: list[str], log: Path) -> subprocess.Popen[bytes]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("COSCRIBE_")}
    with log.open("wb") as out:
        return subprocess.Popen(
            [sys.executable, "-m", "ops.projections_cli", "projections", "run",
             "--poll", "0.01", *args], env=env, stdout=out, stderr=subprocess.STDOUT,
            start_new_session=True)


@contextlib.asynccontextmanager
async def _runner(cfg: StoreConfig, redis_url: str, prefix: str,
                  log: Path) -> AsyncIterator[subprocess.Popen[bytes]]:
    where = (["--database-url", cfg.database_url, "--database-schema",
              cfg.database_schema or "public"] if cfg.database_url
             else ["--data-dir", str(cfg.data_dir)])
    proc = _run([*where, "--redis-url", redis_url, "--redis-prefix", prefix], log)
    try:
        yield proc
    finally:
        os.killpg(proc.pid, signal.SIGTERM)
        proc.wait(20)


async def test_gateways_without_a_runner_are_not_served_stale_after_an_outage(
    store_config: StoreConfig, own_redis: OwnRedis, redis_prefix: str, tmp_path: Path
) -> None:
    """The audit's case: a gateway without projections, ``coscribe projections run`` beside
    it. Analytics cached before the outage are not served after it, and the runner logs the
    outage once and the recovery once, without tracebacks."""
    log = tmp_path / "runner.log"
    async with (
        gateway(store_config, run_projections=False, warm=False, redis_url=own_redis.url,
                redis_prefix=redis_prefix) as api,
        _runner(store_config, own_redis.url, redis_prefix, log) as proc,
    ):
        cache = api.client.app[READMODELS].cache
        doc = await api.create("outage")
        v = await _edit(api, doc, 0, 3)

        async def three() -> bool:
            r = await api.client.get(f"/v1/analytics/documents/{doc}?bucket=day",
                                     headers=api.headers("ann"))
            return r.status == 200 and sum(b["edits"] for b in (await r.json())["series"]) == 3

        await _poll(three)  # the runner made the tables, caught up and raised
        hits = cache.stats_.hits

        async def hit() -> bool:
            return await _edits(api, doc) == (3, None) and cache.stats_.hits > hits

        await _poll(hit)
        own_redis.kill()
        v = await _edit(api, doc, v, 3)

        async def projected() -> bool:
            body = await api.call("GET", "/v1/projections")
            return all(p["lag"] == 0 for p in body["projections"])

        await _poll(projected)
        await asyncio.sleep(0.5)  # the runner tries its raise, and again
        own_redis.start()
        assert await _edits(api, doc) == (6, None)  # the old code served 3 for 10 minutes
        hits = cache.stats_.hits

        async def cached_again() -> bool:
            return await _edits(api, doc) == (6, None) and cache.stats_.hits > hits

        await _poll(cached_again)
        assert proc.poll() is None
    out = log.read_text()
    assert out.count("Redis failing") == 1, out
    assert out.count("Redis works again") == 1, out
    assert "Traceback" not in out and "observer failed" not in out, out


async def test_nothing_is_cached_while_redis_is_unreachable(
    caplog: pytest.LogCaptureFixture,
) -> None:
    """With Redis refusing, every read computes afresh (a memory entry could not be told stale
    by a raise that fails), and the failures are logged once, without a traceback."""
    cache = ReadCache(redis_url=f"redis://127.0.0.1:{free_port()}/0", prefix="x:")
    await cache.start()
    calls: list[int] = []

    async def compute() -> int:
        calls.append(1)
        return len(calls)

    try:
        with caplog.at_level(logging.WARNING):
            assert await cache.fetch("k", ["t"], compute) == 1
            await cache.raise_tags({"t": 5})  # the data changed; Redis does not hear of it
            await cache.confirm(5)
            assert await cache.fetch("k", ["t"], compute) == 2  # the old code served 1
            assert await cache.fetch("k", ["t"], compute) == 3
        assert cache.stats()["hits"] == 0
        failing = [r for r in caplog.records if "Redis failing" in r.getMessage()]
        assert len(failing) == 1 and failing[0].exc_info is None, caplog.text
    finally:
        await cache.close()


async def test_a_runner_killed_between_commit_and_raise_is_covered_at_the_next_start(
    tmp_path: Path, own_redis: OwnRedis, redis_prefix: str, caplog: pytest.LogCaptureFixture,
    retry_at_once: None,
) -> None:
    """Events committed to the read models whose raise never happened (the runner died in
    between) make every older entry stale once a runner starts: it raises the global
    generation to its tracking position before its first step. Its failed raises are logged
    once, and once when Redis works again."""
    cfg = StoreConfig(data_dir=tmp_path)
    store = Store(cfg)
    db = open_db(read_db_config(cfg))
    prefix = redis_keys(redis_prefix, store.log_id())
    cache = ReadCache(redis_url=own_redis.url, prefix=redis_prefix, log_id=store.log_id())
    await cache.start()
    try:
        doc = Document.create("T", "", "ann")
        store.save(doc.collect_events())
        raiser = RedisRaiser(own_redis.url, prefix)
        first = Runner(db, StoreSource(store), MODELS, observe=raiser.observe,
                       confirm=raiser.confirm)
        first.setup()
        cache.reached(first.catch_up())
        tag = f"an-doc:{doc.id}"
        assert await cache.fetch("k", [tag], _value("before")) == "before"
        assert await cache.get("k") == "before"
        raiser.close()
        # More events, applied by a runner whose raises never happen (killed after commit).
        doc.rename("T2", "ann")
        store.save(doc.collect_events())
        dying = Runner(db, StoreSource(store), MODELS)
        dying.setup()
        dying.catch_up()
        # A new runner starts while Redis is down, then Redis comes back.
        own_redis.kill()
        raiser = RedisRaiser(own_redis.url, prefix)
        with caplog.at_level(logging.INFO):
            second = Runner(db, StoreSource(store), MODELS, observe=raiser.observe,
                            confirm=raiser.confirm)
            second.setup()
            for _ in range(5):
                second.step()
            own_redis.start()
            second.step()
        raiser.close()
        cache.reached(second.seen())
        assert await cache.get("k") is None  # without the start rule: "before", stale
        assert await cache.fetch("k", [tag], _value("after")) == "after"
        assert await cache.get("k") == "after"
        messages = [r.getMessage() for r in caplog.records]
        assert sum("Redis failing" in m for m in messages) == 1, messages
        assert sum("Redis works again" in m for m in messages) == 1, messages
        assert all(r.exc_info is None for r in caplog.records), caplog.text
    finally:
        await cache.close()
        db.close()
        store.close()


def _value(value: str) -> Any:
    async def compute() -> str:
        return value

    return compute


async def test_raises_that_redis_lost_retire_every_older_entry(
    redis_url: str, redis_prefix: str, redis_client: redis.Redis, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Redis back at an older state (an AOF that missed the last writes, a lagging replica):
    its stamp is below what the runner confirmed, so the runner's next check raises the
    global generation, and an entry that the lost raise should have retired does not count."""
    where = redis_keys(redis_prefix, "")
    cache = ReadCache(redis_url=redis_url, prefix=redis_prefix)
    await cache.start()
    raiser = RedisRaiser(redis_url, where)
    try:
        raiser.raises.add({"t": 3})
        raiser.confirm(3)
        assert redis_client.get(f"{where}stamp") == b"3 3"
        cache.reached(3)
        assert await cache.fetch("k", ["t"], _value("at 3")) == "at 3"
        raiser.raises.add({"t": 7})
        raiser.confirm(7)
        assert redis_client.get(f"{where}stamp") == b"3 7"
        redis_client.set(f"{where}gen:t", 3)  # Redis loses the last script
        redis_client.set(f"{where}stamp", "3 3")
        cache.reached(7)
        assert await cache.get("k") is None  # its raises are not complete up to 7
        monkeypatch.setattr(generations, "CHECK_SECONDS", 0.0)
        raiser.confirm(7)  # the idle check
        assert redis_client.get(f"{where}stamp") == b"7 7"
        assert await cache.get("k") is None  # without the global generation: "at 3"
        assert await cache.fetch("k", ["t"], _value("at 7")) == "at 7"
        assert await cache.get("k") == "at 7"
    finally:
        raiser.close()
        await cache.close()


def test_too_many_waiting_raises_are_dropped_for_the_global_generation(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Past ``MAX_PENDING`` tags a runner keeps none, and its next send raises the global
    generation over them instead (unless Redis already has raises past them)."""
    monkeypatch.setattr(generations, "MAX_PENDING", 2)
    raises = generations.Raises()
    raises.reached(10)
    raises.sent(raises.take())
    raises.add({"a": 11, "b": 12})
    raises.add({"c": 13})
    raises.reached(13)
    flush = raises.take()
    assert flush.tags == {} and flush.doubt == 13 and flush.position == 13
    raises.failed()
    raises.add({"d": 14})
    raises.reached(14)
    assert raises.take().doubt == 13  # still owed after the failure
    raises.sent(raises.take())
    assert raises.dropped == 0 and raises.take().doubt == 14


async def test_a_redis_that_never_answers_costs_one_timeout_then_none() -> None:
    """A Redis that accepts connections and never answers: every analytics read took 10 s
    (the socket timeout of each of its calls). Now a failed call makes the cache's calls
    fail at once for a while: the reads are answered from the tables, and Redis is not
    tried again meanwhile."""
    received: list[bytes] = []

    async def silent(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        while data := await reader.read(65536):
            received.append(data)
        writer.close()

    server = await asyncio.start_server(silent, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    cache = ReadCache(redis_url=f"redis://127.0.0.1:{port}/0", prefix="silent:")
    await cache.start()
    try:
        async def compute() -> int:
            return 42

        assert await cache.fetch("k", ["t"], compute) == 42
        assert received  # it was tried
        tried = len(b"".join(received))
        for _ in range(5):
            assert await cache.fetch("k", ["t"], compute) == 42
        assert len(b"".join(received)) == tried  # and not again
    finally:
        await cache.close()
        server.close()
        await server.wait_closed()
