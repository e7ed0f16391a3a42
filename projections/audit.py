"""Read model ``audit``: one row per document event, for auditors and ``/history``.

``summary`` is JSON that says what the event did (see ``schema/read_models.md``). A rename
records the title it replaced; since a mapping does no I/O, the previous title comes from
this model's own ``audit_docs`` table inside the same statement (``INSERT ... SELECT``), and
the version of an event that is not an edit from the document's latest audit row.
``hash`` is the event's hash-chain link (hex), so a row can be checked against the store.
"""

from __future__ import annotations

import json
import re
from typing import Any

from domain import ot
from domain.document import Document
from projections.model import ReadModel
from projections.sql import Stmt, iso

DDL = (
    """CREATE TABLE $audit (
        position $bigint PRIMARY KEY,
        document_id $uuid NOT NULL,
        at $ts NOT NULL,
        actor TEXT NOT NULL,
        action TEXT NOT NULL,
        version $bigint NOT NULL,
        event_version $bigint NOT NULL,
        hash TEXT NOT NULL,
        summary $json NOT NULL
    )""",
    "CREATE INDEX ${audit}_doc_$gen ON $audit (document_id, position)",
    "CREATE INDEX ${audit}_actor_$gen ON $audit (actor, position)",
    """CREATE TABLE $audit_docs (
        document_id $uuid PRIMARY KEY,
        title_json TEXT NOT NULL
    )""",
)

ACTIONS: dict[type[Any], str] = {
    Document.Created: "created",
    Document.Edited: "edited",
    Document.Renamed: "renamed",
    Document.MemberAdded: "member_added",
    Document.MemberRemoved: "member_removed",
    Document.ContextItemAdded: "context_added",
    Document.ContextItemUpdated: "context_updated",
    Document.ContextItemRemoved: "context_removed",
}
"""The ``action`` of each event class; other document events get their snake-case name."""

_COLUMNS = "position, document_id, at, actor, action, version, event_version, hash, summary"
_VERSION = (
    "(SELECT p.version FROM $audit p WHERE p.document_id = ? ORDER BY p.position DESC LIMIT 1)"
)
"""The document version as of its latest audit row (an index walk of one row)."""
_OTHER = (
    f"INSERT INTO $audit ({_COLUMNS}) VALUES (?, ?, ?, ?, ?, {_VERSION}, ?, ?, CAST(? AS $json))"
)


def _json(value: Any) -> str:
    return json.dumps(value, separators=(",", ":"), ensure_ascii=False, sort_keys=True)


def action_of(e: Any) -> str:
    """The ``action`` recorded for event ``e``."""
    name = ACTIONS.get(type(e))
    if name is None:
        name = re.sub(r"(?<!^)(?=[A-Z])", "_", type(e).__name__).lower()
    return name


def summary_of(e: Any) -> dict[str, Any]:
    """What ``e`` did, as stored in ``summary`` (renames get ``from`` in SQL)."""
    if isinstance(e, Document.Created):
        return {"title": e.title, "chars_inserted": len(e.text)}
    if isinstance(e, Document.Edited):
        return {"chars_inserted": ot.inserted_chars(e.op), "chars_deleted": ot.deleted_chars(e.op)}
    if isinstance(e, Document.MemberAdded):
        return {"user": e.user, "role": e.role}
    if isinstance(e, Document.MemberRemoved):
        return {"user": e.user}
    if isinstance(e, Document.ContextItemAdded):
        return {"item": e.item, "kind": e.kind, "title": e.title}
    if isinstance(e, Document.ContextItemUpdated):
        changed = [f for f in ("kind", "title", "body", "position") if getattr(e, f) is not None]
        return {"item": e.item, "changed": changed}
    if isinstance(e, Document.ContextItemRemoved):
        return {"item": e.item}
    return {}


def project(e: Any, pos: int) -> list[Stmt]:
    """The statements that record event ``e`` (notification ``pos``) in this read model."""
    if not isinstance(e, Document.Event):
        return []
    doc = str(e.originator_id)
    at = iso(e.timestamp)
    h = e.h.hex()
    n = e.originator_version
    if isinstance(e, Document.Created):
        return [
            Stmt(
                f"INSERT INTO $audit ({_COLUMNS}) VALUES (?, ?, ?, ?, 'created', 0, ?, ?,"
                " CAST(? AS $json))",
                (pos, doc, at, e.owner, n, h, _json(summary_of(e))),
            ),
            Stmt(
                "INSERT INTO $audit_docs (document_id, title_json) VALUES (?, ?)",
                (doc, _json(e.title)),
            ),
        ]
    if isinstance(e, Document.Edited):
        return [
            Stmt(
                f"INSERT INTO $audit ({_COLUMNS}) VALUES (?, ?, ?, ?, 'edited', ?, ?, ?,"
                " CAST(? AS $json))",
                (pos, doc, at, e.by, e.v, n, h, _json(summary_of(e))),
            ),
        ]
    if isinstance(e, Document.Renamed):
        return [
            Stmt(
                f"INSERT INTO $audit ({_COLUMNS}) SELECT ?, ?, ?, ?, 'renamed', {_VERSION}, ?, ?,"
                " CAST('{\"from\":' || s.title_json || ',\"to\":' || ? || '}' AS $json)"
                " FROM $audit_docs s WHERE s.document_id = ?",
                (pos, doc, at, e.by, doc, n, h, _json(e.title), doc),
            ),
            Stmt(
                "UPDATE $audit_docs SET title_json = ? WHERE document_id = ?",
                (_json(e.title), doc),
            ),
        ]
    actor = getattr(e, "by", "")
    return [
        Stmt(_OTHER, (pos, doc, at, actor, action_of(e), doc, n, h, _json(summary_of(e))))
    ]


MODEL = ReadModel(
    name="audit",
    version=2,
    tables=("audit", "audit_docs"),
    ddl=DDL,
    mapping=project,
)
