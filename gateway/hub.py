"""The hub: how processes that share one event store tell each other what was committed.

A process publishes, after each commit, the stored form of the events it appended (one
message per document per tick) and its sessions' presence changes; every other process
that has the document open applies them to its room and delivers them to its subscribers.
The hub is a hint, never the truth: a room checks that events arrive contiguously and reads
the store to fill a gap, so a lost or duplicated message is never shown to a client.

Adapters: ``LocalHub`` (in-process; with one process there is nobody to tell, and several
hubs on one ``LocalBroker`` behave like processes on one Redis) and ``gateway.redis_hub``.

Wire format (msgpack maps, one per publish; see ``schema/protocol.md``):
``{"k": "e", "p": PROC, "e": [[position, topic, state], ...]}`` for events and
``{"k": "p", "p": PROC, "s": SESSION, "u": USER, "d": DATA|None}`` for presence;
``{"k": "c", "p": PROC}``: PROC lost a commit race on the document (others pace theirs);
``{"k": "P", "p": PROC, "all": {SESSION: [USER, DATA], ...}}``: every session of PROC on the
document, after messages may have been lost (``reset_presence``): the others not named are gone.
"""

from __future__ import annotations

import asyncio
import secrets
from collections.abc import Callable
from typing import Any, Protocol
from uuid import UUID

import msgpack

OnMessage = Callable[[UUID, dict[str, Any]], None]
"""Called on the loop with the document and the decoded message of another process."""
PresenceTables = Callable[[], dict[UUID, dict[str, list[Any]]]]
"""A process's sessions' presence on its open documents, as it is when called:
``{doc: {session: [user, data]}}`` (``Hub.reset_presence``)."""
OnResync = Callable[[], None]
"""Called after the hub may have missed messages (a reconnect): rooms re-read the store."""


def new_proc_id() -> str:
    """An id for this gateway process, unique among the processes sharing a hub."""
    return secrets.token_hex(6)


def pack(msg: dict[str, Any]) -> bytes:
    """Encode a hub message."""
    return bytes(msgpack.packb(msg, use_bin_type=True))


def unpack(data: bytes) -> dict[str, Any]:
    """Decode a hub message (raises on garbage; callers drop it)."""
    msg = msgpack.unpackb(data, raw=False)
    if not isinstance(msg, dict):
        raise ValueError("hub message is not a map")
    return msg


class Hub(Protocol):
    """What rooms need to share one store with other processes."""

    proc: str
    healthy: bool
    published: int
    """Messages (and presence writes) handed to the other processes."""
    publish_failures: int
    """Those dropped because the broker could not be reached (Redis down)."""

    async def start(self, on_message: OnMessage, on_resync: OnResync) -> None:
        """Connect and start delivering messages of other processes."""

    async def watch(self, doc: UUID) -> None:
        """Deliver this document's messages from now on (returns once in effect)."""

    def unwatch(self, doc: UUID) -> None:
        """Stop delivering this document's messages."""

    def publish(self, doc: UUID, msg: dict[str, Any]) -> None:
        """Queue ``msg`` for the other processes; sent with this tick's batch. Never blocks."""

    def set_presence(self, doc: UUID, session: str, entry: list[Any] | None) -> None:
        """Record (or clear, with None) a local session's presence where others can read it."""

    async def presence_of(self, doc: UUID) -> dict[str, list[Any]]:
        """Presence of live sessions of other processes: ``{session: [user, data, proc]}``."""

    def reset_presence(self, tables: PresenceTables) -> None:
        """After presence messages or writes may have been lost (the hub reconnected, this
        process was taken for dead): tell the others, and the shared record, that this
        process's sessions on each document are exactly ``tables()[doc]`` (``{session:
        [user, data]}``), and on the documents whose presence writes were lost, none.
        ``tables`` gives them as they are when called. Never blocks."""

    async def live_procs(self, procs: set[str]) -> set[str]:
        """Which of ``procs`` are alive."""

    async def close(self) -> None:
        """Stop and disconnect."""


class LocalBroker:
    """In-process stand-in for Redis pub/sub, shared by several ``LocalHub``."""

    def __init__(self) -> None:
        self.hubs: list[LocalHub] = []
        self.presence: dict[UUID, dict[str, list[Any]]] = {}


class LocalHub:
    """The in-process hub. Alone on its broker (the embedded default) it sends nothing."""

    def __init__(self, broker: LocalBroker | None = None) -> None:
        self.broker = broker or LocalBroker()
        self.proc = new_proc_id()
        self.healthy = True
        self.published = 0
        self.publish_failures = 0
        self._watched: set[UUID] = set()
        self._on_message: OnMessage | None = None

    async def start(self, on_message: OnMessage, on_resync: OnResync) -> None:
        """Join the broker."""
        self._on_message = on_message
        self.broker.hubs.append(self)

    async def watch(self, doc: UUID) -> None:
        """Receive the document's messages."""
        self._watched.add(doc)

    def unwatch(self, doc: UUID) -> None:
        """Stop receiving them."""
        self._watched.discard(doc)

    def publish(self, doc: UUID, msg: dict[str, Any]) -> None:
        """Hand ``msg`` to every other hub watching ``doc``, on a later loop turn."""
        data = pack(msg)  # what Redis would carry: no shared mutable objects
        self.published += 1
        loop = asyncio.get_running_loop()
        for hub in self.broker.hubs:
            if hub is not self and doc in hub._watched and hub._on_message is not None:
                loop.call_soon(hub._on_message, doc, unpack(data))

    def set_presence(self, doc: UUID, session: str, entry: list[Any] | None) -> None:
        """Keep the entry in the broker."""
        table = self.broker.presence.setdefault(doc, {})
        if entry is None:
            table.pop(session, None)
        else:
            table[session] = entry

    async def presence_of(self, doc: UUID) -> dict[str, list[Any]]:
        """Entries of hubs still on the broker."""
        live = {h.proc for h in self.broker.hubs}
        table = self.broker.presence.get(doc, {})
        return {s: e for s, e in table.items() if e[2] in live and e[2] != self.proc}

    def reset_presence(self, tables: PresenceTables) -> None:
        """Replace this hub's entries in the broker and tell the other hubs."""
        for doc, entries in tables().items():
            table = self.broker.presence.setdefault(doc, {})
            for sid in [s for s, e in table.items() if e[2] == self.proc and s not in entries]:
                del table[sid]
            table.update({sid: [user, data, self.proc] for sid, (user, data) in entries.items()})
            self.publish(doc, {"k": "P", "p": self.proc, "all": entries})

    async def live_procs(self, procs: set[str]) -> set[str]:
        """Procs whose hub is still on the broker."""
        return procs & {h.proc for h in self.broker.hubs}

    async def close(self) -> None:
        """Leave the broker (as a process death would)."""
        if self in self.broker.hubs:
            self.broker.hubs.remove(self)
