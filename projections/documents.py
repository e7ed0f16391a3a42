"""Read model ``documents``: one row per document, and its members.

``created_pos``/``updated_pos`` are the notification ids of the document's first and latest
events. They order the document lists (``GET /v1/documents``): unlike timestamps they are
unique and follow commit order, which is what makes keyset pages exact. Members carry
``created_pos`` too, so a user's documents are walked on one index.
"""

from __future__ import annotations

from typing import Any

from domain import ot
from domain.document import Document
from projections.model import ReadModel
from projections.sql import Stmt, iso

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
    "CREATE INDEX ${documents}_updated_$gen ON $documents (updated_pos)",
    """CREATE TABLE $members (
        document_id $uuid NOT NULL,
        user_id TEXT NOT NULL,
        role TEXT NOT NULL,
        created_pos $bigint NOT NULL,
        added_at $ts NOT NULL,
        PRIMARY KEY (document_id, user_id)
    )""",
    "CREATE INDEX ${members}_user_$gen ON $members (user_id, created_pos)",
)

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


MODEL = ReadModel(
    name="documents",
    version=1,
    tables=("documents", "members"),
    ddl=DDL,
    mapping=project,
)
