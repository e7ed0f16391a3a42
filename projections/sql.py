"""SQL statements as values, written once for both SQLite and PostgreSQL.

A read-model mapping returns ``Stmt`` values; the database adapter renders them. The text of a
statement uses three conventions so that one spelling serves both databases:

- ``$name`` or ``${name}`` stands for a *table* of the read model (``$documents``), replaced
  by its physical name. A rebuild renders the same statements against fresh tables
  (``rm_documents__next``) and swaps them in when it has caught up.
- ``$ts``, ``$json``, ``$uuid``, ``$bigint`` stand for column types (``timestamptz``,
  ``jsonb``, ``uuid``, ``bigint`` on Postgres; ``TEXT``/``INTEGER`` on SQLite), and ``$gen``
  for a token unique to one creation of the tables (index names must not clash across
  rebuilds).
- ``?`` is a parameter. Parameters are plain values: ``str``, ``int``, ``None``. Times are
  ISO 8601 strings in UTC (``iso``), JSON is text; Postgres casts them to the column types.
- ``$rows`` (only in a ``Rows`` statement) stands for a set of rows given with the statement,
  as a table ``r`` with named, typed columns: the statement changes many rows at once
  (``INSERT ... SELECT ... FROM $rows``, ``UPDATE ... FROM $rows WHERE ...``). On Postgres
  the rows travel as ONE JSON parameter unpacked by ``jsonb_array_elements`` (one statement
  for the set: cheap to encode in Python, one execution in the server); on SQLite the
  statement runs once per row (``executemany``, ``$rows`` being one row of parameters).

Nothing here does I/O.
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from enum import StrEnum
from functools import lru_cache
from typing import Any
from uuid import UUID

Param = str | int | None
"""A statement parameter: text (times, ids and JSON included), an integer or NULL."""


@dataclass(frozen=True, slots=True)
class Stmt:
    """One statement of a read-model change: template text and its parameters in order."""

    sql: str
    params: tuple[Param, ...] = ()


Column = tuple[str, str]
"""A column of a ``Rows`` set: its name and its type token (``bigint``, ``uuid``, ``ts``,
``json`` or ``text``)."""


@dataclass(frozen=True, slots=True)
class Rows:
    """One set-based statement: ``sql`` reads ``rows`` through ``$rows``, a table ``r``.

    ``r`` has ``columns``; each row holds one plain value per column, in that order (JSON
    columns hold JSON text). The result must not depend on whether the rows are taken one at
    a time, in order (SQLite), or all at once (Postgres): a mapping coalesces its changes so
    that no two rows touch the same key. An empty ``rows`` runs nothing.
    """

    sql: str
    columns: tuple[Column, ...]
    rows: Sequence[tuple[Param, ...]]


Statement = Stmt | Rows
"""What a mapping returns: one statement with its parameters, or one over a set of rows."""


class Dialect(StrEnum):
    """The SQL dialects a read model is rendered for."""

    SQLITE = "sqlite"
    POSTGRES = "postgres"


TYPES: dict[Dialect, dict[str, str]] = {
    Dialect.SQLITE: {"ts": "TEXT", "json": "TEXT", "uuid": "TEXT", "bigint": "INTEGER",
                     "text": "TEXT"},
    Dialect.POSTGRES: {"ts": "timestamptz", "json": "jsonb", "uuid": "uuid", "bigint": "bigint",
                       "text": "TEXT"},
}
"""Column types behind the ``$ts``-style tokens."""

_TOKEN = re.compile(r"\$\{(\w+)\}|\$(\w+)")


def render(sql: str, dialect: Dialect, names: Mapping[str, str]) -> str:
    """The text of ``sql`` for ``dialect`` with ``names`` (tables, ``gen``) filled in.

    Raises KeyError for a token that is neither a type nor in ``names``. For Postgres the
    ``?`` placeholders become ``%s`` (and a literal ``%`` is doubled).
    """
    types = TYPES[dialect]

    def sub(m: re.Match[str]) -> str:
        key = m.group(1) or m.group(2)
        if key in types:
            return types[key]
        return names[key]

    text = _TOKEN.sub(sub, sql)
    if dialect is Dialect.POSTGRES:
        text = text.replace("%", "%%").replace("?", "%s")
    return text


def rows_source(columns: Sequence[Column], dialect: Dialect) -> str:
    """What ``$rows`` stands for: a derived table ``r`` with ``columns``.

    Postgres: the elements of one JSON array parameter (each row an array of its values),
    cast to the column types. SQLite: one row of parameters (the statement runs per row).
    """
    if dialect is Dialect.SQLITE:
        return "(SELECT " + ", ".join(f"? AS {name}" for name, _ in columns) + ") AS r"
    types = TYPES[dialect]
    cols = []
    for i, (name, kind) in enumerate(columns):
        value = f"x.e->>{i}"
        cols.append(f"{value} AS {name}" if kind == "text"
                    else f"CAST({value} AS {types[kind]}) AS {name}")
    return ("(SELECT " + ", ".join(cols)
            + " FROM jsonb_array_elements(CAST(? AS jsonb)) AS x(e)) AS r")


@lru_cache(maxsize=4096)
def _render_cached(sql: str, dialect: Dialect, names: tuple[tuple[str, str], ...]) -> str:
    return render(sql, dialect, dict(names))


@lru_cache(maxsize=1024)
def _render_rows_cached(
    sql: str, columns: tuple[Column, ...], dialect: Dialect, names: tuple[tuple[str, str], ...]
) -> str:
    return render(sql, dialect, {**dict(names), "rows": rows_source(columns, dialect)})


class Renderer:
    """Renders statements for one dialect and one set of names, caching the text."""

    __slots__ = ("_names", "dialect", "names")

    def __init__(self, dialect: Dialect, names: Mapping[str, str]) -> None:
        self.dialect = dialect
        self.names = dict(names)
        self._names = tuple(sorted(self.names.items()))

    def __call__(self, sql: str) -> str:
        """The rendered text of ``sql``."""
        return _render_cached(sql, self.dialect, self._names)

    def rows(self, stmt: Rows) -> str:
        """The rendered text of a ``Rows`` statement, ``$rows`` filled in."""
        return _render_rows_cached(stmt.sql, stmt.columns, self.dialect, self._names)


# Every read model formats the same event's timestamp and document id: remember the last few
# thousand (a page of events is mapped by each model in turn).

_ISO: dict[datetime, str] = {}
_ISO_MAX = 16_384
"""Formatted timestamps kept; the whole memo is dropped when full (a page's events are new:
an ``lru_cache`` spent more evicting, per miss, than the formatting itself)."""


def iso(ts: datetime) -> str:
    """A time as the ISO 8601 text stored in read models: UTC, microseconds, ``Z``."""
    text = _ISO.get(ts)
    if text is not None:
        return text
    utc = ts if ts.tzinfo is UTC else ts.astimezone(UTC)
    # The same text as strftime("%Y-%m-%dT%H:%M:%S.%fZ"), at a fraction of the cost.
    text = utc.isoformat(timespec="microseconds")[:-6] + "Z"
    if len(_ISO) >= _ISO_MAX:
        _ISO.clear()
    _ISO[ts] = text
    return text


def hour_of(ts: datetime) -> str:
    """The start of the UTC hour of ``ts``, as stored in the analytics tables."""
    return iso(ts)[:13] + ":00:00.000000Z"


def day_of(ts: datetime) -> str:
    """The start of the UTC day of ``ts``, as stored in the analytics tables."""
    return iso(ts)[:10] + "T00:00:00.000000Z"


def text_of(doc_id: UUID) -> str:
    """``str(doc_id)``, remembered: a page names the same few documents again and again."""
    # Keyed by the UUID's int: hashing and comparing a UUID itself runs Python code.
    return _uuid_text(doc_id.int)


@lru_cache(maxsize=8192)
def _uuid_text(n: int) -> str:
    return str(UUID(int=n))


def plain(value: Any) -> Any:
    """A value read back from either database as plain JSON-ready data.

    Postgres returns ``datetime``, ``UUID`` and decoded ``jsonb``; SQLite returns the text
    that was written. Both become what SQLite returns (JSON columns are decoded by callers
    that know which columns hold JSON).
    """
    if isinstance(value, datetime):
        return iso(value)
    if value is not None and type(value).__name__ == "UUID":
        return str(value)
    return value
