"""Context items: where an item without a position goes, and what writes answer."""

from __future__ import annotations

from hypothesis import given
from hypothesis import strategies as st

from domain.document import MAX_CONTEXT_POSITION, Document
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
