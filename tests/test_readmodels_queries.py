"""The read side's queries answer alike on SQLite and Postgres, say when they lag, and
take and give versions and times alike."""

from __future__ import annotations

import asyncio
import logging
from urllib.parse import quote

import pytest

from gateway import readmodels
from gateway.store import StoreConfig
from tests.readside import catch_up, gateway


async def test_q_ignores_case_in_every_script(store_config: StoreConfig) -> None:
    """``q`` matches titles whatever the case of non-ASCII letters, on both databases."""
    titles = ["Été report", "ÉTÉ SUMMARY", "ĞÜŞ türkçe", "straße", "İstanbul", "plain"]
    async with gateway(store_config) as api:
        for title in titles:
            await api.create(title)

        async def found(q: str) -> set[str]:
            page = await api.call("GET", f"/v1/documents?limit=50&q={quote(q)}")
            return {i["title"] for i in page["items"]}

        for q in ("été", "ÉTÉ", "éTé"):
            assert await found(q) == {"Été report", "ÉTÉ SUMMARY"}, q
        assert await found("ğüş") == await found("ĞÜŞ") == {"ĞÜŞ türkçe"}
        assert await found("STRAßE") == {"straße"}
        assert await found("İST") == await found("İstanbul") == {"İstanbul"}
        assert await found("PLAIN") == {"plain"}


async def test_every_read_of_a_lagging_read_model_says_so(
    store_config: StoreConfig, monkeypatch: pytest.MonkeyPatch
) -> None:
    """With the read models behind, lists, history, context and analytics carry the lag."""
    monkeypatch.setattr(readmodels, "FRESH_SECONDS", 0.1)  # how long each read waits
    async with gateway(store_config, run_projections=False, warm=False) as api:
        doc = await api.create("lag")
        await asyncio.to_thread(catch_up, store_config)
        await api.edit(doc, 0, ["x"])
        routes = ["/v1/documents", f"/v1/documents/{doc}/history",
                  f"/v1/documents/{doc}/context", "/v1/analytics/overview",
                  f"/v1/analytics/documents/{doc}", "/v1/analytics/top-documents"]
        for route in routes:
            r = await api.client.get(route, headers=api.headers("ann"))
            assert (r.status, r.headers.get("X-Projection-Lag")) == (200, "1"), route
        await asyncio.to_thread(catch_up, store_config)
        for route in routes:
            r = await api.client.get(route, headers=api.headers("ann"))
            assert (r.status, r.headers.get("X-Projection-Lag")) == (200, None), route


async def test_read_models_never_built_answer_503_without_sql(store_config: StoreConfig) -> None:
    """No runner has made the tables yet: 503 unavailable saying so, never the SQL."""
    async with gateway(store_config, run_projections=False, warm=False) as api:
        await api.create("t")
        body = await api.call("GET", "/v1/documents", status=503)
        message = body["error"]["message"]
        assert body["error"]["code"] == "unavailable" and "not built yet" in message
        assert "SELECT" not in message.upper()


async def test_time_travel_answers_at_normalized(store_config: StoreConfig) -> None:
    """``at`` in the answer is the version asked for, or the time in UTC with Z."""
    async with gateway(store_config) as api:
        doc = await api.create("t", "a")
        await api.edit(doc, 0, ["x"])
        base = f"/v1/documents/{doc}"
        assert (await api.call("GET", f"{base}?at=0"))["at"] == 0
        now = await api.call("GET", base)
        local = now["updated_at"].replace("Z", "+00:00")
        asked = {local: now["updated_at"],
                 local.removesuffix("+00:00"): now["updated_at"],  # naive is UTC
                 "2100-01-01T01:00:00+01:00": "2100-01-01T00:00:00.000000Z"}
        for at, normal in asked.items():
            got = await api.call("GET", f"{base}?at={quote(at)}")
            assert (got["at"], got["version"]) == (normal, 1), at


async def test_versions_past_the_current_one_are_bad_version(store_config: StoreConfig) -> None:
    """Time travel, blame and diff answer 400 bad_version alike; a malformed one is
    bad_request."""
    async with gateway(store_config) as api:
        doc = await api.create("t", "a")
        await api.edit(doc, 0, ["x"])
        base = f"/v1/documents/{doc}"
        for path in (f"{base}?at=2", f"{base}/blame?at=2", f"{base}/diff?to=2",
                     f"{base}/diff?from=2"):
            body = await api.call("GET", path, status=400)
            assert body["error"]["code"] == "bad_version", path
        for path in (f"{base}/blame?at=-1", f"{base}/diff?to=x", f"{base}/diff?from=1&to=0"):
            body = await api.call("GET", path, status=400)
            assert body["error"]["code"] == "bad_request", path


async def test_the_warm_up_logs_what_it_warmed(
    store_config: StoreConfig, caplog: pytest.LogCaptureFixture
) -> None:
    """The start-up log counts the dashboards and documents actually warmed (none here)."""
    caplog.set_level(logging.INFO, logger="gateway.readmodels")
    async with gateway(store_config):
        for _ in range(250):
            warmed = [r.getMessage() for r in caplog.records if "warmed" in r.getMessage()]
            if warmed:
                break
            await asyncio.sleep(0.02)
    assert warmed == ["warmed 0 dashboards and 0 documents"]
