"""Gateways with the read side mounted and a client for them, for the read-model tests
(no tests here)."""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator, Callable, Sequence
from typing import Any

from aiohttp import web
from aiohttp.test_utils import TestClient, TestServer

from gateway.app import Services, create_app
from gateway.auth import sign_token
from gateway.readmodels import Extension, StoreSource, read_db_config
from gateway.store import Store, StoreConfig
from projections.db import open_db
from projections.registry import MODELS
from projections.runner import Runner

SECRET = b"test-secret"


class Api:
    """A test client acting as one user at a time."""

    def __init__(self, client: TestClient[Any, Any]) -> None:
        self.client = client

    def headers(self, user: str) -> dict[str, str]:
        """The Authorization header of ``user``."""
        return {"Authorization": f"Bearer {sign_token(SECRET, user)}"}

    async def call(self, method: str, path: str, user: str = "ann", status: int = 200,
                   **kw: Any) -> Any:
        """Send a request, check the status, return the JSON body (None when empty)."""
        r = await self.client.request(method, path, headers=self.headers(user), **kw)
        text = await r.text()
        assert r.status == status, f"{method} {path} -> {r.status}: {text}"
        return await r.json() if text else None

    async def create(self, title: str, text: str = "", user: str = "ann") -> str:
        """A new document's id."""
        doc = await self.call("POST", "/v1/documents", user, 201,
                              json={"title": title, "text": text})
        return str(doc["id"])

    async def edit(self, doc: str, v: int, op: list[Any], user: str = "ann") -> int:
        """Apply ``op`` made on version ``v``; returns the new version."""
        out = await self.call("POST", f"/v1/documents/{doc}/ops", user, json={"v": v, "op": op})
        return int(out["v"])


@contextlib.asynccontextmanager
async def gateway(
    cfg: StoreConfig, more: Sequence[Callable[[web.Application], None]] = (), **extension: Any
) -> AsyncIterator[Api]:
    """An in-process gateway on a free port with ``Extension(**extension)`` (and the
    ``more`` extensions) mounted.

    ``run_projections=False, warm=False`` gives one whose read models nobody keeps up to
    date (until the test calls ``catch_up``).
    """
    services = Services(
        store=Store(cfg), secret=SECRET, extensions=[Extension(**extension), *more]
    )
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
