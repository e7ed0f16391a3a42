"""What a received frame says, worked out once per load process and shared by its sessions.

The server encodes an ``ops`` message once and writes the same bytes to every subscriber
of the document (``schema/frames.py``, ``Encoded``), so the ~10 sessions of one document in
a load process receive identical payloads. :class:`FrameCache` decodes each distinct
payload once and keeps what every receiver needs: for a frame made only of ``ops``
messages, an :class:`OpsRun` (how many ops, their versions, their net length change and
the times in their stamps); for any other frame, the decoded messages. A receiver then
does no decoding and no per-op work beyond its own bookkeeping.

Everything here is a pure function of the payload's bytes, so sharing is safe; the
decoded objects are shared too and must not be mutated (``domain.ot`` never mutates).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from domain import ot
from ops.loadtest import stamp

CACHE_SIZE = 4096
"""Distinct payloads kept per cache; it is emptied when full (all receivers of one frame
get it within milliseconds of each other)."""
MEMO_SIZE = 16384
"""Ops remembered per cache (emptied when full)."""
CACHE_MAX_BYTES = 65536
"""Larger payloads are decoded every time (a snapshot of a big text is not kept)."""


@dataclass(frozen=True, slots=True)
class OpsRun:
    """The ops of one or more ``ops`` messages, in order, summarised.

    ``first_v``/``last_v`` are -1 when there are no ops. ``in_order`` is False when the
    versions inside the run are not consecutive. ``delta`` is the net number of code points
    the ops insert. ``stamps`` are the stamp times (``stamp.units``) the ops' inserts carry.
    ``entries`` are ``(v, op)`` for the clients that apply the ops.
    """

    count: int
    first_v: int
    last_v: int
    in_order: bool
    delta: int
    stamps: tuple[int, ...]
    entries: tuple[tuple[int, ot.Op], ...]


@dataclass(frozen=True, slots=True)
class Frame:
    """A decoded frame: its messages, and when all are ``ops`` or ``presence`` (the ones
    the server sends alike to every subscriber) the :class:`OpsRun` of its ops and how many
    presence messages it holds; else ``run`` is None and ``presence`` 0.
    """

    messages: list[Any]
    run: OpsRun | None
    presence: int = 0


class Malformed(Exception):
    """An ``ops`` message whose entries are not ``{"v": int, "op": [...]}``."""


def op_stamps(op: ot.Op) -> list[int]:
    """The stamp times an op's inserts carry (text that only looks like a stamp is skipped)."""
    last = op[-1] if op else None
    if (
        type(last) is str
        and len(last) == stamp.WIDTH
        and last[0] == stamp.OPEN
        and last[-1] == stamp.CLOSE
        and (len(op) == 1 or (len(op) == 2 and type(op[0]) is int))
    ):
        found: list[str] = [last[1:-1]]  # one edit: [pos, "[digits]"]
    else:
        found = stamp.in_op(op)
    out = []
    for digits in found:
        try:
            out.append(int(digits, 32))
        except ValueError:
            continue  # eight characters that were not a stamp after all
    return out


def length_change(op: ot.Op) -> int:
    """Net code points ``op`` inserts (negative when it deletes more)."""
    n = len(op)
    if not n:
        return 0
    if type(op[-1]) is str and (n == 1 or (n == 2 and type(op[0]) is int)):
        return len(op[-1])  # one insert: [pos, text] or [text]
    return ot.inserted_chars(op) - ot.deleted_chars(op)


Memo = dict[tuple[Any, int], tuple[ot.Op, int, list[int]]]
"""``(doc, v) -> (op, length change, stamps)``: what one op says, for every frame carrying it."""


def ops_run(messages: list[Any], memo: Memo | None = None) -> OpsRun:
    """Summarise the ``ops`` messages ``messages`` (in order); raises :class:`Malformed`.

    With a ``memo``, an op already seen (same document, version and op) is not looked
    at again: the writers' own frames carry the same ops as everyone's, in other frames.
    """
    count = delta = 0
    first = last = -1
    in_order = True
    stamps: list[int] = []
    entries: list[tuple[int, ot.Op]] = []
    for msg in messages:
        ops = msg.get("ops")
        doc = msg.get("doc")
        if type(ops) is not list:
            raise Malformed("ops is not a list")
        for entry in ops:
            try:
                v = entry["v"]
                op = entry["op"]
                if type(v) is not int or type(op) is not list:
                    raise Malformed("entry is not {v: int, op: [...]}")
                seen = memo.get((doc, v)) if memo is not None else None
                if seen is not None and seen[0] == op:
                    _, change, found = seen
                else:
                    change, found = length_change(op), op_stamps(op)
                    if memo is not None:
                        if len(memo) >= MEMO_SIZE:
                            memo.clear()
                        memo[(doc, v)] = (op, change, found)
            except (TypeError, KeyError, AttributeError) as exc:
                raise Malformed(str(exc)) from exc
            delta += change
            if count == 0:
                first = v
            elif v != last + 1:
                in_order = False
            last = v
            count += 1
            stamps += found
            entries.append((v, op))
    return OpsRun(count, first, last, in_order, delta, tuple(stamps), tuple(entries))


def parse(payload: bytes, decode: Callable[[bytes], Any], memo: Memo | None = None) -> Frame:
    """Decode one frame; raises ``ValueError`` when it cannot be decoded."""
    decoded = decode(payload)
    messages = decoded if isinstance(decoded, list) else [decoded]
    kinds = [m.get("t") if type(m) is dict else None for m in messages]
    if not messages or not all(k == "ops" or k == "presence" for k in kinds):
        return Frame(messages, None)
    try:
        run = ops_run([m for m, k in zip(messages, kinds, strict=True) if k == "ops"], memo)
    except Malformed:
        return Frame(messages, None)  # handled message by message, where the error is counted
    return Frame(messages, run, kinds.count("presence"))


class FrameCache:
    """Frames by payload for one codec: ``get(payload)`` decodes only the first copy.

    Only frames of ``ops`` and ``presence`` messages, the ones shared by every
    subscriber, are kept.
    """

    __slots__ = ("_decode", "_memo", "frames")

    def __init__(self, decode: Callable[[bytes], Any]) -> None:
        self._decode = decode
        self.frames: dict[bytes, Frame] = {}
        """The kept frames: a receiver may look here first (``dict.get``) and call
        :meth:`get` only on a miss."""
        self._memo: Memo = {}

    def run(self, messages: list[Any]) -> OpsRun:
        """:func:`ops_run` of ``messages`` (of another frame), with this cache's memo."""
        return ops_run(messages, self._memo)

    def get(self, payload: bytes) -> Frame:
        """The frame ``payload`` carries; raises ``ValueError`` when it cannot be decoded."""
        frame = self.frames.get(payload)
        if frame is not None:
            return frame
        frame = parse(payload, self._decode, self._memo)
        if frame.run is not None and len(payload) <= CACHE_MAX_BYTES:
            frames = self.frames
            if len(frames) >= CACHE_SIZE:
                frames.clear()
            frames[payload] = frame
        return frame
