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

Nothing here does I/O.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import UTC, datetime
from enum import StrEnum
from functools import lru_cache
from typing import Any

Param = str | int | None
"""A statement parameter: text (times, ids and JSON included), an integer or NULL."""


@dataclass(frozen=True, slots=True)
class Stmt:
    """One statement of a read-model change: template text and its parameters in order."""

    sql: str
    params: tuple[Param, ...] = ()


class Dialect(StrEnum):
    """The SQL dialects a read model is rendered for."""

    SQLITE = "sqlite"
    POSTGRES = "postgres"


TYPES: dict[Dialect, dict[str, str]] = {
    Dialect.SQLITE: {"ts": "TEXT", "json": "TEXT", "uuid": "TEXT", "bigint": "INTEGER"},
    Dialect.POSTGRES: {"ts": "timestamptz", "json": "jsonb", "uuid": "uuid", "bigint": "bigint"},
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


@lru_cache(maxsize=4096)
def _render_cached(sql: str, dialect: Dialect, names: tuple[tuple[str, str], ...]) -> str:
    return render(sql, dialect, dict(names))


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


# Every read model formats the same event's timestamp: remember the last few thousand.


@lru_cache(maxsize=8192)
def iso(ts: datetime) -> str:
    """A time as the ISO 8601 text stored in read models: UTC, microseconds, ``Z``."""
    return ts.astimezone(UTC).strftime("%Y-%m-%dT%H:%M:%S.%fZ")


@lru_cache(maxsize=8192)
def hour_of(ts: datetime) -> str:
    """The start of the UTC hour of ``ts``, as stored in the analytics tables."""
    return ts.astimezone(UTC).strftime("%Y-%m-%dT%H:00:00.000000Z")


@lru_cache(maxsize=8192)
def day_of(ts: datetime) -> str:
    """The start of the UTC day of ``ts``, as stored in the analytics tables."""
    return ts.astimezone(UTC).strftime("%Y-%m-%dT00:00:00.000000Z")


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
