"""Read model ``analytics``: counters per document and UTC hour, and who was active when.

- ``analytics_hourly``: per document and hour, edits, code points inserted and deleted, and
  how many distinct users edited.
- ``analytics_activity``: per document, hour and user, events and edits. Active users of any
  period are the distinct ``user_id`` here; it is also where ``distinct_editors`` comes from.
- ``analytics_documents``: when each document was created (documents created per day).

Every table carries ``day`` beside ``hour`` so that daily figures are a ``GROUP BY day``.
Plugin usage will add its own table here (a version bump rebuilds).
"""

from __future__ import annotations

from typing import Any

from domain import ot
from domain.document import Document
from projections.model import ReadModel
from projections.sql import Stmt, day_of, hour_of, iso

DDL = (
    """CREATE TABLE $analytics_hourly (
        document_id $uuid NOT NULL,
        hour $ts NOT NULL,
        day $ts NOT NULL,
        edits $bigint NOT NULL,
        chars_inserted $bigint NOT NULL,
        chars_deleted $bigint NOT NULL,
        distinct_editors $bigint NOT NULL,
        PRIMARY KEY (document_id, hour)
    )""",
    "CREATE INDEX ${analytics_hourly}_hour_$gen ON $analytics_hourly (hour)",
    """CREATE TABLE $analytics_activity (
        document_id $uuid NOT NULL,
        hour $ts NOT NULL,
        day $ts NOT NULL,
        user_id TEXT NOT NULL,
        events $bigint NOT NULL,
        edits $bigint NOT NULL,
        PRIMARY KEY (document_id, hour, user_id)
    )""",
    "CREATE INDEX ${analytics_activity}_hour_$gen ON $analytics_activity (hour)",
    """CREATE TABLE $analytics_documents (
        document_id $uuid PRIMARY KEY,
        owner TEXT NOT NULL,
        created_at $ts NOT NULL,
        hour $ts NOT NULL,
        day $ts NOT NULL
    )""",
    "CREATE INDEX ${analytics_documents}_hour_$gen ON $analytics_documents (hour)",
)

_ACTIVITY = (
    "INSERT INTO $analytics_activity AS a (document_id, hour, day, user_id, events, edits)"
    " VALUES (?, ?, ?, ?, 1, ?) ON CONFLICT (document_id, hour, user_id)"
    " DO UPDATE SET events = a.events + 1, edits = a.edits + excluded.edits"
)


def project(e: Any, pos: int) -> list[Stmt]:
    """The statements that record event ``e`` (notification ``pos``) in this read model."""
    if not isinstance(e, Document.Event):
        return []
    doc = str(e.originator_id)
    hour, day = hour_of(e.timestamp), day_of(e.timestamp)
    if isinstance(e, Document.Created):
        return [
            Stmt(
                "INSERT INTO $analytics_documents (document_id, owner, created_at, hour, day)"
                " VALUES (?, ?, ?, ?, ?)",
                (doc, e.owner, iso(e.timestamp), hour, day),
            ),
            Stmt(_ACTIVITY, (doc, hour, day, e.owner, 0)),
        ]
    if isinstance(e, Document.Edited):
        # The editor's activity row first, so the hourly row can count distinct editors.
        return [
            Stmt(_ACTIVITY, (doc, hour, day, e.by, 1)),
            Stmt(
                "INSERT INTO $analytics_hourly AS h (document_id, hour, day, edits,"
                " chars_inserted, chars_deleted, distinct_editors) VALUES (?, ?, ?, 1, ?, ?,"
                " (SELECT COUNT(*) FROM $analytics_activity a WHERE a.document_id = ?"
                " AND a.hour = ? AND a.edits > 0))"
                " ON CONFLICT (document_id, hour) DO UPDATE SET edits = h.edits + 1,"
                " chars_inserted = h.chars_inserted + excluded.chars_inserted,"
                " chars_deleted = h.chars_deleted + excluded.chars_deleted,"
                " distinct_editors = excluded.distinct_editors",
                (doc, hour, day, ot.inserted_chars(e.op), ot.deleted_chars(e.op), doc, hour),
            ),
        ]
    actor = getattr(e, "by", None)
    if not isinstance(actor, str):
        return []
    return [Stmt(_ACTIVITY, (doc, hour, day, actor, 0))]


MODEL = ReadModel(
    name="analytics",
    version=2,
    tables=("analytics_hourly", "analytics_activity", "analytics_documents"),
    ddl=DDL,
    mapping=project,
)
