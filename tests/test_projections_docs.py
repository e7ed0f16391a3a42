"""The schema docs match the code: table DDL, routes, events, and the import direction."""

from __future__ import annotations

import ast
import re
from pathlib import Path

from aiohttp import web

from domain.document import Document
from gateway.readmodels import add_routes
from projections.registry import MODELS
from projections.sql import Dialect, render

ROOT = Path(__file__).resolve().parent.parent


def _ddl_as_documented(text: str) -> str:
    return re.sub(r"\n\s+", "\n    ", text).replace("\n    )", "\n)")


def test_every_table_is_documented_as_created() -> None:
    """schema/read_models.md holds each model's DDL exactly as created on Postgres."""
    doc = (ROOT / "schema" / "read_models.md").read_text()
    for model in MODELS:
        assert f"### `{model.name}` (version {model.version})" in doc
        for ddl in (*model.ddl, *model.read_indexes):
            text = render(ddl, Dialect.POSTGRES, {**model.physical(), "gen": "<gen>"})
            assert _ddl_as_documented(text) + ";" in doc, text


def test_every_route_is_documented() -> None:
    """Each route the read side mounts appears in the API table."""
    doc = (ROOT / "schema" / "read_models.md").read_text()
    app = web.Application()
    add_routes(app)
    for route in app.router.routes():
        if route.method == "HEAD":  # added with every GET
            continue
        info = route.resource.get_info() if route.resource else {}
        path = info.get("path") or info.get("formatter")
        assert f"`{route.method} {path}" in doc, (route.method, path)


def test_every_event_is_documented() -> None:
    """schema/events.md names every event class of the Document aggregate."""
    doc = (ROOT / "schema" / "events.md").read_text()
    events = [n for n, v in vars(Document).items()
              if isinstance(v, type) and issubclass(v, Document.Event) and n != "Event"]
    assert len(events) >= 8
    for name in events:
        assert f"`Document.{name}`" in doc, name


def test_mappings_import_no_io_libraries() -> None:
    """The pure mappings import nothing that does I/O (asyncio, aiohttp, psycopg, redis...)."""
    banned = {"asyncio", "aiohttp", "psycopg", "redis", "aiocache", "sqlite3", "opentelemetry",
              "gateway", "ops"}
    for name in ("documents", "context", "audit", "analytics", "sql", "model", "history"):
        tree = ast.parse((ROOT / "projections" / f"{name}.py").read_text())
        for node in ast.walk(tree):
            if isinstance(node, ast.Import):
                mods = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom):
                mods = [node.module or ""]
            else:
                continue
            for mod in mods:
                assert mod.split(".")[0] not in banned, f"projections/{name}.py imports {mod}"
