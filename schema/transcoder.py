"""The msgpack transcoder for event state: the library's ``Transcoder`` interface.

Stored state is msgpack with two extension types. It is a persisted format: the ext codes
below never change meaning (see ``schema/events.md``).

- ext ``-1`` (msgpack's own Timestamp): timezone-aware ``datetime`` (the library's
  ``timestamp``), read back as UTC.
- ext ``1``: ``uuid.UUID`` as its 16 bytes.

Tuples are stored as lists. Anything else raises ``TypeError`` at encode time, so a new type
in an event is caught by the first test that saves it, never silently stringified.
"""

from __future__ import annotations

import threading
from typing import Any
from uuid import UUID

import msgpack
from eventsourcing.persistence import Transcoder

EXT_UUID = 1
"""Extension type code of a UUID (16 raw bytes)."""


def _default(obj: object) -> Any:
    if isinstance(obj, UUID):
        return msgpack.ExtType(EXT_UUID, obj.bytes)
    raise TypeError(f"cannot store {type(obj).__name__} in an event: {obj!r}")


def _ext_hook(code: int, data: bytes) -> Any:
    if code == EXT_UUID:
        return UUID(bytes=data)
    return msgpack.ExtType(code, data)


class MsgpackTranscoder(Transcoder):
    """Encodes event state as msgpack; about 3-5x faster than the library's JSON default."""

    def __init__(self) -> None:
        self._local = threading.local()

    def encode(self, obj: Any) -> bytes:
        """Encode ``obj`` (the event's ``__dict__`` less id and version) to bytes.

        Thread-safe: each thread has a packer of its own, made once (``packb`` makes one per
        call: 1.40 against 0.52 µs for an edit's state).
        """
        try:
            packer = self._local.packer
        except AttributeError:
            packer = self._local.packer = msgpack.Packer(
                default=_default, datetime=True, use_bin_type=True
            )
        data: bytes = packer.pack(obj)
        return data

    def decode(self, data: bytes) -> Any:
        """Decode bytes written by ``encode``."""
        return msgpack.unpackb(data, ext_hook=_ext_hook, timestamp=3, raw=False)
