"""The editor's side of the protocol for one document, without I/O (ShareDB's client model).

A :class:`DocClient` holds the last server version it knows, at most one op in flight and a
buffer of edits made since it was sent, composed into one op. The driver feeds it what the
user does (:meth:`DocClient.edit`) and what the server says (:meth:`DocClient.remote`,
:meth:`DocClient.ack`) and sends the ``op`` messages it hands back. Times are passed in, so
the object is deterministic.

Mirror of the server: the server rewrites a late client op ``a`` against each op ``r`` it
missed as ``transform(a, r, "left")``; so when ``r`` arrives while ``a`` is in flight the
client keeps ``transform(a, r, "left")`` in flight and applies ``transform(r, a, "right")``
locally, and then the same against the buffer. By TP1 both sides end on the same text.

A *full* client keeps two texts: ``text``, what its user sees (server state plus its own
pending edits), and ``confirmed``, the server's text at ``version`` as this client
reconstructs it (remote ops as received, its own ops as they were acknowledged). The end of
a run compares ``confirmed`` with the server, which checks the client-side transforms even
when edits are still pending; with nothing pending both texts must be equal. A light client
(``keep_text=False``) keeps only the length, all it needs to make valid edits and transform.

A repeated op (``v`` at or below ``version``) is a violation here, not skipped: the protocol
allows repeats only after a ``sub`` that replaces a subscription, where clients skip them,
and a load-test session subscribes once per connection.
"""

from __future__ import annotations

import random
from dataclasses import dataclass
from typing import Any

from domain import ot


class ProtocolViolation(Exception):
    """The server broke an ordering promise (a version gap, or an ack for another seq)."""


@dataclass(frozen=True, slots=True)
class Acked:
    """What an ack settled: the op's typed edits, their stamps, when it was sent, what next."""

    edits: int
    stamps: tuple[str, ...]
    sent_ns: int
    send: dict[str, Any] | None


class DocClient:
    """Client-side OT state for one document on one connection.

    Invariants: ``version`` only moves forward by one per remote op or ack; local state ==
    server state at ``version`` + ``inflight`` + ``buffer``; ``inflight`` is None while
    ``buffer`` is None or the client has nothing unacknowledged.
    """

    __slots__ = (
        "acked",
        "buffer",
        "buffer_edits",
        "buffer_stamps",
        "confirmed",
        "doc",
        "inflight",
        "inflight_edits",
        "inflight_seq",
        "inflight_stamps",
        "length",
        "sent_ns",
        "seq",
        "text",
        "version",
    )

    def __init__(self, doc: str, version: int, text: str, *, keep_text: bool = True) -> None:
        self.doc = doc
        self.version = version
        self.text: str | None = text if keep_text else None
        self.confirmed: str | None = self.text
        self.length = len(text)
        self.inflight: ot.Op | None = None
        self.inflight_seq = -1
        self.inflight_edits = 0
        self.inflight_stamps: tuple[str, ...] = ()
        self.sent_ns = 0
        self.buffer: ot.Op | None = None
        self.buffer_edits = 0
        self.buffer_stamps: tuple[str, ...] = ()
        self.seq = 0
        self.acked = 0

    @property
    def pending(self) -> bool:
        """True while an edit of this client is not acknowledged yet."""
        return self.inflight is not None

    @property
    def can_delete(self) -> bool:
        """True when a delete cannot cut into a stamp still buffered (nothing is buffered)."""
        return self.buffer is None

    def edit(self, op: ot.Op, now_ns: int, stamps: tuple[str, ...] = ()) -> dict[str, Any] | None:
        """Apply a local edit (made on the current local text); return an op message to send.

        Returns None while another op is in flight: the edit joins the buffer and goes out
        with the ack. ``stamps`` are the latency stamps the edit inserts.
        """
        self._apply(op)
        if self.inflight is None:
            self.inflight = op
            self.inflight_edits = 1
            self.inflight_stamps = stamps
            return self._send(now_ns)
        if self.buffer is None:
            self.buffer = op
            self.buffer_edits = 1
            self.buffer_stamps = stamps
        else:
            self.buffer = ot.compose(self.buffer, op)
            self.buffer_edits += 1
            self.buffer_stamps += stamps
        return None

    def remote(self, v: int, op: ot.Op) -> None:
        """Take another client's op, which produced server version ``v``."""
        if v != self.version + 1:
            raise ProtocolViolation(f"{self.doc}: op v{v} after v{self.version}")
        self.version = v
        before = self.confirmed
        if before is not None:
            self.confirmed = ot.apply(before, op)
            if self.inflight is None and self.text is before:
                # Nothing pending and the user's text is the confirmed one: apply once.
                self.text = self.confirmed
                self.length = len(self.confirmed)
                return
        if self.inflight is not None:
            op, self.inflight = (
                transform(op, self.inflight, "right"),
                transform(self.inflight, op, "left"),
            )
            if self.buffer is not None:
                op, self.buffer = (
                    transform(op, self.buffer, "right"),
                    transform(self.buffer, op, "left"),
                )
        self._apply(op)

    def ack(self, seq: int, v: int, now_ns: int) -> Acked:
        """Take the ack of the op in flight (version ``v``); send the buffer next, if any."""
        if self.inflight is None or seq != self.inflight_seq:
            raise ProtocolViolation(f"{self.doc}: ack of seq {seq}, in flight {self.inflight_seq}")
        if v != self.version + 1:
            raise ProtocolViolation(f"{self.doc}: ack v{v} after v{self.version}")
        self.version = v
        self.acked += 1
        if self.confirmed is not None:
            self.confirmed = ot.apply(self.confirmed, self.inflight)
        done = (self.inflight_edits, self.inflight_stamps, self.sent_ns)
        self.inflight = self.buffer
        self.inflight_edits = self.buffer_edits
        self.inflight_stamps = self.buffer_stamps
        self.buffer = None
        self.buffer_edits = 0
        self.buffer_stamps = ()
        send = self._send(now_ns) if self.inflight is not None else None
        if send is None and self.text is not None and self.text == self.confirmed:
            self.text = self.confirmed  # one string from now on (see remote); unequal stays
        return Acked(done[0], done[1], done[2], send)

    def abandon_buffer(self) -> int:
        """Give up the edits not sent yet (the run is over); return how many were dropped.

        What the user sees goes back to the server state plus the op in flight, so the
        texts stay consistent; only the op in flight is still to be acknowledged.
        """
        if self.buffer is None:
            return 0
        dropped = self.buffer_edits
        if self.confirmed is not None:
            self.text = (
                self.confirmed if self.inflight is None else ot.apply(self.confirmed, self.inflight)
            )
            self.length = len(self.text)
        else:
            self.length -= ot.inserted_chars(self.buffer) - ot.deleted_chars(self.buffer)
        self.buffer = None
        self.buffer_edits = 0
        self.buffer_stamps = ()
        return dropped

    def reject(self) -> tuple[int, int]:
        """Drop the op in flight and the buffer after the server refused the op.

        Returns ``(ops, edits)`` dropped. The client no longer matches the server; its
        driver should stop editing.
        """
        dropped = (
            int(self.inflight is not None) + int(self.buffer is not None),
            self.inflight_edits + self.buffer_edits,
        )
        self.inflight = self.buffer = None
        self.inflight_edits = self.buffer_edits = 0
        self.inflight_stamps = self.buffer_stamps = ()
        return dropped

    def _send(self, now_ns: int) -> dict[str, Any]:
        self.seq += 1
        self.inflight_seq = self.seq
        self.sent_ns = now_ns
        return {"t": "op", "doc": self.doc, "v": self.version, "op": self.inflight, "seq": self.seq}

    def _apply(self, op: ot.Op) -> None:
        if self.text is not None:
            self.text = ot.apply(self.text, op)
            self.length = len(self.text)
        else:
            self.length += ot.inserted_chars(op) - ot.deleted_chars(op)


class LightEditor:
    """An editor that keeps only the document's length: most writers of a run are these.

    The protocol is an editor's (one op in flight; edits typed meanwhile go out together
    with the ack), but the edits typed meanwhile are not composed into an op that would
    then have to be transformed against every remote op: the client keeps their stamps
    (and at most one delete, typed first) and turns them into one op when it sends,
    at a random place in the text of the version it knows then, the way a user's
    keystrokes accumulate in one place. So a remote op costs a version check and a length
    update; the op in flight is transformed only when it deletes (a concurrent delete can
    shrink it, and the length must stay exact). The ``random.Random`` given picks places.

    Same driver interface as :class:`DocClient` (``pending``, ``remote``, ``ack``,
    ``abandon_buffer``, ``reject``, ...), with :meth:`insert` and :meth:`delete` in place
    of ``edit``.
    """

    __slots__ = (
        "acked",
        "buffer_delete",
        "buffer_edits",
        "buffer_stamps",
        "doc",
        "inflight",
        "inflight_deletes",
        "inflight_delta",
        "inflight_edits",
        "inflight_seq",
        "inflight_stamps",
        "length",
        "rng",
        "sent_ns",
        "seq",
        "version",
    )

    def __init__(self, doc: str, version: int, length: int, rng: random.Random) -> None:
        self.doc = doc
        self.version = version
        self.length = length
        """The server's length at ``version`` (what the buffer will be placed in)."""
        self.rng = rng
        self.inflight: ot.Op | None = None
        self.inflight_seq = -1
        self.inflight_edits = 0
        self.inflight_stamps: tuple[str, ...] = ()
        self.inflight_delta = 0
        self.inflight_deletes = False
        self.sent_ns = 0
        self.buffer_edits = 0
        self.buffer_stamps: list[str] = []
        self.buffer_delete = 0
        self.seq = 0
        self.acked = 0

    @property
    def pending(self) -> bool:
        """True while an edit of this client is not acknowledged yet."""
        return self.inflight is not None

    @property
    def can_delete(self) -> bool:
        """True when nothing is buffered (a delete is only ever typed first)."""
        return self.buffer_edits == 0

    def insert(self, text: str, now_ns: int) -> dict[str, Any] | None:
        """Type a stamp (``stamp.encode``); return the op message to send, if one is due."""
        self.buffer_stamps.append(text)
        self.buffer_edits += 1
        return self._send(now_ns) if self.inflight is None else None

    def delete(self, n: int, now_ns: int) -> dict[str, Any] | None:
        """Type a delete of ``n`` code points (only while :attr:`can_delete`)."""
        if not self.can_delete:
            raise ValueError("a delete must be typed before anything else is buffered")
        self.buffer_delete = n
        self.buffer_edits = 1
        return self._send(now_ns) if self.inflight is None else None

    def remote(self, v: int, op: ot.Op) -> None:
        """Take another client's op, which produced server version ``v``."""
        if v != self.version + 1:
            raise ProtocolViolation(f"{self.doc}: op v{v} after v{self.version}")
        self.version = v
        self.length += ot.inserted_chars(op) - ot.deleted_chars(op)
        if self.inflight_deletes and self.inflight is not None:
            self.inflight = transform(self.inflight, op, "left")
            self.inflight_delta = ot.inserted_chars(self.inflight) - ot.deleted_chars(self.inflight)

    def remote_run(self, first_v: int, last_v: int, delta: int, in_order: bool) -> bool:
        """Take consecutive remote ops ``first_v..last_v`` that change the length by
        ``delta``, without looking at them. False (nothing taken) when the op in flight
        deletes: then each op must go through :meth:`remote`.
        """
        if first_v != self.version + 1 or not in_order:
            raise ProtocolViolation(f"{self.doc}: ops v{first_v}..v{last_v} after v{self.version}")
        if self.inflight_deletes:
            return False
        self.version = last_v
        self.length += delta
        return True

    def ack(self, seq: int, v: int, now_ns: int) -> Acked:
        """Take the ack of the op in flight (version ``v``); send what was typed meanwhile."""
        if self.inflight is None or seq != self.inflight_seq:
            raise ProtocolViolation(f"{self.doc}: ack of seq {seq}, in flight {self.inflight_seq}")
        if v != self.version + 1:
            raise ProtocolViolation(f"{self.doc}: ack v{v} after v{self.version}")
        self.version = v
        self.acked += 1
        self.length += self.inflight_delta
        done = (self.inflight_edits, self.inflight_stamps, self.sent_ns)
        self.inflight = None
        self.inflight_edits = 0
        self.inflight_stamps = ()
        self.inflight_delta = 0
        self.inflight_deletes = False
        send = self._send(now_ns) if self.buffer_edits else None
        return Acked(done[0], done[1], done[2], send)

    def abandon_buffer(self) -> int:
        """Give up the edits not sent yet (the run is over); return how many were dropped."""
        dropped = self.buffer_edits
        self._clear_buffer()
        return dropped

    def reject(self) -> tuple[int, int]:
        """Drop the op in flight and the buffer after the server refused the op.

        Returns ``(ops, edits)`` dropped, as :meth:`DocClient.reject`.
        """
        dropped = (
            int(self.inflight is not None) + int(self.buffer_edits > 0),
            self.inflight_edits + self.buffer_edits,
        )
        self.inflight = None
        self.inflight_edits = 0
        self.inflight_stamps = ()
        self.inflight_delta = 0
        self.inflight_deletes = False
        self._clear_buffer()
        return dropped

    def _clear_buffer(self) -> None:
        self.buffer_edits = 0
        self.buffer_stamps = []
        self.buffer_delete = 0

    def _send(self, now_ns: int) -> dict[str, Any]:
        text = "".join(self.buffer_stamps)
        n = min(self.buffer_delete, self.length)
        position = self.rng.randrange(self.length - n + 1)
        op: ot.Op = [position] if position and (text or n) else []
        if text:
            op.append(text)
        if n:
            op.append({"d": n})
        # (Nothing left to delete in an empty text: the op is [], a valid no-op.)
        self.inflight = op
        self.inflight_edits = self.buffer_edits
        self.inflight_stamps = tuple(t[1:-1] for t in self.buffer_stamps)
        self.inflight_delta = len(text) - n
        self.inflight_deletes = n > 0
        self._clear_buffer()
        self.seq += 1
        self.inflight_seq = self.seq
        self.sent_ns = now_ns
        return {"t": "op", "doc": self.doc, "v": self.version, "op": op, "seq": self.seq}


def _single_insert(op: ot.Op) -> tuple[int, str] | None:
    """``(position, text)`` when ``op`` is one normalized insert, else None."""
    if len(op) == 1:
        c = op[0]
        return (0, c) if isinstance(c, str) else None
    if len(op) == 2:
        first, second = op
        if isinstance(first, int) and isinstance(second, str):
            return first, second
    return None


def transform(op: ot.Op, other: ot.Op, side: ot.Side) -> ot.Op:
    """``domain.ot.transform``, with a shortcut for the load's usual case: two single inserts.

    An insert at p against one of ``t`` at q moves by ``len(t)`` when q < p, or q == p and
    ``op`` is on the right; anything else goes to ``domain.ot``. Equal results, tested.
    """
    a = _single_insert(op)
    b = _single_insert(other) if a is not None else None
    if a is None or b is None:
        return ot.transform(op, other, side)
    p, text = a
    q, theirs = b
    if q < p or (q == p and side == "right"):
        p += len(theirs)
    return [p, text] if p else [text]


def insert_op(position: int, text: str) -> ot.Op:
    """The normalized op that inserts ``text`` at ``position``."""
    return [position, text] if position else [text]


def delete_op(position: int, n: int) -> ot.Op:
    """The normalized op that deletes ``n`` code points from ``position``."""
    return [position, {"d": n}] if position else [{"d": n}]
