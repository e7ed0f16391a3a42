"""``gateway.resp``: the RESP2 parser on any split of the stream, and real Redis."""

from __future__ import annotations

from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from gateway import resp


def _encode(value: Any) -> bytes:
    """RESP2 of a reply value, as a server writes it."""
    if value is None:
        return b"$-1\r\n"
    if isinstance(value, bytes):
        return b"$%d\r\n%s\r\n" % (len(value), value)
    if isinstance(value, bool):
        raise TypeError(value)
    if isinstance(value, int):
        return b":%d\r\n" % value
    if isinstance(value, str):
        return b"+%s\r\n" % value.encode()
    if isinstance(value, resp.RespError):
        return b"-%s\r\n" % str(value).encode()
    return b"*%d\r\n" % len(value) + b"".join(_encode(v) for v in value)


simple = st.text(st.characters(blacklist_characters="\r\n", blacklist_categories=("Cs",)))
replies = st.recursive(
    st.none() | st.binary(max_size=64) | st.integers(-(2**63), 2**63 - 1) | simple,
    lambda inner: st.lists(inner, max_size=5),
    max_leaves=12,
)


@settings(max_examples=200, deadline=None)
@given(values=st.lists(replies, min_size=1, max_size=8), data=st.data())
def test_parser_gives_every_reply_whatever_the_chunks(values: list[Any], data: Any) -> None:
    """Bulk strings holding CR LF, nested arrays, nulls: the same replies for any cutting."""
    stream = b"".join(_encode(v) for v in values)
    cuts = sorted(data.draw(st.lists(st.integers(0, len(stream)), max_size=6)))
    parser = resp.Parser()
    got: list[Any] = []
    last = 0
    for cut in [*cuts, len(stream)]:
        got += parser.feed(stream[last:cut])
        last = cut
    assert got == values


def test_parser_error_replies_and_garbage() -> None:
    (err,) = resp.Parser().feed(b"-ERR unknown command\r\n")
    assert isinstance(err, resp.RespError) and str(err) == "ERR unknown command"
    with pytest.raises(resp.RespError, match="not a RESP reply"):
        resp.Parser().feed(b"HTTP/1.1 400 Bad Request\r\n")
    with pytest.raises(resp.RespError, match="not a RESP reply"):
        resp.Parser().feed(b"$x\r\n")


def test_command_is_an_array_of_bulk_strings() -> None:
    assert resp.command("PUBLISH", "ch", b"a\r\nb") == (
        b"*3\r\n$7\r\nPUBLISH\r\n$2\r\nch\r\n$4\r\na\r\nb\r\n"
    )
    assert resp.Parser().feed(resp.command("SET", "é", b"")) == [[b"SET", "é".encode(), b""]]


@pytest.mark.redis
async def test_connection_talks_to_redis(redis_url: str, redis_prefix: str) -> None:
    """Pub/sub through two connections; an error reply comes back as ``RespError``."""
    sub = await resp.Connection.open(redis_url)
    pub = await resp.Connection.open(redis_url)
    channel = f"{redis_prefix}resp-test"
    try:
        sub.send(resp.command("SUBSCRIBE", channel))
        assert await sub.read() == [[b"subscribe", channel.encode(), 1]]
        payload = bytes(range(256)) * 40  # larger than one read of the server's
        pub.send(resp.command("PUBLISH", channel, payload) * 3 + resp.command("NOSUCH"))
        got: list[Any] = []
        while len(got) < 4:
            got += await pub.read()
        assert got[:3] == [1, 1, 1] and isinstance(got[3], resp.RespError)
        messages: list[Any] = []
        while len(messages) < 3:
            messages += await sub.read()
        assert messages == [[b"message", channel.encode(), payload]] * 3
    finally:
        sub.close()
        pub.close()


@pytest.mark.redis
async def test_connection_refused_auth_is_an_error(redis_url: str) -> None:
    """A password the server does not take fails ``open`` (this server has none set)."""
    url = redis_url.replace("redis://", "redis://:wrong@", 1)
    with pytest.raises(resp.RespError, match=r"AUTH|WRONGPASS|password"):
        await resp.Connection.open(url)


@pytest.mark.parametrize(("url", "tls"), [("rediss://h:1", True), ("REDISS://h:1", True),
                                          ("redis://h:1", False), ("Redis://h:1", False)])
async def test_tls_follows_the_scheme_in_any_case(
    monkeypatch: pytest.MonkeyPatch, url: str, tls: bool
) -> None:
    """``REDISS://`` (schemes are case-insensitive, and the settings accept it) connected
    without TLS here while redis-py's pool used TLS."""
    seen: list[object] = []

    async def fake_open(host: str, port: int, ssl: object = None) -> Any:
        seen.append(ssl)
        raise ConnectionRefusedError

    monkeypatch.setattr(resp.asyncio, "open_connection", fake_open)
    with pytest.raises(ConnectionRefusedError):
        await resp.Connection.open(url)
    assert (seen[0] is not None) is tls
