"""Group commit: one store transaction per tick, covering every room with pending work.

A tick is "whatever queued up while the previous commit was running": under load each
transaction carries many events (the throughput lever, since the store serialises commits);
when idle a submission is committed at once. One commit is in flight at a time, so each
room's events reach the store in the order they were prepared.

On PostgreSQL a commit is one round trip on a connection the loop drives
(``gateway.writer``; two more, the lock read and ``COMMIT``, for a document that other
processes write too); otherwise (SQLite, and the rare unchecked retry) the store runs on one
dedicated writer thread with its own connection. Either way the loop only awaits it.
On a version conflict the clashing room is taken out of the batch and the rest is retried at
once; that room re-reads the store and its submissions are transformed again.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any
from uuid import UUID

from eventsourcing.persistence import Recording

from gateway.room import Room, State
from gateway.store import UNAVAILABLE_MESSAGE, Store, StoreUnavailable, VersionConflict
from gateway.writer import AsyncWriter
from schema.codes import Code

log = logging.getLogger(__name__)

MAX_EVENTS_PER_COMMIT = 5000
"""Rooms beyond this many events in one tick wait for the next one."""


@dataclass(slots=True)
class CommitStats:
    """Counters of the committer, for /metrics and the load test."""

    commits: int = 0
    events: int = 0
    conflicts: int = 0
    failures: int = 0
    max_batch: int = 0
    commit_seconds: float = 0.0
    locked: int = 0
    """Commits made under the table lock taken first (contended documents): a subset of
    ``commits``."""
    locked_idle: int = 0
    """Ticks that took the table lock and then committed nothing under it (every queued
    submission was refused or was a resend, or the commit failed)."""
    caught_up: int = 0
    """Events read under that lock: other processes' commits the rooms had not seen yet."""


class Committer:
    """Commits the pending events of all dirty rooms, one transaction per tick."""

    def __init__(
        self,
        store: Store,
        on_stale: Callable[[Room], None],
        on_parked: Callable[[Room], None],
        on_committed: Callable[[list[Recording[UUID]]], None] = lambda recordings: None,
        max_events: int = MAX_EVENTS_PER_COMMIT,
    ) -> None:
        self.store = store
        self._on_stale = on_stale
        self._on_parked = on_parked
        self._on_committed = on_committed
        self.max_events = max_events
        self._dirty: dict[Room, None] = {}
        self._wake = asyncio.Event()
        self._idle = asyncio.Event()
        self._idle.set()
        self._writer = ThreadPoolExecutor(max_workers=1, thread_name_prefix="store-write")
        self._async_writer = AsyncWriter(store) if store.checks_heads else None
        self.stats = CommitStats()

    def mark(self, room: Room) -> None:
        """``room`` has queued work: include it in the next tick."""
        self._dirty[room] = None
        self._idle.clear()
        self._wake.set()

    async def run(self) -> None:
        """The commit loop; runs until cancelled."""
        while True:
            await self._wake.wait()
            self._wake.clear()
            try:
                await self._tick()
            except Exception:  # a bug must not stop every document's commits
                log.exception("commit tick failed")
            if not self._dirty:
                self._idle.set()

    async def drain(self) -> None:
        """Wait until everything queued so far is committed (or refused)."""
        while not self._idle.is_set():
            await self._idle.wait()

    def close(self) -> None:
        """Stop the writer thread (after ``drain``)."""
        self._writer.shutdown(wait=True)

    async def aclose(self) -> None:
        """Close the writer's connections (after ``drain``)."""
        if self._async_writer is not None:
            await self._async_writer.close()
        await asyncio.get_running_loop().run_in_executor(None, self.close)

    async def _tick(self) -> None:
        rooms = list(self._dirty)
        self._dirty.clear()
        locked = await self._lock_contended(rooms)
        locked_before = self.stats.locked
        try:
            batch: list[tuple[Room, list[Any]]] = []
            count = 0
            for room in rooms:
                try:
                    if room.state is State.STALE:
                        self._on_stale(room)
                        continue
                    if count >= self.max_events:
                        self._dirty[room] = None
                        continue
                    events = room.prepare()
                    if room.state is State.STALE:  # behind the store: re-read, then prepare
                        self._on_stale(room)
                        continue
                    if room.parked or room.lookups:
                        self._on_parked(room)
                    if events or room.inflight:
                        batch.append((room, events))
                        count += len(events)
                except Exception:
                    # A bug around one room must not orphan it (prepared but never
                    # committed, rolled back or refused) nor stop the other rooms.
                    log.exception("preparing room %s failed", room.id)
                    if room.inflight:
                        self._refuse([(room, [])], Code.INTERNAL, "internal error; not applied")
                    for sub in room.inbox:
                        sub.fail(Code.INTERNAL, "internal error; not applied")
                    room.inbox.clear()
            if self._dirty:
                self._wake.set()
            if batch:
                await self._commit(batch, locked=locked)
        finally:
            # Whatever happened in between (nothing to commit, a bug), never leave the table
            # lock held: every writer of every process would wait on it.
            if locked and self.stats.locked == locked_before:
                self.stats.locked_idle += 1
            writer = self._async_writer
            if writer is not None and writer.in_transaction:
                await writer.abort()

    async def _lock_contended(self, rooms: list[Room]) -> bool:
        """Take the table lock and catch up contended rooms before preparing them.

        A document that other processes write too would otherwise lose commit races (its
        head moved between our read of it and our commit: a retry, a re-read, transforms
        again; measured at seconds of p99 with two workers on the same documents). Under
        the lock nobody can append: the rooms apply what they missed, then prepare on the
        true head, and the commit in the same transaction cannot conflict.
        """
        writer = self._async_writer
        if writer is None:
            return False
        if not any(r.contended for r in rooms):
            return False
        # A tick with nothing queued (rooms dirty again after the last tick took their work)
        # has nothing to commit: no lock. Ops that do not fit were refused on submission.
        if not any(r.inbox for r in rooms if r.state is State.READY):
            return False
        # Every room of the tick, not only the contended ones: one that had nothing queued
        # when the tick began, or had not seen the other process yet, may still be prepared
        # in it, and must then be on the true head too (measured: a third of the commits of
        # two workers had such a stale room when only contended rooms with work were read).
        heads = {r.id: r.position for r in rooms if r.state is State.READY}
        if not heads:
            return False
        try:
            missed = await writer.begin_locked(heads)
        except StoreUnavailable:
            return False  # the commit itself then fails and refuses, as without the lock
        for room in rooms:
            events = missed.get(room.id)
            if events:
                self.stats.caught_up += len(events)
                room.remote_events(events)
        return True

    async def _save(
        self, batch: list[tuple[Room, list[Any]]], *, checked: bool, locked: bool = False
    ) -> set[UUID]:
        """One transaction for ``batch``; returns the ids of rooms left out as stale.

        ``checked`` (Postgres): rooms whose store head moved are left out, not the whole
        batch failed; unchecked, any clash raises ``VersionConflict``.
        """
        events = [e for _, evs in batch for e in evs]
        if not events:  # a locked transaction left open here is ended by the tick
            return set()
        client_ops = [row for room, _ in batch for row in room.client_ops()]
        loop = asyncio.get_running_loop()
        started = loop.time()
        stale: set[UUID] = set()
        if checked:  # PostgreSQL: the asyncio writer (checks_heads made it)
            assert self._async_writer is not None
            heads = {room.id: room.position for room, evs in batch if evs}
            recordings, stale = await self._async_writer.save_checked(
                events, client_ops, heads, locked=locked
            )
        else:
            recordings = await loop.run_in_executor(
                self._writer, self.store.save, events, client_ops
            )
        self.stats.commits += 1
        if locked:
            self.stats.locked += 1
        self.stats.events += len(recordings)
        self.stats.conflicts += len(stale)
        self.stats.max_batch = max(self.stats.max_batch, len(recordings))
        self.stats.commit_seconds += loop.time() - started
        self._on_committed(recordings)
        return stale

    async def _commit(self, batch: list[tuple[Room, list[Any]]], *, locked: bool = False) -> None:
        pending = batch
        checked = self.store.checks_heads
        while pending:
            try:
                once, locked = locked, False  # a retry is a transaction of its own
                stale = await self._save(pending, checked=checked, locked=once)
            except VersionConflict as exc:
                self.stats.conflicts += 1
                if checked:  # a (doc, client, seq) clash: find it without the head check
                    checked = False
                    continue
                culprit = next((b for b in pending if b[0].id == exc.doc_id), None)
                if culprit is None:
                    await self._commit_each(pending)
                    return
                self._conflicted(culprit[0])
                pending = [b for b in pending if b is not culprit]
                continue
            except Exception as exc:
                if len(pending) == 1 or isinstance(exc, StoreUnavailable):
                    self._failed(pending, exc)
                    return
                # Not the store's fault, so one room's events are (a bug): find which, so
                # that the other rooms' ops are not refused with them.
                log.warning("commit of %d rooms failed (%r); committing them one by one",
                            len(pending), exc)
                writer = self._async_writer
                if writer is not None and writer.in_transaction:
                    await writer.abort()
                await self._commit_each(pending)
                return
            for room, _ in pending:
                if room.id in stale:
                    self._conflicted(room)
                else:
                    self._committed(room)
            return

    async def _commit_each(self, pending: list[tuple[Room, list[Any]]]) -> None:
        """Commit room by room: the store did not say which document clashed, or one
        room's events could not be written."""
        for room, events in pending:
            try:
                await self._save([(room, events)], checked=False)
            except VersionConflict:
                self._conflicted(room)
                continue
            except Exception as exc:
                self._failed([(room, events)], exc)
                continue
            self._committed(room)

    def _committed(self, room: Room) -> None:
        """Resolve a room whose events are durable; a bug here must not strand the others."""
        subs = list(room.inflight)
        try:
            room.committed()
        except Exception:
            # The ops are in the store: resolve their submitters with their versions (HTTP
            # waits on them) and re-read the document; the reload delivers the ops to the
            # subscribers with their client and seq, which counts as their ack.
            log.exception("resolving committed room %s failed; reloading it", room.id)
            for sub in subs:
                if not sub.future.done():
                    sub.future.set_result(sub.result)
            room.inflight = []
            room.needs_reload = True
            room.state = State.STALE
            self._on_stale(room)

    def _conflicted(self, room: Room) -> None:
        room.conflicted()
        self._on_stale(room)

    def _failed(self, pending: list[tuple[Room, list[Any]]], exc: Exception) -> None:
        """Refuse a batch the store did not take: ``unavailable``, or ``internal`` for a bug."""
        if isinstance(exc, StoreUnavailable):
            log.warning("commit of %d rooms failed: event store unavailable: %s", len(pending), exc)
            self._refuse(pending, Code.UNAVAILABLE, UNAVAILABLE_MESSAGE)
        else:
            log.exception("commit failed", exc_info=exc)
            self._refuse(pending, Code.INTERNAL, f"commit failed: {type(exc).__name__}")

    def _refuse(self, pending: list[tuple[Room, list[Any]]], code: Code, message: str) -> None:
        self.stats.failures += 1
        for room, _ in pending:
            room.unavailable(code, message)
            self._on_stale(room)
