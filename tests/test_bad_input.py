"""Bad input over WebSocket and HTTP: each gets its error code, and nothing else breaks.

Every WebSocket case runs on a connection (each codec) subscribed to two documents with one
accepted op each; after the bad input the connection must still ack edits on both
subscriptions and the texts must be exactly what the accepted ops made.
"""

from __future__ import annotations

import asyncio
import contextlib
import io
import logging
import warnings
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Any
from uuid import UUID

import msgpack
import orjson
import psycopg
import pytest
from aiohttp.test_utils import TestClient, TestServer
from psycopg import sql

from domain import ot
from gateway import keys
from gateway.app import Services, create_app
from gateway.auth import sign_token
from gateway.http import MAX_BODY_BYTES
from gateway.session import CLOSE_SLOW_CONSUMER, CLOSE_UNAUTHORIZED, SessionLimits
from gateway.store import UNAVAILABLE_MESSAGE, Store, StoreConfig
from schema.frames import HARD_FRAME_BYTES, MAX_FRAME_BYTES, Codec
from tests.test_protocol import signed
from tests.wsclient import DocState, Message, WsClient

SECRET = b"test-secret"  # what the app_client fixture signs with
OWNER, EDITOR, VIEWER, STRANGER = "olga", "ed", "vic", "stan"
JSON_HEADERS = {"Content-Type": "application/json"}


@dataclass
class Env:
    """A running in-process gateway with three documents owned by OWNER."""

    http: TestClient[Any, Any]
    docs: dict[str, str] = field(default_factory=dict)

    @property
    def ws_url(self) -> str:
        """The WebSocket endpoint."""
        return str(self.http.make_url("/v1/ws"))

    async def api(
        self, method: str, path: str, user: str | None = OWNER, **kw: Any
    ) -> tuple[int, Any]:
        """``(status, JSON body or None)`` of a request as ``user`` (None: no header)."""
        headers = kw.pop("headers", {})
        if user is not None:
            headers.setdefault("Authorization", f"Bearer {sign_token(SECRET, user)}")
        async with self.http.request(method, path, headers=headers, **kw) as r:
            raw = await r.read()
            return r.status, orjson.loads(raw) if raw else None

    async def text(self, doc: str) -> tuple[str, int]:
        """``(text, version)`` of a document over HTTP."""
        status, body = await self.api("GET", f"/v1/documents/{self.docs[doc]}")
        assert status == 200, body
        return body["text"], body["version"]

    async def connect(self, user: str = OWNER, codec: Codec = Codec.JSON) -> WsClient:
        """A WebSocket client that said hello as ``user``."""
        client = await WsClient.connect(
            self.http.session, self.ws_url, codec, token=sign_token(SECRET, user)
        )
        assert client.user == user
        return client


@pytest.fixture
async def env(app_client: TestClient[Any, Any]) -> Env:
    """Documents a ("alpha", with an editor and a viewer), b ("beta") and c ("gamma")."""
    e = Env(app_client)
    for name, text in (("a", "alpha"), ("b", "beta"), ("c", "gamma")):
        status, body = await e.api("POST", "/v1/documents", json={"title": name, "text": text})
        assert status == 201, body
        e.docs[name] = body["id"]
    for user, role in ((EDITOR, "editor"), (VIEWER, "viewer")):
        status, body = await e.api(
            "POST", f"/v1/documents/{e.docs['a']}/members", json={"user": user, "role": role}
        )
        assert status == 201, body
    return e


@dataclass
class Conn:
    """A connection subscribed to documents a and b, one accepted op on each."""

    ws: WsClient
    a: DocState
    b: DocState


@pytest.fixture(params=list(Codec), ids=[c.name.lower() for c in Codec])
async def conn(request: pytest.FixtureRequest, env: Env) -> AsyncIterator[Conn]:
    """An owner's connection in each codec, with accepted work on two subscriptions."""
    ws = await env.connect(OWNER, request.param)
    try:
        a = await ws.subscribe(env.docs["a"])
        b = await ws.subscribe(env.docs["b"])
        a.edit([5, " one"])
        b.edit(["two "])
        await ws.wait_until(lambda: a.quiet and b.quiet)
        assert (a.text, a.version, b.text, b.version) == ("alpha one", 1, "two beta", 1)
        yield Conn(ws, a, b)
    finally:
        await ws.close()


def op_msg(doc: str, v: Any, op: Any, seq: int) -> Message:
    """An ``op`` message."""
    return {"t": "op", "doc": doc, "v": v, "op": op, "seq": seq}


async def errors_after(ws: WsClient, mark: int) -> list[Message]:
    """The errors received since ``mark``, once everything sent before a ping has arrived."""
    await ws.ping()
    return [m for m in ws.since(mark) if m["t"] == "error"]


async def expect_one_error(
    ws: WsClient, mark: int, code: str, doc: str | None = None, seq: int | None = None
) -> Message:
    """Exactly one error arrived since ``mark``, with ``code`` (and ``doc``/``seq`` if given).

    Errors about ops come from the room after its next tick, so wait for the error first.
    """
    await ws.wait_for(lambda m: m["t"] == "error", since=mark)
    errors = await errors_after(ws, mark)
    assert [e["code"] for e in errors] == [code], errors
    (err,) = errors
    assert isinstance(err["message"], str) and err["message"]
    if doc is not None:
        assert err.get("doc") == doc, err
    if seq is not None:
        assert err.get("seq") == seq, err
    return err


async def assert_intact(env: Env, conn: Conn) -> None:
    """Both subscriptions still edit, and the stored texts are exactly the accepted ops."""
    for state in (conn.b, conn.a):  # the other subscription first
        assert state.quiet and not state.problems, state.problems
        assert state.text is not None
        before = (state.text, state.version)
        assert await env.text("a" if state is conn.a else "b") == before
        state.edit([len(state.text), "+"])
        await conn.ws.wait_until(lambda s=state: s.quiet)  # type: ignore[misc]
        assert state.version == before[1] + 1
        assert await env.text("a" if state is conn.a else "b") == (before[0] + "+", before[1] + 1)
    assert not conn.a.problems and not conn.b.problems


# -- malformed frames ---------------------------------------------------------------------


@pytest.mark.parametrize(
    "payload",
    [
        pytest.param(b"not a frame \xc1\xff", id="undecodable"),
        pytest.param(b"[{", id="truncated"),
        pytest.param(42, id="int"),
        pytest.param("just a string", id="string"),
        pytest.param(None, id="null"),
    ],
)
async def test_malformed_frame_is_bad_frame(env: Env, conn: Conn, payload: Any) -> None:
    """A frame that does not decode, or is not a list of maps, gets bad_frame."""
    ws = conn.ws
    if isinstance(payload, bytes):
        data = payload if ws.codec is Codec.MSGPACK else payload.decode("latin-1").encode()
    elif ws.codec is Codec.MSGPACK:
        data = msgpack.packb(payload)
    else:
        data = orjson.dumps(payload)
    mark = len(ws.log)
    await ws.send_raw(data)
    await expect_one_error(ws, mark, "bad_frame")
    await assert_intact(env, conn)


async def test_a_msgpack_map_with_a_bin_key_is_bad_frame_and_nothing_in_it_is_applied(
    env: Env, conn: Conn
) -> None:
    """A bin map key (msgpack's strict_map_key lets it through with str keys) makes the
    frame undecodable, as an int key does: the op beside it is not applied."""
    ws = conn.ws
    if ws.codec is not Codec.MSGPACK:
        pytest.skip("msgpack's bin type")
    op = op_msg(env.docs["a"], conn.a.version, [0, "X"], 99) | {b"junk": 1}  # type: ignore[operator]
    mark = len(ws.log)
    await ws.send_raw(msgpack.packb([op], use_bin_type=True))
    await expect_one_error(ws, mark, "bad_frame")
    await assert_intact(env, conn)


async def test_wrong_frame_type_is_bad_frame(env: Env, conn: Conn) -> None:
    """A binary frame on json (or a text frame on msgpack) gets bad_frame, even if well formed."""
    ws = conn.ws
    mark = len(ws.log)
    # JSON text in the frame type the codec does not use: binary on json, text on msgpack.
    await ws.send_raw(orjson.dumps([{"t": "ping"}]), binary=ws.codec is Codec.JSON)
    await expect_one_error(ws, mark, "bad_frame")
    assert [m["t"] for m in ws.since(mark)] == ["error", "pong"]  # the frame was not handled
    await assert_intact(env, conn)


async def test_items_that_are_not_maps_are_bad_message(env: Env, conn: Conn) -> None:
    """Each non-map item of a frame gets bad_message; the maps in it are still handled."""
    ws = conn.ws
    mark = len(ws.log)
    await ws.send(1, {"t": "ping"}, [], "x")  # type: ignore[arg-type]
    errors = await errors_after(ws, mark)
    assert [e["code"] for e in errors] == ["bad_message"] * 3
    assert [m["t"] for m in ws.since(mark)] == ["error", "pong", "error", "error", "pong"]
    await assert_intact(env, conn)


async def test_empty_frame_is_ignored(env: Env, conn: Conn) -> None:
    """An empty list is a valid frame with nothing to do."""
    mark = len(conn.ws.log)
    await conn.ws.send()
    assert await errors_after(conn.ws, mark) == []
    await assert_intact(env, conn)


async def test_lone_map_frame_is_accepted(env: Env, conn: Conn) -> None:
    """A frame that is one map (not a list) is handled as a frame of one message."""
    ws = conn.ws
    mark = len(ws.log)
    single = {"t": "ping"}
    await ws.send_raw(msgpack.packb(single) if ws.codec is Codec.MSGPACK else orjson.dumps(single))
    await ws.wait_for(lambda m: m["t"] == "pong", since=mark)
    assert await errors_after(ws, mark) == []
    await assert_intact(env, conn)


# -- malformed messages ------------------------------------------------------------------


MALFORMED_MESSAGES: list[tuple[str, Message, str]] = [
    ("unknown type", {"t": "nope"}, "bad_message"),
    ("null type", {"t": None}, "bad_message"),
    ("no type", {"no": "type"}, "bad_message"),
    ("sub without doc", {"t": "sub"}, "bad_message"),
    ("sub doc int", {"t": "sub", "doc": 7}, "bad_message"),
    ("sub v str", {"t": "sub", "doc": "A", "v": "1"}, "bad_message"),
    ("unsub without doc", {"t": "unsub"}, "bad_message"),
    ("op without seq", {"t": "op", "doc": "A", "v": 1, "op": ["x"]}, "bad_message"),
    ("op without v", {"t": "op", "doc": "A", "op": ["x"], "seq": 9}, "bad_message"),
    ("op without op", {"t": "op", "doc": "A", "v": 1, "seq": 9}, "bad_message"),
    ("op without doc", {"t": "op", "v": 1, "op": ["x"], "seq": 9}, "bad_message"),
    ("op v str", {"t": "op", "doc": "A", "v": "1", "op": ["x"], "seq": 9}, "bad_message"),
    ("op v bool", {"t": "op", "doc": "A", "v": True, "op": ["x"], "seq": 9}, "bad_message"),
    ("op seq negative", {"t": "op", "doc": "A", "v": 1, "op": ["x"], "seq": -9}, "bad_message"),
    ("op seq past int64", {"t": "op", "doc": "A", "v": 1, "op": ["x"], "seq": 1 << 63},
     "bad_message"),
    ("presence without data", {"t": "presence", "doc": "A"}, "bad_message"),
    ("second hello", {"t": "hello", "token": "x"}, "bad_message"),
]


async def test_malformed_messages(env: Env, conn: Conn) -> None:
    """Unknown types and missing or mistyped fields get their code; nothing is applied."""
    for name, raw, code in MALFORMED_MESSAGES:
        msg = {k: (env.docs["a"] if v == "A" else v) for k, v in raw.items()}
        mark = len(conn.ws.log)
        await conn.ws.send(msg)
        err = await expect_one_error(conn.ws, mark, code)
        if msg.get("t") == "op" and msg.get("seq", -1) >= 0:
            assert err.get("seq") == msg["seq"], name  # the client can tell which op failed
        await assert_intact(env, conn)


# -- invalid ops ---------------------------------------------------------------------------

INVALID_OPS: list[tuple[str, Any]] = [
    ("string", "garbage"),
    ("map", {"d": 1}),
    ("null", None),
    ("int", 10),
    ("retain past end", [99, "x"]),
    ("delete past end", [{"d": 99}]),
    ("delete across end", [3, {"d": 99}]),
    ("zero retain", [0, "x"]),
    ("zero delete", [{"d": 0}]),
    ("negative retain", [-1]),
    ("bool retain", [True, "x"]),
    ("bool delete", [{"d": True}]),
    ("empty insert", [""]),
    ("float", [1.5]),
    ("null component", [None]),
    ("nested list", [["x"]]),
    ("delete with extra key", [{"d": 1, "x": 1}]),
    ("unknown component", [{"i": "x"}]),
]


async def test_invalid_ops_are_bad_op(env: Env, conn: Conn) -> None:
    """An op that is not a valid text op for the document gets bad_op with its doc and seq."""
    ws, doc = conn.ws, conn.a.doc
    for name, op in INVALID_OPS:
        seq = ws.next_seq()
        mark = len(ws.log)
        await ws.send(op_msg(doc, conn.a.version, op, seq))
        err = await expect_one_error(ws, mark, "bad_op", doc, seq)
        assert not [m for m in ws.since(mark) if m["t"] == "ack"], name
        assert "op" in err["message"] or "component" in err["message"], (name, err)
        await assert_intact(env, conn)


async def test_op_with_wrong_version_is_bad_version(env: Env, conn: Conn) -> None:
    """An op based on a version the document never had (negative, ahead) gets bad_version."""
    ws, doc = conn.ws, conn.a.doc
    for ahead in (None, 1, 1000, 2**62):
        v = -1 if ahead is None else conn.a.version + ahead
        seq = ws.next_seq()
        mark = len(ws.log)
        await ws.send(op_msg(doc, v, ["x"], seq))
        await expect_one_error(ws, mark, "bad_version", doc, seq)
        await assert_intact(env, conn)


async def test_sub_with_wrong_version_is_bad_version(env: Env, conn: Conn) -> None:
    """Catch-up from a version the document never had gets bad_version; the old sub stays."""
    ws = conn.ws
    for doc in (conn.a.doc, env.docs["c"]):  # subscribed already, and not
        for v in (-1, 3, 99):
            mark = len(ws.log)
            await ws.send({"t": "sub", "doc": doc, "v": v})
            await expect_one_error(ws, mark, "bad_version", doc)
    await assert_intact(env, conn)


async def test_json_integers_past_64_bits_read_as_floats(env: Env) -> None:
    """In JSON an integer outside -2**63..2**64-1 reads as a float: as ``v`` that is not an
    integer (``bad_message``, with the doc), and presence carries it as that float."""
    doc = env.docs["a"]
    ws, peer = await env.connect(), await env.connect(codec=Codec.MSGPACK)
    try:
        await ws.subscribe(doc)
        await peer.subscribe(doc)
        for v, code in ((2**64 - 1, "bad_version"), (10**20, "bad_message")):
            mark = len(ws.log)
            await ws.send_raw(f'[{{"t":"sub","doc":"{doc}","v":{v}}}]')
            await expect_one_error(ws, mark, code, doc)
            mark = len(ws.log)
            await ws.send_raw(f'[{{"t":"op","doc":"{doc}","v":{v},"op":["x"],"seq":5}}]')
            await expect_one_error(ws, mark, code, doc, 5)
        def seen() -> list[Any]:
            return [m["data"] for m in peer.log if m["t"] == "presence"]

        for n, value in enumerate((2**64, -(2**63), -(2**63) - 1), 1):
            await ws.send_raw(f'[{{"t":"presence","doc":"{doc}","data":{value}}}]')
            await peer.wait_until(lambda n=n: len(seen()) == n)  # type: ignore[misc]
        got = seen()
        assert got == [2.0**64, -(2**63), -(2.0**63)]
        assert [type(d) for d in got] == [float, int, float]
        assert await env.text("a") == ("alpha", 0)
    finally:
        await ws.close()
        await peer.close()


async def test_op_making_document_too_large_is_refused(env: Env, conn: Conn) -> None:
    """An op over the document size limit (8 Mi code points) gets too_large, over HTTP too."""
    from gateway.room import MAX_DOCUMENT_CHARS

    body = orjson.dumps({"v": conn.a.version, "op": ["x" * (MAX_DOCUMENT_CHARS + 1)]})
    status, body = await env.api(
        "POST", f"/v1/documents/{conn.a.doc}/ops", data=io.BytesIO(body), headers=JSON_HEADERS
    )
    assert (status, body["error"]["code"]) == (413, "too_large")
    await assert_intact(env, conn)


async def test_op_with_too_many_components_is_too_large(env: Env, conn: Conn) -> None:
    """An op of more than MAX_OP_COMPONENTS components gets too_large (with doc and seq; 413
    over HTTP) and is not applied; one of exactly that many is accepted."""
    limit = ot.MAX_OP_COMPONENTS
    a = conn.a
    mark = len(conn.ws.log)
    await conn.ws.send(op_msg(a.doc, a.version, ["x"] * (limit + 1), 99))
    await expect_one_error(conn.ws, mark, "too_large", a.doc, 99)
    status, body = await env.api(
        "POST", f"/v1/documents/{a.doc}/ops", json={"v": a.version, "op": [1] * (limit + 1)}
    )
    assert (status, body["error"]["code"]) == (413, "too_large")
    assert await env.text("a") == (a.text, a.version)
    status, body = await env.api(
        "POST", f"/v1/documents/{a.doc}/ops", json={"v": a.version, "op": ["x"] * limit}
    )
    assert (status, body) == (200, {"v": 2})
    await conn.ws.wait_until(lambda: a.version == 2)
    assert await env.text("a") == ("x" * limit + "alpha one", 2) == (a.text, a.version)
    await assert_intact(env, conn)


async def test_document_created_too_large_is_refused(env: Env) -> None:
    """A new document's text has the same limit as an edited one's: 413 too_large."""
    from domain.document import MAX_TEXT_CHARS

    for size, status in ((MAX_TEXT_CHARS + 1, 413), (MAX_TEXT_CHARS, 201)):
        body = orjson.dumps({"title": "big", "text": "x" * size})
        got, answer = await env.api(
            "POST", "/v1/documents", data=io.BytesIO(body), headers=JSON_HEADERS
        )
        assert got == status, size
        if status == 413:
            assert answer["error"]["code"] == "too_large"
        else:
            assert answer["version"] == 0 and len(answer["text"]) == size


# -- oversized frames -----------------------------------------------------------------------


async def test_oversized_frame_is_too_large_and_connection_stays_usable(
    env: Env, conn: Conn
) -> None:
    """A frame over 1 MiB gets too_large; nothing in it is applied; the connection goes on."""
    ws, doc = conn.ws, conn.a.doc
    msg = op_msg(doc, conn.a.version, ["x" * MAX_FRAME_BYTES], ws.next_seq())
    mark = len(ws.log)
    await ws.send(msg)
    await expect_one_error(ws, mark, "too_large")
    await assert_intact(env, conn)
    # Just under the limit is accepted.
    padding = MAX_FRAME_BYTES - 200
    conn.a.edit(["y" * padding])
    await ws.wait_until(lambda: conn.a.quiet)
    assert (await env.text("a"))[0].startswith("y" * padding)
    await assert_intact(env, conn)


async def test_frame_over_hard_limit_closes_with_1009(env: Env, conn: Conn) -> None:
    """A frame over the 16 MiB hard limit closes the connection (1009); accepted ops stay."""
    before = await env.text("a"), await env.text("b")
    with contextlib.suppress(ConnectionError):  # the server may close while we still send
        await conn.ws.send_raw(b"x" * (HARD_FRAME_BYTES + 1))
    assert await conn.ws.wait_closed() == 1009
    assert (await env.text("a"), await env.text("b")) == before


async def test_a_frame_of_exactly_the_hard_limit_is_too_large_not_closed(
    env: Env, conn: Conn
) -> None:
    """16 MiB is not over the hard limit (aiohttp refuses at its size, so the server sets
    one byte more): ``too_large`` as any frame over 1 MiB, and the connection goes on."""
    ws = conn.ws
    mark = len(ws.log)
    await ws.send_raw(b"x" * HARD_FRAME_BYTES)
    await expect_one_error(ws, mark, "too_large")
    await assert_intact(env, conn)


async def test_too_many_messages_in_a_frame(env: Env, conn: Conn) -> None:
    """A frame of more than 1000 messages gets too_large and none of them is handled."""
    ws = conn.ws
    mark = len(ws.log)
    await ws.send(*[{"t": "ping"}] * 1001)
    await expect_one_error(ws, mark, "too_large")
    assert [m["t"] for m in ws.since(mark)] == ["error", "pong"]
    await assert_intact(env, conn)


# -- authorization ----------------------------------------------------------------------------


async def test_viewer_edit_is_forbidden(env: Env, conn: Conn) -> None:
    """A viewer may subscribe and read but its op gets forbidden (and is not applied)."""
    viewer = await env.connect(VIEWER, conn.ws.codec)
    try:
        state = await viewer.subscribe(conn.a.doc)
        assert state.text == conn.a.text
        seq = viewer.next_seq()
        mark = len(viewer.log)
        await viewer.send(op_msg(conn.a.doc, state.version, ["x"], seq))
        await expect_one_error(viewer, mark, "forbidden", conn.a.doc, seq)
        await assert_intact(env, conn)
        # The viewer still receives the owner's ops.
        await viewer.wait_until(lambda: state.version == conn.a.version)
        assert state.text == conn.a.text and not state.problems
    finally:
        await viewer.close()


async def test_removed_member_is_unsubscribed(env: Env, conn: Conn) -> None:
    """A member removed while subscribed gets not_found for the document and no later ops."""
    editor = await env.connect(EDITOR, conn.ws.codec)
    try:
        state = await editor.subscribe(conn.a.doc)
        mark = len(editor.log)
        status, _ = await env.api("DELETE", f"/v1/documents/{conn.a.doc}/members/{EDITOR}")
        assert status == 204
        await expect_one_error(editor, mark, "not_found", conn.a.doc)
        seen = state.version
        conn.a.edit(["secret "])
        await conn.ws.wait_until(lambda: conn.a.quiet)
        await editor.ping()
        assert state.version == seen and "secret" not in (state.text or "")
        assert not [m for m in editor.since(mark) if m["t"] == "ops"]
        mark = len(editor.log)
        await editor.send(op_msg(conn.a.doc, seen, ["x"], editor.next_seq()))
        await expect_one_error(editor, mark, "not_subscribed", conn.a.doc)
        await assert_intact(env, conn)
    finally:
        await editor.close()


async def test_non_member_cannot_subscribe(env: Env, conn: Conn) -> None:
    """A user who is not a member gets not_found for the document (existence not revealed)."""
    stranger = await env.connect(STRANGER, conn.ws.codec)
    try:
        mark = len(stranger.log)
        await stranger.send({"t": "sub", "doc": conn.a.doc})
        await expect_one_error(stranger, mark, "not_found", conn.a.doc)
        mark = len(stranger.log)
        await stranger.send(op_msg(conn.a.doc, 0, ["x"], 1))
        await expect_one_error(stranger, mark, "not_subscribed", conn.a.doc, 1)
    finally:
        await stranger.close()
    await assert_intact(env, conn)


@pytest.mark.parametrize("doc", [str(UUID(int=7)), "not-a-uuid"], ids=["unknown", "malformed"])
async def test_sub_to_unknown_document_is_not_found(env: Env, conn: Conn, doc: str) -> None:
    """A subscription to a document that does not exist gets not_found."""
    mark = len(conn.ws.log)
    await conn.ws.send({"t": "sub", "doc": doc})
    await expect_one_error(conn.ws, mark, "not_found", doc)
    await assert_intact(env, conn)


async def test_op_before_sub_is_not_subscribed(env: Env, conn: Conn) -> None:
    """An op for a document the connection has not subscribed to gets not_subscribed."""
    ws, doc = conn.ws, env.docs["c"]
    seq = ws.next_seq()
    mark = len(ws.log)
    await ws.send(op_msg(doc, 0, ["x"], seq))
    await expect_one_error(ws, mark, "not_subscribed", doc, seq)
    assert await env.text("c") == ("gamma", 0)
    await assert_intact(env, conn)


async def test_op_after_unsub_is_not_subscribed(env: Env, conn: Conn) -> None:
    """After unsub, ops for that document are refused and no more ops arrive for it."""
    ws = conn.ws
    await ws.send({"t": "unsub", "doc": conn.b.doc})
    seq = ws.next_seq()
    mark = len(ws.log)
    await ws.send(op_msg(conn.b.doc, conn.b.version, ["x"], seq))
    await expect_one_error(ws, mark, "not_subscribed", conn.b.doc, seq)
    assert await env.text("b") == ("two beta", 1)
    status, _ = await env.api("POST", f"/v1/documents/{conn.b.doc}/ops", json={"v": 1, "op": ["!"]})
    assert status == 200
    await ws.ping()
    assert not [m for m in ws.since(mark) if m["t"] == "ops" and m["doc"] == conn.b.doc]
    conn.b = await ws.subscribe(conn.b.doc)  # subscribing again gives the current snapshot
    assert (conn.b.text, conn.b.version) == ("!two beta", 2)
    await assert_intact(env, conn)


async def test_messages_before_hello_are_unauthorized(env: Env) -> None:
    """Before hello only ping works; other messages get unauthorized, with their doc and
    seq, and change nothing."""
    ws = await WsClient.connect(env.http.session, env.ws_url)
    try:
        mark = len(ws.log)
        await ws.send({"t": "sub", "doc": env.docs["a"]})
        await ws.send(op_msg(env.docs["a"], 0, ["x"], 1))
        await ws.send({"t": "unsub", "doc": env.docs["b"].upper()})
        errors = await errors_after(ws, mark)
        assert [e["code"] for e in errors] == ["unauthorized"] * 3
        # Each names its request, as any error does (the document in its canonical form).
        named = [(e.get("doc"), e.get("seq")) for e in errors]
        assert named == [(env.docs["a"], None), (env.docs["a"], 1), (env.docs["b"], None)]
        assert await env.text("a") == ("alpha", 0)
    finally:
        await ws.close()


@pytest.mark.parametrize(
    "token",
    [
        pytest.param("garbage", id="garbage"),
        pytest.param("", id="empty"),
        pytest.param(sign_token(b"another secret", OWNER), id="other-secret"),
        pytest.param(sign_token(SECRET, OWNER, ttl=-1), id="expired"),
        pytest.param(sign_token(SECRET, OWNER)[:-2] + "xx", id="tampered"),
        pytest.param(sign_token(SECRET, OWNER) + "!!", id="junk-appended"),
        pytest.param(signed(b'{"u":"olga","exp":"soon"}', SECRET), id="exp-not-a-number"),
    ],
)
async def test_bad_token_is_unauthorized_then_closed(env: Env, token: str) -> None:
    """A hello with a bad token gets error unauthorized, then the server closes with 4001."""
    ws = await WsClient.connect(env.http.session, env.ws_url)
    try:
        reply = await ws.hello(token)
        assert (reply["t"], reply["code"]) == ("error", "unauthorized")
        assert await ws.wait_closed() == CLOSE_UNAUTHORIZED
    finally:
        await ws.close()
    assert await env.text("a") == ("alpha", 0)


async def test_a_session_ends_when_its_token_expires(env: Env) -> None:
    """A session lasts as long as its token: then unauthorized and close 4001, with every op
    acked before still in the store."""
    ws = await WsClient.connect(env.http.session, env.ws_url)
    try:
        reply = await ws.hello(sign_token(SECRET, OWNER, ttl=2))
        assert reply["t"] == "welcome"
        state = await ws.subscribe(env.docs["b"])
        state.edit(["kept "])
        await ws.wait_until(lambda: state.quiet)
        assert await ws.wait_closed() == CLOSE_UNAUTHORIZED
        errors = [m for m in ws.log if m["t"] == "error"]
        assert [e["code"] for e in errors] == ["unauthorized"]
        assert "expired" in errors[0]["message"]
    finally:
        await ws.close()
    assert await env.text("b") == ("kept beta", 1)


async def test_hello_without_token_is_unauthorized_then_closed(env: Env) -> None:
    """A hello that carries no token is treated like a bad token: unauthorized, close 4001."""
    ws = await WsClient.connect(env.http.session, env.ws_url)
    try:
        mark = len(ws.log)
        await ws.send({"t": "hello"})
        err = await ws.wait_for(lambda m: m["t"] == "error", since=mark)
        assert err["code"] == "unauthorized"
        assert await ws.wait_closed() == CLOSE_UNAUTHORIZED
    finally:
        await ws.close()


async def test_default_subprotocol_is_json(env: Env) -> None:
    """Without an offered subprotocol the connection speaks JSON in text frames."""
    ws = await WsClient.connect(env.http.session, env.ws_url, Codec.JSON, offer_protocol=False)
    try:
        assert ws.ws.protocol is None
        reply = await ws.hello(sign_token(SECRET, OWNER))
        assert reply["t"] == "welcome"
    finally:
        await ws.close()


# -- presence -------------------------------------------------------------------------------


async def test_presence_limits(env: Env, conn: Conn) -> None:
    """Presence over 4 KiB gets too_large; presence for an unsubscribed document not_subscribed."""
    ws = conn.ws
    mark = len(ws.log)
    await ws.send({"t": "presence", "doc": conn.a.doc, "data": {"x": "y" * 5000}})
    await expect_one_error(ws, mark, "too_large", conn.a.doc)
    mark = len(ws.log)
    await ws.send({"t": "presence", "doc": env.docs["c"], "data": {"cursor": 1}})
    await expect_one_error(ws, mark, "not_subscribed", env.docs["c"])
    mark = len(ws.log)
    await ws.send({"t": "presence", "doc": conn.a.doc, "data": {"cursor": 1}})
    assert await errors_after(ws, mark) == []
    await assert_intact(env, conn)


@pytest.mark.parametrize(
    "data",
    [
        pytest.param({"cursor": b"\x01\x02"}, id="bin"),
        pytest.param({"cursor": msgpack.ExtType(7, b"x")}, id="ext"),
        pytest.param({b"cursor": 1}, id="bin-key"),
        pytest.param({"cursor": msgpack.Timestamp(5, 0)}, id="timestamp"),
    ],
)
async def test_msgpack_presence_that_is_not_json_is_refused(env: Env, data: Any) -> None:
    """A msgpack client's presence that JSON cannot carry is bad_message and is not relayed:
    a JSON subscriber of the document keeps getting every op and its acks. (A bin key of
    the message map itself makes the whole frame bad_frame:
    ``test_a_msgpack_map_with_a_bin_key_is_bad_frame...``.)"""
    doc = env.docs["a"]
    reader = await env.connect(OWNER, Codec.JSON)
    writer = await env.connect(EDITOR, Codec.MSGPACK)
    try:
        seen = await reader.subscribe(doc)
        await writer.subscribe(doc)
        mark = len(writer.log)
        await writer.send({"t": "presence", "doc": doc, "data": data})
        await expect_one_error(writer, mark, "bad_message", doc)
        seen.edit([5, "!"])
        await reader.wait_until(lambda: seen.quiet)
        await reader.ping()
        assert not any(m["t"] == "presence" for m in reader.log), reader.log
        assert (seen.text, seen.version, seen.problems) == ("alpha!", 1, [])
    finally:
        await reader.close()
        await writer.close()


def _session_of(env: Env, ws: WsClient) -> Any:
    """The server's side of the in-process connection ``ws``."""
    (found,) = [s for s in env.http.app[keys.SESSIONS] if s.id == ws.session]
    return found


async def test_a_message_the_codec_cannot_encode_costs_only_itself(
    env: Env, caplog: pytest.LogCaptureFixture
) -> None:
    """A queued message JSON cannot encode is left out of its frame; the messages queued
    with it are sent, and the session logs one warning for all such messages."""
    ws = await env.connect(OWNER, Codec.JSON)
    try:
        session = _session_of(env, ws)
        for n in range(2):
            mark = len(ws.log)
            session.send({"t": "presence", "doc": "d", "data": b"not json"})
            session.send({"t": "pong", "n": n})
            await ws.wait_for(lambda m: m["t"] == "pong", since=mark)
            assert [m["t"] for m in ws.since(mark)] == ["pong"]
        await ws.ping()
    finally:
        await ws.close()
    warnings_logged = [r for r in caplog.records if "cannot be encoded" in r.getMessage()]
    assert len(warnings_logged) == 1 and warnings_logged[0].exc_info is None


async def test_remote_presence_that_is_not_json_clears_it(env: Env) -> None:
    """Presence from another process that is not a JSON value clears that session's presence
    here instead of being relayed (a process of another version may let it through)."""
    doc = env.docs["a"]
    ws = await env.connect(OWNER, Codec.JSON)
    try:
        await ws.subscribe(doc)
        rooms = env.http.app[keys.ROOMS]
        room = await rooms.get(UUID(doc))
        assert room is not None
        proc = rooms.hub.proc  # a live process: its sessions' presence is not swept
        mark = len(ws.log)
        room.remote_presence("s9", EDITOR, {"cursor": 1}, proc)
        await ws.wait_for(lambda m: m["t"] == "presence", since=mark)
        room.remote_presence("s9", EDITOR, {"cursor": b"\x01"}, proc)
        await ws.wait_for(lambda m: m["t"] == "presence" and m["data"] is None, since=mark)
        await ws.ping()
        presence = [m["data"] for m in ws.since(mark) if m["t"] == "presence"]
        assert presence == [{"cursor": 1}, None]
        assert "s9" not in room.presence
    finally:
        await ws.close()


# -- session limits (an app of its own with small limits) -----------------------------------


@contextlib.asynccontextmanager
async def limited_env(store_config: StoreConfig, limits: SessionLimits) -> AsyncIterator[Env]:
    """A gateway of its own with session ``limits`` and documents a, b, c and big (5,000
    characters)."""
    app = create_app(Services(store=Store(store_config), secret=SECRET, limits=limits))
    client: TestClient[Any, Any] = TestClient(TestServer(app, host="127.0.0.1", port=0))
    await client.start_server()
    try:
        e = Env(client)
        for name, text in (("a", "a"), ("b", "b"), ("c", "c"), ("big", "z" * 5000)):
            status, body = await e.api("POST", "/v1/documents", json={"title": name, "text": text})
            assert status == 201, body
            e.docs[name] = body["id"]
        yield e
    finally:
        await client.close()


@pytest.fixture
async def small_env(store_config: StoreConfig) -> AsyncIterator[Env]:
    """A gateway with tiny session limits: 2 subscriptions, a 4 KiB send buffer."""
    limits = SessionLimits(max_subscriptions=2, max_buffer_bytes=4096)
    async with limited_env(store_config, limits) as e:
        yield e


async def test_too_many_subscriptions(small_env: Env) -> None:
    """A subscription over the per-connection limit gets too_large; the others keep working."""
    ws = await small_env.connect(OWNER)
    try:
        a = await ws.subscribe(small_env.docs["a"])
        await ws.subscribe(small_env.docs["b"])
        mark = len(ws.log)
        await ws.send({"t": "sub", "doc": small_env.docs["c"]})
        await expect_one_error(ws, mark, "too_large", small_env.docs["c"])
        await ws.subscribe(small_env.docs["a"])  # re-subscribing is not a new subscription
        a = ws.docs[small_env.docs["a"]]
        a.edit(["!"])
        await ws.wait_until(lambda: a.quiet)
        assert await small_env.text("a") == ("!a", 1)
    finally:
        await ws.close()


async def test_messages_over_the_rate_are_rate_limited_and_not_handled(
    store_config: StoreConfig,
) -> None:
    """Each message past the connection's burst gets rate_limited with its doc and seq; a
    refused op is not applied, and once the bucket refills a resend of it is accepted."""
    limits = SessionLimits(messages_per_second=1.0, message_burst=4.0)
    async with limited_env(store_config, limits) as env:
        doc = env.docs["a"]
        ws = await env.connect(OWNER)  # the hello takes one message of the burst
        await ws.subscribe(doc)  # and the sub another
        mark = len(ws.log)
        ops = [op_msg(doc, 0, [], seq) for seq in range(4)]
        await ws.send({"t": "ping"}, *ops)
        await ws.wait_for(lambda m: m["t"] == "ack", since=mark)
        limited = [m for m in ws.since(mark) if m.get("code") == "rate_limited"]
        assert [(m["doc"], m["seq"]) for m in limited] == [(doc, 1), (doc, 2), (doc, 3)]
        assert [m["seq"] for m in ws.since(mark) if m["t"] == "ack"] == [0]
        assert (await env.api("GET", f"/v1/documents/{doc}"))[1]["version"] == 1
        await asyncio.sleep(1.2)  # one message's worth of refill
        mark = len(ws.log)
        await ws.send(op_msg(doc, 1, [], 1))
        ack = await ws.wait_for(lambda m: m["t"] in ("ack", "error"), since=mark)
        assert (ack["t"], ack["seq"], ack["v"]) == ("ack", 1, 2)
        await ws.close()


async def test_a_connection_without_hello_is_closed_at_the_deadline(
    store_config: StoreConfig,
) -> None:
    """A connection that only pings (or sends nothing) gets unauthorized, then 4001, once
    the hello deadline passes; one that said hello in time stays open."""
    limits = SessionLimits(hello_seconds=0.3)
    async with limited_env(store_config, limits) as env:
        silent = await WsClient.connect(env.http.session, env.ws_url)
        pinging = await WsClient.connect(env.http.session, env.ws_url)
        greeted = await env.connect(OWNER)
        try:
            await pinging.send({"t": "ping"})
            for ws in (silent, pinging):
                assert await ws.wait_closed(within=5) == CLOSE_UNAUTHORIZED
                refused = [m for m in ws.log if m["t"] == "error"]
                assert [m["code"] for m in refused] == ["unauthorized"]
                assert "no hello within 0.3 s" in refused[0]["message"]
            await asyncio.sleep(0.3)
            mark = len(greeted.log)
            await greeted.send({"t": "ping"})
            assert (await greeted.wait_for(lambda m: m["t"] == "pong", since=mark))["t"] == "pong"
        finally:
            for ws in (silent, pinging, greeted):
                await ws.close()


async def test_slow_consumer_is_closed_with_4008(small_env: Env) -> None:
    """A session whose send buffer overflows is closed with 4008; the document is intact."""
    ws = await small_env.connect(OWNER)
    try:
        await ws.send({"t": "sub", "doc": small_env.docs["big"]})  # a 5 KB snapshot
        assert await ws.wait_closed() == CLOSE_SLOW_CONSUMER
    finally:
        await ws.close()
    assert await small_env.text("big") == ("z" * 5000, 0)


# -- HTTP -------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "headers",
    [
        pytest.param({}, id="missing"),
        pytest.param({"Authorization": "Bearer"}, id="empty"),
        pytest.param({"Authorization": "Bearer garbage"}, id="garbage"),
        pytest.param({"Authorization": "Basic b2xnYTpwdw=="}, id="basic"),
        pytest.param(
            {"Authorization": f"Bearer {sign_token(SECRET, OWNER, ttl=-1)}"}, id="expired"
        ),
        pytest.param({"Authorization": f"Bearer {sign_token(b'other', OWNER)}"}, id="other-secret"),
        pytest.param(
            {"Authorization": f"Bearer {sign_token(SECRET, OWNER)}!!"}, id="junk-appended"
        ),
        pytest.param(
            {"Authorization": "Bearer " + signed(b'{"u":"olga","exp":"soon"}', SECRET)},
            id="exp-not-a-number",
        ),
    ],
)
async def test_http_bad_token_is_401(env: Env, headers: dict[str, str]) -> None:
    """Every authenticated route answers 401 unauthorized without a valid bearer token."""
    doc = env.docs["a"]
    for method, path, body in [
        ("GET", f"/v1/documents/{doc}", None),
        ("POST", "/v1/documents", {"title": "x"}),
        ("POST", f"/v1/documents/{doc}/ops", {"v": 0, "op": ["x"]}),
        ("GET", f"/v1/documents/{doc}/ops", None),
        ("PATCH", f"/v1/documents/{doc}", {"title": "x"}),
        ("GET", f"/v1/documents/{doc}/members", None),
        ("POST", f"/v1/documents/{doc}/members", {"user": "x", "role": "viewer"}),
        ("DELETE", f"/v1/documents/{doc}/members/{VIEWER}", None),
    ]:
        status, reply = await env.api(method, path, user=None, headers=dict(headers), json=body)
        assert (status, reply["error"]["code"]) == (401, "unauthorized"), (method, path)
    assert await env.text("a") == ("alpha", 0)


async def test_websocket_route_without_an_upgrade_is_bad_request(env: Env) -> None:
    """A plain GET of /v1/ws answers in the error envelope, like every other route."""
    status, body = await env.api("GET", "/v1/ws", user=None)
    assert (status, body["error"]["code"]) == (400, "bad_request")
    assert "websocket" in body["error"]["message"].lower()


async def test_unknown_routes_are_404_without_a_token(env: Env) -> None:
    """No route is 404 and no such method 400, token or not; a real route still needs one."""
    assert (await env.api("GET", "/favicon.ico", user=None))[0] == 404
    status, body = await env.api("PUT", "/v1/documents", user=None)
    assert (status, body["error"]["code"]) == (400, "bad_request")
    status, body = await env.api("GET", f"/v1/documents/{env.docs['a']}", user=None)
    assert (status, body["error"]["code"]) == (401, "unauthorized")


async def test_http_health_needs_no_token(env: Env) -> None:
    """/healthz answers without a token."""
    assert await env.api("GET", "/healthz", user=None) == (200, {"status": "ok"})


NOBODY = str(UUID(int=12345))
"""A document id that does not exist."""

BAD_REQUESTS: list[tuple[str, str, dict[str, Any], int, str]] = [
    ("POST", "/v1/documents", {"data": b"not json"}, 400, "bad_request"),
    ("POST", "/v1/documents", {"data": b"[1, 2]"}, 400, "bad_request"),
    ("POST", "/v1/documents", {"json": {}}, 400, "bad_request"),
    ("POST", "/v1/documents", {"json": {"title": 5}}, 400, "bad_request"),
    ("POST", "/v1/documents", {"json": {"title": "t", "text": 5}}, 400, "bad_request"),
    ("POST", "/v1/documents", {"json": {"title": "t" * 201}}, 413, "too_large"),
    ("POST", "/v1/documents", {"json": {"title": "t\x00"}}, 400, "bad_request"),
    ("PATCH", "/A", {"json": {"title": "\x00"}}, 400, "bad_request"),
    ("POST", "/A/members", {"json": {"user": "x\x00", "role": "viewer"}}, 400, "bad_request"),
    ("POST", "/A/ops", {"json": {"v": 0, "op": ["x"], "client": "c\x00", "seq": 1}}, 400,
     "bad_request"),
    ("POST", "/v1/documents", {"data": "big"}, 413, "too_large"),
    # A body its Content-Encoding cannot decode (it was a 500 with a traceback).
    ("POST", "/v1/documents", {"data": b"\x1f\x8b not gzip", "headers": {
        "Content-Encoding": "gzip", "Content-Type": "application/json"}}, 400, "bad_request"),
    ("POST", "/A/ops", {"data": b"\x00\x00", "headers": {"Content-Encoding": "gzip"}}, 400,
     "bad_request"),
    ("POST", "/A/ops", {"data": b"{"}, 400, "bad_request"),
    ("POST", "/A/ops", {"json": {"op": ["x"]}}, 400, "bad_request"),
    ("POST", "/A/ops", {"json": {"v": True, "op": ["x"]}}, 400, "bad_request"),
    ("POST", "/A/ops", {"json": {"v": 0, "op": "x"}}, 400, "bad_op"),
    ("POST", "/A/ops", {"json": {"v": 0, "op": [99, "x"]}}, 400, "bad_op"),
    ("POST", "/A/ops", {"json": {"v": 0, "op": [True]}}, 400, "bad_op"),
    ("POST", "/A/ops", {"json": {"v": 99, "op": ["x"]}}, 400, "bad_version"),
    ("POST", "/A/ops", {"json": {"v": -1, "op": ["x"]}}, 400, "bad_version"),
    ("POST", "/A/ops", {"json": {"v": 0, "op": ["x"], "seq": 1}}, 400, "bad_request"),
    ("POST", "/A/ops", {"json": {"v": 0, "op": ["x"], "client": "c"}}, 400, "bad_request"),
    ("POST", "/A/ops", {"json": {"v": 0, "op": ["x"], "client": "c", "seq": -1}}, 400,
     "bad_request"),
    ("POST", "/A/ops", {"json": {"v": 0, "op": ["x"], "client": "c", "seq": 1 << 63}}, 400,
     "bad_request"),
    ("POST", "/A/ops", {"json": {"v": 0, "op": ["x"], "client": "", "seq": 1}}, 400, "bad_request"),
    ("POST", "/A/ops", {"json": {"v": 0, "op": ["x"], "client": "c" * 129, "seq": 1}}, 400,
     "bad_request"),
    ("GET", "/A/ops?from=-1", {}, 400, "bad_request"),
    ("GET", "/A/ops?from=x", {}, 400, "bad_request"),
    ("GET", "/A/ops?limit=0", {}, 400, "bad_request"),
    ("GET", "/A/ops?limit=1001", {}, 400, "bad_request"),
    ("GET", "/A/ops?limit=1_0", {}, 400, "bad_request"),
    ("GET", "/A/ops?from=%2B1", {}, 400, "bad_request"),
    ("PATCH", "/A", {"json": {"title": None}}, 400, "bad_request"),
    ("POST", "/A/members", {"json": {"user": "x"}}, 400, "bad_request"),
    ("POST", "/A/members", {"json": {"user": "x", "role": "owner"}}, 400, "bad_request"),
    ("POST", "/A/members", {"json": {"user": "x", "role": "admin"}}, 400, "bad_request"),
    ("POST", "/A/members", {"json": {"user": "", "role": "viewer"}}, 400, "bad_request"),
    ("POST", "/A/members", {"json": {"user": "x" * 129, "role": "viewer"}}, 400, "bad_request"),
    ("POST", "/A/members", {"json": {"user": OWNER, "role": "viewer"}}, 409, "conflict"),
    ("DELETE", f"/A/members/{OWNER}", {}, 409, "conflict"),
    ("DELETE", "/A/members/nobody", {}, 404, "not_found"),
    ("GET", f"/v1/documents/{NOBODY}", {}, 404, "not_found"),
    ("GET", "/v1/documents/not-a-uuid", {}, 404, "not_found"),
    ("POST", f"/v1/documents/{NOBODY}/ops", {"json": {"v": 0, "op": ["x"]}}, 404, "not_found"),
    ("GET", f"/v1/documents/{NOBODY}/ops", {}, 404, "not_found"),
    ("GET", f"/v1/documents/{NOBODY}/members", {}, 404, "not_found"),
    ("GET", "/v1/nothing-here", {}, 404, "not_found"),
]


async def test_http_bad_requests(env: Env) -> None:
    """Malformed bodies, ops, versions, queries and unknown documents get their status and code."""
    doc = env.docs["a"]
    text, v = "alpha", 0
    for method, raw_path, raw_kw, status, code in BAD_REQUESTS:
        case = (method, raw_path, status)
        path = raw_path.replace("/A", f"/v1/documents/{doc}", 1)
        kw = raw_kw
        if kw.get("data") == "big":  # a stream: aiohttp warns about large raw bodies
            kw = {"data": io.BytesIO(b"x" * (MAX_BODY_BYTES + 1)), "headers": JSON_HEADERS}
        got, body = await env.api(method, path, **kw)
        assert (got, body["error"]["code"]) == (status, code), (case, body)
        assert isinstance(body["error"]["message"], str), case
        assert await env.text("a") == (text, v), case
        # Earlier accepted ops are intact and the document still takes ops.
        got, body = await env.api("POST", f"/v1/documents/{doc}/ops", json={"v": v, "op": ["+"]})
        assert (got, body) == (200, {"v": v + 1}), case
        text, v = "+" + text, v + 1
        assert await env.text("a") == (text, v), case


@pytest.mark.parametrize(
    ("user", "method", "path", "body", "status", "code"),
    [
        (VIEWER, "POST", "/A/ops", {"v": 0, "op": ["x"]}, 403, "forbidden"),
        (VIEWER, "PATCH", "/A", {"title": "mine"}, 403, "forbidden"),
        (VIEWER, "POST", "/A/members", {"user": "z", "role": "viewer"}, 403, "forbidden"),
        (EDITOR, "POST", "/A/members", {"user": "z", "role": "viewer"}, 403, "forbidden"),
        (EDITOR, "DELETE", f"/A/members/{VIEWER}", None, 403, "forbidden"),
        (STRANGER, "GET", "/A", None, 404, "not_found"),
        (STRANGER, "GET", "/A/ops", None, 404, "not_found"),
        (STRANGER, "GET", "/A/members", None, 404, "not_found"),
        (STRANGER, "POST", "/A/ops", {"v": 0, "op": ["x"]}, 404, "not_found"),
        (STRANGER, "PATCH", "/A", {"title": "mine"}, 404, "not_found"),
        (STRANGER, "POST", "/A/members", {"user": "z", "role": "viewer"}, 404, "not_found"),
    ],
)
async def test_http_roles(
    env: Env, user: str, method: str, path: str, body: Any, status: int, code: str
) -> None:
    """Members without the role get 403; non-members get 404 (the document stays hidden)."""
    path = path.replace("/A", f"/v1/documents/{env.docs['a']}", 1)
    got, reply = await env.api(method, path, user=user, json=body)
    assert (got, reply["error"]["code"]) == (status, code), reply
    assert await env.text("a") == ("alpha", 0)
    status, members = await env.api("GET", f"/v1/documents/{env.docs['a']}/members")
    assert members == {
        "members": [
            {"user": EDITOR, "role": "editor"},
            {"user": OWNER, "role": "owner"},
            {"user": VIEWER, "role": "viewer"},
        ]
    }


async def test_http_members_and_rename(env: Env) -> None:
    """The owner shares and unshares; editors rename; a removed member loses access."""
    doc = env.docs["a"]
    assert (await env.api("GET", f"/v1/documents/{doc}", user=VIEWER))[0] == 200
    status, body = await env.api("PATCH", f"/v1/documents/{doc}", user=EDITOR, json={"title": "N"})
    assert (status, body["title"], body["version"]) == (200, "N", 0)
    status, _ = await env.api("DELETE", f"/v1/documents/{doc}/members/{VIEWER}")
    assert status == 204
    assert (await env.api("GET", f"/v1/documents/{doc}", user=VIEWER))[0] == 404
    status, body = await env.api(
        "POST", f"/v1/documents/{doc}/members", json={"user": VIEWER, "role": "editor"}
    )
    assert (status, body) == (201, {"user": VIEWER, "role": "editor"})
    status, body = await env.api(
        "POST", f"/v1/documents/{doc}/ops", user=VIEWER, json={"v": 0, "op": [5, "!"]}
    )
    assert (status, body) == (200, {"v": 1})
    assert await env.text("a") == ("alpha!", 1)


@pytest.mark.slow
async def test_a_store_failure_tells_clients_no_sql(
    env: Env, store_config: StoreConfig, caplog: pytest.LogCaptureFixture
) -> None:
    """While another transaction holds the event table's lock past lock_timeout, a create
    and a WebSocket op are refused with the one generic ``unavailable`` message;
    PostgreSQL's text (SQL, function names) is only in the server log."""
    if store_config.database_url is None:
        pytest.skip("the lock timeout is PostgreSQL's")
    ws = await env.connect()
    a = await ws.subscribe(env.docs["a"])
    table = sql.Identifier(str(store_config.database_schema), "coscribe_events")
    async with await psycopg.AsyncConnection.connect(store_config.database_url) as holder:
        await holder.execute(sql.SQL("LOCK TABLE {} IN EXCLUSIVE MODE").format(table))
        mark = len(ws.log)
        a.edit(["x"])
        status, create = await env.api("POST", "/v1/documents", json={"title": "t"})
        refused = await ws.wait_for(lambda m: m["t"] == "error", since=mark, within=15)
        await holder.rollback()
    assert (status, create["error"]["code"], refused["code"]) == (503, "unavailable", "unavailable")
    assert [create["error"]["message"], refused["message"]] == [UNAVAILABLE_MESSAGE] * 2
    logged = [r.getMessage() for r in caplog.records if "lock timeout" in r.getMessage()]
    assert len(logged) >= 2 and all("event store unavailable" in m for m in logged), logged


# -- the app itself ---------------------------------------------------------------------------


def test_app_factory_emits_no_warnings(tmp_path: Any) -> None:
    """Building the app raises no warnings (the suite runs with warnings as errors)."""
    store = Store(StoreConfig(data_dir=tmp_path))
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error")
            create_app(Services(store=store, secret=SECRET))
    finally:
        store.close()


_FIRST_REQUEST = """
import asyncio, sys, tempfile, warnings
from pathlib import Path
warnings.simplefilter("error")
from aiohttp.test_utils import TestClient, TestServer
from gateway.app import Services, create_app
from gateway.auth import sign_token
from gateway.store import Store, StoreConfig

async def main() -> int:
    store = Store(StoreConfig(data_dir=Path(tempfile.mkdtemp())))
    client = TestClient(TestServer(create_app(Services(store=store, secret=b"s"))))
    await client.start_server()
    try:
        headers = {"Authorization": "Bearer " + sign_token(b"s", "u")}
        r = await client.post("/v1/documents", json={"title": "t"}, headers=headers)
        return r.status
    finally:
        await client.close()

print(asyncio.run(main()))
"""


def test_first_request_emits_no_warnings() -> None:
    """In a fresh process with warnings as errors, the first HTTP request succeeds (201)."""
    import subprocess
    import sys
    from pathlib import Path

    root = Path(__file__).resolve().parent.parent
    out = subprocess.run(
        [sys.executable, "-c", _FIRST_REQUEST],
        cwd=root,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert out.stdout.strip().splitlines()[-1:] == ["201"], out.stdout + out.stderr


async def test_a_request_the_http_parser_refuses_is_one_log_line(
    env: Env, caplog: pytest.LogCaptureFixture
) -> None:
    """A control character in a header, a header line over 8190 bytes: aiohttp answers 400
    itself and logged a traceback at ERROR for each (any client could fill the log); now
    each is one INFO line, and the server goes on serving."""
    port = env.http.server.port
    assert port is not None
    caplog.set_level(logging.INFO, logger="aiohttp.server")
    for head in (b"Authorization: Bearer a\x1fb", b"X-Big: " + b"a" * 9000):
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        writer.write(b"GET /healthz HTTP/1.1\r\nHost: x\r\n" + head + b"\r\n\r\n")
        status = await reader.readline()
        writer.close()
        assert status.startswith(b"HTTP/1.") and b" 400 " in status, status
    await asyncio.sleep(0.05)
    server = [r for r in caplog.records if r.name == "aiohttp.server"]
    assert len(server) == 2, [r.getMessage() for r in server]
    assert all(r.levelno == logging.INFO and r.exc_info is None for r in server)
    assert "refused (400)" in server[0].getMessage()
    status, _ = await env.api("GET", "/healthz", user=None)
    assert status == 200


async def test_an_undecodable_body_is_one_log_line(
    env: Env, caplog: pytest.LogCaptureFixture
) -> None:
    """A gzip body that is not gzip: 400 ``bad_request``, and aiohttp, draining it after the
    answer, logged three chained tracebacks at ERROR for each; now one INFO line."""
    caplog.set_level(logging.INFO, logger="aiohttp.server")
    status, body = await env.api("POST", "/v1/documents", data=b"\x1f\x8b not gzip",
                                 headers={"Content-Encoding": "gzip"})
    assert (status, body["error"]["code"]) == (400, "bad_request")
    await asyncio.sleep(0.05)
    server = [r for r in caplog.records if r.name == "aiohttp.server"]
    assert all(r.levelno == logging.INFO and r.exc_info is None for r in server), [
        (r.levelname, r.getMessage()) for r in server]
