"""The composition root: the one place adapters are chosen and built from ``Settings``.

The commands open the event store through :func:`open_store`, which turns the ways opening
fails (the database does not answer, the data directory cannot be made or written) into
:class:`StoreUnreachable`, and, for the commands that only read, a store that is not there
into :class:`NoStore`, before anything is created.
"""

from __future__ import annotations

from urllib.parse import urlsplit, urlunsplit

from aiohttp import web
from eventsourcing.persistence import InterfaceError, OperationalError

from gateway.app import Services, create_app
from gateway.hub import Hub, LocalHub
from gateway.readmodels import Extension
from gateway.session import SessionLimits
from gateway.store import APP_NAME, Store, StoreConfig
from ops.settings import Settings


class StoreUnreachable(Exception):
    """The event store cannot be opened: the database does not answer, or the data directory
    cannot be made or written (a runtime failure; the message names where and why)."""


class NoStore(Exception):
    """There is no event store where the settings point (a mistyped ``--data-dir`` or
    ``--database-schema``): read-only commands refuse to make an empty one."""


def store_config(settings: Settings) -> StoreConfig:
    """Postgres when ``database_url`` is set, else SQLite in ``<data dir>/events.sqlite``."""
    return StoreConfig(
        data_dir=settings.data_dir,
        database_url=settings.database_url,
        database_schema=settings.database_schema,
    )


def store_place(cfg: StoreConfig) -> str:
    """Where the events are, for messages: the SQLite file, or the URL (without its password)
    and the schema."""
    if not cfg.database_url:
        return str(cfg.data_dir / "events.sqlite")
    url = urlsplit(cfg.database_url)
    if url.password is not None:
        user = url.username or ""
        url = url._replace(netloc=f"{user}:***@{url.netloc.rpartition('@')[2]}")
    return f"{urlunsplit(url)} (schema {cfg.database_schema or 'public'})"


def open_store(settings: Settings, *, existing: bool = False) -> Store:
    """The event store of ``settings``; with ``existing``, only if it is there already.

    Raises :class:`StoreUnreachable` or (with ``existing``) :class:`NoStore`. The store
    adapter's own translations cover the calls on an open store; these are the failures of
    opening it, which surface as psycopg's, the library's or the file system's errors.
    """
    import psycopg

    cfg = store_config(settings)
    try:
        if existing and not _exists(cfg):
            raise NoStore(f"no event store at {store_place(cfg)}")
        return Store(cfg)
    except (psycopg.OperationalError, OperationalError, InterfaceError, OSError) as exc:
        reason = str(exc).strip().splitlines()[0]
        if isinstance(exc, OSError) and exc.strerror:
            reason = f"{exc.filename}: {exc.strerror}" if exc.filename else exc.strerror
        raise StoreUnreachable(
            f"cannot open the event store at {store_place(cfg)}: {reason}"
        ) from exc


def _exists(cfg: StoreConfig) -> bool:
    """Whether the event table is there (asked without creating anything)."""
    if not cfg.database_url:
        return (cfg.data_dir / "events.sqlite").is_file()
    import psycopg

    schema = (cfg.database_schema or "public").replace('"', '""')
    with psycopg.connect(cfg.database_url, connect_timeout=5) as conn:
        row = conn.execute(
            "SELECT to_regclass(%s) IS NOT NULL", (f'"{schema}".{APP_NAME}_events',)
        ).fetchone()
    return bool(row and row[0])


def build_hub(settings: Settings) -> Hub:
    """Redis pub/sub when ``redis_url`` is set, else the in-process hub."""
    if settings.redis_url:
        from gateway.redis_hub import RedisHub

        return RedisHub(settings.redis_url, prefix=settings.redis_prefix)
    return LocalHub()


def build_app(settings: Settings) -> web.Application:
    """The gateway application with every adapter the settings ask for."""
    store = open_store(settings)
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
