"""The aiohttp application factory. Adapters are built by ``ops.wiring`` and passed in.

Lifecycle: on startup the committer and the room sweeper start; on shutdown (SIGTERM) the
gateway stops accepting, closes sessions with 1001 (going away), lets the committer flush
what was queued, then releases the store.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field

from aiohttp import web

from gateway import http, keys
from gateway.clients import ClientIds
from gateway.hub import Hub
from gateway.rooms import Rooms
from gateway.session import CLOSE_GOING_AWAY, Session, SessionLimits, handle_ws
from gateway.store import Store


@dataclass(slots=True)
class Services:
    """What the gateway runs on, built once by the composition root."""

    store: Store
    secret: bytes
    hub: Hub | None = None
    limits: SessionLimits = field(default_factory=SessionLimits)
    close_store: bool = True
    extensions: list[Callable[[web.Application], None]] = field(default_factory=list)
    """Called with the app before it starts: add routes, ``cleanup_ctx``, ``on_shutdown``."""


def create_app(services: Services) -> web.Application:
    """A ready-to-run gateway application over ``services``."""
    http.install_log_filters()
    app = web.Application(
        client_max_size=http.MAX_BODY_BYTES, middlewares=[http.errors_middleware]
    )
    app[keys.SERVICES] = services
    app[keys.SECRET] = services.secret
    app[keys.SESSION_LIMITS] = services.limits
    app[keys.ROOMS] = Rooms(services.store, services.hub)
    app[keys.CLIENTS] = ClientIds(services.store)
    app[keys.SESSIONS] = set[Session]()
    http.add_routes(app)
    app.router.add_get("/v1/ws", handle_ws)
    app.cleanup_ctx.append(_background)
    app.on_shutdown.append(_close_sessions)
    for extend in services.extensions:
        extend(app)
    return app


async def _background(app: web.Application) -> AsyncIterator[None]:
    rooms: Rooms = app[keys.ROOMS]
    await rooms.start()
    committer = asyncio.create_task(rooms.committer.run(), name="committer")
    sweeper = asyncio.create_task(rooms.sweep_forever(), name="room-sweeper")
    presence = asyncio.create_task(rooms.presence_forever(), name="presence-liveness")
    yield
    with contextlib.suppress(TimeoutError):
        await asyncio.wait_for(rooms.drain(), timeout=10)
    for task in (committer, sweeper, presence):
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task
    await rooms.close()
    await rooms.hub.close()
    await rooms.committer.aclose()
    services: Services = app[keys.SERVICES]
    if services.close_store:
        await asyncio.get_running_loop().run_in_executor(None, services.store.close)


async def _close_sessions(app: web.Application) -> None:
    """SIGTERM: the listener is already closed; commit what is queued, then say goodbye."""
    rooms: Rooms = app[keys.ROOMS]
    with contextlib.suppress(TimeoutError):
        await asyncio.wait_for(rooms.drain(), timeout=10)
    sessions: set[Session] = app[keys.SESSIONS]
    await asyncio.gather(
        *(s.close(CLOSE_GOING_AWAY, "server shutting down") for s in list(sessions)),
        return_exceptions=True,
    )
