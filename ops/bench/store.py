"""Benchmark of durable appends: ``python -m ops.bench.store [--quick] [--json OUT]``.

Every case writes to the real PostgreSQL server (``--database-url``; ``synchronous_commit``
as the server has it, ``on`` here) in a fresh schema that is dropped afterwards:

- **library as-is**: a plain ``eventsourcing.application.Application`` with the library's
  default Postgres recorder (composite-type array insert) and JSON transcoder, saving the
  events of a tiny aggregate (``Counter.Incremented``, one int), one per transaction and, for
  comparison, in batches;
- **Store.save**: our store (``gateway.store.Store``: msgpack transcoder, base-type array
  insert) saving real ``Document.Edited`` events (a few documents, ``edit([pos,
  "xxxxxxxx"], "bench")`` round-robin) in batches of 1, 10, 100, 1000 events per
  transaction (the committer's group commit), from one writer thread as the gateway has, and
  from two threads on their own documents; ``+ client_ops`` also records the
  ``(doc, client, seq)`` row that a WebSocket submission adds;
- **raw COPY**: psycopg binary ``COPY`` of equivalent rows (uuid, bigint, text topic, bytea
  state of the real mapper's size, the same key pattern) into a bare table with the same
  columns and primary key, one committed transaction per batch: the physical limit of a
  durable append here. ``COPY (events layout)`` adds the ``notification_id`` bigserial and
  its unique index of the real table;
- **SQLite store**: ``Store`` on the embedded SQLite adapter (WAL, the library's defaults),
  batches of 1 and 100.

Events are generated before each timed round (never inside it), so a rate is what the store
sustains once the events exist. Cases run batch size by batch size (compared cases back to
back); ``--repeat N`` runs them all N times and reports the median (other processes on the
machine move these figures; the JSON keeps every repetition). ``recorder µs/ev`` is the time inside
``recorder.insert_events`` (driver, round trips, server, commit); ``other µs/ev`` is the rest
of ``Store.save`` (mapper and transcoder, application bookkeeping). A second table gives the
CPU cost per event of the domain, the mapper and the transcoders without any database.
"""

from __future__ import annotations

import argparse
import random
import sys
import tempfile
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from uuid import UUID

from eventsourcing.application import Application
from eventsourcing.persistence import Mapper

from domain.document import Document
from gateway.store import Store, StoreConfig, library_env
from ops.bench.harness import (
    DEFAULT_DATABASE_URL,
    database_reachable,
    float_in,
    fresh_schema,
    load_note,
    machine_facts,
    make_console,
    num,
    output_file,
    print_table,
    server_facts,
    time_calls,
    write_json,
)
from ops.bench.writers import (
    DOCS_PER_WRITER,
    CommitWorker,
    CopyWorker,
    Counter,
    EditStream,
    LibraryWorker,
    Measured,
    StoreWorker,
    Timer,
    measure,
    time_recorders,
)
from schema.transcoder import MsgpackTranscoder

BATCHES = (1, 10, 100, 1000)
"""Events per transaction."""
THREADS = (1, 2)
"""Writer threads (each with its own connection and its own documents)."""


@dataclass
class Case:
    """One row of the result table."""

    method: str
    batch: int
    threads: int
    measured: Measured
    recorder_seconds: float | None = None
    raw_rate: float | None = None
    all_rates: list[float] = field(default_factory=list)

    @property
    def rate(self) -> float:
        """Events per second."""
        return self.measured.events / self.measured.seconds

    def row(self) -> dict[str, Any]:
        """The JSON form."""
        m = self.measured
        us = m.seconds * self.threads / m.events * 1e6
        rec = None if self.recorder_seconds is None else self.recorder_seconds / m.events * 1e6
        return {
            "method": self.method, "batch": self.batch, "threads": self.threads,
            "events": m.events, "transactions": m.transactions, "seconds": round(m.seconds, 3),
            "events_s": round(self.rate, 1), "transactions_s": round(m.transactions / m.seconds, 1),
            "us_per_event_per_thread": round(us, 2),
            "recorder_us_per_event": None if rec is None else round(rec, 2),
            "other_us_per_event": None if rec is None else round(us - rec, 2),
            "ratio_to_raw_copy": None if not self.raw_rate else round(self.rate / self.raw_rate, 3),
            "events_s_all_repeats": self.all_rates,
        }


# -- cases -----------------------------------------------------------------------------------


def _pg_config(url: str, schema: str, tmp: Path, threads: int) -> StoreConfig:
    return StoreConfig(data_dir=tmp, database_url=url, database_schema=schema,
                       pool_size=max(4, threads + 1))


def run_library(url: str, batch: int, seconds: float, created: list[str]) -> Case:
    """The plain library application, as shipped, one writer thread."""
    with tempfile.TemporaryDirectory() as tmp, fresh_schema(url, created) as schema:
        ours = library_env(_pg_config(url, schema, Path(tmp), 1))
        keep = ("PERSISTENCE_MODULE", "POSTGRES_DBNAME", "POSTGRES_HOST", "POSTGRES_PORT",
                "POSTGRES_USER", "POSTGRES_PASSWORD", "POSTGRES_SCHEMA")
        app: Application[UUID] = Application(env={k: ours[k] for k in keep if k in ours})
        try:
            timer = Timer(app.recorder.insert_events)
            app.recorder.insert_events = timer  # type: ignore[method-assign]
            worker = LibraryWorker(app, batch)
            timer.seconds = 0.0
            measured = measure([worker], seconds)
            return Case("library as-is (JSON, composite insert)", batch, 1, measured,
                        timer.seconds)
        finally:
            app.close()


def run_store(
    url: str | None, batch: int, threads: int, seconds: float, created: list[str],
    seed: int, client_ops: bool = False, direct: bool = False,
) -> Case:
    """``Store.save`` on Postgres (``url``) or SQLite (``url`` None)."""
    with tempfile.TemporaryDirectory() as tmp:
        if url is None:
            return _store_case(StoreConfig(data_dir=Path(tmp)), "SQLite Store.save", batch,
                               threads, seconds, seed, client_ops, direct)
        with fresh_schema(url, created) as schema:
            name = "Store.save + client_ops" if client_ops else "Store.save"
            if direct:
                name = "app.events.put (no per-event Protocol check)"
            return _store_case(_pg_config(url, schema, Path(tmp), threads), name, batch,
                               threads, seconds, seed, client_ops, direct)


def _store_case(
    cfg: StoreConfig, name: str, batch: int, threads: int, seconds: float, seed: int,
    client_ops: bool, direct: bool,
) -> Case:
    store = Store(cfg)
    try:
        timed = time_recorders(store)
        workers = [
            StoreWorker(store, EditStream(random.Random(seed + i), client_ops=client_ops), batch)
            for i in range(threads)
        ]
        for w in workers:  # warm up (connections, prepared statements), untimed
            w.execute(w.prepare(1))
        writer = max(timed.values(), key=lambda at: at[1].calls)[0]
        for w in workers:
            w.direct = writer if direct else None
        for _, timer in timed.values():
            timer.reset()
        measured = measure(workers, seconds)
        return Case(name, batch, threads, measured, sum(t.seconds for _, t in timed.values()))
    finally:
        store.close()


def run_commit(
    url: str, batch: int, threads: int, seconds: float, created: list[str], seed: int
) -> Case:
    """The server's checked commit (``AsyncWriter.save_checked``) with client-op rows."""
    with tempfile.TemporaryDirectory() as tmp, fresh_schema(url, created) as schema:
        store = Store(_pg_config(url, schema, Path(tmp), threads))
        workers = [CommitWorker(store, EditStream(random.Random(seed + i), client_ops=True),
                                batch) for i in range(threads)]
        try:
            for w in workers:  # warm up (connection, prepared statement), untimed
                w.execute(w.prepare(1))
            measured = measure(workers, seconds)
        finally:
            for w in workers:
                w.close()
            store.close()
    return Case("server commit (coscribe_append) + client_ops", batch, threads, measured,
                None)


def run_copy(
    url: str, batch: int, threads: int, seconds: float, created: list[str], states: list[bytes],
    events_layout: bool = False,
) -> Case:
    """Raw COPY into a bare table (or one laid out like ``coscribe_events``)."""
    import psycopg
    from psycopg import sql

    with fresh_schema(url, created) as schema:
        table = sql.Identifier(schema, "raw_events")
        extra = sql.SQL(", notification_id bigserial" if events_layout else "")
        with psycopg.connect(url, autocommit=True) as conn:
            conn.execute(sql.SQL(
                "CREATE TABLE {} (originator_id uuid NOT NULL, originator_version bigint NOT NULL,"
                " topic text, state bytea{}, PRIMARY KEY (originator_id, originator_version))"
            ).format(table, extra))
            if events_layout:
                conn.execute(sql.SQL("CREATE UNIQUE INDEX ON {} (notification_id)").format(table))
        copy_sql = sql.SQL(
            "COPY {} (originator_id, originator_version, topic, state) FROM STDIN (FORMAT BINARY)"
        ).format(table)
        conns = [psycopg.connect(url, autocommit=True) for _ in range(threads)]
        try:
            workers = [CopyWorker(c, copy_sql, states, batch) for c in conns]
            measured = measure(workers, seconds)
        finally:
            for c in conns:
                c.close()
    name = "raw COPY (events layout)" if events_layout else "raw COPY (bare table)"
    return Case(name, batch, threads, measured, measured.seconds * threads)


# -- CPU per event, no database ---------------------------------------------------------------


def cpu_rows(seconds: float, seed: int) -> list[dict[str, Any]]:
    """µs per event of generating, mapping, encoding and decoding events, without I/O.

    The library's JSON mapper cannot store ``Document`` events at all (``h`` is bytes, which
    its transcoder has no transcoding for), so it is timed on the baseline's
    ``Counter.Incremented`` beside ours on the same event.
    """
    stream = EditStream(random.Random(seed))
    events = [e for e in stream.take(2000)[0] if isinstance(e, Document.Edited)]
    ours: Mapper[UUID] = Mapper(transcoder=MsgpackTranscoder())
    library = Application[UUID]().mapper  # the library's default mapper (JSON, in memory)
    stored = [ours.to_stored_event(e) for e in events]
    states = []
    for e in events:
        s = dict(vars(e))
        del s["originator_id"], s["originator_version"]
        states.append(s)
    counter = Counter()
    for _ in range(1000):
        counter.increment(1)
    small = [e for e in counter.collect_events() if not isinstance(e, Counter.Created)]
    msgpack = MsgpackTranscoder()
    n, k = len(events), len(small)
    gen = EditStream(random.Random(seed + 1))
    cases: list[tuple[str, Callable[[int], object]]] = [
        ("Document.edit + collect (domain: OT apply, hash chain)", lambda _i: gen.take(1)),
        ("mapper.to_stored_event, msgpack: Document.Edited",
         lambda i: ours.to_stored_event(events[i % n])),
        ("  of which MsgpackTranscoder.encode", lambda i: msgpack.encode(states[i % n])),
        ("mapper.to_domain_event, msgpack: Document.Edited",
         lambda i: ours.to_domain_event(stored[i % n])),
        ("mapper.to_stored_event, msgpack: Counter.Incremented",
         lambda i: ours.to_stored_event(small[i % k])),
        ("mapper.to_stored_event, library JSON: Counter.Incremented",
         lambda i: library.to_stored_event(small[i % k])),
    ]
    rows: list[dict[str, Any]] = []
    for name, fn in cases:
        calls, elapsed = time_calls(fn, seconds)
        rows.append({"step": name, "us_per_event": round(elapsed / calls * 1e6, 2),
                     "events_s": round(calls / elapsed, 1)})
    rows.append({"step": "stored state of Document.Edited (bytes, msgpack)",
                 "bytes": round(sum(len(s.state) for s in stored) / len(stored), 1)})
    return rows


def real_states(seed: int, n: int = 1024) -> list[bytes]:
    """``n`` stored states of real ``Edited`` events, for the raw COPY rows."""
    mapper: Mapper[UUID] = Mapper(transcoder=MsgpackTranscoder())
    events, _ = EditStream(random.Random(seed)).take(n + DOCS_PER_WRITER)
    return [mapper.to_stored_event(e).state for e in events
            if isinstance(e, Document.Edited)][:n]


# -- main ------------------------------------------------------------------------------------


def _ints(text: str) -> tuple[int, ...]:
    try:
        values = tuple(int(x) for x in text.split(",") if x.strip())
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a list of integers: {text!r}") from None
    if not values or min(values) < 1:
        raise argparse.ArgumentTypeError("give positive integers, comma-separated")
    return values


def plan(args: argparse.Namespace, created: list[str]) -> list[Callable[[], Case]]:
    """The cases the arguments ask for, batch size by batch size.

    Cases that are compared with each other run one after the other, so that a change in
    the machine's load (other processes) shifts them alike.
    """
    url, seconds, seed = args.database_url, args.seconds, args.seed
    states = real_states(seed)
    extras = not args.quick
    todo: list[Callable[[], Case]] = []
    for b in args.batches:
        for t in args.threads:
            todo.append(lambda b=b, t=t: run_copy(url, b, t, seconds, created, states))
            todo.append(lambda b=b, t=t: run_store(url, b, t, seconds, created, seed))
            todo.append(lambda b=b, t=t: run_commit(url, b, t, seconds, created, seed))
            if t != 1:
                continue
            if b == 1 or (extras and b in (100, 1000)):
                todo.append(lambda b=b: run_library(url, b, seconds, created))
            if extras and b in (100, 1000):
                todo.append(lambda b=b: run_store(url, b, 1, seconds, created, seed,
                                                  client_ops=True))
                todo.append(lambda b=b: run_store(url, b, 1, seconds, created, seed,
                                                  direct=True))
            if extras:
                todo.append(lambda b=b: run_copy(url, b, 1, seconds, created, states,
                                                 events_layout=True))
            if not args.no_sqlite and b in (1, 100):
                todo.append(lambda b=b: run_store(None, b, 1, seconds, created, seed))
    return todo


def run_all(args: argparse.Namespace, created: list[str]) -> list[Case]:
    """Every planned case ``--repeat`` times; the run of median rate of each, with the ratio.

    ``Case.all_rates`` keeps the rate of every repetition.
    """
    todo = plan(args, created)
    runs: list[list[Case]] = [[] for _ in todo]
    for _ in range(args.repeat):
        for i, fn in enumerate(todo):
            runs[i].append(fn())
    cases = []
    for repeats in runs:
        ordered = sorted(repeats, key=lambda c: c.rate)
        median = ordered[(len(ordered) - 1) // 2]
        median.all_rates = [round(c.rate, 1) for c in repeats]
        cases.append(median)
    raw = {(c.batch, c.threads): c.rate for c in cases if c.method == "raw COPY (bare table)"}
    for c in cases:
        c.raw_rate = raw.get((c.batch, c.threads)) or raw.get((c.batch, 1))
    return cases


def main(argv: list[str] | None = None) -> int:
    """Parse arguments, run every case, print the tables (and write JSON when asked)."""
    parser = argparse.ArgumentParser(
        prog="python -m ops.bench.store", description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--database-url", default=DEFAULT_DATABASE_URL)
    parser.add_argument("--seconds", type=float_in(0, 86_400), default=2.0,
                        help="timed writing per case")
    parser.add_argument("--batches", type=_ints, default=BATCHES, help="e.g. 1,10,100,1000")
    parser.add_argument("--threads", type=_ints, default=THREADS, help="writer threads, e.g. 1,2")
    parser.add_argument("--no-sqlite", action="store_true", help="skip the SQLite store")
    parser.add_argument("--repeat", type=int, default=1,
                        help="run every case N times and report the median (a noisy machine)")
    parser.add_argument("--quick", action="store_true",
                        help="a smoke run: 0.15 s per case, batches 1,100, one thread, no extras")
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--json", dest="json_out", type=output_file, metavar="OUT")
    args = parser.parse_args(argv)
    if args.quick:
        args.seconds = min(args.seconds, 0.15)
        if args.batches == BATCHES:
            args.batches = (1, 100)
        if args.threads == THREADS:
            args.threads = (1,)
    if args.seconds <= 0 or args.repeat < 1:
        parser.error("--seconds > 0 and --repeat >= 1, please")
    if not database_reachable(args.database_url, parser.prog):
        return 1
    facts = machine_facts()
    server = server_facts(args.database_url)
    console = make_console()
    created: list[str] = []
    cases = run_all(args, created)
    rows = [c.row() for c in cases]

    def opt(x: float | None, digits: int = 1) -> str:
        return "-" if x is None else num(x, digits)

    print_table(
        f"durable appends, PostgreSQL {server['server_version']} synchronous_commit="
        f"{server['synchronous_commit']}, median of {args.repeat} ({load_note(facts)})",
        ["method", "batch", "threads", "events/s", "tx/s", "µs/ev/thread", "recorder µs/ev",
         "other µs/ev", "× raw COPY"],
        [[r["method"], num(r["batch"]), str(r["threads"]), num(r["events_s"]),
          num(r["transactions_s"]), num(r["us_per_event_per_thread"], 1),
          opt(r["recorder_us_per_event"]), opt(r["other_us_per_event"]),
          "-" if r["ratio_to_raw_copy"] is None else f"{r['ratio_to_raw_copy']:.2f}"]
         for r in rows],
        console,
    )
    cpu = cpu_rows(0.05 if args.quick else 0.5, args.seed)
    print_table(
        "CPU per event without a database (one thread)",
        ["step", "µs/event", "events/s"],
        [[r["step"], num(r["bytes"], 1) if "bytes" in r else num(r["us_per_event"], 2),
          "-" if "bytes" in r else num(r["events_s"])] for r in cpu],
        console,
    )
    if args.json_out is not None:
        report = {
            "benchmark": "store", "seconds_per_case": args.seconds, "repeat": args.repeat,
            "machine": facts,
            "load_avg_end": machine_facts()["load_avg"], "postgres": server,
            "cases": rows, "cpu": cpu, "schemas": created,
        }
        if not write_json(args.json_out, report, parser.prog):
            return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
