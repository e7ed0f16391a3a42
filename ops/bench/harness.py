"""What every benchmark in ``ops/bench`` shares: timing, machine facts, schemas, output.

Nothing here runs at import time. The benchmarks are programs, not tests: each one prints a
rich table and, with ``--json OUT``, writes the same figures with the machine facts (load
average included, since other processes may share the two cores).
"""

from __future__ import annotations

import argparse
import math
import os
import platform
import sys
import time
import uuid
from collections.abc import Awaitable, Callable, Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import orjson
from rich.console import Console
from rich.table import Table

DEFAULT_DATABASE_URL = "postgresql://postgres@127.0.0.1:5432/postgres"
"""The PostgreSQL server the store and projection benchmarks write to (``--database-url``)."""

SCHEMA_PREFIX = "bench_"
"""Every schema a benchmark creates starts with this; each is dropped when it is done."""


def int_at_least(low: int) -> Callable[[str], int]:
    """An argparse ``type``: an integer of at least ``low``.

    Anything else is a usage error (the message names the flag and the bound, exit 2), so a
    computation never starts on a count it cannot use.
    """

    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"not an integer: {text!r}") from None
        if value < low:
            raise argparse.ArgumentTypeError(f"must be >= {low:,}, got {value:,}")
        return value

    return parse


def float_in(low: float, high: float) -> Callable[[str], float]:
    """An argparse ``type``: a number in ``[low, high]`` (never NaN or infinite)."""

    def parse(text: str) -> float:
        try:
            value = float(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"not a number: {text!r}") from None
        if not (math.isfinite(value) and low <= value <= high):
            raise argparse.ArgumentTypeError(f"must be in [{low:g}, {high:g}], got {text}")
        return value

    return parse


def database_reachable(database_url: str, prog: str) -> bool:
    """True when PostgreSQL at ``database_url`` accepts a connection.

    Otherwise print one line on stderr (``prog``: the reason psycopg gives) and return
    False; a benchmark's ``main`` then returns 1, before any work, instead of a traceback
    from somewhere inside it.
    """
    import psycopg

    try:
        with psycopg.connect(database_url, autocommit=True, connect_timeout=5):
            return True
    except psycopg.Error as exc:
        reason = " ".join(str(exc).split()) or type(exc).__name__
        print(f"{prog}: cannot connect to PostgreSQL: {reason}", file=sys.stderr)
        return False


def machine_facts() -> dict[str, Any]:
    """CPU count, load averages and uptime now: the context a figure was measured in."""
    load1, load5, load15 = os.getloadavg()
    try:
        up = float(Path("/proc/uptime").read_text().split()[0])
    except (OSError, ValueError, IndexError):
        up = -1.0
    return {
        "cpus": os.cpu_count(),
        "load_avg": [round(load1, 2), round(load5, 2), round(load15, 2)],
        "uptime_s": round(up),
        "python": platform.python_version(),
        "platform": platform.platform(),
    }


def load_note(facts: dict[str, Any]) -> str:
    """A one-line summary of ``machine_facts()`` for a table title."""
    l1, l5, l15 = facts["load_avg"]
    return f"{facts['cpus']} CPUs, load average {l1:.2f} / {l5:.2f} / {l15:.2f} at start"


def time_calls(fn: Callable[[int], object], seconds: float) -> tuple[int, float]:
    """Call ``fn(i)`` for i = 0, 1, ... for about ``seconds``; returns (calls, elapsed).

    The clock is read after batches of calls (doubling up to 512) so that reading it costs
    nothing measurable next to the calls.
    """
    calls = 0
    batch = 1
    start = time.perf_counter()
    deadline = start + seconds
    while True:
        for _ in range(batch):
            fn(calls)
            calls += 1
        now = time.perf_counter()
        if now >= deadline:
            return calls, now - start
        batch = min(batch * 2, 512)


@contextmanager
def fresh_schema(database_url: str, created: list[str]) -> Iterator[str]:
    """A new, empty PostgreSQL schema, dropped with everything in it on the way out.

    Its name is appended to ``created`` (so that a report can say which schemas it used,
    and a test can check that none is left behind).
    """
    import psycopg
    from psycopg import sql

    name = f"{SCHEMA_PREFIX}{uuid.uuid4().hex[:12]}"
    with psycopg.connect(database_url, autocommit=True, connect_timeout=5) as conn:
        conn.execute(sql.SQL("CREATE SCHEMA {}").format(sql.Identifier(name)))
    created.append(name)
    try:
        yield name
    finally:
        with psycopg.connect(database_url, autocommit=True, connect_timeout=5) as conn:
            conn.execute(sql.SQL("DROP SCHEMA IF EXISTS {} CASCADE").format(sql.Identifier(name)))


def run_on_store(
    database_url: str, measure: Callable[[Any], Awaitable[Any]], created: list[str]
) -> Any:
    """``measure(store)`` awaited on uvloop (asyncio without it), ``store`` a ``Store`` on a
    fresh schema of ``database_url`` (its name appended to ``created``), closed and dropped
    on the way out; its result."""
    import asyncio
    import tempfile

    from gateway.store import Store, StoreConfig

    try:
        import uvloop
    except ImportError:
        uvloop = None
    with fresh_schema(database_url, created) as schema, tempfile.TemporaryDirectory() as tmp:
        store = Store(StoreConfig(Path(tmp), database_url, schema))
        try:
            runner = uvloop.run if uvloop is not None else asyncio.run
            return runner(measure(store))
        finally:
            store.close()


def server_facts(database_url: str) -> dict[str, Any]:
    """The PostgreSQL settings that bound durable writes (version, commit and WAL sync)."""
    import psycopg

    names = ("server_version", "synchronous_commit", "fsync", "wal_sync_method",
             "shared_buffers", "commit_delay")
    out: dict[str, Any] = {}
    with psycopg.connect(database_url, autocommit=True, connect_timeout=5) as conn:
        for n in names:
            row = conn.execute(f"SHOW {n}").fetchone()
            out[n] = row[0] if row else None
    return out


def make_console() -> Console:
    """A console that does not squeeze wide tables when the output is a file or a pipe."""
    console = Console()
    return console if console.is_terminal else Console(width=160)


def print_table(
    title: str, columns: Sequence[str], rows: Sequence[Sequence[str]], console: Console
) -> None:
    """Print ``rows`` under ``columns``; every column but the first is right-aligned."""
    table = Table(title=title, title_justify="left")
    for i, c in enumerate(columns):
        table.add_column(c, justify="left" if i == 0 else "right")
    for r in rows:
        table.add_row(*r)
    console.print(table)


def output_file(text: str) -> Path:
    """An argparse ``type`` for ``--json``: a path the report can be written to, checked
    before any work (a usage error otherwise, exit 2: the results are not lost after it)."""
    from ops.loadtest.command import output_problem

    path = Path(text)
    why = output_problem(path)
    if why is not None:
        raise argparse.ArgumentTypeError(f"{path}: {why}")
    return path


def write_json(path: Path, report: dict[str, Any], prog: str) -> bool:
    """Write ``report`` as indented JSON (with a trailing newline); a write that still fails
    (a full disk) is one line on stderr and False."""
    try:
        path.write_bytes(orjson.dumps(report, option=orjson.OPT_INDENT_2) + b"\n")
    except OSError as exc:
        print(f"{prog}: --json {path}: {exc.strerror or exc}", file=sys.stderr)
        return False
    return True


def num(x: float, digits: int = 0) -> str:
    """``x`` with thousands separators and ``digits`` decimals."""
    return f"{x:,.{digits}f}"
