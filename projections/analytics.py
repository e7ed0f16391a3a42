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
from projections.facts import chars
from projections.model import Page, ReadModel
from projections.sql import Param, Rows, Statement, Stmt, day_of, hour_of, iso, text_of

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
    """CREATE TABLE $analytics_activity (
        document_id $uuid NOT NULL,
        hour $ts NOT NULL,
        day $ts NOT NULL,
        user_id TEXT NOT NULL,
        events $bigint NOT NULL,
        edits $bigint NOT NULL,
        PRIMARY KEY (document_id, hour, user_id)
    )""",
    """CREATE TABLE $analytics_documents (
        document_id $uuid PRIMARY KEY,
        owner TEXT NOT NULL,
        created_at $ts NOT NULL,
        hour $ts NOT NULL,
        day $ts NOT NULL
    )""",
)
READ_INDEXES = (
    "CREATE INDEX ${analytics_hourly}_hour_$gen ON $analytics_hourly (hour)",
    "CREATE INDEX ${analytics_activity}_hour_$gen ON $analytics_activity (hour)",
    "CREATE INDEX ${analytics_documents}_hour_$gen ON $analytics_documents (hour)",
)
"""Indexes of the queries only (a rebuild makes them after its last page)."""

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


# -- a page at once --------------------------------------------------------------------------

_EDITED = Document.Edited
_NEW_DOCS = Rows(
    "INSERT INTO $analytics_documents (document_id, owner, created_at, hour, day)"
    " SELECT r.document_id, r.owner, r.created_at, r.hour, r.day FROM $rows",
    (("document_id", "uuid"), ("owner", "text"), ("created_at", "ts"), ("hour", "ts"),
     ("day", "ts")),
    (),
)
# ``WHERE true``: SQLite would read ``ON CONFLICT`` as a join constraint of the FROM clause.
_ACTIVITY_ROWS = Rows(
    "INSERT INTO $analytics_activity AS a (document_id, hour, day, user_id, events, edits)"
    " SELECT r.document_id, r.hour, r.day, r.user_id, r.events, r.edits FROM $rows WHERE true"
    " ON CONFLICT (document_id, hour, user_id)"
    " DO UPDATE SET events = a.events + excluded.events, edits = a.edits + excluded.edits",
    (("document_id", "uuid"), ("hour", "ts"), ("day", "ts"), ("user_id", "text"),
     ("events", "bigint"), ("edits", "bigint")),
    (),
)
# After the activity rows: distinct editors are counted from them, as after each edit.
_HOURLY_ROWS = Rows(
    "INSERT INTO $analytics_hourly AS h (document_id, hour, day, edits, chars_inserted,"
    " chars_deleted, distinct_editors) SELECT r.document_id, r.hour, r.day, r.edits,"
    " r.chars_inserted, r.chars_deleted, (SELECT COUNT(*) FROM $analytics_activity a"
    " WHERE a.document_id = r.document_id AND a.hour = r.hour AND a.edits > 0)"
    " FROM $rows WHERE true ON CONFLICT (document_id, hour) DO UPDATE SET"
    " edits = h.edits + excluded.edits,"
    " chars_inserted = h.chars_inserted + excluded.chars_inserted,"
    " chars_deleted = h.chars_deleted + excluded.chars_deleted,"
    " distinct_editors = excluded.distinct_editors",
    (("document_id", "uuid"), ("hour", "ts"), ("day", "ts"), ("edits", "bigint"),
     ("chars_inserted", "bigint"), ("chars_deleted", "bigint")),
    (),
)


def project_page(page: Page) -> list[Statement]:
    """The statements that record ``page`` in this read model: at most three.

    Counters are summed per key in Python and each table gets one upsert that adds the sums.
    """
    created: list[tuple[Param, ...]] = []
    activity: dict[tuple[str, str, str], list[Any]] = {}
    hourly: dict[tuple[str, str], list[Any]] = {}
    for _pos, e in page:
        kind = type(e)
        if kind is _EDITED:  # most events: tested first, by class identity
            actor: Any = e.by
        elif not isinstance(e, Document.Event):
            continue
        elif isinstance(e, Document.Created):
            actor = e.owner
        else:
            actor = getattr(e, "by", None)
            if not isinstance(actor, str):
                continue
        doc = text_of(e.originator_id)
        hour = hour_of(e.timestamp)
        a = activity.get((doc, hour, actor))
        if a is None:
            a = activity[(doc, hour, actor)] = [day_of(e.timestamp), 0, 0]
        a[1] += 1
        if kind is _EDITED or isinstance(e, Document.Edited):
            a[2] += 1
            hr = hourly.get((doc, hour))
            if hr is None:
                hr = hourly[(doc, hour)] = [a[0], 0, 0, 0]
            inserted, deleted = chars(e.op)
            hr[1] += 1
            hr[2] += inserted
            hr[3] += deleted
        elif isinstance(e, Document.Created):
            created.append((doc, e.owner, iso(e.timestamp), hour, a[0]))
    return [
        Rows(_NEW_DOCS.sql, _NEW_DOCS.columns, created),
        Rows(_ACTIVITY_ROWS.sql, _ACTIVITY_ROWS.columns,
             [(doc, hour, day, user, n, edits)
              for (doc, hour, user), (day, n, edits) in activity.items()]),
        Rows(_HOURLY_ROWS.sql, _HOURLY_ROWS.columns,
             [(doc, hour, day, n, ins, dels)
              for (doc, hour), (day, n, ins, dels) in hourly.items()]),
    ]


MODEL = ReadModel(
    name="analytics",
    version=2,
    tables=("analytics_hourly", "analytics_activity", "analytics_documents"),
    ddl=DDL,
    read_indexes=READ_INDEXES,
    mapping=project,
    page_mapping=project_page,
)
