"""The read cache: tag generations in memory and in Redis, shared by processes, never stale."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import pytest
import redis
import redis.asyncio as aioredis
from aiohttp.test_utils import TestClient, TestServer

from domain.document import Document
from gateway import readmodels
from gateway.app import Services, create_app
from gateway.auth import sign_token
from gateway.readmodels import READMODELS, Extension, StoreSource, read_db_config
from gateway.store import Store, StoreConfig
from projections import cache as cache_module
from projections.cache import ReadCache, RedisRaiser, redis_keys
from projections.db import open_db
from projections.generations import GEN_TTL_SECONDS
from projections.registry import MODELS
from projections.runner import Runner
from tests.readside import gateway

pytestmark = [
    pytest.mark.redis,
]
SECRET = b"test-secret"


@pytest.fixture
async def prefix(redis_url: str, redis_prefix: str) -> AsyncIterator[str]:
    """A Redis key prefix for this test; its keys are deleted afterwards."""
    yield redis_prefix
    client = aioredis.Redis.from_url(redis_url)
    try:
        keys = [k async for k in client.scan_iter(f"{redis_prefix}*")]
        if keys:
            await client.delete(*keys)
    finally:
        await client.aclose()


async def _cache(redis_url: str | None, prefix: str = "x:") -> ReadCache:
    cache = ReadCache(redis_url=redis_url, prefix=prefix)
    await cache.start()
    return cache


async def test_memory_entries_go_stale_when_their_tag_moves() -> None:
    """Without Redis, invalidating a tag makes the entries stored under it misses."""
    cache = await _cache(None)
    try:
        calls = []

        async def compute() -> dict[str, int]:
            calls.append(1)
            return {"n": len(calls)}

        assert await cache.fetch("k", ["t"], compute) == {"n": 1}
        assert await cache.fetch("k", ["t"], compute) == {"n": 1}
        assert await cache.fetch("other", [], compute) == {"n": 2}
        await cache.invalidate_tags(["t"])
        assert await cache.fetch("k", ["t"], compute) == {"n": 3}
        assert await cache.fetch("other", [], compute) == {"n": 2}
        assert cache.stats()["hits"] == 2 and cache.stats()["stale"] == 1
    finally:
        await cache.close()


def _const(value: str) -> Callable[[], Awaitable[str]]:
    async def compute() -> str:
        return value

    return compute


async def test_another_log_shares_no_generations_or_entries(redis_url: str, prefix: str) -> None:
    """A reset database starts its positions again: its cache (another ``log_id``) must not
    take the old log's higher generations, nor serve the old log's entries."""
    old = ReadCache(redis_url=redis_url, prefix=prefix, log_id="old")
    new = ReadCache(redis_url=redis_url, prefix=prefix, log_id="new")
    await old.start()
    await new.start()
    try:
        await old.raise_tags({"t": 300})
        assert await old.fetch("k", ["t"], _const("old log")) == "old log"
        assert await new.fetch("k", ["t"], _const("new log")) == "new log"
        await new.raise_tags({"t": 5})  # below the old log's 300, and it counts all the same
        assert await new.fetch("k", ["t"], _const("after")) == "after"
    finally:
        await old.close()
        await new.close()


async def test_a_value_computed_across_an_invalidation_is_never_served(
    redis_url: str, prefix: str
) -> None:
    """An entry whose computation overlapped an invalidation is stored but never counts."""
    cache = await _cache(redis_url, prefix)
    try:
        async def racing() -> str:
            await cache.invalidate_tags(["t"])  # the data changed while we were reading
            return "old"

        assert await cache.fetch("k", ["t"], racing) == "old"
        assert await cache.get("k") is None

        async def fresh() -> str:
            return "new"

        assert await cache.fetch("k", ["t"], fresh) == "new"
        assert await cache.get("k") == "new"
    finally:
        await cache.close()


async def test_processes_share_entries_and_invalidations_through_redis(
    redis_url: str, prefix: str
) -> None:
    """One process's entry is the other's hit; one's invalidation is the other's miss."""
    a, b = await _cache(redis_url, prefix), await _cache(redis_url, prefix)
    try:
        async def value() -> list[int]:
            return [1, 2]

        await a.fetch("k", ["an-all"], value)
        assert await b.get("k") == [1, 2]
        assert b.stats()["hits"] == 1
        await b.invalidate_tags(["an-all"])
        assert await a.get("k") is None  # a's memory copy is checked against Redis
        assert a.stats()["redis"] is True
    finally:
        await a.close()
        await b.close()


def _app(cfg: StoreConfig, redis_url: str, prefix: str) -> TestClient[Any, Any]:
    services = Services(store=Store(cfg), secret=SECRET,
                        extensions=[Extension(redis_url=redis_url, redis_prefix=prefix)])
    return TestClient(TestServer(create_app(services), host="127.0.0.1", port=0))


async def test_two_gateways_never_serve_each_other_stale_analytics(
    store_config: StoreConfig, redis_url: str, prefix: str
) -> None:
    """Gateway A's cached overview reflects an edit made through gateway B at once."""
    a, b = _app(store_config, redis_url, prefix), _app(store_config, redis_url, prefix)
    await a.start_server()
    await b.start_server()
    headers = {"Authorization": f"Bearer {sign_token(SECRET, 'ann')}"}
    try:
        r = await a.post("/v1/documents", json={"title": "shared", "text": ""}, headers=headers)
        doc = (await r.json())["id"]
        v = 0
        for _ in range(4):
            r = await b.post(f"/v1/documents/{doc}/ops", json={"v": v, "op": ["x"]},
                             headers=headers)
            v = (await r.json())["v"]
            for gateway in (a, a, b):
                r = await gateway.get("/v1/analytics/overview", headers=headers)
                assert sum(s["edits"] for s in (await r.json())["series"]) == v
        stats = (await (await a.get("/v1/projections", headers=headers)).json())["cache"]
        assert stats["redis"] and stats["hits"] >= 4
    finally:
        await a.close()
        await b.close()


async def test_start_warms_the_busiest_dashboards(
    store_config: StoreConfig, redis_url: str, prefix: str
) -> None:
    """After a restart the busiest user's overview is already cached."""
    headers = {"Authorization": f"Bearer {sign_token(SECRET, 'ann')}"}
    first = _app(store_config, redis_url, prefix)
    await first.start_server()
    try:
        r = await first.post("/v1/documents", json={"title": "w", "text": ""}, headers=headers)
        doc = (await r.json())["id"]
        await first.post(f"/v1/documents/{doc}/ops", json={"v": 0, "op": ["x"]},
                         headers=headers)
    finally:
        await first.close()
    # A fresh Redis namespace, so only the warm-up can have filled the second gateway's cache.
    second = _app(store_config, redis_url, prefix + "2:")
    await second.start_server()
    try:
        rm = second.app[READMODELS]
        for _ in range(200):
            if rm.cache.stats()["sets"] >= 3:
                break
            await asyncio.sleep(0.02)
        r = await second.get("/v1/analytics/overview", headers=headers)
        assert sum(s["edits"] for s in (await r.json())["series"]) == 1
        assert rm.cache.stats()["hits"] == 1
    finally:
        await second.close()
        client = aioredis.Redis.from_url(redis_url)
        keys = [k async for k in client.scan_iter(f"{prefix}2:*")]
        if keys:
            await client.delete(*keys)
        await client.aclose()


def _project_with_raises(cfg: StoreConfig, redis_url: str, prefix: str) -> None:
    """What ``coscribe projections run --redis-url`` does once: the read models of every
    event so far, and their raises (and stamp) in Redis under ``prefix``."""
    store = Store(cfg)
    db = open_db(read_db_config(cfg))
    raiser = RedisRaiser(redis_url, redis_keys(prefix, store.log_id()))
    try:
        runner = Runner(db, StoreSource(store), MODELS, observe=raiser.observe,
                        confirm=raiser.confirm)
        runner.setup()
        runner.catch_up()
    finally:
        raiser.close()
        db.close()
        store.close()


async def _logged(caplog: pytest.LogCaptureFixture, text: str, times: int) -> None:
    for _ in range(1000):
        if sum(text in r.getMessage() for r in caplog.records) >= times:
            return
        await asyncio.sleep(0.02)
    raise AssertionError(f"{text!r} not logged {times} times: {caplog.text}")


async def test_gateways_without_projections_warm_and_query_once_for_all(
    store_config: StoreConfig, redis_url: str, prefix: str, caplog: pytest.LogCaptureFixture
) -> None:
    """The gateways of ``serve --workers N`` run no projections, and each warms its caches
    at start all the same (they warmed nothing); one computes the dashboards, the other
    copies them from Redis into its memory instead of querying them again."""
    store = Store(store_config)
    try:
        doc = Document.create("w", "", "ann")
        doc.edit(["x"], "ann")
        store.save(doc.collect_events())
    finally:
        store.close()
    _project_with_raises(store_config, redis_url, prefix)
    with caplog.at_level(logging.INFO, logger="gateway.readmodels"):
        async with (
            gateway(store_config, run_projections=False, redis_url=redis_url,
                    redis_prefix=prefix) as a,
            gateway(store_config, run_projections=False, redis_url=redis_url,
                    redis_prefix=prefix) as b,
        ):
            await _logged(caplog, "warmed 1 dashboards and 1 documents", 2)
            caches = [api.client.app[READMODELS].cache.stats_ for api in (a, b)]
            # hour and day overviews and the top documents: computed by one, copied by one
            assert sorted((c.sets, c.hits) for c in caches) == [(0, 3), (3, 0)]
            for api, stats in zip((a, b), caches, strict=True):
                before = (stats.hits, stats.misses)
                over = await api.call("GET", "/v1/analytics/overview")
                assert sum(s["edits"] for s in over["series"]) == 1
                assert (stats.hits, stats.misses) == (before[0] + 1, before[1])


async def test_a_warm_up_that_cannot_start_never_holds_up_the_gateway(
    store_config: StoreConfig, redis_url: str, prefix: str, caplog: pytest.LogCaptureFixture,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A gateway without projections whose read models nobody has built yet serves at once;
    its warm-up waits for them in the background and gives up with one line."""
    monkeypatch.setattr(readmodels, "WARM_WAIT_SECONDS", 0.5)
    with caplog.at_level(logging.INFO, logger="gateway.readmodels"):
        async with gateway(store_config, run_projections=False, redis_url=redis_url,
                           redis_prefix=prefix) as api:
            r = await api.client.get("/healthz")
            assert r.status == 200
            await _logged(caplog, "caches not warmed", 1)
            assert api.client.app[READMODELS].cache.stats_.sets == 0
    assert not any(r.exc_info for r in caplog.records), caplog.text
    assert "read-model query failed" not in caplog.text  # polled quietly, not 10 lines a second


async def test_generation_keys_expire_a_day_after_their_last_raise(
    redis_url: str, prefix: str, redis_client: redis.Redis
) -> None:
    """A tag's key (one per document) lived for ever; each raise now gives it
    ``GEN_TTL_SECONDS``, far past any entry's life, from a gateway's runner and from
    ``projections run`` alike. A write that raises nothing leaves the expiry alone (only a
    raise can make an entry stale), and the stamp is kept."""
    where = redis_keys(prefix, "")
    cache = await _cache(redis_url, prefix)
    raiser = RedisRaiser(redis_url, where)
    try:
        await cache.raise_tags({"a": 5})
        raiser.observe("analytics", [(6, Document.Created)])  # no originator: tag "an-doc:"
        raiser.confirm(6)
        for tag in ("a", "an-doc:", "an-all"):
            assert GEN_TTL_SECONDS - 60 < redis_client.ttl(f"{where}gen:{tag}") <= GEN_TTL_SECONDS
        assert GEN_TTL_SECONDS >= 100 * cache_module.TTL_SECONDS
        redis_client.expire(f"{where}gen:a", 100)
        await cache.raise_tags({"a": 4})
        assert redis_client.ttl(f"{where}gen:a") <= 100
        await cache.raise_tags({"a": 7})
        assert redis_client.get(f"{where}gen:a") == b"7"
        assert redis_client.ttl(f"{where}gen:a") > GEN_TTL_SECONDS - 60
        assert redis_client.ttl(f"{where}stamp") == -1
    finally:
        raiser.close()
        await cache.close()


async def test_no_entry_outlives_its_ttl_counted_from_the_read_of_its_generations(
    redis_url: str, prefix: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """What the generation keys' expiry relies on: a copy of an entry from Redis into
    another process's memory ends with the entry (it got a whole new TTL), and a value that
    took longer than the TTL to compute is not kept at all."""
    monkeypatch.setattr(cache_module, "TTL_SECONDS", 1)
    a, b = await _cache(redis_url, prefix), await _cache(redis_url, prefix)
    try:
        assert await a.fetch("k", ["t"], _const("v")) == "v"
        await asyncio.sleep(0.5)
        assert await b.get("k") == "v"  # now in b's memory too
        await asyncio.sleep(0.8)
        assert await b.get("k") is None

        async def slow() -> str:
            await asyncio.sleep(1.1)
            return "slow"

        assert await a.fetch("s", ["t"], slow) == "slow"
        assert await a.get("s") is None and await b.get("s") is None
        assert a.stats()["sets"] == 1
    finally:
        await a.close()
        await b.close()
