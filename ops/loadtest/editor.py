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
"""

from __future__ import annotations

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
        if self.confirmed is not None:
            self.confirmed = ot.apply(self.confirmed, op)
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
