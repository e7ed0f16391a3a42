"""One-dimensional PostgreSQL arrays in the binary wire format, built in a few C calls.

The committer sends every commit as arrays (``coscribe_append``: ten of them, four or eight
elements per event). psycopg dumps a Python list element by element in Python, with a type
lookup per array: measured, a third of the client CPU of a ten-event commit (and ~7.5 µs per
event at a thousand). The format is simple (``array_send`` in PostgreSQL's ``arrayfuncs.c``):
a header (dimensions, has-nulls flag, element type oid, then the length and lower bound of
the one dimension) followed by each element as a 4-byte length and its binary value.

``uuids``, ``int8s``, ``texts`` and ``byteas`` build it from plain lists (no ``None``:
nothing the committer sends is null); the result is passed as a query parameter for a
``%b::uuid[]`` (…) placeholder, through the dumpers registered here on psycopg's global
adapters. Values that repeat in a commit (a document's id, a topic, a client id) are
encoded once.
"""

from __future__ import annotations

import struct
from collections.abc import Sequence
from uuid import UUID

import psycopg
from psycopg.adapt import Dumper
from psycopg.pq import Format

_HEADER = struct.Struct(">iiiii")
_EMPTY = struct.Struct(">iii")
_INT4 = struct.Struct(">i").pack
_UUID_LEN = _INT4(16)


class PgArray:
    """An encoded array: ``data`` is its binary wire value (see the module's docstring)."""

    __slots__ = ("data",)
    oid = 0
    """The array type's oid (the element type's is in ``data``)."""

    def __init__(self, data: bytes) -> None:
        self.data = data

    def __repr__(self) -> str:
        return f"{type(self).__name__}({len(self.data)} bytes)"


class UuidArray(PgArray):
    __slots__ = ()
    oid = 2951


class Int8Array(PgArray):
    __slots__ = ()
    oid = 1016


class TextArray(PgArray):
    __slots__ = ()
    oid = 1009


class ByteaArray(PgArray):
    __slots__ = ()
    oid = 1001


def _header(element_oid: int, n: int) -> bytes:
    return _HEADER.pack(1, 0, element_oid, n, 1) if n else _EMPTY.pack(0, 0, element_oid)


def uuids(values: Sequence[UUID | str]) -> UuidArray:
    """``uuid[]`` (of ``UUID`` objects or their strings)."""
    memo: dict[int | str, bytes] = {}
    parts = [_header(2950, len(values))]
    append = parts.append
    last: object = None
    b = b""
    for u in values:
        if u is not last:  # a commit's events come grouped by document
            last = u
            key = u.int if type(u) is UUID else u
            found = memo.get(key)
            if found is None:
                found = memo[key] = _UUID_LEN + (
                    u.bytes if isinstance(u, UUID) else UUID(u).bytes
                )
            b = found
        append(b)
    return UuidArray(b"".join(parts))


def int8s(values: Sequence[int]) -> Int8Array:
    """``bigint[]``."""
    n = len(values)
    flat = [8] * (2 * n)
    flat[1::2] = values
    return Int8Array(_header(20, n) + struct.pack(">" + "iq" * n, *flat))


def texts(values: Sequence[str]) -> TextArray:
    """``text[]`` (UTF-8, as the server's encoding is)."""
    memo: dict[str, bytes] = {}
    parts = [_header(25, len(values))]
    append = parts.append
    last: object = None
    b = b""
    for s in values:
        if s is not last:
            last = s
            found = memo.get(s)
            if found is None:
                raw = s.encode()
                found = memo[s] = _INT4(len(raw)) + raw
            b = found
        append(b)
    return TextArray(b"".join(parts))


def byteas(values: Sequence[bytes]) -> ByteaArray:
    """``bytea[]``."""
    parts: list[bytes] = [b""] * (2 * len(values))
    parts[0::2] = [_INT4(len(b)) for b in values]
    parts[1::2] = values
    return ByteaArray(_header(17, len(values)) + b"".join(parts))


class _ArrayDumper(Dumper):
    format = Format.BINARY

    def dump(self, obj: PgArray) -> bytes:
        return obj.data


def _register() -> None:
    for cls in (UuidArray, Int8Array, TextArray, ByteaArray):
        dumper = type(f"{cls.__name__}Dumper", (_ArrayDumper,), {"oid": cls.oid})
        psycopg.adapters.register_dumper(cls, dumper)


_register()
