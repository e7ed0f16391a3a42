"""Shared fixtures: real PostgreSQL and Redis, a fresh schema or key prefix per test.

Set ``COSCRIBE_TEST_DATABASE_URL`` / ``COSCRIBE_TEST_REDIS_URL`` to use other servers.
"""

from __future__ import annotations

import contextlib
import os
import uuid
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import psycopg
import pytest
from psycopg import sql

from gateway.store import Store, StoreConfig

PG_URL = os.environ.get("COSCRIBE_TEST_DATABASE_URL", "postgresql://postgres@127.0.0.1:5432/postgres")
REDIS_URL = os.environ.get("COSCRIBE_TEST_REDIS_URL", "redis://127.0.0.1:6379/0")


def every_kind_of_event(owner: str) -> list[Any]:
    """One document's events of every kind (edit with client and seq, rename, members,
    context items), then another document's creation: uncommitted, in order."""
    from domain.document import Document

    doc = Document.create(title="T", text="héllo", owner=owner)
    doc.edit([5, " 😀"], by=owner, client="c", seq=1)
    doc.rename("N", by=owner)
    doc.add_member("ed", "editor", by=owner)
    item = doc.add_context_item("note", "a", "body", by="ed")
    doc.update_context_item(item, by="ed", title="b")
    doc.remove_context_item(item, by=owner)
    doc.remove_member("ed", by=owner)
    other = Document.create(title="O", text="", owner=owner)
    return [*doc.collect_events(), *other.collect_events()]


@pytest.fixture
def pg_url() -> str:
    """The base URL of the test PostgreSQL server."""
    return PG_URL


@contextlib.contextmanager
def fresh_pg_schema() -> Iterator[str]:
    """A fresh, empty Postgres schema, dropped (with everything in it) on leaving."""
    name = f"t_{uuid.uuid4().hex[:12]}"
    with psycopg.connect(PG_URL, autocommit=True) as conn:
        conn.execute(sql.SQL("CREATE SCHEMA {}").format(sql.Identifier(name)))
    try:
        yield name
    finally:
        with psycopg.connect(PG_URL, autocommit=True) as conn:
            conn.execute(sql.SQL("DROP SCHEMA {} CASCADE").format(sql.Identifier(name)))


@pytest.fixture
def pg_schema() -> Iterator[str]:
    """A fresh, empty Postgres schema, dropped (with everything in it) after the test."""
    with fresh_pg_schema() as name:
        yield name


@pytest.fixture
def redis_url() -> str:
    """The URL of the test Redis server."""
    return REDIS_URL


@pytest.fixture
def redis_prefix(redis_url: str) -> Iterator[str]:
    """A key/channel prefix unique to this test; whatever the test (or a server it ran)
    left under it in the test Redis is deleted afterwards."""
    prefix = f"t{uuid.uuid4().hex[:10]}:"
    yield prefix
    import redis

    client = redis.Redis.from_url(redis_url, socket_timeout=5)
    try:
        found = list(client.scan_iter(f"{prefix}*"))
        if found:
            client.delete(*found)
    except redis.RedisError:  # a test that stopped Redis: nothing to clean up there
        pass
    finally:
        client.close()


@pytest.fixture
def redis_client(redis_url: str, redis_prefix: str) -> Iterator[Any]:
    """A (sync) client of the test Redis (``redis_prefix``'s keys are deleted afterwards)."""
    import redis

    client = redis.Redis.from_url(redis_url)
    try:
        yield client
    finally:
        client.close()


@pytest.fixture(params=["sqlite", "postgres"])
def store_config(request: pytest.FixtureRequest, tmp_path: Path) -> StoreConfig:
    """A store configuration for each adapter: SQLite in tmp_path, Postgres in a new schema."""
    if request.param == "sqlite":
        return StoreConfig(data_dir=tmp_path)
    schema = request.getfixturevalue("pg_schema")
    return StoreConfig(data_dir=tmp_path, database_url=PG_URL, database_schema=schema)


@pytest.fixture
def store(store_config: StoreConfig) -> Iterator[Store]:
    """An open store on each adapter, closed after the test."""
    s = Store(store_config)
    try:
        yield s
    finally:
        s.close()


@pytest.fixture
async def app_client(store_config: StoreConfig) -> AsyncIterator[object]:
    """An in-process gateway on a free port (each adapter) with an aiohttp test client."""
    from aiohttp.test_utils import TestClient, TestServer

    from gateway.app import Services, create_app

    app = create_app(Services(store=Store(store_config), secret=b"test-secret"))
    client = TestClient(TestServer(app, host="127.0.0.1", port=0))
    await client.start_server()
    try:
        yield client
    finally:
        await client.close()
