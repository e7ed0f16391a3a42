"""A room: one open document in this process, its pending submissions and its subscribers.

The room is a state machine driven by the committer, all on the event loop, never awaiting:

1. ``submit`` queues a submission (an edit, or a command such as a rename) in ``inbox``.
2. ``prepare`` (committer, before a commit) checks and transforms every queued edit against
   the ops since its base version, applies it to the aggregate and returns the new events.
   The aggregate then holds *tentative* state; ``snapshot`` still holds the committed one.
3. After the store committed the batch, ``committed`` acks and broadcasts in version order;
   after a version conflict, ``conflicted`` drops the tentative state and re-queues the
   submissions (they are transformed again once the room has read what it missed).

Ordering promise per subscriber: ops in version order, and every op with ``v < M`` before
the ack of version ``M``. A subscriber that is catching up from the store buffers live
messages until its catch-up has been sent; one whose catch-up went past the room's snapshot
(to versions other processes committed that wait here, ``skip_to``) is not sent those again.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from enum import Enum
from typing import Any, Protocol
from uuid import UUID

from domain import ot
from domain.document import MAX_TEXT_CHARS, Document
from domain.errors import BadOp, BadVersion, DomainError, Forbidden, NotFound, TooLarge
from schema.codes import Code
from schema.frames import Codec, Encoded, OpsMessage, encode_one, is_message
from schema.messages import json_value

log = logging.getLogger(__name__)

MAX_DOCUMENT_CHARS = MAX_TEXT_CHARS
"""Longest text a document may reach (code points); longer results get ``too_large``."""
HISTORY_WINDOW = 2000
"""Committed ops kept in memory per room for transforms and catch-up."""
CONTENDED_SECONDS = 30.0
"""How long after seeing another process's events a room counts as contended."""
class Subscriber(Protocol):
    """What a room needs of a session: a place to put encoded messages, in order."""

    user: str | None
    """Who reads: a member removed from the document is dropped (``removed``)."""

    def deliver(self, msg: Encoded) -> None:
        """Queue ``msg`` for sending; never blocks."""

    def removed(self, doc: UUID) -> None:
        """The room dropped this subscriber: its user may no longer read the document."""


@dataclass(frozen=True, slots=True)
class OpRecord:
    """A committed (or tentative) op as the room keeps it."""

    v: int
    op: ot.Op
    by: str
    client: str | None
    seq: int | None
    at: float
    len_after: int

    def entry(self) -> dict[str, Any]:
        """The op as it appears in an ``ops`` message."""
        out: dict[str, Any] = {"v": self.v, "op": self.op, "by": self.by}
        if self.client is not None:
            out["client"] = self.client
            out["seq"] = self.seq
        return out


@dataclass(frozen=True, slots=True)
class Snapshot:
    """The committed state of a document: what readers and new subscribers see.

    The text is kept as the document's pieces and joined the first time it is read: a
    commit of one op into a 4 MiB document then costs the op, not a copy of the text.
    """

    id: UUID
    title: str
    chunks: ot.Chunks
    v: int
    owner: str
    created_at: float
    updated_at: float
    joined: list[str] = field(default_factory=list, compare=False, repr=False)
    """The joined text once read (a list: the snapshot itself is frozen)."""

    @property
    def text(self) -> str:
        """The document's text at version ``v``."""
        joined = self.joined
        if not joined:
            joined.append("".join(self.chunks))
        return joined[0]

    def as_json(self) -> dict[str, Any]:
        """The HTTP representation."""
        return {
            "id": str(self.id),
            "title": self.title,
            "text": self.text,
            "version": self.v,
            "owner": self.owner,
            "created_at": iso_time(self.created_at),
            "updated_at": iso_time(self.updated_at),
        }


def iso_time(ts: float) -> str:
    """A UTC timestamp (seconds) as ISO 8601 with microseconds and Z."""
    return time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(ts)) + f".{int(ts * 1e6) % 1000000:06d}Z"


@dataclass(slots=True, eq=False)
class Submission:
    """One request to change a document, resolved through ``future``.

    ``kind`` is ``edit`` (``op`` made on version ``base``) or ``command`` (``command`` is
    called with the aggregate and may trigger events). ``session`` is the submitting
    WebSocket session, whose ack then travels in its ordered stream.
    """

    kind: str
    by: str
    future: asyncio.Future[Any]
    base: int = 0
    op: Any = None
    client: str | None = None
    seq: int | None = None
    session: Subscriber | None = None
    command: Callable[[Document], Any] | None = None
    result: Any = None
    dup_of: int | None = None
    looked_up: bool = False
    """The store was asked whether ``(client, seq)`` was committed; ``dup_of`` has the answer."""
    checked: bool = False
    """``op`` was validated (and normalized) against the text at ``base`` on submission."""

    def fail(self, code: Code, message: str) -> None:
        """Resolve with an error (never after an ack)."""
        if not self.future.done():
            self.future.set_exception(Rejected(code, message))


class Rejected(Exception):
    """A submission the room did not accept; ``code`` is what the client sees."""

    def __init__(self, code: Code, message: str) -> None:
        super().__init__(message)
        self.code = code
        self.message = message


class State(Enum):
    """A room's life: READY takes part in commits; STALE must re-read the store first."""

    READY = "ready"
    STALE = "stale"


@dataclass(slots=True, eq=False)
class Member:
    """A subscriber's place in the room; buffers while its catch-up is being read."""

    session: Subscriber
    ready: bool = True
    buffer: list[Encoded] = field(default_factory=list)

    def send(self, msg: Encoded) -> None:
        """Deliver now, or after the catch-up when still catching up."""
        if self.ready:
            self.session.deliver(msg)
        else:
            self.buffer.append(msg)

    def release(self) -> None:
        """Catch-up sent: flush what arrived meanwhile, in order."""
        self.ready = True
        for msg in self.buffer:
            self.session.deliver(msg)
        self.buffer.clear()


class Room:
    """One document's in-memory state. Only the committer calls prepare/committed/etc."""

    def __init__(
        self,
        doc: Document,
        on_dirty: Callable[[Room], None],
        on_gap: Callable[[Room], None] | None = None,
        on_presence: Callable[[Room, str, str, Any], None] | None = None,
    ) -> None:
        self.id: UUID = doc.id
        self.doc = doc
        self._on_dirty = on_dirty
        self._on_gap = on_gap or (lambda room: None)
        self._on_presence = on_presence or (lambda room, sid, user, data: None)
        self.position = doc.version
        """The aggregate version of the committed state (the store's sequence position)."""
        self._remote: list[Any] = []
        self._contended_until = 0.0
        self._checkpoint: dict[str, Any] | None = None
        self.needs_reload = False
        """After a failed commit without a checkpoint: re-read the whole document."""
        self.state = State.READY
        self.inbox: list[Submission] = []
        self.inflight: list[Submission] = []
        self.parked: list[Submission] = []
        self.lookups: list[Submission] = []
        self.members: dict[Subscriber, Member] = {}
        self.history: list[OpRecord] = []
        self.first_v = doc.doc_version + 1
        self.base_len = doc.length
        self.snapshot = self._snap()
        self._snapshot_msg: tuple[Snapshot, Encoded] | None = None
        self.position = doc.version - len(doc.pending_events)  # a new document: 0
        self.last_used = time.monotonic()
        self._fresh: list[OpRecord] = []
        self._inflight_keys: dict[tuple[str, int], Submission] = {}
        self.presence: dict[str, dict[str, Any]] = {}
        """Session id -> its ``presence`` message, for local and remote sessions."""
        self.presence_proc: dict[str, str] = {}
        """Session id -> the process it is connected to (remote sessions only)."""
        self._local_sids: dict[Subscriber, str] = {}
        self._presence_out: dict[str, tuple[Subscriber | None, dict[str, Any]]] = {}
        self._removed: dict[str, int] = {}
        """Users removed by the batch in flight, each with the version it was removed at."""
        """Users removed from the members by the events in flight."""
        self.writers: set[str] = set()
        """Other processes whose commits of this document the hub delivered: if one dies,
        the room re-reads the store (it may have died before publishing its last)."""
        self._ahead: dict[Subscriber, int] = {}
        """Members sent the ops up to a version past the snapshot from the store (``skip_to``):
        the room's broadcast of those ops is not sent to them again."""

    # -- what sessions and handlers call -----------------------------------------------

    def submit(self, sub: Submission) -> None:
        """Queue a submission for the next commit.

        An edit whose op has more than ``ot.MAX_OP_COMPONENTS`` components is refused at
        once with ``too_large``, before it is checked or transformed (WebSocket and HTTP).
        An edit on a committed version this room holds (``first_v - 1 .. snapshot.v``) is
        validated here against the text's length at that version, which its transformed
        form fits too: one that does not fit is refused at once with ``bad_op``, and never
        reaches a commit tick (nor, on a contended document, the table lock). Only an op on
        a version this process has not applied yet (up to ``head``) needs the tick (its
        catch-up) to be checked. An edit on a version past ``head`` is refused at once with
        ``bad_version``: the caller has asked the store for it first (``Rooms.submit``), and
        a version past ``head`` then is past the store's head too.
        """
        if sub.kind == "edit":
            op = sub.op
            if isinstance(op, list) and len(op) > ot.MAX_OP_COMPONENTS:
                limit = ot.MAX_OP_COMPONENTS
                sub.fail(Code.TOO_LARGE, f"op has {len(op)} components; at most {limit}")
                return
            base, head = sub.base, self.head
            if not 0 <= base <= head:
                if self._refusable(sub):
                    sub.fail(Code.BAD_VERSION, f"base version {base} is not in 0..{head}")
                    return
            elif self.first_v - 1 <= base <= self.snapshot.v:
                try:
                    sub.op = ot.validate(op, self._len_at(base))
                    sub.checked = True
                except BadOp as exc:
                    if self._refusable(sub):
                        sub.fail(exc.code, exc.message)
                        return
        self.inbox.append(sub)
        self.last_used = time.monotonic()
        self._on_dirty(self)

    def subscribe(self, session: Subscriber) -> Member:
        """Register ``session``; it receives every op committed after ``snapshot.v``, and
        every presence change from now on (``send_presence_to`` gives it the presence as it
        is now: call it before yielding to the loop)."""
        member = self.members.get(session)
        if member is None:
            if self._presence_out:
                # Changes not broadcast yet are in ``presence`` already, which the newcomer
                # is sent whole: they go to the others now, not to it a second time.
                self._flush_presence()
            member = self.members[session] = Member(session)
        self.last_used = time.monotonic()
        return member

    def skip_to(self, session: Subscriber, v: int) -> None:
        """``session`` (subscribed) is sent the ops up to ``v`` from the store, past the
        snapshot (they wait here as ``head``): the room's broadcast of them, once it applies
        them, leaves them out for it. It still gets every ack of its own ops."""
        if v > self.snapshot.v:
            self._ahead[session] = v

    def unsubscribe(self, session: Subscriber, keep_presence: bool = False) -> None:
        """Stop sending to ``session`` and clear its presence (kept with ``keep_presence``:
        it subscribes again at once, a ``sub`` replacing its subscription).

        The acks of its ops still reach it: those held back while it caught up are sent now
        (the ops around them are not), and later ones are sent to it directly."""
        member = self.members.pop(session, None)
        if member is not None:
            for msg in member.buffer:
                if is_message(msg, "ack"):
                    session.deliver(msg)
        self._ahead.pop(session, None)
        sid = None if keep_presence else self._local_sids.pop(session, None)
        if sid is not None and sid in self.presence:
            self.set_presence(session, sid, self.presence[sid]["user"], None)
        self.last_used = time.monotonic()

    def set_presence(self, session: Subscriber, sid: str, user: str, data: Any) -> None:
        """Record a local session's presence (None clears); sent to others this loop turn.

        Coalesced: of several updates from one session in one loop turn only the latest
        goes out, locally and to other processes. The value it has already is no change and
        goes nowhere (as a remote session's, ``remote_presence``).
        """
        msg = {"t": "presence", "doc": str(self.id), "session": sid, "user": user, "data": data}
        if data is None:
            if self.presence.pop(sid, None) is None and sid not in self._presence_out:
                return
            self._local_sids.pop(session, None)
        elif _same_presence(self.presence.get(sid), msg):
            return  # the value it has: not a change, here or on the other processes
        else:
            self.presence[sid] = msg
            self._local_sids[session] = sid
        self._on_presence(self, sid, user, data)
        self._queue_presence(session, sid, msg)

    def remote_presence(self, sid: str, user: str, data: Any, proc: str) -> None:
        """Presence of a session of another process (None clears).

        Data that is not a JSON value (a process of another version let it through) clears
        the session's presence instead: JSON clients could not be sent it.
        """
        if not json_value(data):
            data = None
        msg = {"t": "presence", "doc": str(self.id), "session": sid, "user": user, "data": data}
        if data is not None and _same_presence(self.presence.get(sid), msg):
            # No change: the same entry read from Redis (opening the room) and published.
            self.presence_proc[sid] = proc
            return
        if data is None:
            self.presence_proc.pop(sid, None)
            if self.presence.pop(sid, None) is None:
                return
        else:
            self.presence[sid] = msg
            self.presence_proc[sid] = proc
        self._queue_presence(None, sid, msg)

    def remote_presence_all(self, proc: str, entries: dict[str, list[Any]]) -> None:
        """Every session of process ``proc`` here, as ``{session: [user, data]}``: its
        sessions not named are cleared, the others set (an unchanged one goes nowhere)."""
        for sid, p in list(self.presence_proc.items()):
            if p == proc and sid not in entries:
                self.remote_presence(sid, self.presence[sid]["user"], None, proc)
        for sid, (user, data) in entries.items():
            self.remote_presence(str(sid), str(user), data, proc)

    def local_presence(self) -> dict[str, list[Any]]:
        """The presence of this process's sessions, as ``{session: [user, data]}``."""
        return {sid: [msg["user"], msg["data"]] for sid, msg in self.presence.items()
                if sid not in self.presence_proc}

    def clear_procs(self, dead: set[str]) -> None:
        """Clear the presence of every session of processes that died."""
        for sid, proc in list(self.presence_proc.items()):
            if proc in dead:
                self.remote_presence(sid, self.presence[sid]["user"], None, proc)

    def _queue_presence(self, origin: Subscriber | None, sid: str, msg: dict[str, Any]) -> None:
        first = not self._presence_out
        self._presence_out[sid] = (origin, msg)
        if first:
            asyncio.get_running_loop().call_soon(self._flush_presence)

    def _flush_presence(self) -> None:
        out, self._presence_out = self._presence_out, {}
        for origin, msg in out.values():
            enc = Encoded(msg)
            for session, member in self.members.items():
                if session is not origin:
                    member.send(enc)

    def send_presence_to(self, session: Subscriber) -> None:
        """Send ``session`` the presence of everyone else here (after its snapshot), once:
        call it in the loop turn of ``subscribe`` (later changes reach it as broadcasts)."""
        member = self.members.get(session)
        if member is None:
            return
        own = self._local_sids.get(session)
        for sid, msg in self.presence.items():
            if sid != own:
                member.send(Encoded(msg))

    # -- events committed by other processes ----------------------------------------------

    def remote_events(self, events: list[Any]) -> None:
        """Events another process committed (from the hub or read back from the store).

        Applied in position order once nothing of ours is in flight (meanwhile ``head``
        names the newest version among them); duplicates are dropped; a gap asks the store
        for the missing ones (``on_gap``). Subscribers get the edits as ``ops``, exactly once
        and in version order.
        """
        self._remote.extend(events)
        self._contended_until = time.monotonic() + CONTENDED_SECONDS
        if not self.inflight and self.state is State.READY:
            self._apply_remote()

    def _apply_remote(self) -> None:
        if not self._remote:
            return
        pending = sorted(self._remote, key=lambda e: e.originator_version)
        self._remote = []
        records: list[OpRecord] = []
        removed: dict[str, int] = {}
        changed = False
        for i, e in enumerate(pending):
            pos = e.originator_version
            if pos <= self.doc.version:
                continue
            if pos != self.doc.version + 1:
                self._remote = pending[i:]
                self._on_gap(self)
                break
            e.mutate(self.doc)
            changed = True
            if isinstance(e, Document.Edited):
                records.append(_record(e, self.doc.length))
            elif isinstance(e, Document.MemberRemoved):
                removed.setdefault(e.user, self.doc.doc_version)
        if changed:
            self.history.extend(records)
            self.snapshot = self._snap()
            self._broadcast(records, [], removed)
            self._trim()
            if self.inbox:
                self._on_dirty(self)

    def snapshot_message(self) -> Encoded:
        """The ``snapshot`` message of the committed state, encoded once for every joiner.

        A storm of joins on a large document would otherwise encode (and frame) the whole
        text once per session.
        """
        snap = self.snapshot
        cached = self._snapshot_msg
        if cached is None or cached[0] is not snap:
            msg = {"t": "snapshot", "doc": str(self.id), "v": snap.v, "text": snap.text,
                   "title": snap.title}
            cached = self._snapshot_msg = (snap, Encoded(msg))
        return cached[1]

    @property
    def head(self) -> int:
        """The latest version known to be committed: the snapshot's, or past it that of an
        edit another process committed which waits here (``remote_events`` holds them while
        a commit of ours is in flight or the room re-reads the store). Every version up to
        it is in the store, whatever the room applied so far."""
        top = self.snapshot.v
        for e in self._remote:
            if isinstance(e, Document.Edited) and e.v > top:
                top = e.v
        return top

    def may_read(self, user: str) -> bool:
        """Whether ``user`` may read at ``head``: the document's members, with the changes of
        membership that other processes committed and that wait here (``remote_events``, in
        position order from the committed state on, up to a gap) applied on top. A member
        just added elsewhere got 404 while a commit of this room was in flight."""
        allowed = self.doc.can_read(user)
        pos = self.position
        for e in sorted(self._remote, key=lambda e: e.originator_version):
            if e.originator_version <= pos:
                continue
            if e.originator_version != pos + 1:
                break  # a gap: what follows it is not known to hold
            pos = e.originator_version
            if isinstance(e, Document.MemberAdded | Document.MemberRemoved) and e.user == user:
                allowed = isinstance(e, Document.MemberAdded)
        return allowed

    def ops_since(self, v: int) -> list[OpRecord] | None:
        """Committed ops after ``v`` from memory, or None if the window does not reach.

        ``v`` at most ``snapshot.v`` (past it, a catch-up comes from the store: ``skip_to``).
        """
        if v < self.first_v - 1:
            return None
        start = v - self.first_v + 1
        return [r for r in self.history[start:] if r.v <= self.snapshot.v]

    @property
    def busy(self) -> bool:
        """Ops are queued, in flight, parked or being looked up, or the room is re-reading."""
        return bool(self.inbox or self.inflight or self.parked or self.lookups) or (
            self.state is State.STALE
        )

    @property
    def idle(self) -> bool:
        """Nothing queued, nothing in flight and nobody subscribed."""
        return not (self.inbox or self.inflight or self.parked or self.lookups or self.members)

    # -- the committer's side -------------------------------------------------------------

    def prepare(self) -> list[Any]:
        """Check, transform and apply every queued submission; return the new events.

        A room that other processes write to as well (it saw their events lately) first
        takes a checkpoint of the aggregate, so that a conflict costs a rollback and a read
        of the missed events, not a replay of the whole document.

        An edit made on a version the store holds that the room has not applied (past the
        snapshot, up to ``head``: events another process committed wait behind a gap in what
        the hub delivered) is not refused: the room prepares nothing and goes STALE, as
        after a lost race (a commit on its position would lose one), and its submissions
        stay queued until it has read the store. A commit under the table lock catches up
        before preparing, so this is the path of an unlocked tick.
        """
        if self._remote:
            cur, head = self.doc.doc_version, self.head
            if any(sub.kind == "edit" and cur < sub.base <= head for sub in self.inbox):
                self.mark_contended()
                self.state = State.STALE
                return []
        queue, self.inbox = self.inbox, []
        self._checkpoint = None
        if queue and time.monotonic() < self._contended_until:
            self._checkpoint = _capture(self.doc)
        for sub in queue:
            try:
                if sub.kind == "edit":
                    self._prepare_edit(sub)
                elif sub.command is not None:
                    sub.result = sub.command(self.doc)
            except DomainError as exc:
                sub.fail(exc.code, exc.message)
                continue
            except Exception:  # a bug in one submission must not stall the others
                log.exception("submission failed in prepare")
                sub.fail(Code.INTERNAL, "internal error; the op was not applied")
                continue
            if sub.kind in ("parked", "lookup"):
                continue
            self.inflight.append(sub)
        events = list(self.doc.collect_events())
        self._removed = _removals(events, self.snapshot.v)
        return events

    def mark_contended(self) -> None:
        """Another process lost a race on this document: pace our commits of it too."""
        self._contended_until = time.monotonic() + CONTENDED_SECONDS

    @property
    def contended(self) -> bool:
        """Other processes wrote this document lately: commit it under the lock, reads first."""
        return time.monotonic() < self._contended_until

    def client_ops(self) -> list[tuple[str, str, int, int]]:
        """``(doc, client, seq, v)`` of the ops prepared for this commit that carry a client."""
        doc = str(self.id)
        return [(doc, r.client, r.seq, r.v) for r in self._fresh if r.client is not None
                and r.seq is not None]

    def committed(self) -> None:
        """The batch is durable: advance the snapshot, ack and broadcast in order."""
        fresh, self._fresh = self._fresh, []
        inflight, self.inflight = self.inflight, []
        self._inflight_keys.clear()
        self._checkpoint = None
        self.snapshot = self._snap()
        removed, self._removed = self._removed, {}
        self._broadcast(fresh, inflight, removed)
        for sub in inflight:
            if not sub.future.done():
                sub.future.set_result(sub.result)
        self._trim()
        self._apply_remote()

    def conflicted(self) -> None:
        """Another writer was first: drop tentative state, keep the submissions queued."""
        self._contended_until = time.monotonic() + CONTENDED_SECONDS
        self._rollback()
        self.inbox[:0] = self.inflight
        self.inflight = []
        self.state = State.STALE

    def unavailable(self, code: Code, message: str) -> None:
        """The store failed: refuse what was in flight (never acked) and re-read later."""
        self._rollback()
        for sub in self.inflight:
            sub.fail(code, message)
        self.inflight = []
        self.state = State.STALE

    def _send_until_removed(
        self,
        doc: str,
        records: list[OpRecord],
        entries: list[Encoded],
        own: dict[Subscriber, list[Submission]],
        removed: Mapping[str, int],
    ) -> tuple[dict[Subscriber, Member], list[Subscriber]]:
        """Send the members whose user ``removed`` names the records up to the version the
        user was removed at (and no further: the whole batch went out before they were
        dropped, so an op committed after the removal reached them); return the other
        members and those to drop. Dropped even if added again later in the batch: they
        would miss the ops in between."""
        rest = dict(self.members)
        gone = [s for s in rest if s.user in removed]
        for session in gone:
            member = rest.pop(session)
            cut = removed[session.user]  # type: ignore[index]
            keep = [r.v <= cut for r in records]
            _send_part(member, doc, records, entries, keep, own.get(session, []))
        return rest, gone

    def _rollback(self) -> None:
        self._removed = {}
        self._drop_tentative()
        if self._checkpoint is not None:
            _restore(self.doc, self._checkpoint)
            self._checkpoint = None
        else:
            self.needs_reload = True

    def resynced(self, events: list[Any]) -> None:
        """After a rollback: the events committed since our position, read from the store."""
        self.state = State.READY
        self.remote_events(events)
        if self.inbox:
            self._on_dirty(self)

    def refreshed(self, doc: Document, missed: list[Document.Edited]) -> None:
        """Install the state re-read from the store and deliver the ops others wrote."""
        prev_len = len(self.snapshot.text)
        records = []
        for e in missed:
            if e.v <= self.snapshot.v:
                continue
            prev_len = ot.target_length(e.op, prev_len)
            records.append(_record(e, prev_len))
        before = self.snapshot.v
        self.doc = doc
        self.needs_reload = False
        self.history.extend(records)
        if not self.history:
            self.first_v = doc.doc_version + 1
            self.base_len = doc.length
        self.snapshot = self._snap()
        # When a reader lost access among the missed events is not known here: it gets none.
        gone = {s.user: before for s in self.members
                if s.user is not None and not doc.can_read(s.user)}
        self._broadcast(records, [], gone)
        self.state = State.READY
        self._apply_remote()
        if self.inbox:
            self._on_dirty(self)

    def looked_up(self, answers: list[tuple[Submission, int | None]]) -> None:
        """The store answered whether each parked resend was committed; queue them again."""
        for sub, v in answers:
            sub.kind = "edit"
            sub.looked_up = True
            sub.dup_of = v
        self.inbox[:0] = [sub for sub, _ in answers]
        if self.inbox:
            self._on_dirty(self)

    def add_older(self, edits: list[Document.Edited]) -> None:
        """Prepend committed ops read from the store so that old bases can be transformed."""
        older = [e for e in edits if e.v < self.first_v]
        if not older or older[-1].v != self.first_v - 1:
            return
        lengths: list[int] = []
        length = self.base_len
        for e in reversed(older):  # walk back from the known length at first_v - 1
            lengths.append(length)
            length = _base_length_before(e.op, length)
        lengths.reverse()
        self.history[:0] = [_record(e, n) for e, n in zip(older, lengths, strict=True)]
        self.first_v = older[0].v
        self.base_len = length
        for sub in self.parked:
            sub.kind = "edit"
        self.inbox[:0] = self.parked
        self.parked = []
        if self.inbox:
            self._on_dirty(self)

    # -- internals ---------------------------------------------------------------------

    def _prepare_edit(self, sub: Submission) -> None:
        doc = self.doc
        # A resend of a committed op is acked whatever its author's role is now: it was
        # applied (a refusal says it never was). Only a new op needs the right to write.
        if sub.client is not None and sub.seq is not None:
            if sub.looked_up:
                done = sub.dup_of
            else:
                done = doc.committed_seq(sub.client, sub.seq)
                last = doc.clients.get(sub.client)
                if done is None and last is not None and sub.seq < last[0]:
                    done = self._find_seq(sub.client, sub.seq)
                    if done is None:  # older than the window: ask the store
                        sub.kind = "lookup"
                        self.lookups.append(sub)
                        return
            if done is not None:
                self._require_author(sub, self._author(done))
                sub.dup_of = done
                sub.result = done
                return
            twin = self._inflight_keys.get((sub.client, sub.seq))
            if twin is not None:
                self._require_author(sub, twin.by)
                sub.dup_of = doc.doc_version
                sub.result = twin.result
                return
            if not sub.looked_up and sub.by in doc.members and not doc.can_write(sub.by):
                # A viewer now, maybe an editor when this op was committed through another
                # process whose commits this copy has not seen: only the store can tell a
                # resend (acked) from a new op (forbidden).
                sub.kind = "lookup"
                self.lookups.append(sub)
                return
        doc.require_write(sub.by)
        cur = doc.doc_version
        if sub.base < 0 or sub.base > cur:
            raise BadVersion(f"base version {sub.base} is not in 0..{cur}")
        if sub.base < self.first_v - 1:
            sub.kind = "parked"
            self.parked.append(sub)
            return
        op = sub.op if sub.checked else ot.validate(sub.op, self._len_at(sub.base))
        start = sub.base - self.first_v + 1
        if start < len(self.history):
            op = ot.transform_many(op, [rec.op for rec in self.history[start:]], "left")
        if ot.target_length(op, doc.length) > MAX_DOCUMENT_CHARS:
            raise TooLarge(f"the document would exceed {MAX_DOCUMENT_CHARS} characters")
        v = doc.edit(op, sub.by, sub.client, sub.seq)
        rec = OpRecord(v, op, sub.by, sub.client, sub.seq, time.time(), doc.length)
        self.history.append(rec)
        self._fresh.append(rec)
        sub.result = v
        if sub.client is not None and sub.seq is not None:
            self._inflight_keys[(sub.client, sub.seq)] = sub

    def _author(self, v: int) -> str | None:
        """Who made version ``v``, if the window holds it."""
        i = v - self.first_v
        return self.history[i].by if 0 <= i < len(self.history) else None

    @staticmethod
    def _require_author(sub: Submission, author: str | None) -> None:
        """A resend is its author's. A client id is bound to one user (``gateway.clients``)
        before any op of it gets here, so this refuses only what that check let through, and
        only where the author is known here (the window, or the op in flight)."""
        if author is not None and author != sub.by:
            raise Forbidden(f"client id {sub.client!r} is another user's")

    def _refusable(self, sub: Submission) -> bool:
        """Whether an edit whose op does not fit its base may be refused now: ``prepare``
        would refuse it with ``bad_op`` too, not answer otherwise first (a viewer's op is
        ``forbidden``, a resend of a committed op is acked)."""
        if not self.doc.can_write(sub.by):
            return False
        if sub.client is None or sub.seq is None:
            return True
        last = self.doc.clients.get(sub.client)
        fresh = last is None or sub.seq > last[0]
        return fresh and (sub.client, sub.seq) not in self._inflight_keys

    def _find_seq(self, client: str, seq: int) -> int | None:
        for rec in reversed(self.history):
            if rec.client == client and rec.seq == seq and rec.v <= self.snapshot.v:
                return rec.v
        return None

    def _len_at(self, v: int) -> int:
        if v == self.doc.doc_version:
            return self.doc.length
        if v == self.first_v - 1:
            return self.base_len
        return self.history[v - self.first_v].len_after

    def _drop_tentative(self) -> None:
        committed_v = self.snapshot.v
        while self.history and self.history[-1].v > committed_v:
            self.history.pop()
        self._fresh = []
        self._inflight_keys.clear()

    def _trim(self) -> None:
        extra = len(self.history) - HISTORY_WINDOW
        if extra > HISTORY_WINDOW // 2:
            self.base_len = self.history[extra - 1].len_after
            del self.history[:extra]
            self.first_v = self.history[0].v

    def _snap(self) -> Snapshot:
        d = self.doc
        self.position = d.version
        return Snapshot(
            id=d.id,
            title=d.title,
            chunks=d.chunks,
            v=d.doc_version,
            owner=d.owner,
            created_at=d.created_at.timestamp(),
            updated_at=d.updated_at.timestamp(),
        )

    def _broadcast(
        self,
        records: list[OpRecord],
        inflight: list[Submission],
        removed: Mapping[str, int] | None = None,
    ) -> None:
        """Send ``records`` to every member; a submitter gets its ack in place of its op (one
        no longer subscribed gets the ack alone: every op is answered while its connection is
        open).

        ``removed``: users who lost access in this batch, each with the version it happened
        at; their sessions get the records up to it, then leave (``removed``)."""
        doc = str(self.id)
        own: dict[Subscriber, list[Submission]] = {}
        left: list[Submission] = []
        for sub in inflight:
            if sub.session is not None and sub.session in self.members:
                own.setdefault(sub.session, []).append(sub)
            elif sub.session is not None:
                left.append(sub)  # it unsubscribed: the ack still goes to its connection
        entries = [Encoded(r.entry()) for r in records]
        shared = OpsMessage(doc, entries)
        members = self.members
        gone: list[Subscriber] = []
        if removed:
            members, gone = self._send_until_removed(doc, records, entries, own, removed)
        if self._ahead:
            members = self._send_ahead(doc, records, entries, own, members)
        for session, member in members.items():
            mine = own.get(session)
            if mine is None:
                if records:
                    member.send(shared)
                continue
            for msg in _ordered_for(doc, records, entries, mine):
                member.send(msg)
        for sub in left:
            assert sub.session is not None
            sub.session.deliver(_ack(doc, sub.seq, sub.result))
        for session in gone:
            self.unsubscribe(session)
            session.removed(self.id)

    def _send_ahead(
        self,
        doc: str,
        records: list[OpRecord],
        entries: list[Encoded],
        own: dict[Subscriber, list[Submission]],
        members: dict[Subscriber, Member],
    ) -> dict[Subscriber, Member]:
        """Send the ``members`` ahead of the room (``skip_to``) the part of a broadcast they
        lack; return the others. A member the snapshot has caught up with is no longer
        ahead."""
        rest = dict(members)
        for session, after in list(self._ahead.items()):
            member = rest.pop(session, None)
            if member is None:
                del self._ahead[session]
                continue
            mine = own.get(session, [])
            acked = {sub.result for sub in mine if sub.dup_of is None}
            keep = [r.v > after or r.v in acked for r in records]
            _send_part(member, doc, records, entries, keep, mine)
            if after <= self.snapshot.v:
                del self._ahead[session]
        return rest


def _send_part(
    member: Member,
    doc: str,
    records: list[OpRecord],
    entries: list[Encoded],
    keep: list[bool],
    mine: list[Submission],
) -> None:
    """Send ``member`` the records ``keep`` marks, with the acks of ``mine`` in their place."""
    recs = [r for r, k in zip(records, keep, strict=True) if k]
    ents = [e for e, k in zip(entries, keep, strict=True) if k]
    if mine:
        for msg in _ordered_for(doc, recs, ents, mine):
            member.send(msg)
    elif recs:
        member.send(OpsMessage(doc, ents))


def _removals(events: Sequence[Any], v: int) -> dict[str, int]:
    """The users ``events`` (a batch, in order, from edit version ``v``) remove, each with
    the edit version it was removed at (the first time, if more than once)."""
    out: dict[str, int] = {}
    for e in events:
        if isinstance(e, Document.Edited):
            v = e.v
        elif isinstance(e, Document.MemberRemoved):
            out.setdefault(e.user, v)
    return out


def _ordered_for(
    doc: str, records: list[OpRecord], entries: list[Encoded], mine: list[Submission]
) -> list[Encoded]:
    """Messages for a member that submitted ``mine``: ops and acks interleaved by version.

    ``entries`` are the records' entries, encoded once for every member.
    """
    acks = {sub.result: sub for sub in mine if sub.dup_of is None}
    out: list[Encoded] = []
    run: list[Encoded] = []
    for rec, entry in zip(records, entries, strict=True):
        sub = acks.get(rec.v)
        if sub is None:
            run.append(entry)
            continue
        if run:
            out.append(OpsMessage(doc, run))
            run = []
        out.append(_ack(doc, sub.seq, rec.v))
    if run:
        out.append(OpsMessage(doc, run))
    for sub in mine:
        if sub.dup_of is not None:
            out.append(_ack(doc, sub.seq, sub.result))
    return out


def _ack(doc: str, seq: int | None, v: int) -> Encoded:
    return Encoded({"t": "ack", "doc": doc, "seq": seq, "v": v})


def _same_presence(old: dict[str, Any] | None, new: dict[str, Any]) -> bool:
    """Whether presence message ``new`` says what ``old`` said. The data is compared as
    encoded: Python has ``1 == 1.0 == True``, which clients tell apart."""
    if old is None or old["user"] != new["user"]:
        return False
    return encode_one(old["data"], Codec.MSGPACK) == encode_one(new["data"], Codec.MSGPACK)


def _capture(doc: Document) -> dict[str, Any]:
    """The aggregate's state, with its containers copied (strings are immutable)."""
    return {
        k: (v.copy() if isinstance(v, dict | list | set) else v) for k, v in vars(doc).items()
    }


def _restore(doc: Document, state: dict[str, Any]) -> None:
    """Put a captured state back (the pending events list is empty in it)."""
    vars(doc).clear()
    vars(doc).update(state)


def _record(e: Document.Edited, len_after: int) -> OpRecord:
    return OpRecord(e.v, e.op, e.by, e.client, e.seq, e.timestamp.timestamp(), len_after)


def _base_length_before(op: ot.Op, length_after: int) -> int:
    """Length of the text an op applied to, given the length it produced."""
    return length_after - ot.inserted_chars(op) + ot.deleted_chars(op)


__all__ = [
    "MAX_DOCUMENT_CHARS",
    "NotFound",
    "OpRecord",
    "Rejected",
    "Room",
    "Snapshot",
    "Submission",
]
