"""The rooms of this process: load on first use, re-read after conflicts, evict when idle.

Loading runs on the store's reader threads; concurrent requests for one document share one
load. A room that went STALE (conflict, store failure) re-reads the store: its aggregate is
replaced and the ops other writers committed meanwhile are delivered to its subscribers.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from typing import Any
from uuid import UUID

from eventsourcing.persistence import Recording

from domain.document import Document
from gateway.committer import Committer
from gateway.hub import Hub, LocalHub
from gateway.room import Room, State, Submission
from gateway.store import UNAVAILABLE_MESSAGE, Store, StoreUnavailable
from schema.codes import Code

log = logging.getLogger(__name__)

IDLE_SECONDS = 120.0
"""A room with nobody subscribed and nothing pending is dropped after this long."""
REFRESH_BACKOFF = 0.5
"""Least time between two re-reads of one stale room when the store keeps failing."""


class Rooms:
    """The registry of open rooms; the one place rooms are created."""

    def __init__(self, store: Store, hub: Hub | None = None) -> None:
        self.store = store
        self.hub: Hub = hub or LocalHub()
        self.committer = Committer(
            store, on_stale=self._stale, on_parked=self._parked, on_committed=self._published
        )
        self._resyncing: set[UUID] = set()
        self._sync_waiters: dict[UUID, list[asyncio.Future[None]]] = {}
        self._rooms: dict[UUID, Room] = {}
        self._loading: dict[UUID, asyncio.Future[Room | None]] = {}
        self._refreshing: set[UUID] = set()
        self._last_refresh: dict[UUID, float] = {}
        self._tasks: set[asyncio.Task[Any]] = set()
        self._heard: dict[str, float] = {}
        """Process -> when a message of it last came (``presence_forever``'s check)."""

    def __len__(self) -> int:
        return len(self._rooms)

    def peek(self, doc_id: UUID) -> Room | None:
        """The room if it is open in this process, without loading."""
        return self._rooms.get(doc_id)

    async def get(self, doc_id: UUID) -> Room | None:
        """The room of ``doc_id``, loading it from the store; None if there is no document."""
        room = self._rooms.get(doc_id)
        if room is not None:
            return room
        fut = self._loading.get(doc_id)
        if fut is None:
            fut = asyncio.get_running_loop().create_future()
            self._loading[doc_id] = fut
            try:
                await self.hub.watch(doc_id)  # before reading: nothing falls in between
                doc = await self._read(self.store.load, doc_id)
                room = self._new_room(doc) if doc is not None else None
                if room is not None:
                    self._rooms[doc_id] = room
                    for sid, (user, data, proc) in (await self.hub.presence_of(doc_id)).items():
                        room.remote_presence(sid, user, data, proc)
                else:
                    self.hub.unwatch(doc_id)
                fut.set_result(room)
            except BaseException as exc:
                fut.set_exception(exc)
                fut.exception()  # mark retrieved: waiters re-raise it themselves
                raise
            finally:
                self._loading.pop(doc_id, None)
            return room
        return await asyncio.shield(fut)

    def create(self, doc: Document, by: str) -> asyncio.Future[Any]:
        """Open a room for a new document and queue its creation; resolves when durable."""
        room = self._new_room(doc)
        self._rooms[doc.id] = room
        self._spawn(self.hub.watch(doc.id))
        fut: asyncio.Future[Any] = asyncio.get_running_loop().create_future()
        room.submit(Submission(kind="command", by=by, future=fut, command=lambda d: d.id))

        def forget_on_failure(f: asyncio.Future[Any]) -> None:
            if (f.cancelled() or f.exception() is not None) and self._rooms.get(doc.id) is room:
                del self._rooms[doc.id]

        fut.add_done_callback(forget_on_failure)
        return fut

    def _new_room(self, doc: Document) -> Room:
        return Room(doc, self.committer.mark, on_gap=self._gap, on_presence=self._presence)

    # -- the hub's side ----------------------------------------------------------------

    async def start(self) -> None:
        """Connect the hub; call before serving."""
        await self.hub.start(self._on_hub, self._resync_all)

    def _published(self, recordings: list[Recording[UUID]]) -> None:
        by_doc: dict[UUID, list[list[Any]]] = {}
        for r in recordings:
            n = r.notification
            by_doc.setdefault(n.originator_id, []).append([n.originator_version, n.topic, n.state])
        for doc_id, events in by_doc.items():
            self.hub.publish(doc_id, {"k": "e", "p": self.hub.proc, "e": events})

    def _presence(self, room: Room, sid: str, user: str, data: Any) -> None:
        entry = None if data is None else [user, data, self.hub.proc]
        self.hub.set_presence(room.id, sid, entry)
        self.hub.publish(room.id, {"k": "p", "p": self.hub.proc, "s": sid, "u": user, "d": data})

    def _on_hub(self, doc_id: UUID, msg: dict[str, Any]) -> None:
        proc = msg.get("p")
        if isinstance(proc, str):
            self._heard[proc] = time.monotonic()
        room = self._rooms.get(doc_id)
        if room is None:
            return
        kind = msg.get("k")
        try:
            if kind == "e":
                # Events at or below the committed head are here already (a room that
                # committed under the lock read them from the store first): not decoded.
                room.writers.add(msg["p"])
                known = room.position
                fresh = [e for e in msg["e"] if e[0] > known]
                if not fresh:
                    room.mark_contended()
                    return
                decoded = self.store.decoder.decode(
                    [(0, doc_id, pos, t, st) for pos, t, st in fresh]
                )
                room.remote_events([e for _, e in decoded])
            elif kind == "p":
                room.remote_presence(msg["s"], msg.get("u") or "", msg.get("d"), msg["p"])
            elif kind == "P":
                room.remote_presence_all(msg["p"], dict(msg["all"]))
            elif kind == "c":
                room.mark_contended()
        except Exception:
            log.exception("dropped a malformed hub message for %s", doc_id)
            self._gap(room)

    def _gap(self, room: Room) -> None:
        if room.id not in self._resyncing:
            self._resyncing.add(room.id)
            self._spawn(self._resync(room))

    def _resync_all(self) -> None:
        """The hub may have missed messages, or lost this process's presence writes (it
        reconnected, another process did, or this one was taken for dead): every open room
        re-reads the store, and its local sessions' presence is published again, whole."""
        for room in list(self._rooms.values()):
            self._gap(room)
        self.hub.reset_presence(
            lambda: {room.id: room.local_presence() for room in self._rooms.values()}
        )

    async def _resync(self, room: Room) -> None:
        """Read the events after the room's position from the store and apply them."""
        try:
            events = await self._read(self.store.events_after, room.id, room.position)
            room.remote_events(events)
        except StoreUnavailable as exc:
            log.warning("resync of %s failed: %s", room.id, exc)
        finally:
            self._resyncing.discard(room.id)

    async def readable(self, doc_id: UUID, user: str, v: int | None = None) -> Room | None:
        """The room of ``doc_id`` if ``user`` may read it; None if not, or if there is none.

        This process's copy can lag another's by the few ms of a publish (more while Redis
        is down). Where that could change the answer, the store is read first (raising
        ``StoreUnavailable`` if it cannot be read and ``v`` is past the copy): the copy
        says ``user`` may not read (a member just added elsewhere), ``v`` is past it (a
        version seen elsewhere), or the hub is down. Versions are checked against the room's
        ``head``, not its snapshot: what the store read returns waits in the room while a
        commit of the room's own is in flight, and the snapshot stays behind it until then.
        """
        room = await self.get(doc_id)
        if room is None:
            return None
        behind = v is not None and v > room.head
        if behind or not room.may_read(user) or not self.hub.healthy:
            # Only the store can tell whether a version past the copy exists: if it cannot
            # be read, that is ``StoreUnavailable``, not a ``bad_version`` from the copy.
            await self.current(room, strict=behind)
        return room if room.may_read(user) else None

    async def submit(self, room: Room, sub: Submission) -> None:
        """Queue ``sub`` in ``room`` (``Room.submit``), knowing the version it was made on.

        An edit on a version past the room's ``head`` (seen on another process, whose
        publish is still on its way here, or was lost) waits for one read of the store
        first (``current``): the room then holds every version the store held when the
        edit arrived, and only a version past that is ``bad_version``. If the store cannot
        be read the edit is refused with ``unavailable``. Any other submission, and an edit
        on a version the room knows, is queued at once.
        """
        if sub.kind == "edit" and sub.base > room.head:
            try:
                await self.current(room, strict=True)
            except StoreUnavailable:
                sub.fail(Code.UNAVAILABLE, UNAVAILABLE_MESSAGE)
                return
            except Exception:  # a bug reading the store (logged there); never a hang
                sub.fail(Code.INTERNAL, "internal error; the op was not applied")
                return
        room.submit(sub)

    async def current(self, room: Room, *, strict: bool = False) -> None:
        """Apply what the store holds beyond the room's position.

        The hub cannot reveal a gap after the last message: another process may have died
        between its commit and its publish, or Redis may be down. A client that moved here
        with a version seen elsewhere would then get a wrong ``bad_version`` or an empty
        catch-up (``Session`` asks for this then). One read of the room serves every caller
        that came before it began; if the store cannot be read, the room stays as it is
        and, with ``strict``, the store's error is raised (``StoreUnavailable``).
        """
        waiter: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        waiters = self._sync_waiters.get(room.id)
        if waiters is None:
            self._sync_waiters[room.id] = [waiter]
            self._spawn(self._sync(room))
        else:
            waiters.append(waiter)
        try:
            await waiter
        except Exception:
            if strict:
                raise

    async def _sync(self, room: Room) -> None:
        try:
            while True:
                await asyncio.sleep(0)  # callers of this loop turn share the read
                waiters, self._sync_waiters[room.id] = self._sync_waiters[room.id], []
                if not waiters:  # none came during the last read
                    return
                failed: Exception | None = None
                try:
                    events = await self._read(self.store.events_after, room.id, room.position)
                    if events:
                        room.remote_events(events)
                except Exception as exc:
                    log.warning("reading %s from the store failed: %s", room.id, exc)
                    failed = exc
                finally:
                    _resolve(waiters, failed)
        finally:
            _resolve(self._sync_waiters.pop(room.id, []))

    async def presence_forever(self, every: float = 3.0) -> None:
        """Clear presence of sessions whose process died (its liveness key expired).

        The rooms it wrote re-read the store: it may have died between a commit and its
        publish, and no later message would show the gap.
        """
        while True:
            await asyncio.sleep(every)
            procs = {p for r in self._rooms.values() for p in r.presence_proc.values()}
            procs.update(p for r in self._rooms.values() for p in r.writers)
            if not procs:
                continue
            asked = time.monotonic()
            live = await self.hub.live_procs(procs)
            # One that spoke while the answer was on its way is alive (it may have come
            # back and published its presence anew: clearing it now would be for good).
            dead = {p for p in procs - live if self._heard.get(p, 0.0) < asked}
            for p in dead:
                self._heard.pop(p, None)
            if dead:
                for room in list(self._rooms.values()):
                    if not dead.isdisjoint(room.writers):
                        room.writers -= dead
                        self._gap(room)
                    room.clear_procs(dead)

    async def _read(self, fn: Any, *args: Any) -> Any:
        return await asyncio.get_running_loop().run_in_executor(self.store.reader, fn, *args)

    # -- background work ---------------------------------------------------------------

    def _spawn(self, coro: Any) -> None:
        task = asyncio.get_running_loop().create_task(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    def _stale(self, room: Room) -> None:
        if room.state is State.STALE and not room.needs_reload:
            # We lost a race: ask the winners to pace their commits of this document, or the
            # process that commits it most often starves the others.
            self.hub.publish(room.id, {"k": "c", "p": self.hub.proc})
        if room.id not in self._refreshing:
            self._refreshing.add(room.id)
            self._spawn(self._refresh(room))

    def _parked(self, room: Room) -> None:
        self._spawn(self._fetch_older(room))

    async def _refresh(self, room: Room) -> None:
        """Bring a STALE room back: read what it missed (or, without a checkpoint, all)."""
        try:
            # Back off only after a failed re-read (the store is down), never after a conflict.
            wait = self._last_refresh.get(room.id, 0.0) + REFRESH_BACKOFF - time.monotonic()
            if wait > 0:
                await asyncio.sleep(wait)
            try:
                if not room.needs_reload:
                    events = await self._read(self.store.events_after, room.id, room.position)
                    room.resynced(events)
                    return
                doc, missed = await self._read(self._reread, room.id, room.snapshot.v)
            except StoreUnavailable as exc:
                self._last_refresh[room.id] = time.monotonic()
                log.warning("re-read of %s failed: %s", room.id, exc)
                _fail_inbox(room, Code.UNAVAILABLE, UNAVAILABLE_MESSAGE)
                return
            if doc is None:
                _fail_inbox(room, Code.NOT_FOUND, "no such document")
                self._rooms.pop(room.id, None)
                return
            room.refreshed(doc, missed)
        finally:
            self._refreshing.discard(room.id)

    def _reread(self, doc_id: UUID, v: int) -> tuple[Document | None, list[Document.Edited]]:
        doc = self.store.load(doc_id)
        if doc is None:
            return None, []
        missed = self.store.edits_after(doc_id, v, max(0, doc.doc_version - v))
        return doc, [e for e in missed if e.v <= doc.doc_version]

    async def _fetch_older(self, room: Room) -> None:
        if room.lookups:
            await self._lookup(room)
        if not room.parked:
            return
        try:
            want = min(sub.base for sub in room.parked) if room.parked else None
            if want is None:
                return
            edits = await self._read(
                self.store.edits_after, room.id, want, room.first_v - 1 - want
            )
            room.add_older(edits)
        except StoreUnavailable as exc:
            log.warning("reading older edits of %s failed: %s", room.id, exc)
            for sub in room.parked:
                sub.fail(Code.UNAVAILABLE, UNAVAILABLE_MESSAGE)
            room.parked.clear()

    async def _lookup(self, room: Room) -> None:
        subs, room.lookups = room.lookups, []
        try:
            answers = await self._read(
                lambda: [(s, self.store.find_client_op(room.id, s.client, s.seq)) for s in subs]
            )
        except StoreUnavailable as exc:
            log.warning("looking up resent ops of %s failed: %s", room.id, exc)
            for sub in subs:
                sub.fail(Code.UNAVAILABLE, UNAVAILABLE_MESSAGE)
            return
        room.looked_up(answers)

    async def sweep_forever(self, every: float = 30.0, idle: float = IDLE_SECONDS) -> None:
        """Drop rooms that have been idle for ``idle`` seconds."""
        while True:
            await asyncio.sleep(every)
            self.sweep(idle)

    def sweep(self, idle: float = IDLE_SECONDS) -> int:
        """Drop idle rooms now; return how many."""
        cutoff = time.monotonic() - idle
        drop = [
            i
            for i, r in self._rooms.items()
            if r.idle and r.state is State.READY and r.last_used < cutoff
        ]
        for i in drop:
            del self._rooms[i]
            self.hub.unwatch(i)
        return len(drop)

    async def drain(self) -> None:
        """Wait until every op queued so far is committed or refused (SIGTERM).

        The committer's queue is not all: a room that lost a commit race holds its ops while
        it re-reads the store, and a resend waits for its lookup; neither is queued then.
        """
        while True:
            await self.committer.drain()
            if not self._refreshing and not any(r.busy for r in self._rooms.values()):
                return
            await asyncio.sleep(0.005)

    async def close(self) -> None:
        """Cancel background work (after the committer drained)."""
        for task in list(self._tasks):
            task.cancel()
        for task in list(self._tasks):
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await task


def _resolve(waiters: list[asyncio.Future[None]], failed: Exception | None = None) -> None:
    for waiter in waiters:
        if waiter.done():
            continue
        if failed is None:
            waiter.set_result(None)
        else:
            waiter.set_exception(failed)


def _fail_inbox(room: Room, code: Code, message: str) -> None:
    """Refuse everything queued in ``room`` (never acked; clients may resend)."""
    for sub in room.inbox:
        sub.fail(code, message)
    room.inbox.clear()
