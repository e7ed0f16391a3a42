"""What several page mappings read from one event, computed cheaply (no I/O).

``domain.ot`` counts inserted and deleted code points in two passes; a page mapping wants
both, for every edit of the page, so ``chars`` counts them in one.
"""

from __future__ import annotations

from typing import Any


def chars(op: list[Any]) -> tuple[int, int]:
    """``(inserted, deleted)`` code points of a text op (``ot.inserted_chars``,
    ``ot.deleted_chars``)."""
    inserted = deleted = 0
    for c in op:
        t = type(c)
        if t is str:
            inserted += len(c)
        elif t is int:
            pass
        elif isinstance(c, str):  # the exact tests of domain.ot, for subclasses
            inserted += len(c)
        elif not isinstance(c, int):
            deleted += c["d"]
    return inserted, deleted
