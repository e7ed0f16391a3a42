"""Context items: where an item without a position goes, what writes accept and answer."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

import pytest
from hypothesis import given
from hypothesis import strategies as st

from domain.document import MAX_CONTEXT_POSITION, Document
from gateway.store import StoreConfig
from tests.readside import Api, catch_up, gateway
from tests.strategies import context_positions


def _listed(doc: Document, added: list[str]) -> list[str]:
    """The items in list order: by position, ties in the order they were added."""
    return sorted(doc.context_items,
                  key=lambda i: (doc.context_items[i]["position"], added.index(i)))


@given(st.lists(st.tuples(st.sampled_from(("add", "add at", "move")), context_positions(),
                          st.integers(0, 20)), max_size=20))
def test_an_item_without_a_position_goes_after_every_other(
    steps: list[tuple[str, int, int]],
) -> None:
    """Whatever positions the others have (2**31 included), a new item is listed last."""
    doc = Document.create("T", "", "ann")
    added: list[str] = []
    for command, position, pick in steps:
        if command == "move" and added:
            doc.update_context_item(added[pick % len(added)], "ann", position=position)
        elif command == "add at":
            added.append(doc.add_context_item("note", "", "", "ann", position=position))
        else:
            added.append(doc.add_context_item("note", "", "", "ann"))
            assert _listed(doc, added)[-1] == added[-1]
            assert 0 <= doc.context_items[added[-1]]["position"] <= MAX_CONTEXT_POSITION


@pytest.fixture
async def lagging(store_config: StoreConfig) -> AsyncIterator[Api]:
    """A gateway whose read models nobody keeps up to date (no runner anywhere)."""
    async with gateway(store_config, run_projections=False, warm=False) as api:
        yield api


async def test_context_writes_answer_from_the_committed_item(
    lagging: Api, store_config: StoreConfig
) -> None:
    """POST and PATCH answer at once with the item as the read model shows it later."""
    doc = await lagging.create("ctx")
    await asyncio.to_thread(catch_up, store_config)  # the tables exist, then fall behind
    base = f"/v1/documents/{doc}/context"
    added = await lagging.call("POST", base, status=201,
                               json={"kind": "note", "title": "A", "body": "é😀"})
    assert (added["title"], added["position"], added["created_by"]) == ("A", 0, "ann")
    moved = await lagging.call("PATCH", f"{base}/{added['id']}",
                               json={"title": "B", "position": 7})
    assert (moved["title"], moved["position"], moved["created_at"]) == (
        "B", 7, added["created_at"])
    assert moved["updated_at"] > added["updated_at"]
    other = await lagging.call("POST", base, status=201, json={"kind": "snippet"})
    await asyncio.to_thread(catch_up, store_config)
    listed = await lagging.call("GET", base)
    assert listed["items"] == [moved, other]


def test_an_update_that_changes_nothing_records_no_event() -> None:
    """Values equal to the current ones are no change; the event names only real changes."""
    doc = Document.create("T", "", "ann")
    item = doc.add_context_item("note", "A", "b", "ann", position=3)
    doc.collect_events()
    doc.update_context_item(item, "ann", kind="note", title="A", position=3)
    doc.update_context_item(item, "ann")
    assert doc.collect_events() == []
    doc.update_context_item(item, "ann", title="A", body="c")
    (event,) = doc.collect_events()
    assert isinstance(event, Document.ContextItemUpdated)
    assert (event.kind, event.title, event.body, event.position) == (None, None, "c", None)


async def test_context_bodies_name_unknown_fields_and_default_the_texts(
    lagging: Api, store_config: StoreConfig
) -> None:
    """Unknown fields are 400 naming them; title and body default to ""; a PATCH that
    changes nothing answers 200 with the item and leaves no trace in the history."""
    doc = await lagging.create("ctx")
    base = f"/v1/documents/{doc}/context"
    bad = await lagging.call("POST", base, status=400,
                             json={"kind": "note", "titel": "A", "color": "red"})
    assert bad["error"] == {"code": "bad_request", "message": "unknown fields: color, titel"}
    item = await lagging.call("POST", base, status=201, json={"kind": "note"})
    assert (item["title"], item["body"]) == ("", "")
    path = f"{base}/{item['id']}"
    bad = await lagging.call("PATCH", path, status=400, json={"color": "red"})
    assert bad["error"]["message"] == "unknown fields: color"
    assert await lagging.call("PATCH", path, json={}) == item
    assert await lagging.call("PATCH", path, json={"kind": "note", "title": ""}) == item
    await asyncio.to_thread(catch_up, store_config)
    history = await lagging.call("GET", f"/v1/documents/{doc}/history")
    assert [r["action"] for r in history["items"]] == ["context_added", "created"]
