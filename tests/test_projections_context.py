"""Context items on the Document aggregate: commands, validation, roles and the hash chain."""

from __future__ import annotations

import pytest

from domain.document import CONTEXT_FIELDS, MAX_CONTEXT_BODY_CHARS, Document
from domain.errors import Forbidden, Invalid, NotFound, TooLarge
from gateway.store import Store
from projections.history import verify_chain


def _doc() -> Document:
    doc = Document.create("T", "", "ann")
    doc.add_member("ed", "editor", "ann")
    doc.add_member("vi", "viewer", "ann")
    return doc


def test_items_are_added_updated_and_removed() -> None:
    """Add appends after the last position; update changes only given fields (and who and
    when, in a new dict); remove drops."""
    doc = _doc()
    a = doc.add_context_item("note", "A", "body", "ann")
    b = doc.add_context_item("snippet", "B", "", "ed")
    c = doc.add_context_item("reference", "C", "x", "ann", position=10)
    d = doc.add_context_item("note", "D", "", "ann")
    assert [doc.context_items[i]["position"] for i in (a, b, c, d)] == [0, 1, 10, 11]
    before = dict(doc.context_items)
    doc.update_context_item(a, "ed", body="new")
    item = doc.context_items[a]
    assert {k: item[k] for k in CONTEXT_FIELDS} == {
        "kind": "note", "title": "A", "body": "new", "position": 0}
    assert (item["created_by"], item["updated_by"]) == ("ann", "ed")
    assert item["created_at"] < item["updated_at"]
    assert before[a]["body"] == "body"  # replaced, not changed: a shallow copy keeps the past
    doc.remove_context_item(b, "ann")
    assert set(doc.context_items) == {a, c, d}
    assert doc.doc_version == 0


@pytest.mark.parametrize(
    ("kwargs", "error"),
    [
        ({"kind": "poem", "title": "t", "body": ""}, Invalid),
        ({"kind": "note", "title": 5, "body": ""}, Invalid),
        ({"kind": "note", "title": "t", "body": None}, Invalid),
        ({"kind": "note", "title": "x" * 201, "body": ""}, TooLarge),
        ({"kind": "note", "title": "t", "body": "x" * (MAX_CONTEXT_BODY_CHARS + 1)}, TooLarge),
        ({"kind": "note", "title": "t", "body": "", "position": -1}, Invalid),
        ({"kind": "note", "title": "t", "body": "", "position": True}, Invalid),
    ],
)
def test_bad_items_are_refused(kwargs: dict[str, object], error: type[Exception]) -> None:
    """Unknown kinds, wrong types, oversize fields and bad positions raise domain errors."""
    doc = _doc()
    with pytest.raises(error):
        doc.add_context_item(by="ann", **kwargs)  # type: ignore[arg-type]
    assert not doc.context_items


def test_roles_and_unknown_items() -> None:
    """Viewers cannot change items, strangers do not see the document, ids must exist."""
    doc = _doc()
    item = doc.add_context_item("note", "A", "", "ann")
    with pytest.raises(Forbidden):
        doc.add_context_item("note", "x", "", "vi")
    with pytest.raises(Forbidden):
        doc.update_context_item(item, "vi", title="x")
    with pytest.raises(NotFound):
        doc.remove_context_item(item, "stranger")
    with pytest.raises(NotFound):
        doc.update_context_item("nope", "ann", title="x")
    with pytest.raises(NotFound):
        doc.remove_context_item("nope", "ann")


def test_context_events_are_stored_and_chained(store: Store) -> None:
    """Context events survive the store and their hash chain checks out."""
    doc = _doc()
    item = doc.add_context_item("note", "A", "é😀", "ann")
    doc.update_context_item(item, "ann", position=3)
    doc.add_context_item("reference", "B", "", "ed")
    store.save(doc.collect_events())
    loaded = store.load(doc.id)
    assert loaded is not None and loaded.context_items == doc.context_items
    events = store.events_after(doc.id, 0)
    assert verify_chain(events) == (len(events), None)
