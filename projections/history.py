"""Time travel, blame, diffs and the hash-chain check, computed from a document's events.

Pure functions over the events of ONE document in aggregate order (as the store returns
them); no I/O. The gateway reads the events and calls these off the event loop.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

from domain import ot
from domain.document import GENESIS, Document, chain_hash

ENVELOPE = frozenset({"originator_id", "originator_version", "timestamp", "originator_topic", "h"})
"""Event attributes that are not part of the payload ``chain_hash`` covers."""


@dataclass(slots=True)
class State:
    """A document as it was after some event: what time travel returns."""

    id: str
    title: str
    text: str
    owner: str
    version: int
    created_at: datetime
    updated_at: datetime
    members: dict[str, str] = field(default_factory=dict)


def state_at(
    events: Iterable[Any], version: int | None = None, at: datetime | None = None
) -> State | None:
    """The document after its last edit with ``v <= version`` (and every event up to the next
    edit), or as of time ``at``; None if it did not exist yet.

    With ``version``: non-edit events (renames, members) that came before the edit producing
    ``version + 1`` are included, so the title is the one the text had at that version.
    """
    state: State | None = None
    chunks: ot.Chunks = ()  # the text in pieces while replaying: an edit costs O(piece)
    size = 0
    for e in events:
        if at is not None and e.timestamp > at:
            break
        if isinstance(e, Document.Created):
            state = State(str(e.originator_id), e.title, e.text, e.owner, 0,
                          e.timestamp, e.timestamp, {e.owner: "owner"})
            chunks, size = ot.chunks_of(e.text), len(e.text)
            continue
        if state is None:
            continue
        if isinstance(e, Document.Edited):
            if version is not None and e.v > version:
                break
            chunks, size = ot.apply_chunks(chunks, size, e.op)
            state.version = e.v
        elif isinstance(e, Document.Renamed):
            state.title = e.title
        elif isinstance(e, Document.MemberAdded):
            state.members[e.user] = e.role
        elif isinstance(e, Document.MemberRemoved):
            state.members.pop(e.user, None)
        state.updated_at = e.timestamp
    if state is not None:
        state.text = "".join(chunks)
    return state


@dataclass(frozen=True, slots=True)
class Span:
    """A run of text inserted by ``by`` in the edit that produced version ``v``."""

    text: str
    by: str
    v: int


def _take(spans: list[Span], i: int, off: int, n: int, out: list[Span] | None) -> tuple[int, int]:
    """Walk ``n`` code points from span ``i`` offset ``off``, copying them to ``out``."""
    while n > 0:
        s = spans[i]
        k = min(n, len(s.text) - off)
        if out is not None:
            _push(out, Span(s.text[off:off + k], s.by, s.v))
        n -= k
        off += k
        if off == len(s.text):
            i, off = i + 1, 0
    return i, off


def _push(out: list[Span], span: Span) -> None:
    if not span.text:
        return
    if out and out[-1].by == span.by and out[-1].v == span.v:
        last = out.pop()
        span = Span(last.text + span.text, span.by, span.v)
    out.append(span)


def blame(events: Iterable[Any]) -> list[Span]:
    """The current text as spans, each with the author and version that inserted it.

    The initial text is the owner's, at version 0. ``"".join(s.text for s in spans)`` is the
    text; adjacent spans never share both author and version.
    """
    spans: list[Span] = []
    for e in events:
        if isinstance(e, Document.Created):
            spans = [Span(e.text, e.owner, 0)] if e.text else []
        elif isinstance(e, Document.Edited):
            out: list[Span] = []
            i = off = 0
            for c in e.op:
                if isinstance(c, int):
                    i, off = _take(spans, i, off, c, out)
                elif isinstance(c, str):
                    _push(out, Span(c, e.by, e.v))
                else:
                    i, off = _take(spans, i, off, c["d"], None)
            if i < len(spans):
                _push(out, Span(spans[i].text[off:], spans[i].by, spans[i].v))
                for s in spans[i + 1:]:
                    _push(out, s)
            spans = out
    return spans


def edits_between(events: Iterable[Any], v1: int, v2: int) -> list[Document.Edited]:
    """The edits producing versions ``v1 + 1 .. v2`` in order."""
    return [e for e in events if isinstance(e, Document.Edited) and v1 < e.v <= v2]


def compose_all(ops: Sequence[ot.Op]) -> ot.Op:
    """One op equal to applying ``ops`` in order (``[]`` for none)."""
    out: ot.Op = []
    for op in ops:
        out = ot.compose(out, op)
    return out


def readable_diff(text: str, op: ot.Op) -> list[dict[str, str]]:
    """``op`` applied to ``text`` as runs ``{"op": "equal"|"insert"|"delete", "text"}``."""
    out: list[dict[str, str]] = []

    def add(kind: str, s: str) -> None:
        if not s:
            return
        if out and out[-1]["op"] == kind:
            out[-1]["text"] += s
        else:
            out.append({"op": kind, "text": s})

    pos = 0
    for c in op:
        if isinstance(c, int):
            add("equal", text[pos:pos + c])
            pos += c
        elif isinstance(c, str):
            add("insert", c)
        else:
            add("delete", text[pos:pos + c["d"]])
            pos += c["d"]
    add("equal", text[pos:])
    return out


BAD_LINK = ("hash does not follow from the previous event's hash and this event's content"
            " (this event was changed, or the one before it with its hash recomputed)")
"""Why a link breaks when a stored ``h`` is not the hash the chain gives: only the two
events together tell, since a changed event stored with a recomputed ``h`` checks out itself
and breaks the next link."""


@dataclass(frozen=True, slots=True)
class Broken:
    """The first link of a document's hash chain that does not check out."""

    doc: str
    position: int
    """Aggregate version of the first bad event (or where one is missing)."""
    reason: str


@dataclass(frozen=True, slots=True)
class Undecodable:
    """A stored event whose state could not be decoded (it stands in for the event)."""

    originator_id: Any
    originator_version: int
    error: str


def payload_of(e: Any) -> dict[str, Any]:
    """The fields of ``e`` that ``chain_hash`` covers (as stored, unless ``e`` was upcast)."""
    return {k: v for k, v in vars(e).items() if k not in ENVELOPE}


def stored_payload(state: dict[str, Any]) -> dict[str, Any]:
    """The fields that ``chain_hash`` covers, from a stored event's decoded ``state``.

    The payload as it was written, before any upcast: an event's ``h`` was computed when it
    was made, over the fields its class had then (``schema/events.md``, Upcasting). The
    library adds ``class_version`` to the stored state of a class above version 1; it is
    not a field of the event.
    """
    return {k: v for k, v in state.items() if k not in ENVELOPE and k != "class_version"}


MISSING = "event missing (versions skip)"
"""Why a link breaks when a document's log has no event at a version."""


class ChainCheck:
    """Checks hash chains event by event, for any number of documents at once.

    Feed every event in log order (all of the store's, or one document's), then call
    ``finish``. A document's link breaks when an event's stored ``h`` differs from the hash
    of the previous event's ``h`` and its own content (an edited row), when a version has
    no event (a removed row), when the log holds a document's events out of version order
    (rows renumbered), or when a row cannot be decoded (``Undecodable``). Only the first
    broken link of each document is reported; later events of it are skipped. A removed
    *last* event, or a last event edited with its ``h`` recomputed, cannot be seen from the
    chain alone.
    """

    def __init__(self) -> None:
        self._prev: dict[str, tuple[bytes, int]] = {}
        self._ahead: dict[str, int] = {}
        """Per document, the first version seen before its turn: a gap, or the log holds the
        missing event later (out of order); ``finish`` tells which is left."""
        self.broken: dict[str, Broken] = {}
        self.checked = 0

    def feed(self, e: Any, payload: dict[str, Any] | None = None) -> Broken | None:
        """Check one event; returns the document's first broken link if this is it.

        ``payload``: the event's fields as stored (``stored_payload``), which the chain
        covers; without it, ``payload_of(e)`` (the same unless ``e`` was upcast).
        """
        doc = str(e.originator_id)
        if doc in self.broken:
            return None
        prev, last = self._prev.get(doc, (GENESIS, 0))
        version = e.originator_version
        ahead = self._ahead.get(doc)
        bad: Broken | None = None
        if version > last + 1:
            if ahead is None:
                self._ahead[doc] = version
            return None
        if version <= last or ahead is not None:
            bad = Broken(doc, version, f"out of order: the log holds event "
                                       f"{ahead or last} of this document before it")
        elif isinstance(e, Undecodable):
            bad = Broken(doc, version, f"undecodable: {e.error}")
        else:
            h = chain_hash(prev, type(e).__name__, e.originator_id, version, e.timestamp,
                           payload_of(e) if payload is None else payload)
            if getattr(e, "h", None) != h:
                bad = Broken(doc, version, BAD_LINK)
            else:
                self._prev[doc] = (h, version)
                self.checked += 1
        if bad is not None:
            self.broken[doc] = bad
        return bad

    def finish(self) -> dict[str, Broken]:
        """The first broken link of each document, once every event has been fed."""
        for doc in self._ahead:
            if doc not in self.broken:
                last = self._prev.get(doc, (GENESIS, 0))[1]
                self.broken[doc] = Broken(doc, last + 1, MISSING)
        self._ahead.clear()
        return self.broken

    @property
    def documents(self) -> int:
        """Documents seen so far."""
        return len(self._prev.keys() | self._ahead.keys() | self.broken.keys())


def verify_chain(events: Iterable[Any]) -> tuple[int, Broken | None]:
    """Check one document's chain (its events in log order, not upcast); returns (events
    that checked out, first broken link)."""
    check = ChainCheck()
    for e in events:
        bad = check.feed(e)
        if bad is not None:
            return check.checked, bad
    broken = list(check.finish().values())
    return check.checked, broken[0] if broken else None
