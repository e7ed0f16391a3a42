"""What one commit tick costs in CPU, on both sides: the gateway's and PostgreSQL's.

At the standard load the server commits hundreds of times a second, and what a commit
costs whatever it carries sets a floor under the cost per op (``ops/PERFORMANCE.md``,
"What bounds the server's cost"). This benchmark runs the committer's two kinds of commit
through ``gateway.writer.AsyncWriter`` on uvloop, against real PostgreSQL, one after the
other on an otherwise idle machine:

- *checked*: one statement, ``coscribe_append`` in its own transaction (a document only
  this process writes);
- *locked*: ``begin_locked`` (``BEGIN`` and the lock read) then the append and ``COMMIT``
  (a document other processes write too: every commit of the standard load with
  ``--workers 2``).

For each kind and batch size (events per commit) it reports the wall time, the gateway's
CPU (the thread running the loop, from the lock read to the commit's result: the edits
that make the events are not counted) and the CPU of the PostgreSQL backend serving the
writer's connection (``/proc/PID/schedstat``: the database must run on this machine), per
commit and per event. The WAL writer and the checkpointer are not counted, nor the
backends a NOTIFY wakes (none listen here; the server's projection runner does).

    python -m ops.bench.tick [--batches 1 4 16] [--commits 1000] [--json OUT]
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path
from typing import Any

from gateway.store import Store
from gateway.writer import AsyncWriter
from ops.bench import harness
from ops.bench.commit import Docs

KINDS = ("checked", "locked")
WARMUP = 20
"""Commits of each case left out of the figures (prepared statements, caches, plans)."""


def backend_cpu_ns(pid: int) -> int | None:
    """CPU time a process has run, in ns (``schedstat``), or None when it cannot be read.

    Not ``ops.loadtest.procstat.read``: ``/proc/PID/stat`` counts 10 ms clock ticks, too
    coarse for a case of a thousand commits of ~0.4 ms of backend CPU each."""
    try:
        return int(Path(f"/proc/{pid}/schedstat").read_text().split()[0])
    except (OSError, ValueError, IndexError):
        return None


async def _commit(writer: AsyncWriter, docs: Docs, kind: str, batch: int) -> tuple[float, float]:
    """One commit of ``batch`` new edit events; its (CPU, wall) seconds, the edits not
    counted (they are the op's work, not the commit's: ``Document.edit``)."""
    events, ops, heads = docs.batch(batch)
    cpu, wall = time.thread_time(), time.perf_counter()
    if kind == "locked":
        await writer.begin_locked(heads)
    await writer.save_checked(events, ops, heads, locked=kind == "locked")
    return time.thread_time() - cpu, time.perf_counter() - wall


async def _case(
    writer: AsyncWriter, docs: Docs, kind: str, batch: int, commits: int
) -> dict[str, Any]:
    for _ in range(WARMUP):
        await _commit(writer, docs, kind, batch)
    pid = writer.backend_pid
    pg0 = backend_cpu_ns(pid) if pid is not None else None
    cpu = wall = 0.0
    for _ in range(commits):
        c, w = await _commit(writer, docs, kind, batch)
        cpu += c
        wall += w
    pg1 = backend_cpu_ns(pid) if pid is not None else None
    pg_us = None if pg0 is None or pg1 is None else (pg1 - pg0) / 1000 / commits
    gw_us = 1e6 * cpu / commits
    return {
        "kind": kind,
        "batch": batch,
        "commits": commits,
        "wall_us_per_commit": round(1e6 * wall / commits, 1),
        "gateway_cpu_us_per_commit": round(gw_us, 1),
        "postgres_cpu_us_per_commit": None if pg_us is None else round(pg_us, 1),
        "gateway_cpu_us_per_event": round(gw_us / batch, 1),
        "postgres_cpu_us_per_event": None if pg_us is None else round(pg_us / batch, 1),
    }


async def _measure(store: Store, args: argparse.Namespace) -> list[dict[str, Any]]:
    docs = Docs(store)
    writer = AsyncWriter(store)
    try:
        return [await _case(writer, docs, kind, batch, args.commits)
                for batch in args.batches for kind in KINDS]
    finally:
        await writer.close()


def _cell(x: float | None, digits: int = 0) -> str:
    return "n/a" if x is None else harness.num(x, digits)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m ops.bench.tick", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--database-url", default=harness.DEFAULT_DATABASE_URL)
    p.add_argument("--batches", type=harness.int_at_least(1), nargs="+", default=[1, 4, 16],
                   help="events per commit, one case each")
    p.add_argument("--commits", type=harness.int_at_least(1), default=1000,
                   help="commits measured per case")
    p.add_argument("--json", type=harness.output_file)
    args = p.parse_args(argv)
    if not harness.database_reachable(args.database_url, p.prog):
        return 1
    facts = harness.machine_facts()
    created: list[str] = []
    results = harness.run_on_store(
        args.database_url, lambda store: _measure(store, args), created
    )
    rows = [[r["kind"], str(r["batch"]), _cell(r["wall_us_per_commit"]),
             _cell(r["gateway_cpu_us_per_commit"]), _cell(r["postgres_cpu_us_per_commit"]),
             _cell(r["gateway_cpu_us_per_event"], 1), _cell(r["postgres_cpu_us_per_event"], 1)]
            for r in results]
    harness.print_table(
        f"one commit tick, {args.commits:,} commits a case · {harness.load_note(facts)}",
        ["commit", "events", "wall µs", "gateway CPU µs", "PostgreSQL CPU µs",
         "gateway µs/event", "PostgreSQL µs/event"],
        rows,
        harness.make_console(),
    )
    report = {"bench": "tick", "machine": facts, "server": harness.server_facts(args.database_url),
              "params": vars(args) | {"json": str(args.json)}, "schemas": created,
              "results": results}
    return 1 if args.json and not harness.write_json(args.json, report, p.prog) else 0


if __name__ == "__main__":
    raise SystemExit(main())
