"""``coscribe replay``, ``coscribe projections run``, ``coscribe audit verify|show``.

``register(subparsers)`` adds them to the ``coscribe`` parser; ``python -m ops.projections_cli``
runs them on their own. Each reads the same settings as ``serve`` (``COSCRIBE_*``) and takes
the flags ``--data-dir``, ``--database-url``, ``--database-schema``; ``projections run`` takes
``--redis-url``, ``--redis-prefix`` and ``--log-level`` too. None of them makes an event
store: where there is none they say so (``coscribe serve`` makes it) instead of making an
empty one, which ``projections run`` would have followed for good.

Exit codes: 0 done; 1 ``audit verify`` found a broken chain (``audit show``: the document's
is broken); 2 bad arguments (an unknown read model, a malformed or unknown document id, a
version the document does not have, a setting or a flag out of range, no event store where
the settings point); 3 ``replay`` while another replay runs; 4 the database is unreachable
(or the data directory cannot be opened; or, on SQLite, another process held the write lock
past the busy timeout), or the read-model database failed.
"""

from __future__ import annotations

import argparse
import functools
import logging
import signal
import sys
import time
import unicodedata
from collections.abc import Callable, Sequence
from typing import Any, NoReturn
from uuid import UUID

from ops.runtime import tune_gc
from ops.settings import Settings, check_range
from schema.messages import doc_id

UNREACHABLE = 4
"""Exit code: the event store's database does not answer (distinct from 1, a broken chain)."""

MAX_PAGE = 100_000
"""Most events of one ``--page``: a page is held in memory and applied in one transaction."""
MAX_WAIT = 3600
"""Longest ``--poll`` or ``--batch``, in seconds (``inf`` waited for good after one step)."""
FLAG_RANGES: dict[str, tuple[float, float, str]] = {
    "page": (1, MAX_PAGE, ""),
    "poll": (0.001, MAX_WAIT, " seconds"),
    "batch": (0, MAX_WAIT, " seconds"),
}
"""Inclusive bounds (and unit) of the numeric flags that are not settings. A page of 0 or
less reads nothing (``replay --page 0`` never ended, ``projections run --page 0`` never
applied an event); a poll of 0 or less (or NaN) asks the database in a busy loop."""


def _settings(args: argparse.Namespace) -> Settings:
    names = ("data_dir", "database_url", "database_schema", "redis_url", "redis_prefix",
             "log_level")
    return Settings.load(overrides={n: getattr(args, n, None) for n in names})


def _check_flags(args: argparse.Namespace) -> None:
    """Raise ``SettingsError`` (exit 2, one line) for a flag of ``args`` out of its range."""
    for name, (low, high, unit) in FLAG_RANGES.items():
        value = getattr(args, name, None)
        if value is not None:
            check_range(f"--{name}", value, low, high, unit)


def _add_store_flags(p: argparse.ArgumentParser) -> None:
    p.add_argument("--data-dir", help="where the embedded store lives (./data)")
    p.add_argument("--database-url", help="postgresql://... (default: SQLite in data dir)")
    p.add_argument("--database-schema", help="Postgres schema of the tables (public)")


def _store_errors(cmd: Callable[[argparse.Namespace], int]) -> Callable[[argparse.Namespace], int]:
    """``cmd`` with the store's failures as exit codes: no store 2 (the message says where
    it looked, and who makes it), unreachable 4; the read-model database failing is 4 too."""

    @functools.wraps(cmd)
    def run(args: argparse.Namespace) -> int:
        from eventsourcing.persistence import InterfaceError, OperationalError

        from gateway.store import SQLITE_LOCK_SECONDS, StoreUnavailable
        from ops.wiring import NoStore, StoreUnreachable
        from projections.db import ReadDBError

        try:
            return cmd(args)
        except NoStore as exc:
            _usage(f"{exc}: the gateway (coscribe serve) creates it; start one first, or "
                   f"check --data-dir, --database-url and --database-schema")
        except ReadDBError as exc:  # the read models' database (its Busy is the command's)
            print(f"coscribe: read-model database failed: {_reason(exc)}", file=sys.stderr)
            return UNREACHABLE
        except (StoreUnreachable, StoreUnavailable, OperationalError, InterfaceError) as exc:
            # The library's errors: the database went away after the store was opened.
            reason = _reason(exc)
            if "database is locked" in reason:  # SQLite: a writer outlasted the busy timeout
                print(f"coscribe: database locked: {reason} (another process held its write "
                      f"lock for more than {SQLITE_LOCK_SECONDS} s)", file=sys.stderr)
            else:
                print(f"coscribe: database unreachable: {reason}", file=sys.stderr)
            return UNREACHABLE

    return run


def _reason(exc: Exception) -> str:
    """The first line of ``exc``'s message (its class name when it has none)."""
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__


def _open(args: argparse.Namespace) -> tuple[Any, Any, Any]:
    """The store (only if it is there already, else ``NoStore``), its log as an event
    source, and the read-model database."""
    from gateway.readmodels import StoreSource, read_db_config
    from ops.wiring import open_store
    from projections.db import open_db

    store = open_store(_settings(args), existing=True)
    return store, StoreSource(store), open_db(read_db_config(store.cfg))


def _models(name: str | None) -> list[Any]:
    from projections.registry import MODELS, by_name

    if name is None:
        return list(MODELS)
    try:
        return [by_name(name)]
    except KeyError as exc:
        _usage(str(exc.args[0]))


# -- replay -------------------------------------------------------------------------------


class Terminated(Exception):
    """SIGTERM or Ctrl-C during a replay, raised between two pages (``progress``): the
    rebuild then drops its fresh tables and tracking rows on its way out. Raised from the
    signal handler instead, it could land inside the database driver (a pipeline left
    busy: exit 4 and the tables left) or in the swap (some read models swapped, the rest
    left behind)."""

    def __init__(self, signum: int) -> None:
        super().__init__(signum)
        self.signum = signum


class _Stop:
    """The signal that asked the replay to stop, if any (set by the handler)."""

    signum: int | None = None

    def handle(self, signum: int, frame: Any) -> None:
        self.signum = signum

    def check(self) -> None:
        if self.signum is not None:
            raise Terminated(self.signum)


@_store_errors
def cmd_replay(args: argparse.Namespace) -> int:
    """Rebuild read models from the first event into fresh tables, then swap them in."""
    from projections.db import Busy
    from projections.replay import LOCK

    _check_flags(args)
    models = _models(args.projection)
    store, source, db = _open(args)
    tune_gc()
    stop = _Stop()
    previous = {sig: signal.signal(sig, stop.handle) for sig in (signal.SIGTERM, signal.SIGINT)}
    try:
        with db.exclusive(LOCK):
            stop.check()
            _replay(args, models, source, db, stop.check)
    except Busy:
        print("coscribe replay: another replay is running on this read-model database (one "
              "at a time, whichever read models each rebuilds); run this one when it has "
              "finished", file=sys.stderr)
        return 3
    except Terminated as exc:
        how = "terminated" if exc.signum == signal.SIGTERM else "interrupted"
        print(f"coscribe replay: {how}; its unfinished rebuild was dropped (the live read "
              "models are untouched)", file=sys.stderr)
        return 128 + exc.signum
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
        db.close()
        store.close()
    return 0


def _replay(args: argparse.Namespace, models: Sequence[Any], source: Any, db: Any,
            check: Callable[[], None]) -> None:
    """The rebuild with its progress bar; ``check`` runs between pages (it raises to stop:
    a signal asked for it). Once the swap has begun it runs to its end."""
    from rich.progress import (
        BarColumn,
        MofNCompleteColumn,
        Progress,
        TextColumn,
        TimeElapsedColumn,
        TimeRemainingColumn,
    )

    from projections.replay import rebuild_all

    columns = (
        TextColumn("{task.description:<10}"),
        BarColumn(),
        MofNCompleteColumn(),
        TextColumn("{task.fields[rate]:>9} ev/s"),
        TimeElapsedColumn(),
        TextColumn("ETA"),
        TimeRemainingColumn(),
    )
    with Progress(*columns, transient=False, disable=args.quiet) as bar:
        label = models[0].name if len(models) == 1 else "all"
        task = bar.add_task(label, total=max(source.head(), 1), rate="-")

        def progress(position: int, head: int) -> None:
            check()
            speed = bar.tasks[task].speed or 0.0
            bar.update(task, completed=position, total=max(head, 1), rate=f"{speed:,.0f}")

        results = rebuild_all(db, source, models, page_size=args.page, progress=progress)
        done = max(r.position for r in results)
        bar.update(task, completed=done, total=max(done, 1), rate=f"{results[0].rate:,.0f}")
    for r in results:
        print(f"{r.name}: swapped in at position {r.position}")
    r = results[0]
    print(f"replayed {r.events} events into {len(results)} read models in "
          f"{r.seconds:.2f}s ({r.rate:,.0f} events/s)", flush=True)


# -- projections run ----------------------------------------------------------------------


def _redis_bump(redis_url: str | None, prefix: str, log_id: str) -> Any:
    """The runner hooks that raise the cache's tag generations in Redis (other processes'
    caches; ``projections.cache.RedisRaiser``), or None without Redis."""
    if not redis_url:
        return None
    from projections.cache import RedisRaiser, redis_keys

    return RedisRaiser(redis_url, redis_keys(prefix, log_id))


class Stop:
    """A stop request from a signal handler, waited for by the main thread.

    Not a ``threading.Event``: its ``set`` takes the lock that the same thread holds while
    in ``wait``, so a signal arriving then deadlocked the process (seen: a runner that
    never stopped, its ``serve --workers`` parent waiting on it for good). A handler may
    set a flag; ``wait`` sleeps in short steps and looks at it.
    """

    STEP = 0.05
    """Longest a wait goes on after the request (seconds)."""

    def __init__(self) -> None:
        self.requested = False

    def handle(self, signum: int, frame: Any) -> None:
        """The signal handler."""
        self.requested = True

    def is_set(self) -> bool:
        """Whether a stop was requested."""
        return self.requested

    def wait(self, seconds: float) -> None:
        """Sleep ``seconds``, or less once a stop is requested."""
        deadline = time.monotonic() + seconds
        while not self.requested and (left := deadline - time.monotonic()) > 0:
            time.sleep(min(left, self.STEP))


@_store_errors
def cmd_projections_run(args: argparse.Namespace) -> int:
    """Follow the log and keep the read models up to date until SIGTERM or Ctrl-C."""
    from projections.generations import Health
    from projections.runner import Runner

    _check_flags(args)
    settings = _settings(args)
    logging.basicConfig(level=settings.log_level.upper(),
                        format="%(asctime)s %(process)d %(name)s %(message)s")
    log = logging.getLogger("coscribe.projections")
    models = _models(args.projection)
    # Not made here: an empty store where a mistyped --data-dir or --database-schema points
    # would be followed for good. ``serve --workers N`` makes it before starting this.
    store, source, db = _open(args)
    if not settings.redis_url:
        log.warning("no Redis URL (--redis-url, COSCRIBE_REDIS_URL): gateways that cache "
                    "through Redis without running projections will serve stale analytics")
    stop = Stop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, stop.handle)
    bump = _redis_bump(settings.redis_url, settings.redis_prefix, store.log_id())
    try:
        runner = Runner(db, source, models, page_size=args.page,
                        observe=bump and bump.observe, confirm=bump and bump.confirm)
        runner.setup()
        tune_gc()
        log.info("following the log from %s for %s", runner.seen(),
                 ", ".join(m.name for m in models))
        print(f"projections running from position {runner.seen()}", flush=True)
        health = Health("projections", "the read models wait; retried every 1 s",
                        dependency="a step", traceback=True)
        while not stop.is_set():
            try:
                n = runner.step()
                if n == 0:
                    stop.wait(args.poll)
                elif n < runner.page_size and args.batch > 0:
                    # Let more commits arrive: a step costs the same for 5 events or 100
                    # (one read, one transaction), so a busy log is taken in by few steps.
                    stop.wait(args.batch)
            except Exception as exc:  # keep following: the database may come back
                health.failed(exc)
                stop.wait(1.0)
                continue
            health.ok()
        log.info("stopped at %s", runner.seen())
    finally:
        if bump is not None:
            bump.close()
        db.close()
        store.close()
    return 0


# -- audit --------------------------------------------------------------------------------


def _stored_events(store: Any, doc: UUID | None) -> Any:
    """``(event, payload as stored)`` for every stored event (of ``doc``, or all), in log
    order, decoded one by one: a row that does not decode is an ``Undecodable`` (payload
    None) instead of an error."""
    from eventsourcing.persistence import StoredEvent

    from projections.history import Undecodable, stored_payload

    recorder, mapper = store.app.recorder, store.app.mapper

    def decode(stored: Any) -> tuple[Any, Any]:
        try:
            event = mapper.to_domain_event(stored)
            # The store's mapper has neither cipher nor compressor (gateway.store).
            return event, stored_payload(mapper.transcoder.decode(bytes(stored.state)))
        except Exception as exc:  # a tampered row: report it instead of stopping
            error = f"{type(exc).__name__} ({stored.topic})"
            return Undecodable(stored.originator_id, stored.originator_version, error), None

    if doc is not None:
        for _, oid, version, topic, state in recorder.select_document(doc):
            yield decode(StoredEvent(oid, version, topic, state))
        return
    after = 0
    while True:
        page = recorder.select_notifications(after, 1000, inclusive_of_start=False)
        if not page:
            return
        for n in page:
            yield decode(n)
        after = page[-1].id


@_store_errors
def cmd_audit_verify(args: argparse.Namespace) -> int:
    """Recompute hash chains; print the first broken link of each document."""
    from ops.wiring import open_store
    from projections.history import ChainCheck

    doc = _uuid(args.doc) if args.doc else None

    store = open_store(_settings(args), existing=True)
    try:
        check = ChainCheck()
        for e, payload in _stored_events(store, doc):
            check.feed(e, payload)
    finally:
        store.close()
    if doc is not None and check.documents == 0:
        _usage(f"no events for document {doc}")
    broken = check.finish()
    for bad in sorted(broken.values(), key=lambda b: b.doc):
        print(f"BROKEN {bad.doc} at event {bad.position}: {bad.reason}")
    status = "broken" if broken else "ok"
    print(f"{status}: {check.documents} documents, {check.checked} events verified, "
          f"{len(broken)} broken")
    return 1 if broken else 0


@_store_errors
def cmd_audit_show(args: argparse.Namespace) -> int:
    """Print a document's history (from the events) and its text at ``--at`` (or now).

    The document's chain is checked first: a broken one (exit 1, one line) shows nothing,
    since a text rebuilt across a removed or changed event is one that never existed.
    """
    from rich.console import Console
    from rich.table import Table
    from rich.text import Text

    from domain.document import Document
    from ops.wiring import open_store
    from projections.audit import action_of, summary_of
    from projections.history import ChainCheck, state_at
    from projections.sql import iso

    doc = _uuid(args.doc)
    store = open_store(_settings(args), existing=True)
    try:
        stored = list(_stored_events(store, doc))
    finally:
        store.close()
    if not stored:
        _usage(f"no such document {doc}")
    check = ChainCheck()
    for e, payload in stored:
        check.feed(e, payload)
    bad = check.finish().get(str(doc))
    if bad is not None:
        print(f"coscribe: BROKEN {doc} at event {bad.position}: {bad.reason}; not shown",
              file=sys.stderr)
        return 1
    events = [e for e, _ in stored]
    current = sum(isinstance(e, Document.Edited) for e in events)
    if args.at is not None and not 0 <= args.at <= current:
        _usage(f"--at {args.at}: document {doc} has versions 0..{current}")
    state = state_at(events, args.at)
    assert state is not None
    # Cells are Text, never markup: titles and names are the users' ("[/x]" raised an error).
    table = Table(title=f"history of {doc}")
    for col in ("#", "at", "actor", "action", "v", "summary"):
        table.add_column(col)
    version, title = 0, ""
    for e in events:
        version = getattr(e, "v", version)
        actor = getattr(e, "by", None) or getattr(e, "owner", "")
        summary = summary_of(e)
        if isinstance(e, Document.Renamed):
            summary = {"from": title, "to": e.title}  # as the audit read model has it
        if isinstance(e, Document.Created | Document.Renamed):
            title = e.title
        cells = (str(e.originator_version), iso(e.timestamp), actor, action_of(e), str(version),
                 ", ".join(f"{k}={v}" for k, v in summary.items()))
        table.add_row(*(Text(_visible(c, keep="")) for c in cells))
    console = Console()
    console.print(table)
    header = Text(f"{_visible(state.title, keep='')} at version {state.version}:", style="bold")
    console.print(header, soft_wrap=True)
    _write_text(state.text)
    return 0


def _visible(text: str, keep: str = "\n\t") -> str:
    """``text`` with its control characters (but those in ``keep``) as Python escapes
    (``\\x1b``, ``\\r``): what a terminal shows without obeying it."""
    if text.isprintable():
        return text
    return "".join(
        c.encode("unicode_escape").decode("ascii")
        if unicodedata.category(c) == "Cc" and c not in keep else c
        for c in text
    )


def _write_text(text: str) -> None:
    """Print a document's text after the header: on a terminal in ``_visible`` form (it must
    not drive the terminal) and ending with a newline; else its exact UTF-8 bytes and
    nothing more (no wrapping, no markup, no emoji codes, tabs kept)."""
    out = sys.stdout
    if out.isatty():
        shown = _visible(text)
        out.write(shown if shown.endswith("\n") else shown + "\n")
        out.flush()
        return
    out.flush()
    out.buffer.write(text.encode())
    out.buffer.flush()


def _uuid(raw: str) -> UUID:
    try:
        return doc_id(raw)
    except ValueError:
        _usage(f"{raw!r} is not a document id")


def _usage(message: str) -> NoReturn:
    """Stop with ``message`` and exit code 2 (bad arguments), like argparse's errors."""
    print(f"coscribe: {message}", file=sys.stderr)
    raise SystemExit(2)


# -- the parser ---------------------------------------------------------------------------


def register(subparsers: Any) -> None:
    """Add ``replay``, ``projections run`` and ``audit verify|show`` to ``coscribe``."""
    replay = subparsers.add_parser("replay", help="rebuild read models from the first event")
    replay.add_argument("--projection", help="only this read model (default: all)")
    replay.add_argument("--page", type=int, default=2000,
                        help=f"events per transaction (1..{MAX_PAGE:,})")
    replay.add_argument("--quiet", action="store_true", help="no progress bar")
    _add_store_flags(replay)
    replay.set_defaults(func=cmd_replay)

    proj = subparsers.add_parser("projections", help="run the projections in this process")
    proj_sub = proj.add_subparsers(dest="projections_command", required=True)
    run = proj_sub.add_parser("run", help="follow the log until stopped")
    run.add_argument("--projection", help="only this read model (default: all)")
    run.add_argument("--page", type=int, default=500,
                     help=f"events per transaction (1..{MAX_PAGE:,})")
    run.add_argument("--poll", type=float, default=0.1,
                     help=f"seconds between polls when idle (0.001..{MAX_WAIT})")
    run.add_argument("--batch", type=float, default=0.05,
                     help="seconds to wait after a step that found less than a page "
                          f"(0: none; at most {MAX_WAIT})")
    run.add_argument("--redis-url",
                     help="the gateways' redis://...: invalidates their caches (needed when "
                          "they run without projections; without it they serve stale answers)")
    run.add_argument("--redis-prefix", help="the gateways' prefix of Redis keys (coscribe:)")
    run.add_argument("--log-level", help="debug, info, warning, error (info)")
    _add_store_flags(run)
    run.set_defaults(func=cmd_projections_run)

    audit = subparsers.add_parser("audit", help="check and show documents' audit trails")
    audit_sub = audit.add_subparsers(dest="audit_command", required=True)
    verify = audit_sub.add_parser("verify", help="recompute hash chains (all documents or DOC)")
    verify.add_argument("doc", nargs="?", help="a document id (default: every document)")
    _add_store_flags(verify)
    verify.set_defaults(func=cmd_audit_verify)
    show = audit_sub.add_parser("show", help="print a document's history and text")
    show.add_argument("doc", help="a document id")
    show.add_argument("--at", type=int, help="the version whose text to print (default: now)")
    _add_store_flags(show)
    show.set_defaults(func=cmd_audit_show)


def main(argv: Sequence[str] | None = None) -> int:
    """Run one of these subcommands without the rest of ``coscribe``."""
    from ops.cli import Parser

    parser = Parser(prog="coscribe")
    register(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(argv)
    from ops.cli import dispatch

    return dispatch(args)


if __name__ == "__main__":
    sys.exit(main())
