"""The read side over HTTP: lists and cursors, bulk, history, diff, blame, time travel,
context items, analytics and the cache, on SQLite and Postgres."""

from __future__ import annotations

import asyncio
import random
from collections.abc import AsyncIterator
from datetime import UTC, datetime, timedelta
from typing import Any
from urllib.parse import quote

import pytest
from aiohttp import web
from aiohttp.test_utils import TestClient, TestServer

from domain import ot
from gateway.app import Services, create_app
from gateway.readmodels import Extension, encode_cursor, time_travel
from gateway.store import Store, StoreConfig
from projections.sql import iso
from tests.readside import SECRET, Api, gateway

TIME_TRAVEL = "/test/time-travel/{id}"
"""Until ``gateway.http.get_document`` hands ``?at=`` to ``time_travel``, tests mount it here."""


def _mount_time_travel(app: web.Application) -> None:
    app.router.add_get(TIME_TRAVEL, time_travel)


@pytest.fixture
async def api(store_config: StoreConfig) -> AsyncIterator[Api]:
    """A gateway with the read side mounted and projections running in process."""
    async with gateway(store_config, more=[_mount_time_travel]) as client:
        yield client


async def _walk(api: Api, order: str, limit: int, between: Any = None) -> list[str]:
    seen: list[str] = []
    cursor: str | None = None
    while True:
        q = f"/v1/documents?order={order}&limit={limit}" + (f"&cursor={cursor}" if cursor else "")
        page = await api.call("GET", q)
        seen.extend(item["id"] for item in page["items"])
        cursor = page["next_cursor"]
        if cursor is None:
            return seen
        if between is not None:
            await between()


# -- lists ----------------------------------------------------------------------------------


async def test_list_is_newest_first_readable_only_and_filtered_by_title(api: Api) -> None:
    """The list holds the caller's documents, newest first; q filters titles literally."""
    ids = [await api.create(f"Report {i}") for i in range(3)]
    other = await api.create("Secret plan", user="eve")
    page = await api.call("GET", "/v1/documents")
    assert [i["id"] for i in page["items"]] == ids[::-1]
    assert page["next_cursor"] is None
    assert page["items"][0]["role"] == "owner" and page["items"][0]["version"] == 0
    assert [i["id"] for i in (await api.call("GET", "/v1/documents?q=PORT 1"))["items"]] == [
        ids[1]]
    assert (await api.call("GET", "/v1/documents?q=%25"))["items"] == []
    assert [i["id"] for i in (await api.call("GET", "/v1/documents", "eve"))["items"]] == [other]
    await api.call("POST", f"/v1/documents/{other}/members", "eve", 201,
                   json={"user": "ann", "role": "viewer"})
    page = await api.call("GET", "/v1/documents")
    assert page["items"][0]["id"] == other and page["items"][0]["role"] == "viewer"


async def test_bad_list_queries_get_bad_request(api: Api) -> None:
    """Unknown orders, out-of-range limits and foreign cursors are 400 bad_request."""
    for q in ("order=title", "limit=0", "limit=501", "cursor=nope", "limit=x", "limit=1_0",
              "limit=%2B5", "limit=%D9%A3"):
        body = await api.call("GET", f"/v1/documents?{q}", status=400)
        assert body["error"]["code"] == "bad_request"
    await api.create("a")
    await api.create("b")
    page = await api.call("GET", "/v1/documents?order=updated&limit=1")
    body = await api.call("GET", f"/v1/documents?order=created&cursor={page['next_cursor']}",
                          status=400)
    assert body["error"]["code"] == "bad_request"


async def test_a_cursor_pages_only_the_list_that_made_it(api: Api) -> None:
    """A list cursor works only with the order and ``q`` that made it, a history cursor only
    on its document; any other is 400 bad_request (another ``q`` paged a mix of both
    filters, another document an empty page)."""
    for i in range(3):
        await api.create(f"seed {i}")
        await api.create(f"new {i}")
    seed = (await api.call("GET", "/v1/documents?q=seed&limit=1"))["next_cursor"]
    page = await api.call("GET", f"/v1/documents?q=seed&limit=1&cursor={seed}")
    assert [i["title"] for i in page["items"]] == ["seed 1"]
    plain = (await api.call("GET", "/v1/documents?limit=1"))["next_cursor"]
    assert (await api.call("GET", f"/v1/documents?limit=1&cursor={plain}"))["items"]
    for query in (f"cursor={seed}", f"cursor={seed}&q=new", f"cursor={seed}&q=seed&order=updated",
                  f"cursor={plain}&q=seed", f"cursor={plain}&q=new"):
        body = await api.call("GET", f"/v1/documents?limit=1&{query}", status=400)
        assert body["error"]["code"] == "bad_request", query
    first, other = await api.create("first", ""), await api.create("other", "")
    for doc in (first, other):
        await api.edit(doc, await api.edit(doc, 0, ["x"]), ["y"])
    cursor = (await api.call("GET", f"/v1/documents/{first}/history?limit=1"))["next_cursor"]
    page = await api.call("GET", f"/v1/documents/{first}/history?limit=1&cursor={cursor}")
    assert [r["action"] for r in page["items"]] == ["edited"]
    body = await api.call("GET", f"/v1/documents/{other}/history?cursor={cursor}", status=400)
    assert body["error"]["code"] == "bad_request"


async def test_created_walk_visits_every_document_exactly_once_during_writes(api: Api) -> None:
    """order=created: each document that existed at the start is visited exactly once."""
    start = [await api.create(f"d{i}", "x") for i in range(23)]
    rng = random.Random(5)
    created: list[str] = []
    versions = dict.fromkeys(start, 0)

    async def churn() -> None:
        async def one_edit(doc: str) -> None:
            versions[doc] = await api.edit(doc, versions[doc], ["e"])

        new = [api.create(f"new{len(created)}-{k}") for k in range(3)]
        edits = [one_edit(d) for d in rng.sample(start, 4)]
        results = await asyncio.gather(*new, *edits)
        created.extend(r for r in results[:3] if isinstance(r, str))

    seen = await _walk(api, "created", 4, churn)
    assert len(seen) == len(set(seen))
    assert set(start) <= set(seen)
    assert not set(created) & set(seen)


async def test_updated_walk_never_shows_a_document_twice(api: Api) -> None:
    """order=updated: documents edited during the walk move up and are not shown again."""
    docs = [await api.create(f"d{i}", "x") for i in range(15)]
    versions = dict.fromkeys(docs, 0)
    rng = random.Random(9)

    async def churn() -> None:
        for d in rng.sample(docs, 5):
            versions[d] = await api.edit(d, versions[d], ["u"])

    seen = await _walk(api, "updated", 3, churn)
    assert len(seen) == len(set(seen))
    quiet = await _walk(api, "updated", 4)
    assert sorted(quiet) == sorted(docs) and len(quiet) == len(docs)


async def test_bulk_creates_many_documents_in_one_request(api: Api) -> None:
    """Up to 1,000 documents in one request; more is 413; a bad title rejects them all."""
    specs = [{"title": f"bulk {i}", "text": "t" * (i % 3)} for i in range(1000)]
    out = await api.call("POST", "/v1/documents:bulk", status=201, json={"documents": specs})
    assert len(out["items"]) == 1000
    listed = await _walk(api, "created", 500)
    assert set(listed) == {i["id"] for i in out["items"]}
    body = await api.call("POST", "/v1/documents:bulk", status=413,
                          json={"documents": [{"title": "x"}] * 1001})
    assert body["error"]["code"] == "too_large"
    await api.call("POST", "/v1/documents:bulk", status=400,
                   json={"documents": [{"title": "ok"}, {"title": 5}]})
    assert len(await _walk(api, "created", 500)) == 1000


async def test_batch_get_returns_readable_documents_and_names_the_rest(api: Api) -> None:
    """batch-get answers each readable id like GET does and lists the others as missing."""
    mine = await api.create("mine", "hello")
    theirs = await api.create("theirs", user="eve")
    ids = [mine, theirs, "not-a-uuid", "00000000-0000-0000-0000-000000000000"]
    out = await api.call("POST", "/v1/documents:batch-get", json={"ids": ids})
    assert [d["id"] for d in out["items"]] == [mine]
    assert out["items"][0] == await api.call("GET", f"/v1/documents/{mine}")
    assert out["missing"] == ids[1:]
    await api.call("POST", "/v1/documents:batch-get", status=413, json={"ids": [mine] * 101})


async def test_batch_get_takes_any_spelling_of_an_id_once(api: Api) -> None:
    """Other spellings of a UUID name the same document: it comes once, and is not missing
    (it was listed in both, and twice in items for two spellings)."""
    mine = await api.create("mine", "hello")
    spellings = [mine.upper(), mine.replace("-", ""), f"{{{mine}}}", f"urn:uuid:{mine}", mine]
    out = await api.call("POST", "/v1/documents:batch-get", json={"ids": spellings})
    assert [d["id"] for d in out["items"]] == [mine]
    assert out["missing"] == []


async def test_a_path_takes_any_spelling_of_an_id(api: Api) -> None:
    """Every spelling of a document's UUID names it in a path, braces too (aiohttp's default
    pattern for a path part refuses them), on the gateway's routes and the read side's."""
    mine = await api.create("mine", "hello")
    want = await api.call("GET", f"/v1/documents/{mine}")
    for alt in (mine.upper(), mine.replace("-", ""), f"{{{mine}}}", f"%7B{mine}%7D",
                f"urn:uuid:{mine}"):
        assert await api.call("GET", f"/v1/documents/{alt}") == want, alt
        members = await api.call("GET", f"/v1/documents/{alt}/members")
        assert members["members"] == [{"user": "ann", "role": "owner"}], alt
        history = await api.call("GET", f"/v1/documents/{alt}/history")
        assert history == await api.call("GET", f"/v1/documents/{mine}/history"), alt


async def test_a_path_or_batch_id_in_no_documented_spelling_is_not_found(api: Api) -> None:
    """Python's UUID() also takes one brace, doubled braces, ``uuid:``/``urn:`` or a hyphen
    anywhere; none of those is a spelling protocol.md lists: 404, and missing in a batch."""
    mine = await api.create("mine", "hello")
    hexes = mine.replace("-", "")
    bad = [f"{{{mine}", f"{mine}}}", f"{{{{{mine}}}}}", f"uuid:{mine}", f"urn:{mine}",
           f"-{hexes}-", "-".join(hexes), f"{hexes[:8]}-{hexes[8:]}", f"urn:uuid:{{{mine}}}"]
    for alt in bad:
        await api.call("GET", f"/v1/documents/{quote(alt, safe='')}", status=404)
        await api.call("GET", f"/v1/documents/{quote(alt, safe='')}/history", status=404)
    out = await api.call("POST", "/v1/documents:batch-get", json={"ids": bad})
    assert out == {"items": [], "missing": bad}


async def test_a_member_with_braces_or_a_slash_in_the_name_can_be_removed(api: Api) -> None:
    """``DELETE .../members/{user}`` took no name with braces (aiohttp's default pattern for a
    path part refuses them): such a member could be added, but not removed."""
    doc = await api.create("m", "")
    for user in ("x{y}", "a/b", "{z}"):
        await api.call("POST", f"/v1/documents/{doc}/members", status=201,
                       json={"user": user, "role": "viewer"})
        await api.call("DELETE", f"/v1/documents/{doc}/members/{quote(user, safe='')}",
                       status=204)
    members = await api.call("GET", f"/v1/documents/{doc}/members")
    assert members["members"] == [{"user": "ann", "role": "owner"}]


async def test_projections_report_head_position_and_lag(api: Api) -> None:
    """After reads caught up, every model is at the head with no lag."""
    doc = await api.create("p", "abc")
    await api.edit(doc, 0, ["x"])
    await api.call("GET", "/v1/documents")
    out = await api.call("GET", "/v1/projections")
    assert out["head"] == 2
    assert {p["name"] for p in out["projections"]} == {"documents", "context", "audit",
                                                       "analytics"}
    for p in out["projections"]:
        assert (p["position"], p["lag"], p["lag_seconds"]) == (2, 0, 0.0)


async def test_a_killed_replays_leftovers_are_interrupted_not_rebuilding(
    api: Api, store_config: StoreConfig
) -> None:
    """A replay killed mid-rebuild left its tracking rows, reported as "rebuilding" at a
    frozen position for good; they are a rebuild only while a replay holds the lock."""
    from gateway.readmodels import StoreSource, read_db_config
    from projections.db import open_db
    from projections.registry import MODELS
    from projections.replay import LOCK, NEXT
    from projections.runner import Runner

    await api.create("p", "abc")
    await api.call("GET", "/v1/documents")
    store = Store(store_config)
    db = open_db(read_db_config(store_config))
    try:
        Runner(db, StoreSource(store), MODELS, suffix=NEXT).setup(fresh=True)  # what it left
        out = await api.call("GET", "/v1/projections")
        assert "rebuilding" not in out
        assert {r["name"] for r in out["interrupted"]} == {m.name for m in MODELS}
        with db.exclusive(LOCK):
            out = await api.call("GET", "/v1/projections")
        assert "interrupted" not in out
        assert [r["position"] for r in out["rebuilding"]] == [0] * len(MODELS)
    finally:
        db.close()
        store.close()


# -- one document's past --------------------------------------------------------------------


async def _random_history(api: Api) -> tuple[str, list[str], list[list[tuple[str, str, int]]]]:
    """A document edited by two users; its text and per-character authorship per version."""
    doc = await api.create("hist", "héllo wörld")
    await api.call("POST", f"/v1/documents/{doc}/members", json={"user": "bob", "role": "editor"},
                   status=201)
    rng = random.Random(11)
    texts = ["héllo wörld"]
    chars = [[(c, "ann", 0) for c in texts[0]]]
    for v in range(1, 25):
        user = rng.choice(["ann", "bob"])
        text, cur = texts[-1], list(chars[-1])
        pos = rng.randrange(len(text) + 1)
        if text and rng.random() < 0.4 and pos < len(text):
            n = rng.randint(1, len(text) - pos)
            op: list[Any] = ([pos] if pos else []) + [{"d": n}]
            del cur[pos:pos + n]
        else:
            ins = rng.choice(["a", "ß😀", "new ", "\n"])
            op = ([pos] if pos else []) + [ins]
            cur[pos:pos] = [(c, user, v) for c in ins]
        assert await api.edit(doc, v - 1, op, user) == v
        texts.append(ot.apply(text, op))
        chars.append(cur)
        assert "".join(c for c, _, _ in cur) == texts[-1]
    return doc, texts, chars


async def test_time_travel_blame_and_diff_agree_with_applying_ops_by_hand(api: Api) -> None:
    """Every version's text, the blame of the last, and diffs match a hand-kept history."""
    doc, texts, chars = await _random_history(api)
    for v, text in enumerate(texts):
        got = await api.call("GET", f"{TIME_TRAVEL.format(id=doc)}?at={v}")
        assert (got["version"], got["text"]) == (v, text)
    blame = await api.call("GET", f"/v1/documents/{doc}/blame")
    expanded = [(c, s["by"], s["v"]) for s in blame["spans"] for c in s["text"]]
    assert expanded == chars[-1]
    old = await api.call("GET", f"/v1/documents/{doc}/blame?at=7")
    assert [(c, s["by"], s["v"]) for s in old["spans"] for c in s["text"]] == chars[7]
    for a, b in [(0, 24), (3, 9), (10, 10), (23, 24)]:
        d = await api.call("GET", f"/v1/documents/{doc}/diff?from={a}&to={b}")
        assert ot.apply(texts[a], d["op"]) == texts[b]
        assert "".join(s["text"] for s in d["diff"] if s["op"] != "delete") == texts[b]
        assert "".join(s["text"] for s in d["diff"] if s["op"] != "insert") == texts[a]
    await api.call("GET", f"/v1/documents/{doc}/diff?from=5&to=2", status=400)
    await api.call("GET", f"/v1/documents/{doc}/diff?from=0&to=99", status=400)


async def test_time_travel_by_time_and_its_errors(api: Api) -> None:
    """?at=<ISO time> gives the version current then; before creation is 404."""
    doc = await api.create("t", "a")
    for v in range(1, 5):
        await api.edit(doc, v - 1, ["x"])
    ops = (await api.call("GET", f"/v1/documents/{doc}/ops?from=0"))["ops"]
    for op in ops:
        got = await api.call("GET", f"{TIME_TRAVEL.format(id=doc)}?at={op['at']}")
        assert got["version"] == op["v"]
    await api.call("GET", f"{TIME_TRAVEL.format(id=doc)}?at=2001-01-01T00:00:00Z", status=404)
    body = await api.call("GET", f"{TIME_TRAVEL.format(id=doc)}?at=9", status=400)
    assert body["error"]["code"] == "bad_version"
    await api.call("GET", f"{TIME_TRAVEL.format(id=doc)}?at=yesterday", status=400)
    await api.call("GET", f"{TIME_TRAVEL.format(id=doc)}?at=1", user="eve", status=404)


async def test_instants_whose_utc_leaves_years_1_to_9999_are_bad_request(api: Api) -> None:
    """An ``at``, ``from`` or ``to`` with an offset that takes it past 9999 or before year 1
    in UTC is 400 bad_request (was 500: the answer's ``at`` could not be formatted)."""
    doc = await api.create("t", "a")
    late, early = "9999-12-31T23:59:59-01:00", "0001-01-01T00:30:00%2B01:00"
    for path in (
        f"/v1/documents/{doc}?at={late}",
        f"/v1/documents/{doc}?at=9999-12-31T23:45:00-00:30",
        f"/v1/documents/{doc}?at={early}",
        f"/v1/analytics/overview?from=9999-12-31T22:00:00-01:00&to={late}",
        f"/v1/analytics/overview?bucket=day&from={early}",
        f"/v1/analytics/documents/{doc}?to={late}",
        f"/v1/analytics/top-documents?from={early}&to=0001-01-02T00:00:00Z",
    ):
        body = await api.call("GET", path, status=400)
        assert body["error"]["code"] == "bad_request", path
    got = await api.call("GET", f"/v1/documents/{doc}?at=9999-12-31T23:59:59%2B01:00")
    assert (got["version"], got["at"]) == (0, "9999-12-31T22:59:59.000000Z")
    got = await api.call("GET", f"/v1/documents/{doc}?at=9999-12-31T23:59:59.999999Z")
    assert got["at"] == "9999-12-31T23:59:59.999999Z"


async def test_history_pages_through_audit_rows_newest_first(api: Api) -> None:
    """History lists one row per event, newest first, over cursor pages; strangers get 404."""
    doc = await api.create("h", "abc")
    await api.edit(doc, 0, ["xy", {"d": 1}])
    await api.call("PATCH", f"/v1/documents/{doc}", json={"title": "h2"})
    await api.call("POST", f"/v1/documents/{doc}/members", json={"user": "bob", "role": "viewer"},
                   status=201)
    rows: list[dict[str, Any]] = []
    cursor = ""
    while True:
        page = await api.call("GET", f"/v1/documents/{doc}/history?limit=2&cursor={cursor}")
        rows.extend(page["items"])
        if page["next_cursor"] is None:
            break
        cursor = page["next_cursor"]
    assert [r["action"] for r in rows] == ["member_added", "renamed", "edited", "created"]
    assert rows[1]["summary"] == {"from": "h", "to": "h2"}
    assert rows[2]["summary"] == {"chars_inserted": 2, "chars_deleted": 1}
    assert [r["version"] for r in rows] == [1, 1, 1, 0]
    assert await api.call("GET", f"/v1/documents/{doc}/history", "bob") is not None
    await api.call("GET", f"/v1/documents/{doc}/history", "eve", status=404)


# -- context items --------------------------------------------------------------------------


async def test_context_items_crud_in_position_order(api: Api) -> None:
    """Items are added, listed by position, updated, removed; viewers may only read."""
    doc = await api.create("ctx")
    await api.call("POST", f"/v1/documents/{doc}/members", json={"user": "vi", "role": "viewer"},
                   status=201)
    base = f"/v1/documents/{doc}/context"
    a = await api.call("POST", base, status=201, json={"kind": "note", "title": "A", "body": "1"})
    b = await api.call("POST", base, status=201,
                       json={"kind": "reference", "title": "B", "body": "2", "position": 0})
    assert (a["position"], b["position"]) == (0, 0)
    listed = await api.call("GET", base, "vi")
    assert [i["id"] for i in listed["items"]] == [a["id"], b["id"]]
    up = await api.call("PATCH", f"{base}/{a['id']}", json={"position": 5, "body": "one"})
    assert (up["position"], up["body"], up["title"]) == (5, "one", "A")
    assert [i["id"] for i in (await api.call("GET", base))["items"]] == [b["id"], a["id"]]
    body = await api.call("POST", base, "vi", 403, json={"kind": "note", "title": "x"})
    assert body["error"]["code"] == "forbidden"
    await api.call("POST", base, status=400, json={"kind": "poem", "title": "x"})
    await api.call("PATCH", f"{base}/{a['id']}", status=400, json={"title": None})
    await api.call("PATCH", f"{base}/nope", status=404, json={"title": "x"})
    await api.call("DELETE", f"{base}/{b['id']}", status=204)
    assert [i["id"] for i in (await api.call("GET", base))["items"]] == [a["id"]]
    await api.call("GET", base, "eve", status=404)


# -- analytics and the cache ----------------------------------------------------------------


async def test_analytics_totals_equal_the_edits_and_count_only_readable(api: Api) -> None:
    """Overview, per-document and top-documents figures equal what the test did."""
    d1 = await api.create("one", "")
    d2 = await api.create("two", "")
    await api.call("POST", f"/v1/documents/{d1}/members", json={"user": "bob", "role": "editor"},
                   status=201)
    v1 = v2 = 0
    for k in range(12):
        v1 = await api.edit(d1, v1, ["ab"], ("ann", "bob")[k % 2])
    for _ in range(5):
        v2 = await api.edit(d2, v2, ["xyz"])
    v2 = await api.edit(d2, v2, [{"d": 4}])
    over = await api.call("GET", "/v1/analytics/overview?bucket=hour")
    assert over["bucket"] == "hour" and len(over["series"]) >= 24
    totals = {f: sum(s[f] for s in over["series"])
              for f in ("edits", "chars_inserted", "chars_deleted", "documents_created")}
    assert totals == {"edits": 18, "chars_inserted": 39, "chars_deleted": 4,
                      "documents_created": 2}
    assert max(s["active_users"] for s in over["series"]) == 2
    day = await api.call("GET", "/v1/analytics/overview?bucket=day")
    assert sum(s["edits"] for s in day["series"]) == 18
    one = await api.call("GET", f"/v1/analytics/documents/{d1}")
    assert one["document"] == d1 and sum(s["edits"] for s in one["series"]) == 12
    top = await api.call("GET", "/v1/analytics/top-documents?limit=5")
    assert [(i["id"], i["edits"], i["editors"]) for i in top["items"]] == [(d1, 12, 2),
                                                                         (d2, 6, 1)]
    bob = await api.call("GET", "/v1/analytics/overview", "bob")
    assert sum(s["edits"] for s in bob["series"]) == 12
    await api.call("GET", f"/v1/analytics/documents/{d2}", "bob", status=404)
    await api.call("GET", "/v1/analytics/overview?bucket=week", status=400)
    await api.call("GET", "/v1/analytics/overview?from=2020-01-01T00:00:00Z", status=400)


async def test_analytics_from_must_be_before_to_as_given(api: Api) -> None:
    """On every analytics route ``from`` must be before ``to``, as given (``to`` defaults to
    now): an inversion inside one bucket was 200 with that bucket, while ``from == to`` and
    larger inversions were 400 already."""
    doc = await api.create("t")
    hour = datetime(2026, 5, 1, 10, tzinfo=UTC)

    def at(minutes: int) -> str:
        return iso(hour + timedelta(minutes=minutes))

    for route in ("/v1/analytics/overview", f"/v1/analytics/documents/{doc}",
                  "/v1/analytics/top-documents"):
        for start, end in ((20, 10), (10, 10), (60, 0), (0, -1)):
            body = await api.call("GET", f"{route}?from={at(start)}&to={at(end)}", status=400)
            assert body["error"] == {"code": "bad_request",
                                     "message": "from must be before to"}, (route, start, end)
        got = await api.call("GET", f"{route}?from={at(10)}&to={at(20)}")
        assert (got["from"], got["to"]) == (at(0), at(60))
        soon = iso(datetime.now(UTC) + timedelta(minutes=1))
        await api.call("GET", f"{route}?from={soon}", status=400)


async def test_cached_analytics_are_never_stale_after_a_write(api: Api) -> None:
    """A cached overview is replaced as soon as an edit reaches the read models."""
    doc = await api.create("c", "")
    v = await api.edit(doc, 0, ["a"])
    first = await api.call("GET", "/v1/analytics/overview")
    again = await api.call("GET", "/v1/analytics/overview")
    assert first == again
    stats = (await api.call("GET", "/v1/projections"))["cache"]
    assert stats["hits"] >= 1
    for _ in range(3):
        v = await api.edit(doc, v, ["b"])
        now = await api.call("GET", "/v1/analytics/overview")
        assert sum(s["edits"] for s in now["series"]) == v
    blame = [await api.call("GET", f"/v1/documents/{doc}/blame") for _ in range(2)]
    assert blame[0] == blame[1]
    assert (await api.call("GET", "/v1/projections"))["cache"]["stale"] >= 1


async def test_reads_wait_for_a_runner_in_another_process(store_config: StoreConfig) -> None:
    """With run_projections=False, reads wait on the tracking rows another runner moves."""
    import threading

    from gateway.readmodels import StoreSource, read_db_config
    from projections.db import open_db
    from projections.registry import MODELS
    from projections.runner import Runner

    store = Store(store_config)
    services = Services(store=store, secret=SECRET,
                        extensions=[Extension(run_projections=False)])
    client = TestClient(TestServer(create_app(services), host="127.0.0.1", port=0))
    db = open_db(read_db_config(store_config))
    runner = Runner(db, StoreSource(store), MODELS)
    runner.setup()
    stop = threading.Event()
    thread = threading.Thread(target=runner.run_until, args=(stop,), kwargs={"poll": 0.01})
    thread.start()
    await client.start_server()
    try:
        api = Api(client)
        doc = await api.create("elsewhere", "abc")
        await api.edit(doc, 0, ["x"])
        page = await api.call("GET", "/v1/documents")
        assert [(i["id"], i["version"]) for i in page["items"]] == [(doc, 1)]
        status = await api.call("GET", "/v1/projections")
        assert {p["position"] for p in status["projections"]} == {status["head"]}
        for v in (2, 3):
            await api.edit(doc, v - 1, ["y"])
            over = await api.call("GET", "/v1/analytics/overview")
            assert sum(s["edits"] for s in over["series"]) == v
    finally:
        stop.set()  # before the app closes the store the runner reads
        await asyncio.get_running_loop().run_in_executor(None, thread.join)
        await client.close()
        db.close()


async def test_missing_read_models_are_unavailable_not_internal(tmp_path: Any) -> None:
    """Before any runner made the tables, reads answer 503 unavailable."""
    services = Services(store=Store(StoreConfig(data_dir=tmp_path)), secret=SECRET,
                        extensions=[Extension(run_projections=False)])
    client = TestClient(TestServer(create_app(services), host="127.0.0.1", port=0))
    await client.start_server()
    try:
        body = await Api(client).call("GET", "/v1/documents", status=503)
        assert body["error"]["code"] == "unavailable"
    finally:
        await client.close()


async def test_time_travel_accepts_offsets_and_unescaped_plus(api: Api) -> None:
    """An ISO time with an offset works, even with its '+' left unescaped in the URL."""
    doc = await api.create("t", "a")
    await api.edit(doc, 0, ["x"])
    ops = (await api.call("GET", f"/v1/documents/{doc}/ops?from=0"))["ops"]
    at = ops[0]["at"].replace("Z", "+00:00")
    got = await api.call("GET", f"{TIME_TRAVEL.format(id=doc)}?at={at}")
    assert got["version"] == 1


async def test_time_travel_to_the_current_version_sees_a_later_rename(api: Api) -> None:
    """?at=V includes renames made before edit V+1: it is cached only once that edit exists."""
    doc = await api.create("before", "a")
    path = f"/v1/documents/{doc}"
    assert (await api.call("GET", f"{path}?at=0"))["title"] == "before"
    await api.call("PATCH", path, json={"title": "after"})
    assert (await api.call("GET", f"{path}?at=0"))["title"] == "after"
    await api.edit(doc, 0, ["x"])
    assert (await api.call("GET", f"{path}?at=0"))["title"] == "after"
    await api.call("PATCH", path, json={"title": "later"})
    assert (await api.call("GET", f"{path}?at=0"))["title"] == "after"
    assert (await api.call("GET", f"{path}?at=1"))["title"] == "later"


async def test_a_gateway_behind_reads_the_store_before_404_or_bad_version(
    store_config: StoreConfig,
) -> None:
    """A member added, or a version committed, by another gateway whose publish has not
    arrived (here: never; the two have no hub in common) is found in the store."""
    quiet = {"run_projections": False, "warm": False}
    async with gateway(store_config, **quiet) as a, gateway(store_config, **quiet) as b:
        doc = await a.create("T", "abc")
        path = f"/v1/documents/{doc}"
        assert (await b.call("GET", path))["version"] == 0  # b holds its copy from now on
        await a.call("POST", f"{path}/members", status=201,
                     json={"user": "bob", "role": "viewer"})
        assert (await b.call("GET", path, "bob"))["text"] == "abc"
        v = await a.edit(doc, 0, ["x"])
        assert (await b.call("GET", f"{path}?at={v}", "bob"))["text"] == "xabc"
        v = await a.edit(doc, v, ["y"])
        assert (await b.call("GET", f"{path}/blame?at={v}", "bob"))["version"] == v
        v = await a.edit(doc, v, ["z"])
        assert (await b.call("GET", f"{path}/diff?from=0&to={v}", "bob"))["to"] == v
        v = await a.edit(doc, v, ["w"])
        got = await b.call("POST", "/v1/documents:batch-get", "bob", json={"ids": [doc]})
        assert got["missing"] == []
        body = await b.call("GET", f"{path}?at={v + 1}", "bob", status=400)
        assert body["error"]["code"] == "bad_version"
        await b.call("GET", path, "eve", status=404)


async def test_versions_too_long_to_parse_are_bad_version(api: Api) -> None:
    """A version of thousands of digits (past what int() parses) is past the current one."""
    doc = await api.create("t", "a")
    huge = "9" * 5000
    for query in (f"?at={huge}", f"/blame?at={huge}", f"/diff?from=0&to={huge}"):
        body = await api.call("GET", f"/v1/documents/{doc}{query}", status=400)
        assert body["error"]["code"] == "bad_version"


async def test_queries_at_the_edges_of_their_types_get_bad_request(api: Api) -> None:
    """Times whose whole buckets leave years 1..9999, list keys past 2**63, U+0000 in q and
    a context kind that is not a string: 400 bad_request, never 500 or 503."""
    doc = await api.create("t", "a")
    cursor = encode_cursor("created", 1 << 63, "")
    for path in (
        "/v1/analytics/overview?bucket=hour&to=9999-12-31T23:30:00Z",
        "/v1/analytics/overview?bucket=day&to=9999-12-31T12:00:00Z",
        "/v1/analytics/overview?bucket=hour&to=0001-01-01T05:00:00Z",
        f"/v1/analytics/documents/{doc}?bucket=day&to=9999-12-31T12:00:00Z",
        "/v1/analytics/top-documents?to=9999-12-31T23:30:00Z",
        f"/v1/documents?cursor={cursor}",
        "/v1/documents?q=%00",
        "/v1/documents?q=a%00b",
        f"/v1/documents/{doc}?at=%D9%A3",  # ARABIC-INDIC DIGIT THREE: a digit, not ASCII
        f"/v1/documents/{doc}/blame?at=%D9%A3",
        f"/v1/documents/{doc}/diff?from=0&to=1_0",
    ):
        body = await api.call("GET", path, status=400)
        assert body["error"]["code"] == "bad_request", path
    base = f"/v1/documents/{doc}/context"
    item = await api.call("POST", base, status=201, json={"kind": "note"})
    for kind in (["note"], {"note": 1}):
        await api.call("POST", base, status=400, json={"kind": kind})
        await api.call("PATCH", f"{base}/{item['id']}", status=400, json={"kind": kind})
