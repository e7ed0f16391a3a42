"""Wire protocol values: frames in both codecs, message parsing, bearer tokens."""

from __future__ import annotations

import base64
import hashlib
import hmac
import time
from pathlib import Path
from typing import Any
from uuid import UUID, uuid4

import msgpack
import orjson
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from gateway.auth import BadToken, sign_token, verify_token
from schema import frames, messages
from schema.codes import HTTP_STATUS, Code
from schema.frames import Codec, Encoded, FrameError
from schema.messages import Hello, MessageError, OpMsg, Ping, Presence, Sub, Unsub
from tests import strategies as gen

PROPERTY = settings(max_examples=200, deadline=None)
CODECS = st.sampled_from(list(Codec))
SECRET = b"protocol-secret"

_key = st.text(alphabet=st.characters(codec="utf-8"), max_size=6)
# Values both codecs carry unchanged: 64-bit ints, finite floats, UTF-8-encodable text.
_scalars = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(-(2**63), 2**63 - 1),
    st.floats(allow_nan=False, allow_infinity=False),
    st.text(alphabet=st.characters(codec="utf-8"), max_size=12),
)
_values = st.recursive(
    _scalars,
    lambda kids: st.one_of(
        st.lists(kids, max_size=4),
        st.dictionaries(
            st.text(alphabet=st.characters(codec="utf-8"), max_size=6), kids, max_size=4
        ),
    ),
    max_leaves=8,
)
wire_messages = st.dictionaries(_key, _values, max_size=5).map(lambda m: {"t": "x", **m})
"""Message maps as servers send them: str keys, a type, JSON- and msgpack-safe values."""


def _reference(msgs: list[dict[str, Any]], codec: Codec) -> bytes:
    """The frame as the codec library itself encodes the list."""
    if codec is Codec.MSGPACK:
        return bytes(msgpack.packb(msgs, use_bin_type=True))
    return orjson.dumps(msgs)


# -- frames ------------------------------------------------------------------------------


@settings(max_examples=100, deadline=None)
@given(msgs=st.lists(wire_messages, max_size=20), codec=CODECS)
def test_join_of_encoded_messages_equals_encoding_the_list(
    msgs: list[dict[str, Any]], codec: Codec
) -> None:
    """join(encoded parts) is byte-for-byte the codec's encoding of the list, and decodes back."""
    parts = [Encoded(m).get(codec) for m in msgs]
    frame = frames.join(parts, codec)
    assert frame == _reference(msgs, codec) == frames.encode(msgs, codec)
    assert frames.decode(frame, codec) == msgs


@settings(max_examples=100, deadline=None)
@given(
    doc=st.text(max_size=40),
    entries=st.lists(wire_messages, max_size=20),
    codec=CODECS,
)
def test_ops_message_from_encoded_entries_equals_encoding_the_map(
    doc: str, entries: list[dict[str, Any]], codec: Codec
) -> None:
    """An ``ops`` message joined from once-encoded entries is the codec's encoding of it."""
    msg = {"t": "ops", "doc": doc, "ops": entries}
    joined = frames.OpsMessage(doc, [Encoded(e) for e in entries])
    assert joined.get(codec) == frames.encode_one(msg, codec)
    assert joined.frame(codec) == frames.ws_frame(frames.encode([msg], codec), codec)
    assert joined.msg == msg


@pytest.mark.parametrize("codec", list(Codec))
@pytest.mark.parametrize("n", [0, 1, 15, 16, 17, 65535, 65536, 70000])
def test_join_array_headers_at_size_boundaries(codec: Codec, n: int) -> None:
    """The frame header is right around msgpack's fixarray/array16/array32 boundaries."""
    msgs = [{"t": "pong"}] * n
    part = Encoded(msgs[0]).get(codec) if n else b""
    assert frames.join([part] * n, codec) == _reference(msgs, codec)


def test_encoded_caches_one_encoding_per_codec() -> None:
    """An Encoded message is encoded once per codec and shared."""
    enc = Encoded({"t": "ops", "doc": "d", "ops": [{"v": 1, "op": ["é"], "by": "u"}]})
    assert enc.get(Codec.JSON) is enc.get(Codec.JSON)
    assert enc.get(Codec.MSGPACK) is enc.get(Codec.MSGPACK)
    assert orjson.loads(enc.get(Codec.JSON)) == msgpack.unpackb(enc.get(Codec.MSGPACK))


@pytest.mark.parametrize("codec", list(Codec))
def test_lone_map_is_a_frame_of_one(codec: Codec) -> None:
    """A frame that is a single map decodes as a list of that one message."""
    data = frames.encode_one({"t": "ping"}, codec)
    assert frames.decode(data, codec) == [{"t": "ping"}]


@pytest.mark.parametrize("codec", list(Codec))
@pytest.mark.parametrize("value", [42, "ping", None, True, 1.5])
def test_frame_that_is_not_a_list_is_bad_frame(codec: Codec, value: Any) -> None:
    """A frame holding a scalar is bad_frame."""
    with pytest.raises(FrameError) as info:
        frames.decode(frames.encode_one(value, codec), codec)
    assert info.value.code is Code.BAD_FRAME


@pytest.mark.parametrize("codec", list(Codec))
def test_frame_limits(codec: Codec) -> None:
    """Over the byte limit or over MAX_MESSAGES_PER_FRAME messages is too_large."""
    ok = frames.encode([{"t": "ping"}] * frames.MAX_MESSAGES_PER_FRAME, codec)
    assert len(frames.decode(ok, codec)) == frames.MAX_MESSAGES_PER_FRAME
    many = frames.encode([{"t": "ping"}] * (frames.MAX_MESSAGES_PER_FRAME + 1), codec)
    with pytest.raises(FrameError) as info:
        frames.decode(many, codec)
    assert info.value.code is Code.TOO_LARGE
    big = frames.encode([{"t": "ping", "pad": "x" * 100}], codec)
    assert frames.decode(big, codec, limit=len(big)) == [{"t": "ping", "pad": "x" * 100}]
    with pytest.raises(FrameError) as info:
        frames.decode(big, codec, limit=len(big) - 1)
    assert info.value.code is Code.TOO_LARGE
    assert frames.MAX_FRAME_BYTES == 1 << 20


@PROPERTY
@given(data=st.binary(max_size=64), codec=CODECS)
def test_decode_garbage_raises_only_frame_error(data: bytes, codec: Codec) -> None:
    """Random bytes either decode to a list or raise FrameError bad_frame, nothing else."""
    try:
        value = frames.decode(data, codec)
    except FrameError as exc:
        assert exc.code is Code.BAD_FRAME
    else:
        assert isinstance(value, list)


@pytest.mark.parametrize(
    ("codec", "data"),
    [
        (Codec.JSON, b"not json"),
        (Codec.JSON, b"[{"),
        (Codec.JSON, b"\xff\xfe"),
        (Codec.JSON, b""),
        (Codec.MSGPACK, b"\x92\x80"),  # array of 2 with only 1 element
        (Codec.MSGPACK, b"\xc1"),  # never-used byte
        (Codec.MSGPACK, b"\x81\x01\x02"),  # int map key
        (Codec.MSGPACK, msgpack.packb([{"t": "ping", b"junk": 1}], use_bin_type=True)),
        (Codec.MSGPACK, b""),
    ],
)
def test_undecodable_frames_are_bad_frame(codec: Codec, data: bytes) -> None:
    """Truncated, invalid or non-str-keyed input is bad_frame, with a reason in the message."""
    with pytest.raises(FrameError) as info:
        frames.decode(data, codec)
    assert info.value.code is Code.BAD_FRAME
    assert info.value.message.split(": ", 1)[1].strip()


# -- messages -----------------------------------------------------------------------------

_TYPES = ["hello", "sub", "unsub", "op", "ping", "presence", "welcome", "", "OP", None, 1]
_fieldish = st.one_of(
    gen.garbage(),
    st.uuids().map(str),
    st.integers(-3, 3),
    st.sampled_from(["v1.x.y", "", "c" * 129]),
)
near_messages = st.fixed_dictionaries(
    {"t": st.sampled_from(_TYPES)},
    optional={k: _fieldish for k in ("doc", "v", "seq", "op", "token", "client", "data")},
)
"""Message-like maps: a real or bogus type with any subset of fields, valid or not."""


@PROPERTY
@given(msg=st.one_of(gen.garbage(), near_messages))
def test_parse_raises_only_message_error_with_a_known_code(msg: Any) -> None:
    """parse on anything returns a typed message or raises MessageError with a Code."""
    try:
        parsed = messages.parse(msg)
    except MessageError as exc:
        assert isinstance(exc.code, Code)
        assert exc.code in HTTP_STATUS
        assert isinstance(exc.message, str) and exc.message
        assert exc.doc is None or isinstance(exc.doc, str)
        assert exc.seq is None or (isinstance(exc.seq, int) and not isinstance(exc.seq, bool))
    else:
        assert isinstance(parsed, Hello | Sub | Unsub | OpMsg | Ping | Presence)


def test_parse_valid_messages() -> None:
    """Each client message type parses to its value."""
    d = uuid4()
    assert messages.parse({"t": "hello", "token": "tok"}) == Hello("tok", None)
    assert messages.parse({"t": "hello", "token": "tok", "client": "c1"}) == Hello("tok", "c1")
    assert messages.parse({"t": "sub", "doc": str(d)}) == Sub(d, None)
    assert messages.parse({"t": "sub", "doc": str(d), "v": 3}) == Sub(d, 3)
    assert messages.parse({"t": "unsub", "doc": str(d)}) == Unsub(d)
    op = {"t": "op", "doc": str(d), "v": 0, "op": [1, "x"], "seq": 5}
    assert messages.parse(op) == OpMsg(d, 0, [1, "x"], 5)
    assert messages.parse({"t": "ping"}) == Ping()
    assert messages.parse({"t": "presence", "doc": str(d), "data": None}) == Presence(d, None)


def test_parse_keeps_extra_fields_out() -> None:
    """Unknown extra fields are ignored, not an error."""
    assert messages.parse({"t": "ping", "x": 1}) == Ping()


@given(st.uuids())
def test_doc_id_takes_every_documented_spelling(u: UUID) -> None:
    """Canonical, upper case, no hyphens, in braces, after ``urn:uuid:``: the same id."""
    c = str(u)
    for raw in (c, c.upper(), u.hex, u.hex.upper(), f"{{{c}}}", f"{{{u.hex}}}", f"urn:uuid:{c}",
                f"urn:uuid:{u.hex}"):
        assert messages.doc_id(raw) == u, raw


@pytest.mark.parametrize(
    "raw",
    ["{ID", "ID}", "{{ID}}", "uuid:ID", "urn:ID", "urn:uuid:{ID}", "-HEX-", "HEX-",
     "HEX[:8]-HEX[8:]", "I-D", " ID", "ID\n", "", "0" * 31, "g" * 32,
     "+HEX[1:]", "HEX[:4]_HEX[5:]", " HEX[1:]"],
)
def test_doc_id_refuses_what_uuid_alone_would_take(raw: str) -> None:
    """UUID() strips braces one at a time, ``urn:`` and ``uuid:``, and every hyphen, and
    reads the rest with int(): a sign, an underscore or a space pass. None of those is a
    spelling the protocol names, so none names a document (``not_found``)."""
    u = uuid4()
    c, h = str(u), u.hex
    raw = (raw.replace("HEX[:8]-HEX[8:]", f"{h[:8]}-{h[8:]}").replace("HEX[1:]", h[1:])
           .replace("HEX[:4]_HEX[5:]", f"{h[:4]}_{h[5:]}").replace("HEX", h)
           .replace("I-D", "-".join(h)).replace("ID", c))
    with pytest.raises(ValueError):
        messages.doc_id(raw)
    with pytest.raises(MessageError) as info:
        messages.parse({"t": "sub", "doc": raw})
    assert info.value.code is Code.NOT_FOUND


@pytest.mark.parametrize(
    ("msg", "code"),
    [
        ([], Code.BAD_MESSAGE),
        ("ping", Code.BAD_MESSAGE),
        ({}, Code.BAD_MESSAGE),
        ({"t": "nope"}, Code.BAD_MESSAGE),
        ({"t": "sub"}, Code.BAD_MESSAGE),
        ({"t": "sub", "doc": 5}, Code.BAD_MESSAGE),
        ({"t": "sub", "doc": "not-a-uuid"}, Code.NOT_FOUND),
        ({"t": "sub", "doc": str(UUID(int=1)), "v": "3"}, Code.BAD_MESSAGE),
        ({"t": "sub", "doc": str(UUID(int=1)), "v": True}, Code.BAD_MESSAGE),
        ({"t": "op", "doc": str(UUID(int=1)), "v": 0, "op": []}, Code.BAD_MESSAGE),
        ({"t": "op", "doc": str(UUID(int=1)), "v": 0, "seq": -1, "op": []}, Code.BAD_MESSAGE),
        ({"t": "op", "doc": str(UUID(int=1)), "v": 0, "seq": True, "op": []}, Code.BAD_MESSAGE),
        ({"t": "op", "doc": str(UUID(int=1)), "seq": 1, "op": []}, Code.BAD_MESSAGE),
        ({"t": "op", "doc": str(UUID(int=1)), "v": 1.0, "seq": 1, "op": []}, Code.BAD_MESSAGE),
        ({"t": "op", "doc": str(UUID(int=1)), "v": 0, "seq": 1}, Code.BAD_MESSAGE),
        ({"t": "presence", "doc": str(UUID(int=1))}, Code.BAD_MESSAGE),
        ({"t": "hello"}, Code.UNAUTHORIZED),
        ({"t": "hello", "token": 5}, Code.UNAUTHORIZED),
        ({"t": "hello", "token": "x", "client": ""}, Code.BAD_MESSAGE),
        ({"t": "hello", "token": "x", "client": "c" * 129}, Code.BAD_MESSAGE),
        ({"t": "hello", "token": "x", "client": "c\x00"}, Code.BAD_MESSAGE),
    ],
)
def test_parse_errors_have_their_codes(msg: Any, code: Code) -> None:
    """Each kind of malformed message gets its documented code."""
    with pytest.raises(MessageError) as info:
        messages.parse(msg)
    assert info.value.code is code


def _nested(depth: int) -> Any:
    value: Any = 1
    for _ in range(depth):
        value = [value]
    return value


@pytest.mark.parametrize(
    "data",
    [
        pytest.param(b"\x01", id="bin"),
        pytest.param({"cursor": b"\x01"}, id="bin-inside"),
        pytest.param({"c": msgpack.ExtType(7, b"x")}, id="ext"),
        pytest.param({"c": msgpack.Timestamp(5, 0)}, id="timestamp"),
        pytest.param({b"cursor": 1}, id="bin-key"),
        pytest.param({1: "x"}, id="int-key"),
        pytest.param([float("nan")], id="nan"),
        pytest.param({"x": float("-inf")}, id="inf"),
        pytest.param(1 << 64, id="int-over-64-bits"),
        pytest.param(-(1 << 63) - 1, id="int-under-64-bits"),
        pytest.param(_nested(messages.MAX_PRESENCE_DEPTH + 1), id="too-deep"),
    ],
)
def test_presence_data_that_is_not_json_is_bad_message(data: Any) -> None:
    """Presence data must be a JSON value that every codec carries: else bad_message."""
    d = str(uuid4())
    with pytest.raises(MessageError) as info:
        messages.parse({"t": "presence", "doc": d, "data": data})
    assert (info.value.code, info.value.doc) == (Code.BAD_MESSAGE, d)


@pytest.mark.parametrize(
    "data",
    [
        {"cursor": 3, "sel": [1, 2.5], "name": "é", "on": True, "x": None},
        [(1 << 64) - 1, -(1 << 63), 0.0],
        _nested(messages.MAX_PRESENCE_DEPTH),
        "just text",
    ],
)
def test_presence_data_that_is_json_is_accepted_and_encodes_in_both_codecs(data: Any) -> None:
    """Accepted presence data encodes in JSON and msgpack and decodes back the same."""
    d = uuid4()
    assert messages.parse({"t": "presence", "doc": str(d), "data": data}) == Presence(d, data)
    msg = {"t": "presence", "doc": str(d), "data": data}
    for codec in Codec:
        assert frames.decode(frames.encode([msg], codec), codec) == [msg]


@pytest.mark.parametrize("codec", list(Codec))
def test_frame_of_leaves_out_only_what_the_codec_cannot_encode(codec: Codec) -> None:
    """A message the codec cannot encode is left out of the frame; the others stay, in order."""
    good = [Encoded({"t": "ack", "doc": "d", "seq": i, "v": i}) for i in range(3)]
    bad = Encoded({"t": "presence", "data": 1 << 70})
    data, dropped = frames.frame_of([good[0], bad, good[1], good[2]], codec)
    assert dropped == [bad]
    payload = data[4:] if data[1] == 126 else data[2:]
    assert frames.decode(payload, codec) == [g.msg for g in good]
    assert frames.frame_of([bad], codec) == (b"", [bad])


def test_parse_error_names_doc_and_seq_when_readable() -> None:
    """An error about an op carries the op's doc and seq so the client can match it."""
    d = str(uuid4())
    with pytest.raises(MessageError) as info:
        messages.parse({"t": "op", "doc": d, "seq": 4, "v": "x", "op": []})
    assert (info.value.doc, info.value.seq) == (d, 4)
    assert messages.error(Code.BAD_OP, "m", d, 4) == {
        "t": "error",
        "code": "bad_op",
        "message": "m",
        "doc": d,
        "seq": 4,
    }
    assert messages.error(Code.INTERNAL, "m") == {"t": "error", "code": "internal", "message": "m"}


def test_every_code_has_an_http_status() -> None:
    """The codes table is complete, and codes are stable lowercase strings."""
    assert set(HTTP_STATUS) == set(Code)
    for code in Code:
        assert code.value == code.name.lower()
        assert 400 <= HTTP_STATUS[code] <= 599


# -- tokens -------------------------------------------------------------------------------


@PROPERTY
@given(
    user=st.text(
        alphabet=st.characters(codec="utf-8", exclude_characters="\x00"), min_size=1, max_size=40
    )
)
def test_token_round_trip(user: str) -> None:
    """A signed token verifies to the user it names (any name but with U+0000)."""
    assert verify_token(SECRET, sign_token(SECRET, user)) == user
    assert verify_token(SECRET, sign_token(SECRET, user, ttl=60)) == user


def _flip(text: str, i: int) -> str:
    c = text[i]
    return text[:i] + ("A" if c != "A" else "B") + text[i + 1 :]


@PROPERTY
@given(data=st.data())
def test_tampered_token_is_refused(data: st.DataObject) -> None:
    """Changing any character of a token makes it fail verification."""
    token = sign_token(SECRET, "alice")
    i = data.draw(st.integers(0, len(token) - 1))
    with pytest.raises(BadToken):  # also a change of unused low bits: not canonical
        verify_token(SECRET, _flip(token, i))


def signed(payload: bytes, secret: bytes = SECRET) -> str:
    """A correctly signed token around raw ``payload`` bytes."""
    body = f"v1.{base64.urlsafe_b64encode(payload).rstrip(b'=').decode()}"
    sig = hmac.new(secret, body.encode(), hashlib.sha256).digest()
    return f"{body}.{base64.urlsafe_b64encode(sig).rstrip(b'=').decode()}"


def _noncanonical(token: str) -> str:
    """``token`` with the unused low bits of its signature's last character set."""
    sig = token.rsplit(".", 1)[1]
    assert len(sig) % 4 == 3  # 32 bytes: 43 characters, the last carrying 2 unused bits
    alphabet = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_"
    return token[:-1] + alphabet[alphabet.index(token[-1]) | 1]


@pytest.mark.parametrize(
    "spoil",
    [
        pytest.param(lambda t: t + "!!", id="junk-appended"),
        pytest.param(lambda t: t[:-5] + "*" + t[-5:], id="junk-inside"),
        pytest.param(lambda t: t + "=", id="padding"),
        pytest.param(lambda t: t.replace("-", "+").replace("_", "/"), id="standard-alphabet"),
        pytest.param(_noncanonical, id="low-bits"),
    ],
)
def test_token_that_is_not_canonical_base64url_is_refused(spoil: Any) -> None:
    """Only the exact base64url text that was signed verifies: nothing is skipped or fixed."""
    token = sign_token(SECRET, "alice-with-a-name-that-needs-both-alphabet-ends?~~~>>>")
    spoiled = spoil(token)
    if spoiled == token:
        pytest.skip("this token has nothing to spoil that way")
    with pytest.raises(BadToken):
        verify_token(SECRET, spoiled)


@pytest.mark.parametrize(
    "exp", [b'"soon"', b"true", b"false", b"[1]", b'{"at":1}', b"1" + b"0" * 400, b"1e400"]
)
def test_signed_token_with_a_malformed_exp_is_refused(exp: bytes) -> None:
    """A correctly signed token whose exp is not null or a finite number is malformed."""
    token = signed(b'{"u":"alice","iat":1,"exp":' + exp + b"}")
    with pytest.raises(BadToken, match="malformed"):
        verify_token(SECRET, token)
    assert verify_token(SECRET, signed(b'{"u":"alice","iat":1,"exp":1e30}')) == "alice"


def test_forged_payload_is_refused() -> None:
    """A token whose payload names another user, keeping the old signature, is refused."""
    prefix, _, sig = sign_token(SECRET, "alice").split(".")
    forged = base64.urlsafe_b64encode(orjson.dumps({"u": "root", "iat": 0, "exp": None}))
    token = f"{prefix}.{forged.rstrip(b'=').decode()}.{sig}"
    with pytest.raises(BadToken):
        verify_token(SECRET, token)


def test_token_from_another_secret_is_refused() -> None:
    """A token signed with another secret does not verify."""
    with pytest.raises(BadToken):
        verify_token(SECRET, sign_token(b"other", "alice"))


def test_expired_token_is_refused() -> None:
    """A token is valid until its expiry and refused from then on."""
    token = sign_token(SECRET, "alice", ttl=60)
    assert verify_token(SECRET, token, now=time.time() + 30) == "alice"
    with pytest.raises(BadToken, match="expired"):
        verify_token(SECRET, token, now=time.time() + 61)
    with pytest.raises(BadToken, match="expired"):
        verify_token(SECRET, sign_token(SECRET, "alice", ttl=-1))


def test_token_without_ttl_does_not_expire() -> None:
    """A token signed without ttl is accepted far in the future."""
    token = sign_token(SECRET, "alice")
    assert verify_token(SECRET, token, now=time.time() + 10 * 365 * 86400) == "alice"


@PROPERTY
@given(token=st.one_of(st.text(max_size=80), st.just("v1." + "a" * 3000)))
def test_garbage_tokens_raise_only_bad_token(token: str) -> None:
    """Arbitrary strings (including lone surrogates and huge ones) only ever raise BadToken."""
    with pytest.raises(BadToken):
        verify_token(SECRET, token)


@pytest.mark.parametrize("token", ["", "v1", "v1..", "v2.e30.e30", "a.b.c.d", "v1.@@.@@"])
def test_malformed_tokens_are_refused(token: str) -> None:
    """Structurally wrong tokens are refused."""
    with pytest.raises(BadToken):
        verify_token(SECRET, token)


def test_sign_refuses_empty_user() -> None:
    """A token must name someone."""
    with pytest.raises(ValueError):
        sign_token(SECRET, "")


# -- schema/protocol.md stays in step with the code -----------------------------------------

PROTOCOL_MD = Path(__file__).resolve().parent.parent / "schema" / "protocol.md"


def test_protocol_doc_lists_every_code_with_its_status() -> None:
    """schema/protocol.md has a table row for every error code with its HTTP status."""
    doc = PROTOCOL_MD.read_text(encoding="utf-8")
    for code in Code:
        assert f"| `{code.value}` | {HTTP_STATUS[code]} |" in doc, code


def test_protocol_doc_states_the_limits_and_close_codes() -> None:
    """The documented limits, close codes and subprotocols are the ones in the code."""
    from domain.ot import MAX_OP_COMPONENTS
    from gateway import session
    from gateway.room import MAX_DOCUMENT_CHARS

    doc = PROTOCOL_MD.read_text(encoding="utf-8")
    limits = session.SessionLimits()
    for number in (
        frames.MAX_FRAME_BYTES,
        frames.MAX_MESSAGES_PER_FRAME,
        messages.MAX_PRESENCE_BYTES,
        MAX_DOCUMENT_CHARS,
        limits.max_subscriptions,
        int(limits.messages_per_second),
        int(limits.message_burst),
        MAX_OP_COMPONENTS,
    ):
        assert f"{number:,}" in doc, number
    assert frames.HARD_FRAME_BYTES == limits.max_buffer_bytes == 16 << 20
    assert "16 MiB" in doc
    assert f"{messages.MAX_CLIENT_ID_CHARS} characters" in doc
    assert f"| {limits.hello_seconds:g} s |" in doc
    for close in (
        session.CLOSE_GOING_AWAY,
        session.CLOSE_UNAUTHORIZED,
        session.CLOSE_SLOW_CONSUMER,
        1009,
    ):
        assert f"| {close} |" in doc, close
    for codec in Codec:
        assert f"`{codec.value}`" in doc


def test_protocol_doc_covers_every_http_route() -> None:
    """Every route the gateway's HTTP module registers is documented."""
    from aiohttp import web

    from gateway import http

    app = web.Application()
    http.add_routes(app)
    doc = PROTOCOL_MD.read_text(encoding="utf-8")
    for route in app.router.routes():
        if route.method == "HEAD":
            continue
        path = route.resource.canonical if route.resource is not None else ""
        assert f"{route.method} {path}" in doc, (route.method, path)


def test_protocol_doc_names_every_message_type() -> None:
    """Every client and server message type appears in the protocol document."""
    doc = PROTOCOL_MD.read_text(encoding="utf-8")
    for t in ("hello", "sub", "unsub", "op", "presence", "ping"):
        assert f'{{"t": "{t}"' in doc, t
    for t in ("welcome", "snapshot", "ops", "ack", "presence", "pong", "error"):
        assert f'{{"t": "{t}"' in doc, t
