"""Rooms with their committer running, as the app runs them, for in-process tests."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator

from gateway.hub import Hub
from gateway.rooms import Rooms
from gateway.store import Store


@contextlib.asynccontextmanager
async def running(store: Store, hub: Hub | None = None) -> AsyncIterator[Rooms]:
    """Rooms over ``store`` (and ``hub``; default: an in-process hub of their own, so no
    fan-out between processes) with the committer as a task; drained and closed after, as
    the app does. A hub passed in stays open (its owner closes it)."""
    rooms = Rooms(store, hub)
    await rooms.start()
    task = asyncio.create_task(rooms.committer.run())
    try:
        yield rooms
    finally:
        async with asyncio.timeout(10):
            await rooms.drain()
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task
        await rooms.close()
        if hub is None:
            await rooms.hub.close()
        await rooms.committer.aclose()
