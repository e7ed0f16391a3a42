"""Every read model, by name: the one list the runner, the CLI and the API use."""

from __future__ import annotations

from projections import analytics, audit, context, documents
from projections.model import ReadModel

MODELS: tuple[ReadModel, ...] = (
    documents.MODEL,
    context.MODEL,
    audit.MODEL,
    analytics.MODEL,
)
"""All read models, in the order a page of events is applied to them."""


def by_name(name: str) -> ReadModel:
    """The read model called ``name``; raises KeyError with the known names."""
    for m in MODELS:
        if m.name == name:
            return m
    raise KeyError(f"no read model {name!r} (known: {', '.join(m.name for m in MODELS)})")
