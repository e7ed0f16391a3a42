"""Client ids and their users: an id belongs to the first user who uses it, for ever.

``(doc, client, seq)`` identifies an op for ever (a resend of it is acked, not applied
again), and every member of a document sees the ``client``/``seq`` of its ops: were an id
free for anyone, one user could make another's next ops pass for resends of their own, acked
and never applied. So a ``hello`` or an HTTP op with a client id first binds the id to its
user, in the store's ``coscribe_clients`` (across documents, processes and restarts), and
another user's id is refused (``forbidden``).

Bindings never change, so each one this process learns (whoever asked) is kept, up to
``CACHE_SIZE`` of them, the least recently used out first: a reconnect or an op costs no
round trip. Ids not known here are bound in batches: those asked for in one loop turn, and
those asked for while a batch is in the store, go together (one statement on PostgreSQL),
one batch in the store at a time, on the store's reader threads.
"""

from __future__ import annotations

import asyncio
import logging
from collections import OrderedDict
from typing import Any

from domain.errors import Forbidden
from gateway.store import Store, StoreUnavailable

log = logging.getLogger(__name__)

CACHE_SIZE = 100_000
"""Most bindings kept in memory per process."""
BATCH = 1000
"""Most client ids bound in one statement."""
BIND_SECONDS = 5.0
"""Longest a ``claim`` waits for its id's binding, from its call; past it: ``unavailable``."""
GUARD_SECONDS = 30.0
"""Longest a batch may take before it is failed here whatever the database does (the
statement itself ends sooner: ``STATEMENT_SECONDS`` in ``gateway.recorders``)."""


class ClientIds:
    """The client ids of one process's sessions and requests; use on one event loop."""

    def __init__(self, store: Store, size: int = CACHE_SIZE) -> None:
        self._store = store
        self._size = size
        self._owners: OrderedDict[str, str] = OrderedDict()
        self._waiting: dict[str, tuple[str, list[asyncio.Future[str]]]] = {}
        """Client id -> the first user who asked for it, and every request waiting."""
        self._task: asyncio.Task[None] | None = None

    async def claim(self, client: str, user: str) -> None:
        """Bind ``client`` to ``user`` unless it is bound already; raise ``Forbidden`` if it
        belongs to another user, ``StoreUnavailable`` if the store could not say."""
        owner = self._owners.get(client)
        if owner is not None:
            self._owners.move_to_end(client)
        else:
            try:  # the batch goes on for the others waiting on it; this request gives up
                owner = await asyncio.wait_for(asyncio.shield(self._bind(client, user)),
                                               BIND_SECONDS)
            except TimeoutError:
                raise StoreUnavailable(f"no answer within {BIND_SECONDS:g} s") from None
        if owner != user:
            raise Forbidden(f"client id {client!r} is another user's; choose another")

    def _bind(self, client: str, user: str) -> asyncio.Future[str]:
        loop = asyncio.get_running_loop()
        fut: asyncio.Future[str] = loop.create_future()
        waiting = self._waiting.get(client)
        if waiting is None:
            self._waiting[client] = (user, [fut])
        else:
            waiting[1].append(fut)
        if self._task is None:
            # Its first step runs after this loop turn: the turn's other requests join it.
            self._task = loop.create_task(self._run(), name="bind-client-ids")
        return fut

    async def _run(self) -> None:
        loop = asyncio.get_running_loop()
        try:
            while self._waiting:
                batch = {c: self._waiting.pop(c) for c in list(self._waiting)[:BATCH]}
                wanted = {c: user for c, (user, _) in batch.items()}
                try:
                    async with asyncio.timeout(GUARD_SECONDS):
                        owners = await loop.run_in_executor(
                            self._store.reader, self._store.bind_clients, wanted
                        )
                except TimeoutError:
                    _fail(batch, StoreUnavailable(f"no answer within {GUARD_SECONDS:g} s"))
                    continue
                except Exception as exc:  # StoreUnavailable, or a bug: nobody waits for ever
                    _fail(batch, exc)
                    continue
                for client, (_, futs) in batch.items():
                    owner = owners.get(client)
                    if owner is None:  # cannot happen: the store read every id it was given
                        _fail({client: batch[client]}, StoreUnavailable("no owner read back"))
                        continue
                    self._remember(client, owner)
                    for fut in futs:
                        if not fut.done():
                            fut.set_result(owner)
        finally:
            self._task = None

    def _remember(self, client: str, owner: str) -> None:
        self._owners[client] = owner
        self._owners.move_to_end(client)
        if len(self._owners) > self._size:
            self._owners.popitem(last=False)


def _fail(batch: dict[str, tuple[str, list[asyncio.Future[Any]]]], exc: Exception) -> None:
    if isinstance(exc, StoreUnavailable):
        log.warning("binding %d client id(s) failed: %s", len(batch), exc)
    else:
        log.error("binding %d client id(s) failed", len(batch), exc_info=exc)
    for _, futs in batch.values():
        for fut in futs:
            if not fut.done():
                fut.set_exception(exc)
