"""Benchmark of the read-model rebuild: ``python -m ops.bench.projections [--events N]``.

In a fresh PostgreSQL schema (dropped afterwards):

1. **Generate** N events (default 1,000,000; ``--quick`` 50,000) of real documents: each is
   created, gets three editors (``MemberAdded``), then edits (3 inserts to 1 delete of 1-8
   code points, by its four members) and a rename every 250 edits, until it has
   ``--events-per-doc`` events; ``--docs`` documents are active at a time, edited
   round-robin, so the log interleaves them as a busy server's does. Each event goes
   through the domain (``Document``) and the application's real mapper (msgpack), and the
   stored rows are streamed into ``coscribe_events`` with binary ``COPY`` (transactions of
   ``COPY_ROWS`` rows; no more than that is ever held in memory). Then ``VACUUM ANALYZE``,
   as a table that has been live for a while would have had.
2. **Read + decode**: every notification, in pages of ``--page`` (``StoreSource.read``:
   ``Store.notifications``, the log read as binary tuples and decoded by ``EventDecoder``),
   as the runner reads them.
3. **Rebuild**: ``projections.replay.rebuild_all`` over every read model in
   ``projections.registry.MODELS``, called exactly as ``coscribe replay`` does (``Store``,
   ``StoreSource``, ``open_db(read_db_config(cfg))``, ``page_size`` 2000, a progress
   callback), into the same schema. ``--per-model`` also rebuilds each model alone.
   Then, as a floor, the server alone writes the rebuilt audit rows (one per event) again
   into an empty copy of ``rm_audit`` with its indexes (``INSERT ... SELECT``).
4. **Follow**: the first ``--follow-events`` (50,000) events again, into fresh tables, by a
   plain ``Runner`` in pages of ``--follow-page`` (25): what a live runner costs per event
   when a few events arrive per step (one read, one transaction and commit per page).

Reports events/s for each step, and the rebuild's rate in its first and second half (does
it slow down as the tables grow?). Wall-clock rates move with whatever else shares the cores,
so the read and rebuild steps also report CPU seconds: this process's (``process_time``, all
threads) and that of the PostgreSQL backends serving its connections (``/proc/PID/stat`` of
every backend whose ``application_name`` is this run's, set through ``PGAPPNAME``; only when
the server runs on this machine), as µs per event. Events are generated in real time, so
their timestamps fall within a few minutes: the analytics model updates few hourly rows, as
in a busy hour.
"""

from __future__ import annotations

import argparse
import os
import random
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from domain import ot
from domain.document import Document
from gateway.readmodels import StoreSource, read_db_config
from gateway.store import Store, StoreConfig
from ops.bench.harness import (
    DEFAULT_DATABASE_URL,
    database_reachable,
    fresh_schema,
    load_note,
    machine_facts,
    make_console,
    num,
    output_file,
    print_table,
    server_facts,
    write_json,
)
from ops.runtime import tune_gc
from projections.db import open_db
from projections.registry import MODELS
from projections.replay import REPLAY_PAGE, rebuild, rebuild_all
from projections.runner import Runner

COPY_ROWS = 50_000
"""Rows per COPY transaction while generating."""
MEMBERS = ("owner", "ed-1", "ed-2", "ed-3")
"""The owner and the three editors of every generated document."""
RENAME_EVERY = 250
"""A document is renamed after every this many edits."""


def document_events(rng: random.Random, per_doc: int, docs: int) -> Iterator[list[Any]]:
    """Lists of new events, round-robin over ``docs`` active documents, for ever.

    A document that has ``per_doc`` events is replaced by a new one.
    """

    def new() -> Document:
        doc = Document.create(f"bench {rng.getrandbits(32):08x}", "", MEMBERS[0])
        for user in MEMBERS[1:]:
            doc.add_member(user, "editor", MEMBERS[0])
        return doc

    active = [new() for _ in range(docs)]
    while True:
        for i, doc in enumerate(active):
            if doc.version >= per_doc:
                doc = active[i] = new()
            for _ in range(min(10, per_doc - doc.version)):
                n = len(doc.text)
                by = rng.choice(MEMBERS)
                if n > 8 and rng.random() < 0.25:
                    k = rng.randint(1, 8)
                    doc.edit(ot.normalize([rng.randrange(n - k + 1), {"d": k}]), by)
                else:
                    doc.edit(ot.normalize([rng.randrange(n + 1), "x" * rng.randint(1, 8)]), by)
                if doc.doc_version % RENAME_EVERY == 0:
                    doc.rename(f"bench v{doc.doc_version}", by)
            yield doc.collect_events()


def generate(store: Store, schema: str, total: int, per_doc: int, docs: int, seed: int) -> float:
    """Stream ``total`` events into the store's table with COPY; returns the seconds taken."""
    import psycopg
    from psycopg import sql

    assert store.cfg.database_url is not None
    mapper = store.app.mapper
    table = sql.Identifier(schema, "coscribe_events")
    copy_sql = sql.SQL(
        "COPY {} (originator_id, originator_version, topic, state) FROM STDIN (FORMAT BINARY)"
    ).format(table)
    started = time.perf_counter()
    written = 0
    source = document_events(random.Random(seed), per_doc, docs)
    with psycopg.connect(store.cfg.database_url, autocommit=True) as conn:
        while written < total:
            rows = []
            want = min(COPY_ROWS, total - written)
            while len(rows) < want:
                for e in next(source):
                    s = mapper.to_stored_event(e)
                    rows.append((s.originator_id, s.originator_version, s.topic, s.state))
            # Whole batches only: a document's events may not be cut off mid-sequence, but a
            # slightly larger last batch is fine (the total is then a few events over).
            with conn.transaction(), conn.cursor() as cur, cur.copy(copy_sql) as cp:
                cp.set_types(["uuid", "int8", "text", "bytea"])
                for row in rows:
                    cp.write_row(row)
            written += len(rows)
        conn.execute(sql.SQL("VACUUM ANALYZE {}").format(table))
    return time.perf_counter() - started


def read_all(source: StoreSource, page: int) -> tuple[int, float]:
    """Read and decode every notification in pages; returns (events, seconds)."""
    started = time.perf_counter()
    after = events = 0
    while True:
        batch = source.read(after, page)
        if not batch:
            break
        events += len(batch)
        after = batch[-1][0]
    return events, time.perf_counter() - started


APP_NAME = f"coscribe-bench-{os.getpid()}"
"""``application_name`` of every connection this run opens (libpq reads ``PGAPPNAME``)."""


def backend_cpu(db: Any) -> float | None:
    """CPU seconds used so far by the PostgreSQL backends of this run's connections.

    None when a backend's ``/proc`` entry cannot be read (the server runs elsewhere).
    """
    rows = db.query(
        "SELECT pid FROM pg_stat_activity WHERE application_name = %s", (APP_NAME,)
    )
    ticks = os.sysconf("SC_CLK_TCK")
    total = 0.0
    for r in rows:
        try:
            fields = Path(f"/proc/{int(r['pid'])}/stat").read_text().rsplit(")", 1)[1].split()
        except OSError:
            return None
        total += (int(fields[11]) + int(fields[12])) / ticks  # utime, stime
    return total


class CpuMeter:
    """CPU seconds of this process and of its PostgreSQL backends between two ``mark``s."""

    def __init__(self, db: Any) -> None:
        self.db = db
        self.proc = time.process_time()
        self.pg = backend_cpu(db)

    def since(self, events: int) -> dict[str, float | None]:
        """CPU used since construction, in seconds and in µs per event."""
        proc = time.process_time() - self.proc
        pg_now = backend_cpu(self.db)
        pg = None if pg_now is None or self.pg is None else pg_now - self.pg
        per = 1e6 / max(events, 1)
        return {
            "cpu_process_s": round(proc, 2),
            "cpu_postgres_s": None if pg is None else round(pg, 2),
            "cpu_us_per_event": round((proc + (pg or 0.0)) * per, 2),
            "cpu_process_us_per_event": round(proc * per, 2),
            "cpu_postgres_us_per_event": None if pg is None else round(pg * per, 2),
        }


def halves(curve: list[tuple[float, int]]) -> tuple[float, float]:
    """Events/s over the first and the second half of a ``(seconds, position)`` curve."""
    if len(curve) < 3:
        return 0.0, 0.0
    end_t, end_p = curve[-1]
    mid = min(curve, key=lambda c: abs(c[1] - end_p / 2))
    first = mid[1] / mid[0] if mid[0] > 0 else 0.0
    second = (end_p - mid[1]) / (end_t - mid[0]) if end_t > mid[0] else 0.0
    return first, second


def audit_floor(db: Any, events: int) -> dict[str, Any]:
    """The server alone writing the rebuilt audit rows again: ``INSERT ... SELECT`` into an
    empty copy of ``rm_audit`` with the same indexes (no Python, no parameters, no parsing).

    One row per event and three indexes: a floor for any rebuild of this model here.
    """
    with db.transaction() as tx:
        tx.execute("CREATE TABLE bench_audit_floor (LIKE rm_audit INCLUDING ALL)")
    meter = CpuMeter(db)
    started = time.perf_counter()
    with db.transaction() as tx:
        rows = tx.execute("INSERT INTO bench_audit_floor SELECT * FROM rm_audit")
    seconds = time.perf_counter() - started
    cpu = meter.since(rows)
    with db.transaction() as tx:
        tx.execute("DROP TABLE bench_audit_floor")
    return {"rows": rows, "seconds": round(seconds, 2), "events_s": round(events / seconds, 1),
            **cpu}


class _Upto:
    """The log as far as ``upto``: a follower that catches up and stops there."""

    def __init__(self, source: StoreSource, upto: int) -> None:
        self.source, self.upto = source, upto

    def read(self, after: int, limit: int) -> list[tuple[int, Any]]:
        return [(p, e) for p, e in self.source.read(after, min(limit, self.upto - after))
                if p <= self.upto] if after < self.upto else []

    def head(self) -> int:
        return min(self.upto, self.source.head())


def follow(db: Any, source: StoreSource, events: int, page: int) -> dict[str, Any]:
    """Apply the first ``events`` events to fresh tables in pages of ``page``, as a live
    runner does when a few events arrive at a time (read, decode, apply, commit per page)."""
    runner = Runner(db, _Upto(source, events), list(MODELS), page_size=page, suffix="__follow")
    runner.setup(fresh=True)
    meter = CpuMeter(db)
    started = time.perf_counter()
    runner.catch_up()
    seconds = time.perf_counter() - started
    return {"events": events, "page": page, "seconds": round(seconds, 2),
            "events_s": round(events / seconds, 1), **meter.since(events)}


def run(args: argparse.Namespace, created: list[str]) -> dict[str, Any]:
    """Generate, read, rebuild in one fresh schema; the figures as a dict."""
    url = args.database_url
    out: dict[str, Any] = {}
    os.environ["PGAPPNAME"] = APP_NAME
    with tempfile.TemporaryDirectory() as tmp, fresh_schema(url, created) as schema:
        cfg = StoreConfig(data_dir=Path(tmp), database_url=url, database_schema=schema)
        store = Store(cfg)
        try:
            gen_s = generate(store, schema, args.events, args.events_per_doc, args.docs, args.seed)
            source = StoreSource(store)
            head = source.head()
            tune_gc()  # as `coscribe replay` and `coscribe projections run` do
            out.update(events=head, generate_s=round(gen_s, 2),
                       generate_events_s=round(head / gen_s, 1))
            db = open_db(read_db_config(cfg))
            try:
                meter = CpuMeter(db)
                n, read_s = read_all(source, args.page)
                assert n == head, (n, head)
                out.update(read_s=round(read_s, 2), read_events_s=round(n / read_s, 1))
                out["read_cpu"] = meter.since(n)
                meter = CpuMeter(db)
                curve: list[tuple[float, int]] = []
                started = time.perf_counter()

                def progress(position: int, _head: int) -> None:
                    curve.append((time.perf_counter() - started, position))

                results = rebuild_all(db, source, list(MODELS), page_size=args.page,
                                      progress=progress)
                r = results[0]
                out["rebuild_cpu"] = meter.since(r.events)
                first, second = halves(curve)
                out.update(
                    rebuild_s=round(r.seconds, 2), rebuild_events=r.events,
                    rebuild_events_s=round(r.rate, 1), rebuild_first_half_events_s=round(first, 1),
                    rebuild_second_half_events_s=round(second, 1),
                    models=[m.name for m in MODELS],
                    curve=[[round(t, 3), p] for t, p in curve[:: max(1, len(curve) // 200)]],
                )
                out["floor_audit"] = audit_floor(db, r.events)
                if args.follow_events > 0:
                    out["follow"] = follow(db, source, min(args.follow_events, head),
                                           args.follow_page)
                if args.per_model:
                    out["per_model"] = []
                    for model in MODELS:
                        meter = CpuMeter(db)
                        one = rebuild(db, source, model, page_size=args.page)
                        out["per_model"].append({"model": model.name, "seconds": round(
                            one.seconds, 2), "events_s": round(one.rate, 1),
                            "cpu": meter.since(one.events)})
                rows = db.query("SELECT pg_total_relation_size('coscribe_events') AS b")
                out["events_table_mb"] = round(int(rows[0]["b"]) / 2**20, 1)
            finally:
                db.close()
        finally:
            store.close()
    return out


def main(argv: list[str] | None = None) -> int:
    """Parse arguments, run, print the table (and write JSON when asked)."""
    parser = argparse.ArgumentParser(
        prog="python -m ops.bench.projections", description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--database-url", default=DEFAULT_DATABASE_URL)
    parser.add_argument("--events", type=int, help="events to generate (1,000,000)")
    parser.add_argument("--quick", action="store_true", help="50,000 events (unless --events)")
    parser.add_argument("--events-per-doc", type=int, default=1000)
    parser.add_argument("--docs", type=int, default=100, help="documents active at a time")
    parser.add_argument("--page", type=int, default=REPLAY_PAGE,
                        help="events per page/transaction (coscribe replay's default)")
    parser.add_argument("--follow-events", type=int, default=50_000,
                        help="events to follow in small pages afterwards (0: skip)")
    parser.add_argument("--follow-page", type=int, default=25,
                        help="events per page when following (a live runner's steps)")
    parser.add_argument("--per-model", action="store_true", help="also rebuild each model alone")
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--json", dest="json_out", type=output_file, metavar="OUT")
    args = parser.parse_args(argv)
    if args.events is None:
        args.events = 50_000 if args.quick else 1_000_000
    if (args.events < 1 or args.events_per_doc < 5 or args.docs < 1 or args.page < 1
            or args.follow_page < 1):
        parser.error("--events, --docs, --page, --follow-page >= 1 and --events-per-doc >= 5, "
                     "please")
    if not database_reachable(args.database_url, parser.prog):
        return 1
    facts = machine_facts()
    server = server_facts(args.database_url)
    created: list[str] = []
    out = run(args, created)

    def cpu(c: dict[str, Any]) -> list[str]:
        pg = c["cpu_postgres_us_per_event"]
        return [num(c["cpu_process_us_per_event"], 2), "?" if pg is None else num(pg, 2),
                num(c["cpu_us_per_event"], 2)]

    rows = [
        ["generate (domain + mapper + COPY, VACUUM ANALYZE)", num(out["events"]),
         num(out["generate_s"], 2), num(out["generate_events_s"]), "", "", ""],
        ["read + decode (Store.notifications)", num(out["events"]),
         num(out["read_s"], 2), num(out["read_events_s"]), *cpu(out["read_cpu"])],
        [f"rebuild_all, {len(out['models'])} models (coscribe replay)",
         num(out["rebuild_events"]), num(out["rebuild_s"], 2), num(out["rebuild_events_s"]),
         *cpu(out["rebuild_cpu"])],
        ["  rebuild, first half", "", "", num(out["rebuild_first_half_events_s"]), "", "", ""],
        ["  rebuild, second half", "", "", num(out["rebuild_second_half_events_s"]), "", "", ""],
    ]
    fl = out["floor_audit"]
    rows.append(["  floor: the server writing the audit rows alone (INSERT … SELECT)",
                 num(fl["rows"]), num(fl["seconds"], 2), num(fl["events_s"]), *cpu(fl)])
    if "follow" in out:
        f = out["follow"]
        rows.append([f"follow in pages of {f['page']} (live runner: read, apply, commit)",
                     num(f["events"]), num(f["seconds"], 2), num(f["events_s"]), *cpu(f)])
    for m in out.get("per_model", []):
        rows.append([f"rebuild {m['model']} alone", num(out["events"]), num(m["seconds"], 2),
                     num(m["events_s"]), *cpu(m["cpu"])])
    print_table(
        f"projections rebuild from {out['events']:,} events "
        f"(coscribe_events {out['events_table_mb']:,} MB; PostgreSQL "
        f"{server['server_version'].split()[0]}; {load_note(facts)})",
        ["step", "events", "seconds", "events/s", "CPU µs/ev (python)", "(postgres)", "(sum)"],
        rows, make_console(),
    )
    if args.json_out is not None:
        report = {
            "benchmark": "projections", "machine": facts,
            "load_avg_end": machine_facts()["load_avg"], "postgres": server,
            "page": args.page, "docs": args.docs, "events_per_doc": args.events_per_doc,
            **out, "schemas": created,
        }
        if not write_json(args.json_out, report, parser.prog):
            return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
