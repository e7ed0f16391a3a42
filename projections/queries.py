"""Reads of the read models: the SQL behind the HTTP API, for both dialects.

Synchronous (call from a reader thread). Every query that lists documents joins
``rm_members`` on the caller, so a user only ever sees the documents they may read.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any, Literal

from projections.db import ReadDB, Row
from projections.sql import Renderer

Order = Literal["created", "updated"]
"""How ``GET /v1/documents`` is ordered: by creation or by latest change, newest first."""

_DOC_COLUMNS = (
    "d.id, d.title, d.owner, d.version, d.length, d.created_at, d.updated_at,"
    " d.last_editor, d.created_pos, d.updated_pos, m.role"
)


def _r(db: ReadDB) -> Renderer:
    return Renderer(db.dialect, {})


def like_pattern(q: str) -> str:
    """A ``LIKE`` pattern matching text that contains ``q`` literally (``%``, ``_`` and
    ``\\`` escaped); lower both sides in SQL to ignore case."""
    escaped = q.replace("\\", "\\\\").replace("%", "\\%").replace("_", "\\_")
    return f"%{escaped}%"


def list_documents(
    db: ReadDB, user: str, order: Order, before: int | None, limit: int, q: str | None
) -> list[Row]:
    """Up to ``limit`` documents ``user`` may read, newest first, strictly after ``before``.

    ``before`` is the ``created_pos`` (or ``updated_pos``) of the last row of the previous
    page: a keyset, so rows created or changed meanwhile never shift a page. With ``created``
    order a row's key never changes, so a walk visits every row that existed when it began
    exactly once; with ``updated`` order a row that changes moves above the walk, so it is
    never shown twice (it may be missed, having moved to the part already walked).
    """
    key = "m.created_pos" if order == "created" else "d.updated_pos"
    where = ["m.user_id = ?"]
    params: list[Any] = [user]
    if before is not None:
        where.append(f"{key} < ?")
        params.append(before)
    if q:
        # Both sides lowered by the database: Unicode rules on both (see projections.db).
        where.append("lower(d.title) LIKE lower(?) ESCAPE '\\'")
        params.append(like_pattern(q))
    params.append(limit)
    sql = (
        f"SELECT {_DOC_COLUMNS} FROM rm_members m JOIN rm_documents d ON d.id = m.document_id"
        f" WHERE {' AND '.join(where)} ORDER BY {key} DESC LIMIT ?"
    )
    return db.query(_r(db)(sql), params)


def document_rows(db: ReadDB, user: str, ids: list[str]) -> list[Row]:
    """The rows of the documents in ``ids`` that ``user`` may read."""
    if not ids:
        return []
    marks = ", ".join("?" for _ in ids)
    sql = (
        f"SELECT {_DOC_COLUMNS} FROM rm_members m JOIN rm_documents d ON d.id = m.document_id"
        f" WHERE m.user_id = ? AND d.id IN ({marks})"
    )
    return db.query(_r(db)(sql), [user, *ids])


def history(db: ReadDB, doc: str, before: int | None, limit: int) -> list[Row]:
    """Audit rows of ``doc``, newest first, with position < ``before``."""
    where = "document_id = ?"
    params: list[Any] = [doc]
    if before is not None:
        where += " AND position < ?"
        params.append(before)
    sql = f"SELECT * FROM rm_audit WHERE {where} ORDER BY position DESC LIMIT ?"
    rows = db.query(_r(db)(sql), [*params, limit])
    for row in rows:
        row["summary"] = _json_value(row["summary"])
    return rows


def context_items(db: ReadDB, doc: str, item: str | None = None) -> list[Row]:
    """The context items of ``doc`` in list order (or just ``item``)."""
    where, params = "document_id = ?", [doc]
    if item is not None:
        where += " AND item_id = ?"
        params.append(item)
    sql = (
        "SELECT item_id, kind, title, body, position, created_by, created_at, updated_by,"
        f" updated_at FROM rm_context_items WHERE {where} ORDER BY position, created_pos"
    )
    return db.query(_r(db)(sql), params)


def tracking(db: ReadDB) -> list[Row]:
    """Every tracking row."""
    return db.query("SELECT name, version, position, event_at, updated_at FROM rm_tracking")


def _json_value(value: Any) -> Any:
    return json.loads(value) if isinstance(value, str) else value


# -- analytics ------------------------------------------------------------------------------

Bucket = Literal["hour", "day"]
"""The width of an analytics series' buckets."""


@dataclass(frozen=True, slots=True)
class Scope:
    """Whose figures: every document ``user`` may read, or only ``document``."""

    user: str
    document: str | None = None


def _scoped(table: str, scope: Scope) -> tuple[str, list[Any]]:
    """``FROM`` and ``WHERE`` restricting ``table`` (alias ``t``) to the scope."""
    sql = f" FROM {table} t JOIN rm_members m ON m.document_id = t.document_id AND m.user_id = ?"
    params: list[Any] = [scope.user]
    if scope.document is not None:
        sql += " WHERE t.document_id = ?"
        params.append(scope.document)
    else:
        sql += " WHERE 1 = 1"
    return sql, params


def series(db: ReadDB, scope: Scope, bucket: Bucket, start: str, end: str) -> dict[str, Row]:
    """Figures per bucket start (ISO text) for ``start <= t < end``, buckets with data only."""
    render = _r(db)
    col = "hour" if bucket == "hour" else "day"
    out: dict[str, Row] = {}

    def merge(rows: list[Row]) -> None:
        for row in rows:
            at = row.pop("at")
            slot = out.setdefault(at, {})
            slot.update({k: int(v or 0) for k, v in row.items()})

    frm, params = _scoped("rm_analytics_hourly", scope)
    merge(db.query(render(
        f"SELECT t.{col} AS at, SUM(t.edits) AS edits, SUM(t.chars_inserted) AS chars_inserted,"
        f" SUM(t.chars_deleted) AS chars_deleted{frm} AND t.hour >= ? AND t.hour < ?"
        f" GROUP BY t.{col}"
    ), [*params, start, end]))
    frm, params = _scoped("rm_analytics_activity", scope)
    merge(db.query(render(
        f"SELECT t.{col} AS at, COUNT(DISTINCT t.user_id) AS active_users{frm}"
        f" AND t.hour >= ? AND t.hour < ? GROUP BY t.{col}"
    ), [*params, start, end]))
    frm, params = _scoped("rm_analytics_documents", scope)
    merge(db.query(render(
        f"SELECT t.{col} AS at, COUNT(*) AS documents_created{frm}"
        f" AND t.hour >= ? AND t.hour < ? GROUP BY t.{col}"
    ), [*params, start, end]))
    return out


def top_documents(db: ReadDB, user: str, start: str, end: str, limit: int) -> list[Row]:
    """The documents ``user`` may read with the most edits in ``start <= hour < end``."""
    render = _r(db)
    rows = db.query(render(
        "SELECT t.document_id AS id, d.title AS title, SUM(t.edits) AS edits,"
        " SUM(t.chars_inserted) AS chars_inserted, SUM(t.chars_deleted) AS chars_deleted"
        " FROM rm_analytics_hourly t"
        " JOIN rm_members m ON m.document_id = t.document_id AND m.user_id = ?"
        " LEFT JOIN rm_documents d ON d.id = t.document_id"
        " WHERE t.hour >= ? AND t.hour < ?"
        " GROUP BY t.document_id, d.title ORDER BY SUM(t.edits) DESC, t.document_id LIMIT ?"
    ), [user, start, end, limit])
    if not rows:
        return rows
    marks = ", ".join("?" for _ in rows)
    editors = db.query(render(
        "SELECT document_id, COUNT(DISTINCT user_id) AS editors FROM rm_analytics_activity"
        f" WHERE edits > 0 AND hour >= ? AND hour < ? AND document_id IN ({marks})"
        " GROUP BY document_id"
    ), [start, end, *(r["id"] for r in rows)])
    by_doc = {r["document_id"]: int(r["editors"]) for r in editors}
    for r in rows:
        for k in ("edits", "chars_inserted", "chars_deleted"):
            r[k] = int(r[k] or 0)
        r["editors"] = by_doc.get(r["id"], 0)
    return rows


def most_active(db: ReadDB, column: str, since: str, limit: int) -> list[str]:
    """The ``user_id``s (or ``document_id``s) with the most events since ``since``."""
    if column not in ("user_id", "document_id"):
        raise ValueError(column)
    rows = db.query(_r(db)(
        f"SELECT {column} AS k, SUM(events) AS n FROM rm_analytics_activity WHERE hour >= ?"
        f" GROUP BY {column} ORDER BY SUM(events) DESC, {column} LIMIT ?"
    ), [since, limit])
    return [str(r["k"]) for r in rows]
