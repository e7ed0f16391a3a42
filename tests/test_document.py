"""The Document aggregate: commands, roles, versions, the hash chain and client seqs."""

from __future__ import annotations

from typing import Any
from uuid import UUID

import pytest

from domain import ot
from domain.document import GENESIS, MAX_TITLE_CHARS, Document, Role, chain_hash
from domain.errors import BadOp, Conflict, DomainError, Forbidden, Invalid, NotFound, TooLarge
from gateway.store import Store
from schema.codes import Code

OWNER, EDITOR, VIEWER, STRANGER = "olga", "ed", "vic", "stan"

_ENVELOPE = frozenset({"originator_id", "originator_version", "timestamp", "originator_topic", "h"})


def _doc(text: str = "hello") -> Document:
    """A document with an editor and a viewer besides the owner, pending events collected."""
    doc = Document.create(title="T", text=text, owner=OWNER)
    doc.add_member(EDITOR, "editor", by=OWNER)
    doc.add_member(VIEWER, "viewer", by=OWNER)
    doc.collect_events()
    return doc


def _payload(event: Any) -> dict[str, Any]:
    """An event's own fields: what ``chain_hash`` covers besides kind, id, position and time."""
    return {k: v for k, v in vars(event).items() if k not in _ENVELOPE}


def _recompute(events: list[Any]) -> list[bytes]:
    """The hash chain of ``events`` (a document's, from its creation), link by link."""
    links = []
    prev = GENESIS
    for e in events:
        prev = chain_hash(
            prev, type(e).__name__, e.originator_id, e.originator_version, e.timestamp, _payload(e)
        )
        links.append(prev)
    return links


# -- creation -------------------------------------------------------------------------


def test_create_starts_at_version_zero_owned_by_creator() -> None:
    """A new document has version 0, its initial text, and the creator as owner."""
    doc = Document.create(title="Notes", text="abc", owner=OWNER)
    assert (doc.title, doc.text, doc.owner, doc.doc_version) == ("Notes", "abc", OWNER, 0)
    assert doc.members == {OWNER: "owner"}
    assert doc.role_of(OWNER) is Role.OWNER
    assert doc.created_at == doc.updated_at
    events = doc.collect_events()
    assert [type(e).__name__ for e in events] == ["Created"]


def test_create_with_given_id_keeps_it() -> None:
    """``create`` uses the id it is given."""
    doc_id = UUID(int=42)
    assert Document.create(title="t", text="", owner=OWNER, doc_id=doc_id).id == doc_id


@pytest.mark.parametrize(
    ("title", "text", "error"),
    [
        (None, "", Invalid),
        (7, "", Invalid),
        ("x" * (MAX_TITLE_CHARS + 1), "", TooLarge),
        ("ok", None, Invalid),
        ("ok", ["a"], Invalid),
    ],
)
def test_create_rejects_bad_arguments(title: Any, text: Any, error: type[DomainError]) -> None:
    """Non-string titles or texts and over-long titles are refused with a domain error."""
    with pytest.raises(error):
        Document.create(title=title, text=text, owner=OWNER)


def test_title_at_the_limit_is_accepted() -> None:
    """A title of exactly MAX_TITLE_CHARS code points is fine (emoji count as one)."""
    title = "😀" * MAX_TITLE_CHARS
    assert Document.create(title=title, text="", owner=OWNER).title == title


# -- roles ----------------------------------------------------------------------------


def test_read_and_write_by_role() -> None:
    """Owner and editor read and write; a viewer only reads; a non-member does neither."""
    doc = _doc()
    assert [doc.can_read(u) for u in (OWNER, EDITOR, VIEWER, STRANGER)] == [1, 1, 1, 0]
    assert [doc.can_write(u) for u in (OWNER, EDITOR, VIEWER, STRANGER)] == [1, 1, 0, 0]
    assert doc.role_of(EDITOR) is Role.EDITOR
    assert doc.role_of(VIEWER) is Role.VIEWER
    assert doc.role_of(STRANGER) is None


@pytest.mark.parametrize("user", [OWNER, EDITOR])
def test_writers_edit_and_rename(user: str) -> None:
    """The owner and editors may edit the text and rename the document."""
    doc = _doc()
    assert doc.edit([5, "!"], by=user) == 1
    doc.rename("New", by=user)
    assert (doc.text, doc.title, doc.last_editor) == ("hello!", "New", user)


def test_viewer_cannot_edit_or_rename() -> None:
    """A viewer's edit or rename is Forbidden and changes nothing."""
    doc = _doc()
    with pytest.raises(Forbidden) as info:
        doc.edit(["x"], by=VIEWER)
    assert info.value.code is Code.FORBIDDEN
    with pytest.raises(Forbidden):
        doc.rename("mine", by=VIEWER)
    assert (doc.text, doc.title, doc.doc_version) == ("hello", "T", 0)
    assert doc.collect_events() == []


def test_non_member_gets_not_found_for_everything() -> None:
    """For a non-member the document does not exist: NotFound, not Forbidden."""
    doc = _doc()
    attempts = [
        lambda: doc.edit(["x"], by=STRANGER),
        lambda: doc.rename("x", by=STRANGER),
        lambda: doc.add_member("z", "viewer", by=STRANGER),
        lambda: doc.remove_member(VIEWER, by=STRANGER),
    ]
    for attempt in attempts:
        with pytest.raises(NotFound) as info:
            attempt()
        assert info.value.code is Code.NOT_FOUND
    assert doc.collect_events() == []


@pytest.mark.parametrize("user", [EDITOR, VIEWER])
def test_only_the_owner_manages_members(user: str) -> None:
    """Editors and viewers may not add or remove members (Forbidden)."""
    doc = _doc()
    with pytest.raises(Forbidden):
        doc.add_member("zoe", "viewer", by=user)
    with pytest.raises(Forbidden):
        doc.remove_member(VIEWER, by=user)
    assert doc.collect_events() == []


def test_member_lifecycle() -> None:
    """Add, change role, re-add with the same role (no event) and remove a member."""
    doc = Document.create(title="T", text="", owner=OWNER)
    doc.collect_events()
    doc.add_member("zoe", "viewer", by=OWNER)
    doc.add_member("zoe", "viewer", by=OWNER)  # no change: no event
    doc.add_member("zoe", "editor", by=OWNER)
    assert doc.can_write("zoe")
    doc.remove_member("zoe", by=OWNER)
    assert not doc.can_read("zoe")
    kinds = [type(e).__name__ for e in doc.collect_events()]
    assert kinds == ["MemberAdded", "MemberAdded", "MemberRemoved"]


@pytest.mark.parametrize(
    ("user", "role"),
    [
        ("zoe", "owner"),  # owner is not grantable
        ("zoe", "admin"),
        (OWNER, "admin"),  # bad input first, whoever it names
        ("", "viewer"),
        ("z" * 129, "viewer"),
        (None, "viewer"),
    ],
)
def test_add_member_bad_input_is_invalid(user: Any, role: str) -> None:
    """A role other than editor/viewer, or an empty, over-long or non-string user name, is
    Invalid (bad_request), not a Conflict: no state of the document would accept it."""
    doc = _doc()
    with pytest.raises(Invalid) as info:
        doc.add_member(user, role, by=OWNER)
    assert info.value.code is Code.BAD_REQUEST
    assert doc.collect_events() == []


def test_changing_the_owners_role_is_a_conflict() -> None:
    """Naming the owner with a grantable role clashes with who owns it: Conflict."""
    doc = _doc()
    with pytest.raises(Conflict) as info:
        doc.add_member(OWNER, "editor", by=OWNER)
    assert info.value.code is Code.CONFLICT
    assert doc.collect_events() == []


def test_no_sql_text_of_a_document_holds_u0000() -> None:
    """Titles, member names and context items refuse U+0000 (PostgreSQL text cannot hold
    it); the document's own text may have it (it is never SQL text)."""
    doc = Document.create("t", "a\x00b", OWNER)
    with pytest.raises(Invalid):
        Document.create("t\x00", "", OWNER)
    for command in (
        lambda: doc.rename("\x00", by=OWNER),
        lambda: doc.add_member("a\x00", "viewer", by=OWNER),
        lambda: doc.add_context_item("note", "t\x00", "", by=OWNER),
        lambda: doc.add_context_item("note", "t", "b\x00", by=OWNER),
    ):
        with pytest.raises(Invalid):
            command()
    doc.edit(["\x00"], OWNER, None, None)
    assert doc.text == "\x00a\x00b"


def test_remove_member_errors() -> None:
    """The owner cannot be removed (Conflict); removing a non-member is NotFound."""
    doc = _doc()
    with pytest.raises(Conflict):
        doc.remove_member(OWNER, by=OWNER)
    with pytest.raises(NotFound):
        doc.remove_member(STRANGER, by=OWNER)
    assert doc.collect_events() == []


def test_removed_member_loses_access() -> None:
    """After removal a former editor's edit is NotFound."""
    doc = _doc()
    doc.remove_member(EDITOR, by=OWNER)
    with pytest.raises(NotFound):
        doc.edit(["x"], by=EDITOR)


# -- versions -------------------------------------------------------------------------


def test_doc_version_counts_only_edits() -> None:
    """doc_version counts edits; renames and membership changes advance only the aggregate."""
    doc = Document.create(title="T", text="", owner=OWNER)
    assert (doc.doc_version, doc.version) == (0, 1)
    assert doc.edit(["a"], by=OWNER) == 1
    doc.rename("U", by=OWNER)
    doc.add_member(EDITOR, "editor", by=OWNER)
    assert doc.edit([1, "b"], by=EDITOR) == 2
    assert (doc.text, doc.doc_version, doc.version) == ("ab", 2, 5)
    edits = [e for e in doc.collect_events() if isinstance(e, Document.Edited)]
    assert [e.v for e in edits] == [1, 2]
    assert [e.op for e in edits] == [["a"], [1, "b"]]


def test_bad_op_leaves_document_unchanged() -> None:
    """An op that does not fit raises BadOp and records nothing."""
    doc = _doc("abc")
    for op in ([4, "x"], [{"d": 4}], [0], ["x", True]):
        with pytest.raises(BadOp):
            doc.edit(op, by=OWNER)  # type: ignore[arg-type]
    assert (doc.text, doc.doc_version, doc.version) == ("abc", 0, 3)
    assert doc.collect_events() == []


def test_edit_event_carries_author_client_and_seq() -> None:
    """An Edited event records the op, author, client id, seq and produced version."""
    doc = _doc()
    doc.edit([{"d": 1}, "J"], by=EDITOR, client="c1", seq=7)
    (e,) = doc.collect_events()
    assert isinstance(e, Document.Edited)
    assert (e.op, e.by, e.client, e.seq, e.v) == ([{"d": 1}, "J"], EDITOR, "c1", 7, 1)
    assert doc.text == "Jello"


# -- committed seqs -------------------------------------------------------------------


def test_committed_seq_answers_the_latest_seq_per_client() -> None:
    """committed_seq gives the version of a client's latest seq, None for older or unknown."""
    doc = _doc("")
    doc.edit(["a"], by=OWNER, client="c1", seq=1)
    doc.edit(["b"], by=EDITOR, client="c2", seq=1)
    doc.edit(["c"], by=OWNER, client="c1", seq=2)
    doc.edit(["d"], by=OWNER)  # HTTP edit without a client id
    assert doc.committed_seq("c1", 2) == 3
    assert doc.committed_seq("c2", 1) == 2
    assert doc.committed_seq("c1", 1) is None  # older than the latest: the room asks the store
    assert doc.committed_seq("c1", 3) is None
    assert doc.committed_seq("nobody", 1) is None
    assert doc.clients == {"c1": (2, 3), "c2": (1, 2)}


# -- the hash chain -------------------------------------------------------------------


def test_every_event_extends_the_hash_chain() -> None:
    """Each event's h differs from the previous one; the document keeps the latest."""
    doc = Document.create(title="T", text="x", owner=OWNER)
    hashes = [doc.h]
    doc.edit(["a"], by=OWNER)
    hashes.append(doc.h)
    doc.rename("U", by=OWNER)
    hashes.append(doc.h)
    doc.add_member(VIEWER, "viewer", by=OWNER)
    hashes.append(doc.h)
    doc.remove_member(VIEWER, by=OWNER)
    hashes.append(doc.h)
    events = doc.collect_events()
    assert len(set(hashes)) == len(hashes) == 5
    assert [e.h for e in events] == hashes
    assert all(isinstance(h, bytes) and len(h) == 32 for h in hashes)
    assert _recompute(events) == hashes


def test_chain_hash_is_deterministic_and_sensitive() -> None:
    """Equal inputs give equal links; changing any input changes the link."""
    doc = Document.create(title="T", text="x", owner=OWNER)
    (created,) = doc.collect_events()
    args = (GENESIS, "Created", doc.id, 1, created.timestamp, _payload(created))
    assert chain_hash(*args) == chain_hash(*args) == created.h
    assert chain_hash(b"\x01" * 32, *args[1:]) != created.h
    assert chain_hash(GENESIS, "Renamed", *args[2:]) != created.h
    assert chain_hash(GENESIS, "Created", UUID(int=1), *args[3:]) != created.h
    assert chain_hash(*args[:3], 2, *args[4:]) != created.h
    assert chain_hash(*args[:5], {**_payload(created), "text": "y"}) != created.h


def test_hash_chain_recomputes_from_stored_events(store: Store) -> None:
    """Reloaded through the store, the events recompute to the same chain and document h."""
    doc = Document.create(title="Tïtle 😀", text="a\x00b", owner=OWNER)
    doc.edit([1, "é😀"], by=OWNER, client="c", seq=1)
    doc.add_member(EDITOR, "editor", by=OWNER)
    doc.edit([{"d": 2}], by=EDITOR)
    doc.rename("r", by=EDITOR)
    doc.remove_member(EDITOR, by=OWNER)
    originals = [e.h for e in doc.pending_events]
    store.save(doc.collect_events())

    stored = store.events_after(doc.id, 0)
    assert [e.h for e in stored] == originals
    assert _recompute(stored) == originals
    reloaded = store.load(doc.id)
    assert reloaded is not None
    assert reloaded.h == doc.h == originals[-1]
    assert (reloaded.text, reloaded.doc_version) == (doc.text, doc.doc_version)


def test_tampered_event_breaks_the_chain(store: Store) -> None:
    """Changing a stored event's content makes the recomputed chain disagree from there on."""
    doc = Document.create(title="T", text="abc", owner=OWNER)
    doc.edit([3, "d"], by=OWNER)
    doc.edit([4, "e"], by=OWNER)
    store.save(doc.collect_events())
    stored = store.events_after(doc.id, 0)
    good = _recompute(stored)
    stored[1].__dict__["op"] = [3, "X"]  # what an edited row would read back as
    bad = _recompute(stored)
    assert bad[0] == good[0]
    assert bad[1] != stored[1].h
    assert bad[2] != stored[2].h


def test_replaying_stored_edits_gives_the_text(store: Store) -> None:
    """The initial text with the stored ops applied in version order is the stored text."""
    doc = Document.create(title="T", text="start", owner=OWNER)
    text = doc.text
    for i in range(30):
        op = ot.normalize([i % (len(text) + 1), f"<{i}>"]) if i % 3 else [{"d": 1}]
        doc.edit(op, by=OWNER)
        text = ot.apply(text, op)
    store.save(doc.collect_events())
    replayed = "start"
    for e in store.edits_after(doc.id, 0, 1000):
        replayed = ot.apply(replayed, e.op)
    loaded = store.load(doc.id)
    assert loaded is not None
    assert replayed == text == loaded.text
