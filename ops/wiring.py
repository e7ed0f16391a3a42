"""The composition root: the one place adapters are chosen and built from ``Settings``."""

from __future__ import annotations

from aiohttp import web

from gateway.app import Services, create_app
from gateway.hub import Hub, LocalHub
from gateway.readmodels import Extension
from gateway.session import SessionLimits
from gateway.store import Store, StoreConfig
from ops.settings import Settings


def store_config(settings: Settings) -> StoreConfig:
    """Postgres when ``database_url`` is set, else SQLite in ``<data dir>/events.sqlite``."""
    return StoreConfig(
        data_dir=settings.data_dir,
        database_url=settings.database_url,
        database_schema=settings.database_schema,
    )


def build_hub(settings: Settings) -> Hub:
    """Redis pub/sub when ``redis_url`` is set, else the in-process hub."""
    if settings.redis_url:
        from gateway.redis_hub import RedisHub

        return RedisHub(settings.redis_url, prefix=settings.redis_prefix)
    return LocalHub()


def build_app(settings: Settings) -> web.Application:
    """The gateway application with every adapter the settings ask for."""
    store = Store(store_config(settings))
    services = Services(
        store=store,
        hub=build_hub(settings),
        secret=settings.secret_bytes(),
        limits=SessionLimits(
            max_frame_bytes=settings.max_frame_bytes,
            max_buffer_bytes=settings.max_buffer_bytes,
        ),
        extensions=[
            Extension(
                run_projections=settings.projections == "inline",
                redis_url=settings.redis_url,
                redis_prefix=settings.redis_prefix,
            )
        ],
    )
    return create_app(services)
