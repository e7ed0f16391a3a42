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
    """The fields of ``e`` that ``chain_hash`` covers."""
    return {k: v for k, v in vars(e).items() if k not in ENVELOPE}


class ChainCheck:
    """Checks hash chains event by event, for any number of documents at once.

    Feed every event of the store in log order (each document's events then come in
    aggregate order). A document's link breaks when an event's stored ``h`` differs from the
    hash of the previous event's ``h`` and its own content (an edited row), when aggregate
    versions skip (a removed row), or when a row cannot be decoded (``Undecodable``). Only
    the first broken link of each document is reported; later events of it are skipped.
    A removed *last* event cannot be seen from the chain alone.
    """

    def __init__(self) -> None:
        self._prev: dict[str, tuple[bytes, int]] = {}
        self.broken: dict[str, Broken] = {}
        self.checked = 0

    def feed(self, e: Any) -> Broken | None:
        """Check one event; returns the document's first broken link if this is it."""
        doc = str(e.originator_id)
        if doc in self.broken:
            return None
        prev, last = self._prev.get(doc, (GENESIS, 0))
        bad: Broken | None = None
        if e.originator_version != last + 1:
            bad = Broken(doc, last + 1, "event missing (versions skip)")
        elif isinstance(e, Undecodable):
            bad = Broken(doc, e.originator_version, f"undecodable: {e.error}")
        else:
            h = chain_hash(prev, type(e).__name__, e.originator_id, e.originator_version,
                           e.timestamp, payload_of(e))
            if getattr(e, "h", None) != h:
                bad = Broken(doc, e.originator_version, BAD_LINK)
            else:
                self._prev[doc] = (h, e.originator_version)
                self.checked += 1
        if bad is not None:
            self.broken[doc] = bad
        return bad

    @property
    def documents(self) -> int:
        """Documents seen so far."""
        return len(self._prev.keys() | self.broken.keys())


def verify_chain(events: Iterable[Any]) -> tuple[int, Broken | None]:
    """Check one document's chain; returns (events that checked out, first broken link)."""
    check = ChainCheck()
    for e in events:
        bad = check.feed(e)
        if bad is not None:
            return check.checked, bad
    return check.checked, None
