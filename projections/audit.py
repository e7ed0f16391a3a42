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
from projections.facts import chars
from projections.model import Page, ReadModel
from projections.sql import Param, Rows, Statement, Stmt, iso, text_of

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
    """CREATE TABLE $audit_docs (
        document_id $uuid PRIMARY KEY,
        title_json TEXT NOT NULL
    )""",
)
READ_INDEXES = (
    "CREATE INDEX ${audit}_actor_$gen ON $audit (actor, position)",
)
"""Indexes of the queries only (a rebuild makes them after its last page)."""

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


def summary_json(e: Any) -> str:
    """``summary_of(e)`` as stored: canonical JSON (sorted keys, no spaces)."""
    if isinstance(e, Document.Edited):
        # The commonest row, spelled out: the same text as _json() gives.
        return (f'{{"chars_deleted":{ot.deleted_chars(e.op)},'
                f'"chars_inserted":{ot.inserted_chars(e.op)}}}')
    return _json(summary_of(e))


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
                (pos, doc, at, e.owner, n, h, summary_json(e)),
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
                (pos, doc, at, e.by, e.v, n, h, summary_json(e)),
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
        Stmt(_OTHER, (pos, doc, at, actor, action_of(e), doc, n, h, summary_json(e)))
    ]


# -- a page at once --------------------------------------------------------------------------

_EDITED = Document.Edited
_ROW = (("position", "bigint"), ("document_id", "uuid"), ("at", "ts"), ("actor", "text"),
        ("action", "text"), ("version", "bigint"), ("event_version", "bigint"),
        ("hash", "text"))
_KNOWN = Rows(
    f"INSERT INTO $audit ({_COLUMNS}) SELECT r.position, r.document_id, r.at, r.actor, r.action,"
    " r.version, r.event_version, r.hash, r.summary FROM $rows",
    (*_ROW, ("summary", "json")),
    (),
)
# Rows of events whose document version, or (renames) previous title, the page does not tell:
# NULL ``version`` is read from the document's latest audit row, NULL ``summary`` is made from
# the title in audit_docs (a rename of a document without one records no row, as one by one).
_LOOKUP = Rows(
    f"INSERT INTO $audit ({_COLUMNS}) SELECT r.position, r.document_id, r.at, r.actor, r.action,"
    " COALESCE(r.version, (SELECT p.version FROM $audit p WHERE p.document_id = r.document_id"
    " ORDER BY p.position DESC LIMIT 1)), r.event_version, r.hash,"
    " CAST(COALESCE(r.summary, '{\"from\":' || s.title_json || ',\"to\":' || r.to_json || '}')"
    " AS $json) FROM $rows LEFT JOIN $audit_docs s ON s.document_id = r.document_id"
    " WHERE r.summary IS NOT NULL OR s.document_id IS NOT NULL",
    (*_ROW, ("summary", "text"), ("to_json", "text")),
    (),
)
_NEW_TITLES = Rows(
    "INSERT INTO $audit_docs (document_id, title_json) SELECT r.document_id, r.title_json"
    " FROM $rows",
    (("document_id", "uuid"), ("title_json", "text")),
    (),
)
_TITLES = Rows(
    "UPDATE $audit_docs AS s SET title_json = r.title_json FROM $rows"
    " WHERE s.document_id = r.document_id",
    (("document_id", "uuid"), ("title_json", "text")),
    (),
)


def project_page(page: Page) -> list[Statement]:
    """The statements that record ``page`` in this read model: at most four.

    The page itself tells the version of a document's event once the page holds one of its
    edits or its creation, and the title a rename replaced once it holds its creation or an
    earlier rename; such rows go in whole. Rows that need the tables (a document's first
    events in the page) are inserted first, so that they see only what came before the page.
    Titles are stored last.
    """
    version: dict[str, int] = {}
    title: dict[str, str] = {}
    created: dict[str, str] = {}
    renamed: dict[str, str] = {}
    known: list[tuple[Param, ...]] = []
    lookup: list[tuple[Param, ...]] = []
    for pos, e in page:
        if type(e) is _EDITED:  # most events: tested first, by class identity
            doc = text_of(e.originator_id)
            version[doc] = e.v
            inserted, deleted = chars(e.op)
            known.append((pos, doc, iso(e.timestamp), e.by, "edited", e.v,
                          e.originator_version, e.h.hex(),
                          f'{{"chars_deleted":{deleted},"chars_inserted":{inserted}}}'))
            continue
        if not isinstance(e, Document.Event):
            continue
        doc = text_of(e.originator_id)
        at = iso(e.timestamp)
        h = e.h.hex()
        n = e.originator_version
        if isinstance(e, Document.Edited):
            version[doc] = e.v
            known.append((pos, doc, at, e.by, "edited", e.v, n, h, summary_json(e)))
            continue
        if isinstance(e, Document.Created):
            version[doc] = 0
            title[doc] = created[doc] = _json(e.title)
            renamed.pop(doc, None)
            known.append((pos, doc, at, e.owner, "created", 0, n, h, summary_json(e)))
            continue
        v = version.get(doc)
        if isinstance(e, Document.Renamed):
            to = _json(e.title)
            before = title.get(doc)
            summary = None if before is None else '{"from":' + before + ',"to":' + to + "}"
            title[doc] = to
            if doc in created:
                created[doc] = to
            else:
                renamed[doc] = to
            if v is None or summary is None:
                lookup.append((pos, doc, at, e.by, "renamed", v, n, h, summary, to))
            else:
                known.append((pos, doc, at, e.by, "renamed", v, n, h, summary))
            continue
        row = (pos, doc, at, getattr(e, "by", ""), action_of(e), v, n, h, summary_json(e))
        if v is None:
            lookup.append((*row, None))
        else:
            known.append(row)
    return [
        Rows(_LOOKUP.sql, _LOOKUP.columns, lookup),
        Rows(_KNOWN.sql, _KNOWN.columns, known),
        Rows(_NEW_TITLES.sql, _NEW_TITLES.columns, list(created.items())),
        Rows(_TITLES.sql, _TITLES.columns, list(renamed.items())),
    ]


MODEL = ReadModel(
    name="audit",
    version=2,
    tables=("audit", "audit_docs"),
    ddl=DDL,
    read_indexes=READ_INDEXES,
    mapping=project,
    page_mapping=project_page,
)
