"""Read model ``documents``: one row per document, and its members.

``created_pos``/``updated_pos`` are the notification ids of the document's first and latest
events. They order the document lists (``GET /v1/documents``): unlike timestamps they are
unique and follow commit order, which is what makes keyset pages exact. Members carry
``created_pos`` too, so a user's documents are walked on one index.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from domain import ot
from domain.document import Document
from projections.facts import chars
from projections.model import Page, ReadModel
from projections.sql import Param, Rows, Statement, Stmt, iso, text_of

DDL = (
    """CREATE TABLE $documents (
        id $uuid PRIMARY KEY,
        title TEXT NOT NULL,
        owner TEXT NOT NULL,
        version $bigint NOT NULL,
        length $bigint NOT NULL,
        created_at $ts NOT NULL,
        updated_at $ts NOT NULL,
        last_editor TEXT,
        created_pos $bigint NOT NULL UNIQUE,
        updated_pos $bigint NOT NULL,
        events $bigint NOT NULL
    )""",
    """CREATE TABLE $members (
        document_id $uuid NOT NULL,
        user_id TEXT NOT NULL,
        role TEXT NOT NULL,
        created_pos $bigint NOT NULL,
        added_at $ts NOT NULL,
        PRIMARY KEY (document_id, user_id)
    )""",
)
READ_INDEXES = (
    "CREATE INDEX ${documents}_updated_$gen ON $documents (updated_pos)",
    "CREATE INDEX ${members}_user_$gen ON $members (user_id, created_pos)",
)
"""Indexes of the queries only (a rebuild makes them after its last page)."""

_TOUCH = "UPDATE $documents SET updated_at = ?, updated_pos = ?, events = events + 1 WHERE id = ?"


def project(e: Any, pos: int) -> list[Stmt]:
    """The statements that record event ``e`` (notification ``pos``) in this read model."""
    doc = str(e.originator_id)
    at = iso(e.timestamp)
    if isinstance(e, Document.Created):
        return [
            Stmt(
                "INSERT INTO $documents (id, title, owner, version, length, created_at,"
                " updated_at, last_editor, created_pos, updated_pos, events)"
                " VALUES (?, ?, ?, 0, ?, ?, ?, NULL, ?, ?, 1)",
                (doc, e.title, e.owner, len(e.text), at, at, pos, pos),
            ),
            Stmt(
                "INSERT INTO $members (document_id, user_id, role, created_pos, added_at)"
                " VALUES (?, ?, 'owner', ?, ?)",
                (doc, e.owner, pos, at),
            ),
        ]
    if isinstance(e, Document.Edited):
        return [
            Stmt(
                "UPDATE $documents SET version = ?, length = length + ?, last_editor = ?,"
                " updated_at = ?, updated_pos = ?, events = events + 1 WHERE id = ?",
                (e.v, ot.inserted_chars(e.op) - ot.deleted_chars(e.op), e.by, at, pos, doc),
            )
        ]
    if isinstance(e, Document.Renamed):
        return [
            Stmt(
                "UPDATE $documents SET title = ?, updated_at = ?, updated_pos = ?,"
                " events = events + 1 WHERE id = ?",
                (e.title, at, pos, doc),
            )
        ]
    if isinstance(e, Document.MemberAdded):
        return [
            Stmt(
                "INSERT INTO $members AS m (document_id, user_id, role, created_pos, added_at)"
                " SELECT ?, ?, ?, d.created_pos, ? FROM $documents d WHERE d.id = ?"
                " ON CONFLICT (document_id, user_id) DO UPDATE SET role = excluded.role",
                (doc, e.user, e.role, at, doc),
            ),
            Stmt(_TOUCH, (at, pos, doc)),
        ]
    if isinstance(e, Document.MemberRemoved):
        return [
            Stmt("DELETE FROM $members WHERE document_id = ? AND user_id = ?", (doc, e.user)),
            Stmt(_TOUCH, (at, pos, doc)),
        ]
    if isinstance(e, Document.Event):
        return [Stmt(_TOUCH, (at, pos, doc))]
    return []


# -- a page at once --------------------------------------------------------------------------


@dataclass(slots=True)
class _Doc:
    """What a page did to one document row: its values (``created``) or changes to them."""

    created: bool
    title: str | None
    owner: str
    version: int | None
    length: int
    """The length (``created``) or the change of length."""
    created_at: str
    updated_at: Any
    """The time of the page's last event of the document (a datetime until formatted)."""
    last_editor: str | None
    created_pos: int
    updated_pos: int
    events: int


@dataclass(slots=True)
class _Member:
    """What a page did to one (document, user) membership."""

    removed: bool = False
    """A removal came first: the row is deleted before ``role`` (if any) is written."""
    role: str | None = None
    """The role after the page, or None if its last event removed the member."""
    added_at: str | None = None
    """When the first addition after the last removal (or in the page) happened."""


_NEW_DOCS = Rows(
    "INSERT INTO $documents (id, title, owner, version, length, created_at, updated_at,"
    " last_editor, created_pos, updated_pos, events) SELECT r.id, r.title, r.owner, r.version,"
    " r.length, r.created_at, r.updated_at, r.last_editor, r.created_pos, r.updated_pos,"
    " r.events FROM $rows",
    (("id", "uuid"), ("title", "text"), ("owner", "text"), ("version", "bigint"),
     ("length", "bigint"), ("created_at", "ts"), ("updated_at", "ts"), ("last_editor", "text"),
     ("created_pos", "bigint"), ("updated_pos", "bigint"), ("events", "bigint")),
    (),
)
# NULL title/version/last_editor: the page did not change it.
_CHANGED_DOCS = Rows(
    "UPDATE $documents AS d SET title = COALESCE(r.title, d.title),"
    " version = COALESCE(r.version, d.version), length = d.length + r.dlength,"
    " last_editor = COALESCE(r.last_editor, d.last_editor), updated_at = r.updated_at,"
    " updated_pos = r.updated_pos, events = d.events + r.events FROM $rows WHERE d.id = r.id",
    (("id", "uuid"), ("title", "text"), ("version", "bigint"), ("dlength", "bigint"),
     ("last_editor", "text"), ("updated_at", "ts"), ("updated_pos", "bigint"),
     ("events", "bigint")),
    (),
)
_DELETE_MEMBERS = Rows(
    "DELETE FROM $members WHERE (document_id, user_id) IN"
    " (SELECT r.document_id, r.user_id FROM $rows)",
    (("document_id", "uuid"), ("user_id", "text")),
    (),
)
_UPSERT_MEMBERS = Rows(
    "INSERT INTO $members AS m (document_id, user_id, role, created_pos, added_at)"
    " SELECT r.document_id, r.user_id, r.role, d.created_pos, r.added_at"
    " FROM $rows, $documents d WHERE d.id = r.document_id"
    " ON CONFLICT (document_id, user_id) DO UPDATE SET role = excluded.role",
    (("document_id", "uuid"), ("user_id", "text"), ("role", "text"), ("added_at", "ts")),
    (),
)


_EDITED = Document.Edited


def _rows(template: Rows, rows: Sequence[tuple[Param, ...]]) -> Rows:
    return Rows(template.sql, template.columns, rows)


def project_page(page: Page) -> list[Statement]:
    """The statements that record ``page`` in this read model: one per table and kind of change.

    Every document the page touches is one row: inserted whole if the page created it, else
    updated once with the page's last version, title and editor, the sum of its length
    changes and its event count. Each membership is settled to its state after the page: a
    removal deletes the row; additions after the last removal upsert the last role (a row
    that was deleted, or not there, takes the time of the first of them).
    """
    docs: dict[str, _Doc] = {}
    members: dict[tuple[str, str], _Member] = {}
    for pos, e in page:
        kind = type(e)
        if kind is _EDITED:  # most events: tested first, by class identity
            doc = text_of(e.originator_id)
            d = docs.get(doc)
            if d is None:
                d = docs[doc] = _Doc(False, None, "", None, 0, "", "", None, pos, pos, 0)
            inserted, deleted = chars(e.op)
            d.version = e.v
            d.length += inserted - deleted
            d.last_editor = e.by
        elif isinstance(e, Document.Event):
            doc = text_of(e.originator_id)
            if isinstance(e, Document.Created):
                at = iso(e.timestamp)
                docs[doc] = _Doc(True, e.title, e.owner, 0, len(e.text), at, at, None, pos, pos,
                                 1)
                _add(members, doc, e.owner, "owner", at)
                continue
            d = docs.get(doc)
            if d is None:
                d = docs[doc] = _Doc(False, None, "", None, 0, "", "", None, pos, pos, 0)
            if isinstance(e, Document.Renamed):
                d.title = e.title
            elif isinstance(e, Document.MemberAdded):
                _add(members, doc, e.user, e.role, iso(e.timestamp))
            elif isinstance(e, Document.MemberRemoved):
                m = members.setdefault((doc, e.user), _Member())
                m.removed, m.role, m.added_at = True, None, None
        else:
            continue
        d.updated_at, d.updated_pos = e.timestamp, pos
        d.events += 1
    new: list[tuple[Param, ...]] = []
    changed: list[tuple[Param, ...]] = []
    for doc, d in docs.items():
        if not isinstance(d.updated_at, str):
            d.updated_at = iso(d.updated_at)  # only the last event's time is formatted
        if d.created:
            new.append((doc, d.title, d.owner, d.version, d.length, d.created_at, d.updated_at,
                        d.last_editor, d.created_pos, d.updated_pos, d.events))
        else:
            changed.append((doc, d.title, d.version, d.length, d.last_editor, d.updated_at,
                            d.updated_pos, d.events))
    removed = [(doc, user) for (doc, user), m in members.items() if m.removed]
    upserts = [(doc, user, m.role, m.added_at) for (doc, user), m in members.items()
               if m.role is not None]
    return [_rows(_NEW_DOCS, new), _rows(_CHANGED_DOCS, changed),
            _rows(_DELETE_MEMBERS, removed), _rows(_UPSERT_MEMBERS, upserts)]


def _add(members: dict[tuple[str, str], _Member], doc: str, user: str, role: str,
         at: str) -> None:
    m = members.setdefault((doc, user), _Member())
    if m.role is None:
        m.added_at = at
    m.role = role


MODEL = ReadModel(
    name="documents",
    version=1,
    tables=("documents", "members"),
    ddl=DDL,
    read_indexes=READ_INDEXES,
    mapping=project,
    page_mapping=project_page,
)
