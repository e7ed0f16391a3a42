"""What a read model is: tables, their DDL, and a pure mapping from events to statements.

A read model is applied exactly once per event by the runner (``projections.runner``): the
statements of a page of events and the model's tracking row are written in one transaction.
The mapping must therefore be deterministic and free of I/O: given the same events in the
same order it produces the same statements, which is what makes a rebuild equal to the live
tables ("replay equals live").

A model may also have a *page mapping*: the statements of a whole page of events at once,
set-based (a handful of ``Rows`` statements per page instead of a few statements per event).
It is what the runner uses when present, and it must leave the tables exactly as ``mapping``
applied event by event would, for any page and any split of the log into pages
(``tests/test_projections_pages.py`` checks this). ``mapping`` stays the plain statement of
what one event means; models that gain nothing from batching have only it.

Bump ``version`` whenever the DDL or the mapping changes meaning: a runner that finds tables
of another version rebuilds them from the first event.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

from projections.sql import Statement, Stmt

Mapping = Callable[[Any, int], list[Stmt]]
"""``mapping(event, position) -> statements``: ``position`` is the event's notification id."""

Page = Sequence[tuple[int, Any]]
"""``[(position, event), ...]`` in log order: what the runner applies in one transaction."""

PageMapping = Callable[[Page], list[Statement]]
"""``page_mapping(page) -> statements``: pure and deterministic, like ``Mapping``."""


@dataclass(frozen=True, slots=True)
class ReadModel:
    """A named read model: its tables, how to create them and how events change them."""

    name: str
    """Stable name: the tracking row, ``--projection NAME`` and ``GET /v1/projections``."""
    version: int
    """Schema/mapping version; a change triggers a rebuild."""
    tables: tuple[str, ...]
    """Logical table names (``$name`` tokens); the physical name is ``rm_<name>``."""
    ddl: tuple[str, ...]
    """``CREATE TABLE`` / ``CREATE INDEX`` templates, run once when the tables are made."""
    mapping: Mapping
    """The pure event -> statements function."""
    page_mapping: PageMapping | None = None
    """The pure page -> statements function, equal in effect to ``mapping`` event by event."""
    read_indexes: tuple[str, ...] = ()
    """``CREATE INDEX`` templates that only reads use (the mappings never need them): made
    with the tables, except by a rebuild, which builds them once after its last page instead
    of row by row (``projections.replay``)."""

    def statements(self, page: Page) -> list[Statement]:
        """The statements that apply ``page`` (the page mapping's, else event by event)."""
        if self.page_mapping is not None:
            return self.page_mapping(page)
        return [s for p, e in page for s in self.mapping(e, p)]

    def physical(self, suffix: str = "") -> dict[str, str]:
        """Logical -> physical table names (``suffix`` names the tables of a rebuild)."""
        return {t: f"rm_{t}{suffix}" for t in self.tables}
