"""A client id belongs to the first user who uses it, for ever: another user's ``hello`` or
HTTP op with it is refused (``forbidden``), so nobody's op can pass for a resend of another
user's, across restarts and processes. Each adapter; the gateway in-process."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator
from typing import Any

import psycopg
import pytest
from aiohttp.test_utils import TestClient
from psycopg import sql

from gateway.session import SessionLimits
from gateway.store import UNAVAILABLE_MESSAGE, StoreConfig
from schema.codes import Code
from schema.frames import Codec
from tests.test_ws_e2e import Api, second_gateway
from tests.wsclient import WsClient

ALICE, BOB, VIC = "olga", "bob", "vic"
"""The owner (``Api``'s default user), an editor and a viewer."""
TAKEN = "client id 'alice-laptop' is another user's; choose another"


@pytest.fixture
def api(app_client: TestClient[Any, Any]) -> Api:
    """The in-process gateway of ``app_client``."""
    return Api(app_client, str(app_client.make_url("")).rstrip("/"), b"test-secret")


async def shared(api: Api) -> str:
    """A new document of alice's, bob an editor and vic a viewer of it."""
    doc = await api.create("")
    for user, role in ((BOB, "editor"), (VIC, "viewer")):
        status, _ = await api.call("POST", f"/v1/documents/{doc}/members",
                                   json={"user": user, "role": role})
        assert status == 201
    return doc


@contextlib.asynccontextmanager
async def said_hello(
    api: Api, user: str, client: str | None
) -> AsyncIterator[tuple[WsClient, dict[str, Any]]]:
    """A connection that sent ``hello`` as ``user`` with ``client``, and the reply."""
    ws = await WsClient.connect(api.session, api.ws_url, Codec.JSON)
    try:
        yield ws, await ws.hello(api.token(user), client)
    finally:
        await ws.close()


async def post(api: Api, doc: str, user: str, **body: Any) -> tuple[int, Any]:
    """``POST .../ops`` as ``user``: ``(status, body)``."""
    return await api.call("POST", f"/v1/documents/{doc}/ops", user=user, json=body)


def refused(reply: dict[str, Any], code: Code = Code.FORBIDDEN) -> bool:
    """``reply`` is an ``error`` with ``code``."""
    return reply["t"] == "error" and reply["code"] == code.value


async def test_another_user_cannot_take_a_client_id(api: Api) -> None:
    """Bob's hello and HTTP ops with alice's client id are forbidden, a viewer's resend of
    her (client, seq) too; alice's next op is applied, and acked with its own version."""
    doc = await shared(api)
    assert await api.post_op(doc, 0, ["a1 "], client="alice-laptop", seq=1) == 1
    async with said_hello(api, BOB, "alice-laptop") as (_, reply):
        assert refused(reply) and reply["message"] == TAKEN
    status, body = await post(api, doc, BOB, v=1, op=["BOB "], client="alice-laptop", seq=2)
    assert (status, body["error"]) == (403, {"code": "forbidden", "message": TAKEN})
    status, body = await post(api, doc, VIC, v=0, op=["V"], client="alice-laptop", seq=1)
    assert (status, body["error"]["code"]) == (403, "forbidden")
    async with said_hello(api, ALICE, "alice-laptop") as (ws, reply):
        assert reply["t"] == "welcome"
        state = await ws.subscribe(doc)
        assert state.version == 1
        await ws.send({"t": "op", "doc": doc, "v": 1, "op": [3, "a2"], "seq": 2})
        ack = await ws.wait_for(lambda m: m["t"] in ("ack", "error"))
        assert (ack["t"], ack["seq"], ack["v"]) == ("ack", 2, 2)
    assert await api.get(doc) == ("a1 a2", 2)
    assert [e["by"] for e in await api.ops(doc)] == [ALICE, ALICE]


async def test_a_refused_hello_can_be_followed_by_a_good_one(api: Api) -> None:
    """After a hello refused for its client id the connection is open and unauthenticated:
    an op is ``unauthorized``, and a hello with another id is welcomed."""
    doc = await shared(api)
    async with said_hello(api, ALICE, "alice-laptop") as (_, reply):
        assert reply["t"] == "welcome"
    async with said_hello(api, BOB, "alice-laptop") as (ws, reply):
        assert refused(reply)
        mark = len(ws.log)
        await ws.send({"t": "sub", "doc": doc})
        assert refused(await ws.wait_for(lambda m: m["t"] == "error", since=mark),
                       Code.UNAUTHORIZED)
        again = await ws.hello(api.token(BOB), "bob-phone")
        assert (again["t"], again["user"]) == ("welcome", BOB)
        state = await ws.subscribe(doc)
        state.edit(["b"])
        await ws.wait_until(lambda: state.quiet)
    assert await api.get(doc) == ("b", 1)
    assert [(e["by"], e["client"]) for e in await api.ops(doc)] == [(BOB, "bob-phone")]


async def test_the_first_of_concurrent_claims_wins_and_others_bind(api: Api) -> None:
    """Ten hellos of alice and ten of bob with one new id, at once: all of one user are
    welcomed, all of the other's refused; forty other new ids at once are all bound."""
    both = [ALICE, BOB] * 10
    async with contextlib.AsyncExitStack() as stack:
        conns = await asyncio.gather(*(stack.enter_async_context(
            said_hello(api, user, "contested")) for user in both))
        others = await asyncio.gather(*(stack.enter_async_context(
            said_hello(api, both[i % 20], f"own-{i}")) for i in range(40)))
    welcomed = {u for u, (_, reply) in zip(both, conns, strict=True) if reply["t"] == "welcome"}
    assert len(welcomed) == 1
    assert all(refused(reply) for u, (_, reply) in zip(both, conns, strict=True)
               if u not in welcomed)
    assert all(reply["t"] == "welcome" for _, reply in others)


async def test_a_binding_holds_across_a_restart(store_config: StoreConfig) -> None:
    """An id bound by one gateway is alice's for the next one on the same store."""
    async with second_gateway(store_config) as first:
        doc = await first.create("")
        assert await first.post_op(doc, 0, ["a"], client="alice-laptop", seq=1) == 1
    async with second_gateway(store_config) as restarted:
        async with said_hello(restarted, BOB, "alice-laptop") as (_, reply):
            assert refused(reply)
        async with said_hello(restarted, ALICE, "alice-laptop") as (_, reply):
            assert reply["t"] == "welcome"


async def test_a_binding_holds_across_gateways(api: Api, store_config: StoreConfig) -> None:
    """Two gateways on one store: an id bound on either is refused to another user on the
    other (whose cache never saw it), over WebSocket and HTTP."""
    doc = await shared(api)
    async with second_gateway(store_config) as there:
        async with said_hello(api, ALICE, "alice-laptop") as (_, reply):
            assert reply["t"] == "welcome"
        async with said_hello(there, BOB, "alice-laptop") as (_, reply):
            assert refused(reply)
        status, body = await post(there, doc, BOB, v=0, op=["b"], client="bob-phone", seq=1)
        assert (status, body) == (200, {"v": 1})
        status, body = await post(api, doc, ALICE, v=1, op=["a"], client="bob-phone", seq=1)
        assert (status, body["error"]["code"]) == (403, "forbidden")
        async with said_hello(api, ALICE, "bob-phone") as (_, reply):
            assert refused(reply)
        assert await there.get(doc) == ("b", 1)
    assert [(e["by"], e["client"]) for e in await api.ops(doc)] == [(BOB, "bob-phone")]


@pytest.mark.slow
async def test_a_hello_is_unavailable_while_the_store_cannot_bind(
    api: Api, store_config: StoreConfig
) -> None:
    """With the clients table locked the hello with a new id gets ``unavailable`` within
    seconds (the connection stays open: a hello without an id is welcomed), not a hang."""
    if store_config.database_url is None:
        pytest.skip("a table lock held by another connection is PostgreSQL's")
    table = sql.Identifier(str(store_config.database_schema), "coscribe_clients")
    doc = await api.create("x")
    async with await psycopg.AsyncConnection.connect(store_config.database_url) as holder:
        await holder.execute(sql.SQL("LOCK TABLE {} IN ACCESS EXCLUSIVE MODE").format(table))
        started = asyncio.get_running_loop().time()
        async with said_hello(api, ALICE, "alice-laptop") as (ws, reply):
            assert refused(reply, Code.UNAVAILABLE) and reply["message"] == UNAVAILABLE_MESSAGE
            # The wait for the store does not count against the hello deadline (10 s from
            # the upgrade): the client gets the whole of it again for another try.
            deadline = started + SessionLimits().hello_seconds
            await asyncio.sleep(deadline + 0.5 - asyncio.get_running_loop().time())
            assert (await ws.hello(api.token(ALICE)))["t"] == "welcome"
        # More binds than the store has reader threads: each timed-out one held its thread
        # until the lock was gone, and then every read of the store waited behind them.
        for n in range(store_config.pool_size):
            async with said_hello(api, ALICE, f"alice-tablet-{n}") as (_, reply):
                assert refused(reply, Code.UNAVAILABLE)
        status, body = await asyncio.wait_for(api.call("GET", f"/v1/documents/{doc}/ops"), 10)
        assert status == 200 and body["ops"] == []
        await holder.rollback()
    # Told unavailable, alice did not get the id (the blocked statement committed it once
    # the lock was gone): bob may take it.
    async with said_hello(api, BOB, "alice-laptop") as (_, reply):
        assert reply["t"] == "welcome"
