"""Frames of the WebSocket protocol: a frame is a list of message maps, both ways.

Two codecs, chosen per connection by subprotocol (see ``schema/protocol.md``):
``coscribe.v1.msgpack`` (binary frames) and ``coscribe.v1.json`` (text frames, the default).

Outgoing messages are encoded once and shared: ``Encoded`` caches one encoding per codec, and
``join`` assembles a frame from already-encoded messages by concatenation (a msgpack array
header, or JSON brackets and commas). A broadcast to N subscribers costs one encoding per
codec, not N.
"""

from __future__ import annotations

from enum import StrEnum
from typing import Any

import msgpack
import orjson

from schema.codes import Code

MAX_FRAME_BYTES = 1 << 20
"""Default limit of an incoming frame (1 MiB); larger frames get ``too_large``."""
HARD_FRAME_BYTES = 16 << 20
"""Above this the WebSocket layer itself closes the connection (1009)."""
MAX_MESSAGES_PER_FRAME = 1000
"""Most messages one incoming frame may carry."""


class Codec(StrEnum):
    """A connection's encoding; the value is the subprotocol name."""

    JSON = "coscribe.v1.json"
    MSGPACK = "coscribe.v1.msgpack"


SUBPROTOCOLS = (Codec.MSGPACK.value, Codec.JSON.value)
"""Offered subprotocols, preferred first."""


class FrameError(Exception):
    """An incoming frame that cannot be decoded; ``code`` is ``bad_frame`` or ``too_large``."""

    def __init__(self, code: Code, message: str) -> None:
        super().__init__(message)
        self.code = code
        self.message = message


def decode(data: bytes, codec: Codec, limit: int = MAX_FRAME_BYTES) -> list[Any]:
    """Decode one incoming frame to its list of messages (each still to be checked).

    Raises ``FrameError``: ``too_large`` over ``limit`` bytes or ``MAX_MESSAGES_PER_FRAME``
    messages, ``bad_frame`` when it is not valid in its codec or not a list.
    """
    if len(data) > limit:
        raise FrameError(Code.TOO_LARGE, f"frame of {len(data)} bytes is over {limit}")
    try:
        if codec is Codec.MSGPACK:
            value = msgpack.unpackb(data, raw=False, strict_map_key=True, timestamp=0)
        else:
            value = orjson.loads(data)
    except Exception as exc:  # each codec raises its own family; all mean the same here
        # Some of msgpack's errors carry no text (a reserved byte): name the error then.
        detail = str(exc) or type(exc).__name__
        raise FrameError(Code.BAD_FRAME, f"undecodable {codec.name} frame: {detail}") from exc
    if codec is Codec.MSGPACK and _bin_marker(data) and _bin_keyed(value):
        # msgpack's strict_map_key lets bin keys through with str ones: a message whose own
        # keys are not all str is refused here, with its frame. Deeper maps are checked by
        # the fields holding them (ops, presence data), as any bad value is.
        raise FrameError(Code.BAD_FRAME, "undecodable MSGPACK frame: a map key is bin, not str")
    if isinstance(value, dict):
        value = [value]  # a lone message is accepted as a frame of one (documented)
    if not isinstance(value, list):
        raise FrameError(Code.BAD_FRAME, "a frame must be a list of message maps")
    if len(value) > MAX_MESSAGES_PER_FRAME:
        raise FrameError(Code.TOO_LARGE, f"more than {MAX_MESSAGES_PER_FRAME} messages")
    return value


def _bin_marker(data: bytes) -> bool:
    """Whether ``data`` may hold a msgpack bin (bin 8/16/32 type bytes; the same bytes in
    a string or a number make this true too: ``_bin_keyed`` then decides)."""
    return b"\xc4" in data or b"\xc5" in data or b"\xc6" in data


def _bin_keyed(value: Any) -> bool:
    """Whether a message of frame ``value`` (a map, or a list of them) has a ``bytes`` key.
    Its keys only, not the maps inside: decoding took as long as this takes, whatever the
    frame holds (a walk of every value cost up to 10x the decode)."""
    messages = value if isinstance(value, list) else [value]
    return any(
        isinstance(m, dict) and not all(type(k) is str for k in m) for m in messages
    )


def encode_one(msg: Any, codec: Codec) -> bytes:
    """Encode one message (not a frame) in ``codec``."""
    if codec is Codec.MSGPACK:
        return bytes(msgpack.packb(msg, use_bin_type=True))
    return orjson.dumps(msg)


def ws_frame(payload: bytes, codec: Codec) -> bytes:
    """A complete server-to-client WebSocket frame (RFC 6455: FIN, unmasked) of ``payload``.

    Binary frames for msgpack, text frames for JSON; no extensions (compression is off).
    """
    first = 0x82 if codec is Codec.MSGPACK else 0x81
    n = len(payload)
    if n < 126:
        return bytes((first, n)) + payload
    if n < 1 << 16:
        return bytes((first, 126)) + n.to_bytes(2, "big") + payload
    return bytes((first, 127)) + n.to_bytes(8, "big") + payload


class Encoded:
    """An outgoing message with its encodings cached: encode once, send to many.

    ``frame`` caches the whole WebSocket frame of a one-message frame, so a subscriber whose
    tick holds only this message costs one write of shared bytes.
    """

    __slots__ = ("_frames", "_json", "_msgpack", "msg")

    def __init__(self, msg: dict[str, Any]) -> None:
        self.msg = msg
        self._json: bytes | None = None
        self._msgpack: bytes | None = None
        self._frames: dict[Codec, bytes] | None = None

    def frame(self, codec: Codec) -> bytes:
        """The WebSocket frame carrying ``[msg]`` in ``codec``, built on first use."""
        frames = self._frames
        if frames is None:
            frames = self._frames = {}
        data = frames.get(codec)
        if data is None:
            data = frames[codec] = ws_frame(join([self.get(codec)], codec), codec)
        return data

    def get(self, codec: Codec) -> bytes:
        """The message in ``codec``, encoded on first use."""
        if codec is Codec.MSGPACK:
            if self._msgpack is None:
                self._msgpack = encode_one(self.msg, codec)
            return self._msgpack
        if self._json is None:
            self._json = encode_one(self.msg, codec)
        return self._json


class OpsMessage(Encoded):
    """An ``ops`` message assembled from entries that are each encoded once.

    A commit's entries are shared by the message every subscriber gets and by the runs
    between acks that each submitter gets instead: encoding an entry once per codec, and
    each message by concatenation, keeps the cost per submitter to joining bytes. The bytes
    equal ``encode_one({"t": "ops", "doc": doc, "ops": [entry, ...]})`` (a property test
    checks it).
    """

    __slots__ = ("_doc", "_entries")

    def __init__(self, doc: str, entries: list[Encoded]) -> None:
        self._doc = doc
        self._entries = entries
        self._json = None
        self._msgpack = None
        self._frames = None

    @property
    def doc(self) -> str:
        """The document the ops are of."""
        return self._doc

    @property
    def msg(self) -> dict[str, Any]:  # type: ignore[override]
        """The message as a map (for inspection; sending uses the bytes)."""
        return {"t": "ops", "doc": self._doc, "ops": [e.msg for e in self._entries]}

    def get(self, codec: Codec) -> bytes:
        """The message in ``codec``, joined on first use."""
        if codec is Codec.MSGPACK:
            if self._msgpack is None:
                parts = [e.get(codec) for e in self._entries]
                self._msgpack = (
                    _OPS_MSGPACK_HEAD + bytes(msgpack.packb(self._doc)) + _OPS_MSGPACK_KEY
                    + _msgpack_array_header(len(parts)) + b"".join(parts)
                )
            return self._msgpack
        if self._json is None:
            self._json = (
                b'{"t":"ops","doc":' + orjson.dumps(self._doc) + b',"ops":['
                + b",".join([e.get(codec) for e in self._entries]) + b"]}"
            )
        return self._json


def is_message(msg: Encoded, t: str, doc: str | None = None) -> bool:
    """Whether ``msg`` is a ``t`` message (of ``doc`` if given), without building the map of
    an ``OpsMessage`` (which is always ``ops``)."""
    if isinstance(msg, OpsMessage):
        return t == "ops" and (doc is None or msg.doc == doc)
    fields = msg.msg
    return fields.get("t") == t and (doc is None or fields.get("doc") == doc)


_OPS_MSGPACK_HEAD = b"\x83" + bytes(msgpack.packb("t")) + bytes(msgpack.packb("ops")) + bytes(
    msgpack.packb("doc")
)
_OPS_MSGPACK_KEY = bytes(msgpack.packb("ops"))


def _msgpack_array_header(n: int) -> bytes:
    if n < 16:
        return bytes((0x90 | n,))
    if n < 1 << 16:
        return b"\xdc" + n.to_bytes(2, "big")
    return b"\xdd" + n.to_bytes(4, "big")


def join(parts: list[bytes], codec: Codec) -> bytes:
    """A frame from already-encoded messages: equal to encoding the list of them."""
    if codec is Codec.MSGPACK:
        return _msgpack_array_header(len(parts)) + b"".join(parts)
    return b"[" + b",".join(parts) + b"]"


UNENCODABLE = (TypeError, ValueError, OverflowError)
"""What the codecs raise for a value they cannot encode (orjson's error is a TypeError)."""


def frame_of(parts: list[Encoded], codec: Codec) -> tuple[bytes, list[Encoded]]:
    """The WebSocket frame carrying ``parts`` in ``codec``, and the parts left out of it.

    A part that ``codec`` cannot encode is left out, never the others; with none left the
    frame is ``b""``. A lone part's frame is the one cached in it (shared by subscribers).
    """
    try:
        if len(parts) == 1:
            return parts[0].frame(codec), []
        return ws_frame(join([p.get(codec) for p in parts], codec), codec), []
    except UNENCODABLE:
        pass
    kept: list[bytes] = []
    dropped: list[Encoded] = []
    for part in parts:
        try:
            kept.append(part.get(codec))
        except UNENCODABLE:
            dropped.append(part)
    return (ws_frame(join(kept, codec), codec) if kept else b""), dropped


def encode(msgs: list[dict[str, Any]], codec: Codec) -> bytes:
    """Encode a whole frame at once (for tests and clients)."""
    return join([encode_one(m, codec) for m in msgs], codec)
