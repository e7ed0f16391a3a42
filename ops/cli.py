"""The ``coscribe`` command: ``serve``, ``token``, ``loadtest`` (and more as they come).

Every setting has a flag and a ``COSCRIBE_*`` variable of the same name (``--database-url``,
``COSCRIBE_DATABASE_URL``); the flag wins. Flags that are not settings (``--ttl``,
``--page``, ``loadtest --url``, ...) have no variable.

Exit codes of ``serve`` and ``token``: 0 done; 1 a runtime failure (the port is in use, the
host does not resolve, the database does not answer, the data directory cannot be used, a
worker failed at start or kept dying); 2 bad arguments (a flag or variable out of range, an
empty user).
"""

from __future__ import annotations

import argparse
import asyncio
import errno
import logging
import multiprocessing
import os
import signal
import socket
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, fields, replace
from typing import Any, NoReturn

from ops.runtime import tune_gc
from ops.settings import DataDirUnusable, Settings, SettingsError

BIND_ERRORS = {
    errno.EADDRINUSE: "the port is in use",
    errno.EACCES: "the port needs privileges this process does not have",
    errno.EADDRNOTAVAIL: "the host is not an address of this machine",
}
"""Why binding the server's address failed (the other OSErrors of a start are not these)."""


STOP_GRACE = 30.0
"""Seconds ``serve --workers`` gives its processes to stop after SIGTERM (a gateway drains
for up to 10 s, then closes for up to 10 s) before it kills them."""
CRASH_LIMIT = 5
CRASH_WINDOW = 10.0
"""``serve --workers`` gives up on a process that ended less than ``CRASH_WINDOW`` seconds
after its start ``CRASH_LIMIT`` times in a row: it stops the others and exits 1, for the
service manager to restart the lot (a longer-lived process is started again at once)."""
PORT_CLAIM = "coscribe-serve-port-{port}"
"""Name, in Linux's abstract Unix socket namespace, of the claim each ``coscribe serve``
holds on its port for its whole life (the kernel frees it when the process ends)."""
DEFAULT_TTL_SECONDS = 86400.0
"""``token``'s tokens expire after a day unless ``--ttl`` says otherwise (they were valid for
ever: nothing revokes a token but a new secret)."""
MAX_TTL_SECONDS = 100 * 365 * 86400
"""Longest ``token --ttl``: a hundred years."""


def _settings(args: argparse.Namespace) -> Settings:
    return Settings.load(overrides={f.name: getattr(args, f.name, None) for f in fields(Settings)})


def _add_common(p: argparse.ArgumentParser) -> None:
    p.add_argument("--data-dir", help="where the embedded store and the secret live (./data)")
    p.add_argument("--secret", help="token signing secret (COSCRIBE_SECRET)")


def _fail(command: str, message: str, code: int = 1) -> int:
    """Print ``message`` as one line on stderr; ``code`` is the exit code to return."""
    print(f"coscribe {command}: {message}", file=sys.stderr, flush=True)
    return code


def _serve_one(settings: Settings, listening: Callable[[], None]) -> int:
    """Serve until stopped; ``listening()`` is called once the port is bound."""
    from aiohttp import web

    from ops.wiring import StoreUnreachable, build_app

    logging.basicConfig(
        level=settings.log_level.upper(), format="%(asctime)s %(process)d %(name)s %(message)s"
    )
    try:
        import uvloop
    except ImportError:  # uvloop is optional (not on every platform)
        uvloop = None
    if uvloop is not None:
        uvloop.install()
    try:
        app = build_app(settings)
    except (StoreUnreachable, DataDirUnusable) as exc:
        return _fail("serve", str(exc))
    tune_gc()
    app.on_startup.append(_stop_on_first_signal)
    # A log line per request costs more than serving a cached read: access logs are debug.
    access_log = logging.getLogger("aiohttp.access") if settings.log_level == "debug" else None
    try:
        # run_app calls ``print`` once every site is listening.
        web.run_app(app, host=settings.host, port=settings.port,
                    print=lambda _banner: listening(), access_log=access_log,
                    shutdown_timeout=10, reuse_port=settings.workers > 1, backlog=4096,
                    handle_signals=False)
    except socket.gaierror as exc:  # the host was resolved at start; a name may go away
        return _fail("serve", _unresolved(settings, exc))
    except OSError as exc:
        if exc.errno not in BIND_ERRORS:
            raise
        return _fail("serve", _cannot_listen(settings, exc))
    _ignore_stop_signals()
    return 0


def _cannot_listen(settings: Settings, exc: OSError) -> str:
    return f"cannot listen on {settings.host}:{settings.port}: {BIND_ERRORS[exc.errno]}"


def _port_taken(settings: Settings) -> OSError | None:
    """Why the port cannot be bound by a socket without ``SO_REUSEPORT``, or None.

    The workers of ``serve --workers`` bind with ``SO_REUSEPORT``: another program that
    listens there with it too (nginx's ``reuseport``, envoy) let them in, and the kernel
    split the connections between the two servers. Binding once without it first finds any
    listener. (The claim covers other ``coscribe serve``s only.)
    """
    for family, kind, proto, _, addr in socket.getaddrinfo(
        settings.host, settings.port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE
    ):
        with socket.socket(family, kind, proto) as probe:
            probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as the server does
            try:
                probe.bind(addr)
            except OSError as exc:
                if exc.errno in BIND_ERRORS:
                    return exc
                raise
    return None


def _unresolved(settings: Settings, exc: socket.gaierror) -> str:
    return (f"cannot listen on {settings.host}:{settings.port}: the host is not an address "
            f"and does not resolve to one ({exc.strerror})")


def _claim_port(port: int) -> socket.socket | None:
    """This machine's claim on ``port`` for ``coscribe serve`` (None: another process holds
    it); the caller keeps the socket open while it serves.

    The workers of ``serve --workers`` bind with ``SO_REUSEPORT``, so the kernel let a
    second group bind the same port and split the connections between two servers (with
    different secrets, one token got 401 or 200 at random). The claim is per port, not per
    address: ``0.0.0.0`` overlaps every address. It is an abstract Unix socket (Linux): no
    file to clean up, gone with the process, even after kill -9; not inherited by the
    workers. Elsewhere there is no claim.
    """
    claim = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    if not sys.platform.startswith("linux"):
        return claim
    try:
        claim.bind("\0" + PORT_CLAIM.format(port=port))
    except OSError as exc:
        claim.close()
        if exc.errno == errno.EADDRINUSE:
            return None
        raise
    return claim


def _ignore_stop_signals() -> None:
    """Once stopped: a late SIGTERM or SIGINT (the process group's, a second Ctrl-C) must
    not kill the process while it exits (the interpreter's exit resets Python's handlers)."""
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, signal.SIG_IGN)


async def _stop_on_first_signal(app: Any) -> None:
    """SIGTERM or SIGINT starts the graceful stop; later ones are ignored.

    aiohttp's own handlers raise ``GracefulExit`` (a ``SystemExit`` with code 1) for every
    signal, so a second one, which a worker of ``serve --workers`` gets when SIGTERM goes
    to the process group and its parent passes it on, broke off the drain and the process
    exited 1 (2 of 8 such stops). The parent kills a process that does not stop in time.
    """
    from aiohttp.web_runner import GracefulExit

    loop = asyncio.get_running_loop()
    stopping = False

    def stop() -> None:
        nonlocal stopping
        if stopping:  # the handler stays, so that a later signal does nothing
            return
        stopping = True
        raise GracefulExit()

    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop)


def _die_with_parent(parent: int) -> None:
    """Have the kernel send this process SIGTERM when ``parent`` ends (Linux), and exit now
    if it already has: a child of ``serve --workers`` whose parent was killed (kill -9,
    outside a service manager that would kill the group) went on serving, orphaned, on a
    port whose claim was gone, so that a new group shared the port with it."""
    if sys.platform.startswith("linux"):
        import ctypes

        pr_set_pdeathsig = 1
        ctypes.CDLL(None, use_errno=True).prctl(pr_set_pdeathsig, signal.SIGTERM, 0, 0, 0)
    if os.getppid() != parent:  # it ended before the prctl: no signal will come
        sys.exit(1)


def _worker(settings: Settings, ready: Any, parent: int) -> None:
    """A gateway process of ``serve --workers N``: tells ``ready`` (the write end of a pipe,
    if any) its pid once listening; stops (SIGTERM) when its parent ends."""
    _die_with_parent(parent)

    def listening() -> None:
        if ready is not None:
            ready.send(os.getpid())  # one write of a few bytes: whole, whoever else writes
            ready.close()

    sys.exit(_serve_one(settings, listening))


def _projections_worker(settings: Settings, parent: int) -> None:
    """``coscribe projections run`` with the parent's settings (passed as COSCRIBE_*); stops
    (SIGTERM) when its parent ends."""
    _die_with_parent(parent)
    for f in fields(settings):
        value = getattr(settings, f.name)
        if value is not None:
            os.environ[f"COSCRIBE_{f.name.upper()}"] = str(value)
    sys.exit(main(["projections", "run"]))


def cmd_serve(args: argparse.Namespace) -> int:
    """Serve HTTP and WebSocket; ``--workers N`` runs N processes on one port."""
    settings = _settings(args)
    if settings.workers > 1 and not settings.redis_url:
        print("coscribe serve: --workers > 1 needs --redis-url (COSCRIBE_REDIS_URL): processes "
              "tell each other about committed ops through Redis", file=sys.stderr)
        return 2
    try:
        socket.getaddrinfo(settings.host, settings.port, type=socket.SOCK_STREAM,
                           flags=socket.AI_PASSIVE)
    except socket.gaierror as exc:  # was a traceback from deep inside the event loop
        return _fail("serve", _unresolved(settings, exc))
    claim = _claim_port(settings.port)
    if claim is None:
        return _fail("serve", f"cannot listen on {settings.host}:{settings.port}: the port is "
                              "in use (by another coscribe serve on this machine)")
    with claim:
        url = f"http://{settings.host}:{settings.port}"
        try:
            settings.secret_bytes()  # made once, before any worker races for it
        except DataDirUnusable as exc:
            return _fail("serve", str(exc))
        if (weak := settings.secret_warning()) is not None:
            print(f"coscribe serve: warning: {weak}", file=sys.stderr)
        if settings.workers == 1:
            return _serve_one(settings, lambda: print(f"coscribe serving on {url}", flush=True))
        if (taken := _port_taken(settings)) is not None:
            return _fail("serve", _cannot_listen(settings, taken))
        return _serve_workers(settings, url)


@dataclass
class CrashLoop:
    """Whether to give up on a process that keeps ending soon after its start: it ended
    less than ``window`` seconds after its start ``limit`` times in a row. The caller
    gives the times (``time.monotonic()``)."""

    limit: int = CRASH_LIMIT
    window: float = CRASH_WINDOW
    started_at: float = 0.0
    quick: int = 0
    """Ends in a row that came within ``window`` of their start."""

    def started(self, now: float) -> None:
        """The process was started at ``now``."""
        self.started_at = now

    def ended(self, now: float) -> bool:
        """The process ended at ``now``: True if that is the ``limit``-th quick end in a row."""
        self.quick = self.quick + 1 if now - self.started_at < self.window else 0
        return self.quick >= self.limit


@dataclass
class _Child:
    """A process of ``serve --workers``, with what it takes to start it again."""

    ctx: Any
    name: str
    target: Callable[..., None]
    args: tuple[Any, ...]
    again: tuple[Any, ...]
    """The arguments of a restart (a restarted worker tells nobody that it listens)."""
    proc: Any = None
    crashes: CrashLoop = field(default_factory=CrashLoop)

    def start(self) -> None:
        """Start the process (the first time with ``args``, then with ``again``)."""
        # Known before it runs, so that a stop that comes meanwhile reaches it.
        ended, self.proc = self.proc, self.ctx.Process(
            target=self.target, args=self.args if self.proc is None else self.again,
            name=self.name)
        if ended is not None:
            ended.close()  # its sentinel and pipe: a long-lived parent may restart many
        # Started with SIGINT ignored (an exec keeps that): a Ctrl-C to the process group
        # while it imports was a KeyboardInterrupt traceback from each child; the parent
        # handles it and stops them. Each child sets its own handlers once it can stop well.
        previous = signal.signal(signal.SIGINT, signal.SIG_IGN)
        try:
            self.proc.start()
        finally:
            signal.signal(signal.SIGINT, previous)
        self.crashes.started(time.monotonic())


def _serve_workers(settings: Settings, url: str) -> int:
    """``serve --workers N``: N gateway processes, and the projections' one, supervised."""
    from ops.wiring import StoreUnreachable, open_store

    try:
        open_store(settings).close()  # one message, not one a worker, if it cannot be opened
    except (StoreUnreachable, DataDirUnusable) as exc:
        return _fail("serve", str(exc))
    ctx = multiprocessing.get_context("spawn")
    # A pipe, not a Queue: a Queue's semaphores outlive a parent killed with -9, and the
    # resource tracker then warned of "leaked semaphore objects" as it cleaned them up.
    ready, ready_w = ctx.Pipe(duplex=False)
    # The gateways only serve; one process of its own follows the log for the read models
    # (a runner inside a gateway competes with its event loop for the GIL).
    gateway = replace(settings, projections="off")
    parent = os.getpid()
    children = [_Child(ctx, f"coscribe-worker-{i}", _worker, (gateway, ready_w, parent),
                       (gateway, None, parent))
                for i in range(settings.workers)]
    if settings.projections == "inline":
        children.append(_Child(ctx, "coscribe-projections", _projections_worker,
                               (settings, parent), (settings, parent)))
    for child in children:
        child.start()
    stopping = False
    gave_up: str | None = None

    def stop_children(signum: int, frame: Any) -> None:
        nonlocal stopping
        stopping = True
        for child in children:
            if child.proc.is_alive():
                child.proc.terminate()  # SIGTERM: each worker drains, closes sessions with 1001

    signal.signal(signal.SIGTERM, stop_children)
    try:
        if _await_listening([c.proc for c in children], ready, settings.workers):
            print(f"coscribe serving on {url} with {settings.workers} workers", flush=True)
            gave_up = _supervise(children, lambda: stopping)
            if gave_up is not None:
                _fail("serve", gave_up)  # before the others stop, whose lines follow
    except KeyboardInterrupt:
        stopping = True
    finally:
        procs = [c.proc for c in children]
        for p in procs:
            if p.is_alive():
                p.terminate()
        _join(procs, lambda: True)
        _ignore_stop_signals()
    if gave_up is not None:
        return 1
    return _exit_code(procs, stopping)


def _supervise(children: Sequence[_Child], stopping: Callable[[], bool]) -> str | None:
    """Until ``stopping()``, start again every child that ends, with one line on stderr each
    time; return why it gave up if one kept ending soon after its start (the caller then
    stops the others).

    Nothing was restarted: with both gateways killed the parent stayed up for good (the
    runner was alive), so the service manager never restarted it; with the runner killed
    the read models froze, without a word, and every read waited for them.
    """
    from multiprocessing.connection import wait

    while True:
        wait([c.proc.sentinel for c in children], timeout=1.0)
        if stopping():
            return None
        for child in children:
            if (code := child.proc.exitcode) is None:
                continue
            how = _how_it_ended(code)
            if child.crashes.ended(time.monotonic()):
                return (f"{child.name} {how}, and ended within {child.crashes.window:g} s of "
                        f"its start {child.crashes.limit} times in a row; giving up")
            print(f"coscribe serve: {child.name} (pid {child.proc.pid}) {how}; restarted",
                  file=sys.stderr, flush=True)
            child.start()


def _how_it_ended(code: int) -> str:
    """A process's exit code (negative: the signal that killed it) in words."""
    if code >= 0:
        return f"exited with code {code}"
    try:
        return f"was killed by {signal.Signals(-code).name}"
    except ValueError:  # a real-time signal has no name
        return f"was killed by signal {-code}"


def _join(procs: Sequence[Any], stopping: Callable[[], bool]) -> None:
    """Wait for every process to end; once ``stopping()``, one still running after
    ``STOP_GRACE`` seconds is killed (a parent must not wait for good on a stuck child:
    the service manager would kill the lot, uncounted)."""
    from multiprocessing.connection import wait

    deadline: float | None = None
    while alive := [p for p in procs if p.is_alive()]:
        if deadline is None and stopping():
            deadline = time.monotonic() + STOP_GRACE
        if deadline is not None and time.monotonic() > deadline:
            for p in alive:
                print(f"coscribe serve: {p.name} did not stop within {STOP_GRACE:g} s; killed",
                      file=sys.stderr, flush=True)
                p.kill()
                p.join()
            return
        wait([p.sentinel for p in alive], timeout=0.5)


def _await_listening(procs: Sequence[Any], ready: Any, workers: int) -> bool:
    """Wait until ``workers`` gateway processes listen; False as soon as a process has
    failed first (the caller stops the others)."""
    listening = 0
    while listening < workers:
        if ready.poll(0.1):
            ready.recv()
            listening += 1
        elif any(p.exitcode not in (None, 0) for p in procs) or all(
                p.exitcode is not None for p in procs):
            return False
    return True


def _exit_code(procs: Sequence[Any], stopping: bool) -> int:
    """The first failed process's exit code (1 if a signal killed it, or if every process
    ended before being stopped); 0 when all ended well or were stopped by this parent."""
    for p in procs:
        code = p.exitcode
        if code is None or code == 0 or (stopping and code == -signal.SIGTERM):
            continue
        return code if code > 0 else 1
    return 0 if stopping else 1


def cmd_token(args: argparse.Namespace) -> int:
    """Print a token for USER."""
    from gateway.auth import sign_token

    settings = _settings(args)
    if not 1 <= args.ttl <= MAX_TTL_SECONDS:  # NaN fails too
        return _fail("token", f"--ttl must be in 1..{MAX_TTL_SECONDS:,} seconds, "
                              f"not {args.ttl:g}", 2)
    try:
        secret = settings.secret_bytes()
    except DataDirUnusable as exc:
        return _fail("token", str(exc))
    try:
        token = sign_token(secret, args.user, ttl=args.ttl)
    except ValueError as exc:  # the user name (sign_token checks it)
        return _fail("token", f"{exc} (the user was {args.user!r})", 2)
    print(token)
    return 0


class Parser(argparse.ArgumentParser):
    """argparse whose usage error is one line, not ten lines of usage text before it (the
    usage itself comes first only when it is one line: ``coscribe``'s list of commands)."""

    def error(self, message: str) -> NoReturn:
        usage = self.format_usage()
        head = usage if usage.count("\n") == 1 else ""
        self.exit(2, f"{head}{self.prog}: error: {message} (see {self.prog} --help)\n")


def build_parser() -> argparse.ArgumentParser:
    """The argument parser of every subcommand."""
    parser = Parser(prog="coscribe", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)

    serve = sub.add_parser("serve", help="run the gateway")
    serve.add_argument("--host", help="address to bind (127.0.0.1)")
    serve.add_argument("--port", type=int, help="port to bind (8080)")
    serve.add_argument("--database-url", help="postgresql://... (default: SQLite in data dir)")
    serve.add_argument("--database-schema", help="Postgres schema for the tables (public)")
    serve.add_argument("--redis-url", help="redis://... for fan-out and presence across processes")
    serve.add_argument("--redis-prefix", help="prefix of Redis keys and channels (coscribe:)")
    serve.add_argument("--workers", type=int, help="processes sharing the port (1)")
    serve.add_argument("--log-level", help="debug, info, warning, error (info)")
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
    token.add_argument("--ttl", type=float, default=DEFAULT_TTL_SECONDS,
                       help=f"seconds until it expires ({DEFAULT_TTL_SECONDS:g}: a day)")
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
    try:
        return dispatch(args)
    except KeyboardInterrupt:  # Ctrl-C before a command's own handling is up (start-up)
        print(f"coscribe {args.command}: interrupted", file=sys.stderr)
        return 130


def dispatch(args: Any) -> int:
    """Run the subcommand of parsed ``args``; a bad setting exits 2 with a one-line message,
    as a bad flag does in argparse."""
    try:
        return int(args.func(args) or 0)
    except SettingsError as exc:
        return _fail(args.command, str(exc), 2)


if __name__ == "__main__":
    sys.exit(main())
