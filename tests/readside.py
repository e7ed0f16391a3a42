"""Gateways with the read side mounted, for the read-model tests (no tests here)."""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator
from typing import Any

from aiohttp.test_utils import TestClient, TestServer

from gateway.app import Services, create_app
from gateway.readmodels import Extension, StoreSource, read_db_config
from gateway.store import Store, StoreConfig
from projections.db import open_db
from projections.registry import MODELS
from projections.runner import Runner
from tests.test_readmodels_http import SECRET, Api


@contextlib.asynccontextmanager
async def gateway(cfg: StoreConfig, **extension: Any) -> AsyncIterator[Api]:
    """An in-process gateway on a free port with ``Extension(**extension)`` mounted.

    ``run_projections=False, warm=False`` gives one whose read models nobody keeps up to
    date (until the test calls ``catch_up``).
    """
    services = Services(store=Store(cfg), secret=SECRET, extensions=[Extension(**extension)])
    client = TestClient(TestServer(create_app(services), host="127.0.0.1", port=0))
    await client.start_server()
    try:
        yield Api(client)
    finally:
        await client.close()


def catch_up(cfg: StoreConfig) -> None:
    """Run the projections once over everything committed so far (tables made if needed)."""
    store = Store(cfg)
    db = open_db(read_db_config(cfg))
    try:
        runner = Runner(db, StoreSource(store), MODELS)
        runner.setup()
        runner.catch_up()
    finally:
        db.close()
        store.close()
