"""The cached HTTP read path: rendered document bodies with ETags and 304, the token cache,
and the shared head probe; never stale after an acknowledged write, auth on every request."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator
from typing import Any
from uuid import UUID

import pytest
from aiohttp.test_utils import TestClient

from gateway.auth import BadToken, TokenCache, sign_token
from gateway.store import StoreConfig
from projections.cache import Bounded, HeadProbe, PageCache
from tests.readside import SECRET, gateway


class Client:
    """Requests as one user or another, returning status, headers and the JSON body."""

    def __init__(self, client: TestClient[Any, Any]) -> None:
        self.client = client

    async def send(self, method: str, path: str, user: str | None = "ann",
                   headers: dict[str, str] | None = None, **kw: Any) -> tuple[int, Any, Any]:
        """``(status, headers, json or None)`` of one request."""
        h = dict(headers or {})
        if user is not None:
            h["Authorization"] = f"Bearer {sign_token(SECRET, user)}"
        r = await self.client.request(method, path, headers=h, **kw)
        text = await r.text()
        return r.status, r.headers, (await r.json() if text else None)

    async def ok(self, method: str, path: str, user: str = "ann", status: int = 200,
                 **kw: Any) -> Any:
        """The JSON body of a request that must answer ``status``."""
        got, _, body = await self.send(method, path, user, **kw)
        assert got == status, f"{method} {path} -> {got}: {body}"
        return body


@pytest.fixture
async def http(store_config: StoreConfig) -> AsyncIterator[Client]:
    """A gateway with the read side, on SQLite and on Postgres."""
    async with gateway(store_config) as api:
        yield Client(api.client)


async def test_document_etag_gives_304_until_an_acknowledged_write(http: Client) -> None:
    """The same version keeps its ETag and answers 304; an acked edit or rename changes both."""
    doc = await http.ok("POST", "/v1/documents", json={"title": "t", "text": "ab"}, status=201)
    path = f"/v1/documents/{doc['id']}"
    status, headers, body = await http.send("GET", path)
    assert status == 200 and body["text"] == "ab"
    etag = headers["ETag"]
    assert etag.startswith('"') and etag.endswith('"')
    status, headers, body = await http.send("GET", path, headers={"If-None-Match": etag})
    assert (status, headers["ETag"], body) == (304, etag, None)
    for header in (f'W/{etag}', f'"other", {etag}', "*"):
        assert (await http.send("GET", path, headers={"If-None-Match": header}))[0] == 304
    await http.ok("POST", f"{path}/ops", json={"v": 0, "op": [2, "c"]})
    status, headers, body = await http.send("GET", path, headers={"If-None-Match": etag})
    assert status == 200 and body["text"] == "abc" and body["version"] == 1
    assert headers["ETag"] != etag
    etag = headers["ETag"]
    await http.ok("PATCH", path, json={"title": "renamed"})  # the version stays 1
    status, headers, body = await http.send("GET", path, headers={"If-None-Match": etag})
    assert status == 200 and body["title"] == "renamed" and headers["ETag"] != etag


async def test_cached_body_still_checks_the_caller_every_time(http: Client) -> None:
    """A rendered body is served only to members: strangers and removed members get 404."""
    doc = await http.ok("POST", "/v1/documents", json={"title": "t", "text": "x"}, status=201)
    path = f"/v1/documents/{doc['id']}"
    await http.ok("POST", f"{path}/members", json={"user": "bob", "role": "viewer"}, status=201)
    assert (await http.ok("GET", path))["text"] == "x"  # rendered and kept
    assert (await http.ok("GET", path, "bob"))["text"] == "x"
    body = await http.ok("GET", path, "eve", status=404)
    assert body["error"]["code"] == "not_found"
    await http.ok("DELETE", f"{path}/members/bob", status=204)
    await http.ok("GET", path, "bob", status=404)
    status, headers, body = await http.send("GET", path, user=None)
    assert status == 401 and body["error"]["code"] == "unauthorized"
    assert headers["WWW-Authenticate"] == 'Bearer realm="coscribe"'  # RFC 6750 section 3
    expired = sign_token(SECRET, "ann", ttl=-1)
    status, headers, body = await http.send(
        "GET", path, user=None, headers={"Authorization": f"Bearer {expired}"}
    )
    assert status == 401 and body["error"]["message"] == "token expired"
    assert headers["WWW-Authenticate"] == 'Bearer realm="coscribe", error="invalid_token"'
    await http.ok("GET", "/v1/documents/not-a-uuid", status=404)


async def test_document_list_pages_have_etags_and_show_acked_writes(http: Client) -> None:
    """A list page is served again (304 with its ETag) until a write; then it shows the write."""
    doc = await http.ok("POST", "/v1/documents", json={"title": "one", "text": ""}, status=201)
    status, headers, page = await http.send("GET", "/v1/documents?limit=20")
    assert status == 200 and [i["title"] for i in page["items"]] == ["one"]
    etag = headers["ETag"]
    status, _, _ = await http.send("GET", "/v1/documents?limit=20",
                                   headers={"If-None-Match": etag})
    assert status == 304
    await http.ok("POST", f"/v1/documents/{doc['id']}/ops", json={"v": 0, "op": ["z"]})
    status, headers, page = await http.send("GET", "/v1/documents?limit=20",
                                            headers={"If-None-Match": etag})
    assert status == 200 and page["items"][0]["version"] == 1 and headers["ETag"] != etag
    await http.ok("POST", "/v1/documents", json={"title": "two", "text": ""}, status=201)
    page = await http.ok("GET", "/v1/documents?limit=20")
    assert [i["title"] for i in page["items"]] == ["two", "one"]
    assert (await http.ok("GET", "/v1/documents?limit=20", "bob"))["items"] == []
    pages = (await http.ok("GET", "/v1/projections"))["pages"]
    assert pages["hits"] >= 1 and pages["misses"] >= 3


async def test_dashboard_page_needs_no_token(http: Client) -> None:
    """``/dashboard`` is public; the API next to it is not."""
    page = await http.client.get("/dashboard")
    assert page.status == 200 and "text/html" in page.headers["Content-Type"]
    assert (await http.send("GET", "/v1/documents", user=None))[0] == 401


def test_token_cache_answers_like_verify_token_and_enforces_expiry() -> None:
    """Hits still expire; bad tokens are refused every time; the size stays bounded."""
    cache = TokenCache(SECRET, size=4)
    token = sign_token(SECRET, "ann", ttl=60)
    now = time.time()
    assert cache.verify(token, now) == "ann"
    assert cache.verify(token, now + 30) == "ann"
    with pytest.raises(BadToken, match="token expired"):
        cache.verify(token, now + 61)
    with pytest.raises(BadToken, match="bad token signature"):
        cache.verify(sign_token(b"other", "ann"))
    forever = sign_token(SECRET, "bob")
    assert cache.verify(forever, now + 10 * 365 * 86400) == "bob"
    for i in range(10):
        assert cache.verify(sign_token(SECRET, f"u{i}")) == f"u{i}"
    assert len(cache._users) <= 4


async def test_head_probe_reads_after_each_caller_arrived_and_shares_reads() -> None:
    """A caller never gets a read that began before it; concurrent callers share one read."""
    counter = 0
    began = asyncio.Event()
    gate = asyncio.Event()

    async def probe() -> int:
        seen = counter  # what a query starting now would see
        began.set()
        await gate.wait()
        return seen

    heads = HeadProbe(probe)
    first = asyncio.ensure_future(heads.read())
    await began.wait()  # the first read is in flight, having seen 0
    counter = 5  # a commit after the first read began
    late = [asyncio.ensure_future(heads.read()) for _ in range(10)]
    await asyncio.sleep(0)
    gate.set()
    assert await first == 0
    assert {await f for f in late} == {5}
    assert heads.calls == 2

    async def broken() -> int:
        raise RuntimeError("down")

    failing = HeadProbe(broken)
    results = await asyncio.gather(failing.read(), failing.read(), return_exceptions=True)
    assert all(isinstance(r, RuntimeError) for r in results)


def test_page_cache_serves_a_page_only_while_the_head_has_not_moved() -> None:
    """A page kept at head 7 is valid for requests that read 7 or less, not 8."""
    pages = PageCache(size=2)
    page = pages.put("k", 7, b"{}")
    assert pages.get("k", 7) is page and pages.get("k", 3) is page
    assert pages.get("k", 8) is None
    pages.put("a", 1, b"1")
    pages.put("b", 1, b"2")
    assert len(pages._pages) <= 2


def test_bounded_keeps_to_its_count_and_byte_budget() -> None:
    """The oldest values go first past either limit; a value over 1/16 of the budget is not
    kept; replacing a value frees its bytes."""
    kept: Bounded[str] = Bounded(size=3, max_bytes=1600)
    for k in "abc":
        kept.put(k, k, 100)
    kept.put("d", "d", 100)
    assert [kept.get(k) for k in "abcd"] == [None, "b", "c", "d"] and kept.nbytes == 300
    kept.put("b", "B", 50)
    assert kept.get("b") == "B" and kept.nbytes == 250
    kept.put("huge", "x", 101)
    assert kept.get("huge") is None and len(kept) == 3
    kept.put("c", "gone", 10_000)  # too big to keep: the old value goes too
    assert kept.get("c") is None and kept.nbytes == 150


async def test_a_swept_room_is_rendered_again_and_freed(http: Client) -> None:
    """After the room is dropped, the next read loads a new room; the old one is not kept."""
    import gc
    import weakref

    from gateway import keys

    doc = await http.ok("POST", "/v1/documents", json={"title": "t", "text": "x"}, status=201)
    path = f"/v1/documents/{doc['id']}"
    first = await http.send("GET", path)
    rooms = http.client.server.app[keys.ROOMS]
    old = weakref.ref(rooms.peek(UUID(doc["id"])))
    assert rooms.sweep(idle=-1) == 1
    gc.collect()
    assert old() is None
    again = await http.send("GET", path, headers={"If-None-Match": first[1]["ETag"]})
    assert again[0] == 304 and rooms.peek(UUID(doc["id"])) is not None
