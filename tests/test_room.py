"""One room alone, driven as the committer and the sessions drive it: while a commit of its
own is in flight, the events another process committed wait in it, and a subscriber that
knows versions among them still gets every op after its version exactly once, in order.
"""

from __future__ import annotations

import asyncio
from typing import Any

from hypothesis import given, settings
from hypothesis import strategies as st

from domain.document import Document
from gateway.room import Room, State, Submission
from schema.frames import Encoded

OWNER = "olga"


class Reader:
    """A subscriber that keeps what it got: its catch-up, then what the room sent."""

    user = OWNER

    def __init__(self, v: int | None) -> None:
        self.v = v
        self.msgs: list[dict[str, Any]] = []

    def deliver(self, msg: Encoded) -> None:
        """The room's ``Subscriber.deliver``."""
        self.msgs.append(msg.msg)

    def removed(self, doc: Any) -> None:
        """The room's ``Subscriber.removed`` (nobody is removed here)."""
        raise AssertionError("removed")

    def entries(self) -> list[dict[str, Any]]:
        """Every op entry received, in order."""
        return [e for m in self.msgs if m["t"] == "ops" for e in m["ops"]]


def _load(events: list[Any]) -> Document:
    """A process's copy of a document, read from its stored events."""
    doc: Any = None
    for e in events:
        doc = e.mutate(doc)
    assert isinstance(doc, Document)
    return doc


def _edits(events: list[Any]) -> list[Document.Edited]:
    return [e for e in events if isinstance(e, Document.Edited)]


class Process:
    """The room of one process, its readers, and the store both processes write to."""

    def __init__(self, committed: int, viewers: tuple[str, ...] = ()) -> None:
        seed = Document.create(title="T", text="", owner=OWNER)
        for user in viewers:
            seed.add_member(user, "viewer", OWNER)
        for i in range(committed):
            seed.edit([f"{i}"], OWNER, None, None)
        self.stored = list(seed.collect_events())
        self.room = Room(_load(self.stored), lambda room: None)
        self.other = _load(self.stored)
        """The other process's copy."""
        self.readers: list[Reader] = []

    def store(self, events: list[Any]) -> None:
        """Events the other process committed (the store has them; the hub may not yet)."""
        self.stored.extend(events)

    def sub(self, v: int | None) -> Reader:
        """What ``Session._sub`` does: ``Rooms.readable`` reads the store for a version past
        the room's head; then a snapshot, a catch-up from memory, or one from the store up to
        the head past a snapshot that waits for an in-flight commit."""
        room = self.room
        if v is not None and v > room.head:
            room.remote_events(self.stored[room.position :])
        reader = Reader(v)
        self.readers.append(reader)
        snap, head = room.snapshot, room.head
        room.subscribe(reader)
        if v is None:
            reader.deliver(room.snapshot_message())
        elif v > snap.v:
            room.skip_to(reader, head)
            entries = [e for e in _edits(self.stored) if v < e.v <= head]
            reader.deliver(Encoded({"t": "ops", "ops": [{"v": e.v, "op": e.op} for e in entries]}))
        else:  # from memory, or from the store where the window does not reach
            records = room.ops_since(v)
            entries = [r.entry() for r in records] if records is not None else [
                {"v": e.v, "op": e.op} for e in _edits(self.stored) if v < e.v <= snap.v
            ]
            reader.deliver(Encoded({"t": "ops", "ops": entries}))
        return reader


steps = st.lists(
    st.one_of(
        st.tuples(st.just("deliver"), st.integers(1, 3)),
        st.tuples(st.just("sub"), st.none() | st.integers(0, 9)),
    ),
    max_size=8,
)


@settings(max_examples=150, deadline=None)
@given(
    committed=st.integers(0, 3),
    theirs=st.integers(0, 4),
    contended=st.booleans(),
    before=steps,
    stale=steps,
    after=st.lists(st.none() | st.integers(0, 12), max_size=3),
)
def test_a_sub_with_any_committed_version_gets_exactly_the_ops_after_it(
    committed: int, theirs: int, contended: bool,
    before: list[Any], stale: list[Any], after: list[Any],
) -> None:
    """Whatever the room's state (a commit of its own in flight, re-reading after losing
    the race, settled), a ``sub`` with any committed version ``v`` gets exactly the ops
    after ``v``, in order, once each; the submitter gets its ack after every op before it."""
    loop = asyncio.new_event_loop()  # for the submission's future; the room never awaits
    try:
        _run(loop, committed, theirs, contended, before, stale, after)
    finally:
        loop.close()


def _run(
    loop: asyncio.AbstractEventLoop, committed: int, theirs: int, contended: bool,
    before: list[Any], stale: list[Any], after: list[Any],
) -> None:
    p = Process(committed)
    room = p.room
    writer = p.sub(None)
    fut = loop.create_future()
    room.submit(Submission(kind="edit", by=OWNER, future=fut, base=committed, op=["L"],
                           client="w", seq=1, session=writer))
    if contended:  # it saw the other process lately: a checkpoint to roll back to
        room.mark_contended()
    events = room.prepare()  # our edit is in flight: committed + 1, tentatively
    assert events
    for i in range(theirs):  # meanwhile the other process commits the same positions
        p.other.edit([f"r{i}"], OWNER, None, None)
    p.store(list(p.other.collect_events()))
    sent = len(p.stored) - theirs

    def play(plan: list[Any]) -> None:
        nonlocal sent
        for kind, arg in plan:
            if kind == "deliver":  # the hub brings some of them
                room.remote_events(p.stored[sent : sent + arg])
                sent = min(sent + arg, len(p.stored))
            else:  # a reader with a version committed somewhere (or none: a snapshot)
                p.sub(arg if arg is None else arg % (committed + theirs + 1))

    play(before)
    if theirs:  # we lost the race: roll back, re-read, prepare again on the true head
        room.conflicted()
        play(stale)
        if room.needs_reload:  # no checkpoint (not contended when prepared): all again
            v = room.snapshot.v
            room.refreshed(_load(p.stored), [e for e in _edits(p.stored) if e.v > v])
        else:
            room.resynced(p.stored[room.position :])
        events = room.prepare()
    room.committed()
    p.store(events)
    for e in events:
        e.mutate(p.other)
    p.other.edit(["z"], OWNER, None, None)  # and a live op after everything
    late = list(p.other.collect_events())
    final = _edits(late)[-1].v
    for v in after:
        p.sub(v if v is None else v % final)
    p.store(late)
    room.remote_events(late)

    ours = committed + theirs + 1
    assert fut.result() == ours
    edits = {e.v: e.op for e in _edits(p.stored)}
    assert sorted(edits) == list(range(1, final + 1))
    for reader in p.readers:
        got = reader.entries()
        start = reader.v if reader.v is not None else reader.msgs[0]["v"]
        want = [v for v in range(start + 1, final + 1) if not (reader is writer and v == ours)]
        assert [e["v"] for e in got] == want, (reader.v, reader.msgs)
        assert [e["op"] for e in got] == [edits[v] for v in want]
    acks = [i for i, m in enumerate(writer.msgs) if m["t"] == "ack"]
    assert [writer.msgs[i]["v"] for i in acks] == [ours]
    assert max((e["v"] for m in writer.msgs[: acks[0]] if m["t"] == "ops" for e in m["ops"]),
               default=writer.msgs[0]["v"]) == ours - 1


def test_a_member_added_elsewhere_may_read_while_a_commit_is_in_flight() -> None:
    """The other process shares the document (and later unshares it) while this room's own
    commit is in flight: the event waits in the room, and the new member got 404 here until
    that commit resolved. ``may_read`` counts the waiting membership changes, in order."""
    loop = asyncio.new_event_loop()
    try:
        p = Process(1)
        room = p.room
        fut = loop.create_future()
        room.submit(Submission(kind="edit", by=OWNER, future=fut, base=1, op=["L"],
                               client="w", seq=1, session=p.sub(None)))
        assert room.prepare()  # in flight
        p.other.add_member("vic", "viewer", OWNER)
        added = list(p.other.collect_events())
        room.remote_events(added)
        assert not room.doc.can_read("vic") and room.may_read("vic")
        p.other.remove_member("vic", OWNER)
        p.other.edit(["x"], OWNER, None, None)
        later = list(p.other.collect_events())
        room.remote_events(later[1:])  # the removal not here yet: a gap before the edit
        assert room.may_read("vic")
        room.remote_events(later[:1])
        assert not room.may_read("vic") and room.may_read(OWNER)
    finally:
        loop.close()


def test_an_op_on_a_version_behind_a_gap_waits_for_the_store() -> None:
    """An op on a version the hub delivered past a gap (the message before it was lost) is
    not refused with ``bad_version`` by a tick that did not catch up: the room prepares
    nothing and goes STALE (to re-read, as after a lost race), then commits it on that
    version."""
    loop = asyncio.new_event_loop()
    try:
        p = Process(1)
        room = p.room
        p.other.edit(["a"], OWNER, None, None)
        p.other.edit(["b"], OWNER, None, None)
        theirs = list(p.other.collect_events())
        p.store(theirs)
        room.remote_events(theirs[1:])  # version 3 came; version 2's message was lost
        assert (room.snapshot.v, room.head) == (1, 3)
        fut = loop.create_future()
        room.submit(Submission(kind="edit", by=OWNER, future=fut, base=3, op=[2, "!"]))
        assert room.prepare() == []
        assert not fut.done() and room.state is State.STALE and room.contended
        room.resynced(p.stored[room.position :])  # what Rooms._refresh reads
        assert room.state is State.READY and room.snapshot.v == 3
        assert room.prepare()
        room.committed()
        assert fut.result() == 4 and room.snapshot.text == "ba!0"
    finally:
        loop.close()


class Removable(Reader):
    """A reader that records being removed, and what it had received by then."""

    def __init__(self, user: str) -> None:
        super().__init__(None)
        self.user = user
        self.gone_after: int | None = None

    def removed(self, doc: Any) -> None:
        self.gone_after = len(self.msgs)


def test_a_removed_member_gets_no_op_committed_after_its_removal() -> None:
    """An edit, the removal of a member and another edit in one commit (the owner's DELETE
    and ops landing in one tick, on this process or another): the whole batch went out
    before the removed member's sessions left, so the edit after its removal reached it.
    Now it gets the ops up to its removal, then leaves: for our commits, for another
    process's (held or not), and after a reload, where the moment is unknown (nothing)."""
    loop = asyncio.new_event_loop()
    try:
        for path in ("ours", "theirs", "reload"):
            p = Process(1, viewers=("vic",))
            room = p.room
            other = p.other
            vic = Removable("vic")
            room.subscribe(vic)
            if path == "ours":
                futs = [loop.create_future() for _ in range(3)]
                room.submit(Submission(kind="edit", by=OWNER, future=futs[0], base=1, op=["a"]))
                room.submit(Submission(kind="command", by=OWNER, future=futs[1],
                                       command=lambda d: d.remove_member("vic", OWNER)))
                room.submit(Submission(kind="edit", by=OWNER, future=futs[2], base=1, op=["b"]))
                assert room.prepare()
                room.committed()
            else:
                other.edit(["a"], OWNER, None, None)
                other.remove_member("vic", OWNER)
                other.edit(["b"], OWNER, None, None)
                events = list(other.collect_events())
                if path == "theirs":
                    room.remote_events(events)
                else:
                    p.store(events)
                    room.refreshed(_load(p.stored), _edits(events))
            assert vic.gone_after is not None, path
            got = [e["v"] for e in vic.entries()]
            assert got == ([] if path == "reload" else [2]), (path, vic.msgs)
            assert vic not in room.members
    finally:
        loop.close()
