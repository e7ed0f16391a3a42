"""The ``coscribe`` command: ``serve``, ``token``, ``loadtest`` (and more as they come).

Every flag has a ``COSCRIBE_*`` variable of the same name; the flag wins.
"""

from __future__ import annotations

import argparse
import logging
import multiprocessing
import os
import signal
import sys
from collections.abc import Sequence
from dataclasses import fields, replace
from typing import Any

from ops.runtime import tune_gc
from ops.settings import Settings


def _settings(args: argparse.Namespace) -> Settings:
    return Settings.load(overrides={f.name: getattr(args, f.name, None) for f in fields(Settings)})


def _add_common(p: argparse.ArgumentParser) -> None:
    p.add_argument("--data-dir", help="where the embedded store and the secret live (./data)")
    p.add_argument("--secret", help="token signing secret (COSCRIBE_SECRET)")


def _serve_one(settings: Settings) -> None:
    from aiohttp import web

    from ops.wiring import build_app

    logging.basicConfig(
        level=settings.log_level.upper(), format="%(asctime)s %(process)d %(name)s %(message)s"
    )
    try:
        import uvloop
    except ImportError:  # uvloop is optional (not on every platform)
        uvloop = None
    if uvloop is not None:
        uvloop.install()
    app = build_app(settings)
    tune_gc()
    print(f"coscribe serving on http://{settings.host}:{settings.port}", flush=True)
    # A log line per request costs more than serving a cached read: access logs are debug.
    access_log = logging.getLogger("aiohttp.access") if settings.log_level == "debug" else None
    web.run_app(app, host=settings.host, port=settings.port, print=None, access_log=access_log,
                shutdown_timeout=10, reuse_port=settings.workers > 1, backlog=4096)


def _worker(settings: Settings) -> None:
    _serve_one(settings)


def _projections_worker(settings: Settings) -> None:
    """``coscribe projections run`` with the parent's settings (passed as COSCRIBE_*)."""
    for f in fields(settings):
        value = getattr(settings, f.name)
        if value is not None:
            os.environ[f"COSCRIBE_{f.name.upper()}"] = str(value)
    main(["projections", "run"])


def cmd_serve(args: argparse.Namespace) -> int:
    """Serve HTTP and WebSocket; ``--workers N`` runs N processes on one port."""
    settings = _settings(args)
    if settings.workers < 1:
        print(f"coscribe serve: --workers must be at least 1, not {settings.workers}",
              file=sys.stderr)
        return 2
    if settings.workers == 1:
        _serve_one(settings)
        return 0
    if not settings.redis_url:
        print("coscribe serve: --workers > 1 needs --redis-url (COSCRIBE_REDIS_URL): processes "
              "tell each other about committed ops through Redis", file=sys.stderr)
        return 2
    settings.secret_bytes()  # create the embedded secret once, before the workers race
    ctx = multiprocessing.get_context("spawn")
    # The gateways only serve; one process of its own follows the log for the read models
    # (a runner inside a gateway competes with its event loop for the GIL).
    procs = [
        ctx.Process(target=_worker, args=(replace(settings, projections="off"),),
                    name=f"coscribe-worker-{i}")
        for i in range(settings.workers)
    ]
    if settings.projections == "inline":
        procs.append(ctx.Process(target=_projections_worker, args=(settings,),
                                 name="coscribe-projections"))
    for p in procs:
        p.start()

    def stop_children(signum: int, frame: Any) -> None:
        for p in procs:
            if p.is_alive():
                p.terminate()  # SIGTERM: each worker drains and closes sessions with 1001

    signal.signal(signal.SIGTERM, stop_children)
    print(f"coscribe serving on http://{settings.host}:{settings.port} "
          f"with {settings.workers} workers", flush=True)
    try:
        for p in procs:
            p.join()
    except KeyboardInterrupt:
        pass
    finally:
        for p in procs:
            if p.is_alive():
                p.terminate()
        for p in procs:
            p.join(timeout=15)
    return 0


def cmd_token(args: argparse.Namespace) -> int:
    """Print a token for USER."""
    from gateway.auth import sign_token

    settings = _settings(args)
    print(sign_token(settings.secret_bytes(), args.user, ttl=args.ttl))
    return 0


def build_parser() -> argparse.ArgumentParser:
    """The argument parser of every subcommand."""
    parser = argparse.ArgumentParser(prog="coscribe", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)

    serve = sub.add_parser("serve", help="run the gateway")
    serve.add_argument("--host", help="address to bind (127.0.0.1)")
    serve.add_argument("--port", type=int, help="port to bind (8080)")
    serve.add_argument("--database-url", help="postgresql://... (default: SQLite in data dir)")
    serve.add_argument("--database-schema", help="Postgres schema for the tables (public)")
    serve.add_argument("--redis-url", help="redis://... for fan-out and presence across processes")
    serve.add_argument("--redis-prefix", help="prefix of Redis keys and channels (coscribe:)")
    serve.add_argument("--workers", type=int, help="processes sharing the port (1)")
    serve.add_argument("--log-level", help="debug, info, warning (info)")
    serve.add_argument("--projections", choices=["inline", "off"],
                       help="run the projection runner in this process (inline) or not (off)")
    serve.add_argument("--max-frame-bytes", type=int,
                       help="incoming WebSocket frame limit, too_large above (1048576)")
    serve.add_argument("--max-buffer-bytes", type=int,
                       help="per-session send buffer, closed with 4008 above (16777216)")
    _add_common(serve)
    serve.set_defaults(func=cmd_serve)

    token = sub.add_parser("token", help="print a signed token for a user")
    token.add_argument("user")
    token.add_argument("--ttl", type=float, default=None, help="seconds until it expires")
    _add_common(token)
    token.set_defaults(func=cmd_token)

    try:
        from ops.loadtest.command import register
    except ImportError:
        pass
    else:
        register(sub)
    from ops.projections_cli import register as register_projections

    register_projections(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``coscribe`` script."""
    args: Any = build_parser().parse_args(argv)
    os.environ.setdefault("PYTHONUNBUFFERED", "1")
    return int(args.func(args) or 0)


if __name__ == "__main__":
    sys.exit(main())
