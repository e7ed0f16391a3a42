"""Commit latency on a busy event loop: the writer thread against the asyncio connection.

The gateway's loop is busy serving sessions while a group commit is in flight. A commit run
on a thread competes with the loop for the GIL at every return from the database; one run
on the loop as an asyncio connection does not. This benchmark reproduces that: a task keeps
the loop busy with pure-Python slices (``--busy`` of its time), and commits of ``--batch``
edit events (10 documents, checked inserts into real PostgreSQL) go through each writer in
alternating blocks (so both see the same machine). It reports wall milliseconds per commit,
p50 and p99.

    python -m ops.bench.commit [--batch 50] [--commits 200] [--busy 0.7] [--json OUT]
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import time
from concurrent.futures import ThreadPoolExecutor
from typing import Any

from domain.document import Document
from gateway.store import EventEncoder, Store
from gateway.writer import AsyncWriter
from ops.bench import harness

DOCS = 10
SLICE_S = 0.0005
"""One slice of simulated session work (pure Python, holds the GIL)."""
BLOCK = 10
"""Commits in a row through one writer before the other takes over."""
MAX_BUSY = 0.95
"""The busiest loop ``--busy`` may ask for (at 1 the loop would never yield)."""


def _spin(seconds: float) -> None:
    end = time.perf_counter() + seconds
    n = 0
    while time.perf_counter() < end:
        n += 1


async def _busy(fraction: float, stop: asyncio.Event) -> None:
    """Keep the loop busy ``fraction`` of the time, in slices, yielding between them."""
    idle = SLICE_S * (1 - fraction) / fraction if fraction > 0 else 0.01
    while not stop.is_set():
        _spin(SLICE_S)
        await asyncio.sleep(idle)


class Docs:
    """In-memory aggregates whose edits make the batches; heads follow the commits."""

    def __init__(self, store: Store) -> None:
        self.docs = [Document.create("bench", "x" * 2000, "bench") for _ in range(DOCS)]
        store.save([e for d in self.docs for e in d.collect_events()])
        self.heads = {d.id: d.version for d in self.docs}
        self.seq = 0

    def batch(self, n: int) -> tuple[list[Any], list[tuple[str, str, int, int]], dict[Any, int]]:
        events: list[Any] = []
        ops: list[tuple[str, str, int, int]] = []
        heads = dict(self.heads)
        for i in range(n):
            d = self.docs[i % DOCS]
            self.seq += 1
            v = d.edit([1 + self.seq % 1000, "abcdefgh"], "bench", "c", self.seq)
            ops.append((str(d.id), "c", self.seq, v))
        for d in self.docs:
            events.extend(d.collect_events())
            self.heads[d.id] = d.version
        return events, ops, heads


def _thread_commit(store: Store, events: list[Any], ops: list[Any], heads: dict[Any, int]) -> Any:
    """The same checked commit, from a thread on the library's own (synchronous) connection."""
    recorder = store.writer_recorder
    params = recorder.checked_params(EventEncoder(store.writer_mapper).columns(events), ops, heads)
    with recorder.datastore.get_connection() as conn, conn.cursor() as curs:
        curs.execute(recorder.checked_insert, params, prepare=True)
        row = curs.fetchone()
        return recorder.checked_result(row["ids"], row["stale"])


async def _measure(store: Store, args: argparse.Namespace) -> dict[str, dict[str, float]]:
    docs = Docs(store)
    thread = ThreadPoolExecutor(max_workers=1)
    writer = AsyncWriter(store)
    loop = asyncio.get_running_loop()
    walls: dict[str, list[float]] = {"thread": [], "asyncio": []}
    stop = asyncio.Event()
    busy = asyncio.create_task(_busy(args.busy, stop))
    try:
        for i in range(args.commits):
            kind = "thread" if (i // BLOCK) % 2 == 0 else "asyncio"
            events, ops, heads = docs.batch(args.batch)
            t0 = time.perf_counter()
            if kind == "thread":
                await loop.run_in_executor(thread, _thread_commit, store, events, ops, heads)
            else:
                await writer.save_checked(events, ops, heads)
            walls[kind].append(1000 * (time.perf_counter() - t0))
    finally:
        stop.set()
        await busy
        await writer.close()
        thread.shutdown()
    out = {}
    for kind, ws in walls.items():
        ws.sort()
        out[kind] = {
            "commits": len(ws),
            "wall_ms_p50": round(statistics.median(ws), 2),
            "wall_ms_p99": round(ws[int(0.99 * (len(ws) - 1))], 2),
        }
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m ops.bench.commit", description=__doc__)
    p.add_argument("--database-url", default=harness.DEFAULT_DATABASE_URL)
    p.add_argument("--batch", type=harness.int_at_least(1), default=50)
    p.add_argument("--commits", type=harness.int_at_least(2 * BLOCK), default=200,
                   help=f"at least {2 * BLOCK}: blocks of {BLOCK} alternate between the writers")
    p.add_argument("--busy", type=harness.float_in(0, MAX_BUSY), default=0.7,
                   help=f"loop busy fraction, 0..{MAX_BUSY}")
    p.add_argument("--json", type=harness.output_file)
    args = p.parse_args(argv)
    if not harness.database_reachable(args.database_url, p.prog):
        return 1
    facts = harness.machine_facts()
    created: list[str] = []
    result = harness.run_on_store(
        args.database_url, lambda store: _measure(store, args), created
    )
    rows = [[k, str(v["commits"]), harness.num(v["wall_ms_p50"], 2),
             harness.num(v["wall_ms_p99"], 2)]
            for k, v in result.items()]
    harness.print_table(
        f"commit of {args.batch} events, loop {args.busy:.0%} busy · {harness.load_note(facts)}",
        ["writer", "commits", "wall ms p50", "wall ms p99"],
        rows,
        harness.make_console(),
    )
    report = {"bench": "commit", "machine": facts,
              "params": vars(args) | {"json": str(args.json)}, "results": result}
    return 1 if args.json and not harness.write_json(args.json, report, p.prog) else 0


if __name__ == "__main__":
    raise SystemExit(main())
