"""Client-to-server messages: parse an untrusted map into a typed, frozen value.

``parse`` never raises anything but ``MessageError``; the error carries the stable code and,
when they could be read, the ``doc`` and ``seq`` of the message so that the client can tell
which of its requests failed. Server-to-client messages are built by the helpers at the end.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass
from typing import Any, TypeGuard
from uuid import UUID

from schema.codes import Code

MAX_CLIENT_ID_CHARS = 128
"""Longest ``client`` id accepted in ``hello``."""
MAX_SEQ = (1 << 63) - 1
"""Largest ``seq``: the store keeps it in a signed 64-bit column."""
MAX_PRESENCE_BYTES = 4096
"""Largest presence ``data`` accepted, encoded (see the presence section of the protocol)."""
MAX_PRESENCE_DEPTH = 64
"""Deepest nesting of lists and maps in presence ``data`` (orjson encodes up to 254)."""
JSON_INTS = range(-(1 << 63), 1 << 64)
"""The integers orjson encodes: signed and unsigned 64-bit."""


class MessageError(Exception):
    """A message that cannot be accepted; sent back as an ``error`` message."""

    def __init__(
        self, code: Code, message: str, doc: str | None = None, seq: int | None = None
    ) -> None:
        super().__init__(message)
        self.code = code
        self.message = message
        self.doc = doc
        self.seq = seq


@dataclass(frozen=True, slots=True)
class Hello:
    """``{"t":"hello","token":T,"client":CID?}``: authenticate the connection."""

    token: str
    client: str | None


@dataclass(frozen=True, slots=True)
class Sub:
    """``{"t":"sub","doc":D,"v":K?}``: snapshot (no ``v``) or catch-up after ``v``."""

    doc: UUID
    v: int | None


@dataclass(frozen=True, slots=True)
class Unsub:
    """``{"t":"unsub","doc":D}``."""

    doc: UUID


@dataclass(frozen=True, slots=True)
class OpMsg:
    """``{"t":"op","doc":D,"v":K,"op":[...],"seq":S}``: ``op`` is still unchecked."""

    doc: UUID
    v: int
    op: Any
    seq: int


@dataclass(frozen=True, slots=True)
class Ping:
    """``{"t":"ping"}``."""


@dataclass(frozen=True, slots=True)
class Presence:
    """``{"t":"presence","doc":D,"data":{...}|null}``."""

    doc: UUID
    data: Any


Message = Hello | Sub | Unsub | OpMsg | Ping | Presence
"""Any parsed client message."""


def valid_seq(seq: Any) -> TypeGuard[int]:
    """``seq`` is an integer in ``0..MAX_SEQ`` (WebSocket ``op`` and HTTP ``POST ops``)."""
    return isinstance(seq, int) and not isinstance(seq, bool) and 0 <= seq <= MAX_SEQ


def valid_client(client: Any) -> TypeGuard[str]:
    """A client id is a string of 1..``MAX_CLIENT_ID_CHARS`` characters, none U+0000 (it
    is SQL text in the store)."""
    return isinstance(client, str) and 0 < len(client) <= MAX_CLIENT_ID_CHARS and (
        "\x00" not in client
    )


def json_value(value: Any, depth: int = MAX_PRESENCE_DEPTH) -> bool:
    """``value`` is JSON that both codecs carry unchanged: null, a bool, a string, an integer
    in ``JSON_INTS``, a finite float, or lists and string-keyed maps of these nested at most
    ``depth`` deep. Not bytes, msgpack ext types or timestamps, nor other map keys."""
    stack = [(value, 0)]
    while stack:
        item, level = stack.pop()
        if item is None or isinstance(item, (bool, str)):
            continue
        if isinstance(item, int):
            if item not in JSON_INTS:
                return False
        elif isinstance(item, float):
            if not math.isfinite(item):
                return False
        elif isinstance(item, (list, dict)):
            if level >= depth or (isinstance(item, dict) and not _str_keys(item)):
                return False
            children = item.values() if isinstance(item, dict) else item
            stack.extend((child, level + 1) for child in children)
        else:
            return False
    return True


def _str_keys(item: dict[Any, Any]) -> bool:
    return all(isinstance(key, str) for key in item)


def _int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


_HEX = "[0-9a-fA-F]"
_UUID = rf"{_HEX}{{32}}|{_HEX}{{8}}-{_HEX}{{4}}-{_HEX}{{4}}-{_HEX}{{4}}-{_HEX}{{12}}"
_DOC_ID = re.compile(rf"(?:urn:uuid:)?({_UUID})|\{{({_UUID})\}}")


def doc_id(raw: str) -> UUID:
    """The document id ``raw`` spells, in one of the documented spellings (protocol.md: 32
    hex digits, with the four hyphens or none, in either case, bare, in ``{}`` or after
    ``urn:uuid:``); ``ValueError`` for anything else. (``UUID()`` alone also takes a hyphen
    anywhere, one brace, ``uuid:`` or ``urn:``.)"""
    m = _DOC_ID.fullmatch(raw)
    if m is None:
        raise ValueError(f"not a document id: {raw[:64]!r}")
    return UUID(m.group(1) or m.group(2))


def _doc(msg: dict[str, Any]) -> UUID:
    raw = msg.get("doc")
    if not isinstance(raw, str):
        raise MessageError(Code.BAD_MESSAGE, "'doc' must be a document id string")
    try:
        return doc_id(raw)
    except ValueError:
        raise MessageError(Code.NOT_FOUND, f"no document {raw[:64]!r}", doc=raw[:64]) from None


def parse(msg: Any) -> Message:
    """Parse one message of a frame; raise ``MessageError`` with the right code."""
    if not isinstance(msg, dict):
        raise MessageError(Code.BAD_MESSAGE, "a message must be a map with a type 't'")
    t = msg.get("t")
    raw_doc = msg.get("doc") if isinstance(msg.get("doc"), str) else None
    raw_seq = msg.get("seq") if _int(msg.get("seq")) else None
    try:
        if t == "op":
            doc = _doc(msg)
            v, seq = msg.get("v"), msg.get("seq")
            if not valid_seq(seq):
                raise MessageError(Code.BAD_MESSAGE, f"'seq' must be an integer in 0..{MAX_SEQ}")
            if not isinstance(v, int) or isinstance(v, bool):
                raise MessageError(Code.BAD_MESSAGE, "'v' must be an integer")
            if "op" not in msg:
                raise MessageError(Code.BAD_MESSAGE, "'op' is missing")
            return OpMsg(doc=doc, v=v, op=msg["op"], seq=seq)
        if t == "sub":
            doc = _doc(msg)
            v = msg.get("v")
            if v is not None and not _int(v):
                raise MessageError(Code.BAD_MESSAGE, "'v' must be an integer when given")
            return Sub(doc=doc, v=v)
        if t == "unsub":
            return Unsub(doc=_doc(msg))
        if t == "ping":
            return Ping()
        if t == "presence":
            if "data" not in msg:
                raise MessageError(Code.BAD_MESSAGE, "'data' is missing (null clears)")
            if not json_value(msg["data"]):
                raise MessageError(
                    Code.BAD_MESSAGE,
                    "'data' must be a JSON value (no bytes, ext types, non-string keys, NaN,"
                    f" integers past 64 bits or nesting over {MAX_PRESENCE_DEPTH})",
                )
            return Presence(doc=_doc(msg), data=msg["data"])
        if t == "hello":
            token, client = msg.get("token"), msg.get("client")
            if not isinstance(token, str):
                raise MessageError(Code.UNAUTHORIZED, "'token' must be a string")
            if client is not None and not valid_client(client):
                raise MessageError(
                    Code.BAD_MESSAGE,
                    f"'client' must be 1..{MAX_CLIENT_ID_CHARS} characters, none U+0000",
                )
            return Hello(token=token, client=client)
    except MessageError as exc:
        exc.doc = exc.doc or raw_doc
        exc.seq = exc.seq if exc.seq is not None else raw_seq
        raise
    kind = repr(t)[:40]
    raise MessageError(Code.BAD_MESSAGE, f"unknown message type {kind}", doc=raw_doc, seq=raw_seq)


def error(
    code: Code, message: str, doc: str | None = None, seq: int | None = None
) -> dict[str, Any]:
    """The ``error`` message; ``doc`` and ``seq`` only when known."""
    out: dict[str, Any] = {"t": "error", "code": code.value, "message": message}
    if doc is not None:
        out["doc"] = doc
    if seq is not None:
        out["seq"] = seq
    return out
