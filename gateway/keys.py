"""Typed keys of the aiohttp application's state (aiohttp warns about plain strings)."""

from __future__ import annotations

from typing import Any

from aiohttp import web

from gateway.clients import ClientIds
from gateway.rooms import Rooms

ROOMS = web.AppKey("rooms", Rooms)
"""The process's rooms (and through them the store, committer and hub)."""
CLIENTS = web.AppKey("clients", ClientIds)
"""Which user each client id belongs to (bound on first use, cached)."""
SECRET = web.AppKey("secret", bytes)
"""The token signing secret."""
SESSION_LIMITS: web.AppKey[Any] = web.AppKey("session_limits", object)
"""``gateway.session.SessionLimits`` for new connections."""
SESSIONS: web.AppKey[set[Any]] = web.AppKey("sessions", set)
"""Open WebSocket sessions (closed with 1001 on shutdown)."""
SERVICES: web.AppKey[Any] = web.AppKey("services", object)
"""The ``gateway.app.Services`` the app was built from."""

USER = web.RequestKey("user", str)
"""The authenticated user of an HTTP request (set by ``errors_middleware``)."""
