"""Read model ``context``: the context items (notes, references, snippets) of each document.

A document's items are listed by ``position``, then by ``created_pos`` (the order they were
added in).
"""

from __future__ import annotations

from typing import Any

from domain.document import Document
from projections.model import Page, ReadModel
from projections.sql import Statement, Stmt, iso

DDL = (
    """CREATE TABLE $context_items (
        document_id $uuid NOT NULL,
        item_id TEXT NOT NULL,
        kind TEXT NOT NULL,
        title TEXT NOT NULL,
        body TEXT NOT NULL,
        position $bigint NOT NULL,
        created_by TEXT NOT NULL,
        created_at $ts NOT NULL,
        updated_by TEXT NOT NULL,
        updated_at $ts NOT NULL,
        created_pos $bigint NOT NULL,
        PRIMARY KEY (document_id, item_id)
    )""",
)
READ_INDEXES = (
    "CREATE INDEX ${context_items}_order_$gen ON $context_items"
    " (document_id, position, created_pos)",
)
"""Indexes of the queries only (a rebuild makes them after its last page)."""


_CONTEXT_EVENTS = (Document.ContextItemAdded, Document.ContextItemUpdated,
                   Document.ContextItemRemoved)


def project(e: Any, pos: int) -> list[Stmt]:
    """The statements that record event ``e`` (notification ``pos``) in this read model."""
    if not isinstance(e, _CONTEXT_EVENTS):
        return []
    doc = str(e.originator_id)
    at = iso(e.timestamp)
    if isinstance(e, Document.ContextItemAdded):
        return [
            Stmt(
                "INSERT INTO $context_items (document_id, item_id, kind, title, body, position,"
                " created_by, created_at, updated_by, updated_at, created_pos)"
                " VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
                (doc, e.item, e.kind, e.title, e.body, e.position, e.by, at, e.by, at, pos),
            )
        ]
    if isinstance(e, Document.ContextItemUpdated):
        return [
            Stmt(
                "UPDATE $context_items SET kind = COALESCE(?, kind), title = COALESCE(?, title),"
                " body = COALESCE(?, body), position = COALESCE(?, position),"
                " updated_by = ?, updated_at = ? WHERE document_id = ? AND item_id = ?",
                (e.kind, e.title, e.body, e.position, e.by, at, doc, e.item),
            )
        ]
    if isinstance(e, Document.ContextItemRemoved):
        return [
            Stmt(
                "DELETE FROM $context_items WHERE document_id = ? AND item_id = ?",
                (doc, e.item),
            )
        ]
    return []


_EDITED = Document.Edited


def project_page(page: Page) -> list[Statement]:
    """``project`` for each event of ``page`` (context events are rare: no need to coalesce)."""
    return [s for p, e in page
            if type(e) is not _EDITED and isinstance(e, _CONTEXT_EVENTS) for s in project(e, p)]


MODEL = ReadModel(
    name="context",
    version=1,
    tables=("context_items",),
    ddl=DDL,
    read_indexes=READ_INDEXES,
    mapping=project,
    page_mapping=project_page,
)
