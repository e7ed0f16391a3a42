"""``coscribe projections run`` raises the gateways' cache generations under their prefix,
refuses flags out of range as ``replay`` does, and follows the store that ``serve`` makes."""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import psycopg
import pytest
import redis
from psycopg import sql

from domain.document import Document
from gateway.store import Store, StoreConfig
from tests.conftest import PG_URL
from tests.procs import TEST_SECRET, ServerProcess

pytestmark = [pytest.mark.redis]


def _run_until(args: list[str], log: Path, done: Callable[[], bool]) -> str:
    """Run ``projections run`` with ``args`` until ``done()`` holds; returns its output."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("COSCRIBE_")}
    with log.open("wb") as out:
        proc = subprocess.Popen(
            [sys.executable, "-m", "ops.projections_cli", "projections", "run",
             "--poll", "0.01", *args], env=env, stdout=out, stderr=subprocess.STDOUT,
            start_new_session=True)
    try:
        deadline = time.monotonic() + 30
        while not done():
            assert proc.poll() is None, log.read_text()
            assert time.monotonic() < deadline, log.read_text()
            time.sleep(0.02)
    finally:
        os.killpg(proc.pid, signal.SIGTERM)
        proc.wait(20)
    assert proc.returncode == 0, log.read_text()
    return log.read_text()


def test_runner_bumps_generations_under_the_given_prefix(
    tmp_path: Path, redis_url: str, redis_prefix: str, redis_client: redis.Redis
) -> None:
    """--redis-prefix names the keys it raises; without a Redis URL it warns at start."""
    store = Store(StoreConfig(data_dir=tmp_path))
    try:
        doc = Document.create("T", "", "ann")
        store.save(doc.collect_events())
        log_id = store.log_id()
    finally:
        store.close()
    generation = f"{redis_prefix}rm:{log_id}:gen:an-doc:{doc.id}"
    out = _run_until(["--data-dir", str(tmp_path), "--redis-url", redis_url,
                      "--redis-prefix", redis_prefix], tmp_path / "with.log",
                     lambda: redis_client.get(generation) == b"1")
    assert "no Redis URL" not in out
    out = _run_until(["--data-dir", str(tmp_path)], tmp_path / "without.log",
                     lambda: "projections running" in (tmp_path / "without.log").read_text())
    assert "no Redis URL" in out


@pytest.mark.parametrize(("argv", "message"), [
    (["replay", "--quiet", "--page", "0"], "--page must be in 1..100000, not 0"),  # hung
    (["replay", "--quiet", "--page", "-5"], "--page must be in 1..100000, not -5"),
    (["replay", "--quiet", "--page", "100001"], "--page must be in 1..100000"),
    (["projections", "run", "--page", "0"], "--page must be in 1..100000"),  # applied nothing
    (["projections", "run", "--poll", "-1"], "--poll must be in 0.001..3600 seconds"),
    (["projections", "run", "--poll", "0"], "--poll must be in 0.001..3600 seconds"),
    (["projections", "run", "--poll", "nan"], "--poll must be in 0.001..3600 seconds, not nan"),
    (["projections", "run", "--batch", "-1"], "--batch must be in 0..3600 seconds"),
    (["projections", "run", "--batch", "inf"], "--batch must be in 0..3600 seconds, not inf"),
])
def test_a_numeric_flag_out_of_range_exits_2_in_one_line(
    tmp_path: Path, argv: list[str], message: str
) -> None:
    """``replay --page 0`` never ended and ``projections run --page 0`` never applied an
    event (a page of nothing); a poll of -1 or NaN asked the database in a busy loop."""
    store = Store(StoreConfig(data_dir=tmp_path))
    try:
        store.save(Document.create("T", "", "ann").collect_events())
    finally:
        store.close()
    env = {k: v for k, v in os.environ.items() if not k.startswith("COSCRIBE_")}
    run = subprocess.run([sys.executable, "-m", "ops.projections_cli", *argv, "--data-dir",
                          str(tmp_path)], env=env, capture_output=True, text=True, timeout=30)
    assert run.returncode == 2, run.stderr
    assert run.stderr.strip().splitlines() == [run.stderr.strip()] and message in run.stderr
    assert run.stdout == ""


def test_the_bounds_of_the_numeric_flags_are_accepted(tmp_path: Path) -> None:
    """``--page 1``, ``--poll 0.001`` and ``--batch 0`` run and apply every event."""
    from gateway.readmodels import read_db_config
    from projections.db import open_db
    from projections.registry import MODELS

    store = Store(StoreConfig(data_dir=tmp_path))
    try:
        for title in ("a", "b"):
            store.save(Document.create(title, "", "ann").collect_events())
    finally:
        store.close()
    db = open_db(read_db_config(StoreConfig(data_dir=tmp_path)))

    def applied_both() -> bool:
        try:
            rows = db.query("SELECT position FROM rm_tracking")
        except Exception:  # not created yet
            return False
        return len(rows) == len(MODELS) and all(int(r["position"]) == 2 for r in rows)

    try:
        _run_until(["--data-dir", str(tmp_path), "--page", "1", "--poll", "0.001",
                    "--batch", "0"], tmp_path / "run.log", applied_both)
    finally:
        db.close()


@pytest.mark.postgres
def test_serve_workers_make_the_store_their_runner_follows(
    tmp_path: Path, pg_schema: str, redis_url: str, redis_prefix: str
) -> None:
    """``serve --workers 2`` on a fresh schema: its ``projections run`` process, which no
    longer makes a store, starts after the parent made it and applies the first event."""
    import json
    import urllib.request

    from gateway.auth import sign_token

    server = ServerProcess(tmp_path / "data", workers="2", database_url=PG_URL,
                           database_schema=pg_schema, redis_url=redis_url,
                           redis_prefix=redis_prefix, projections="inline").start(60)
    try:
        token = sign_token(TEST_SECRET.encode(), "ann")
        request = urllib.request.Request(
            server.url + "/v1/documents", data=json.dumps({"title": "T"}).encode(),
            headers={"Authorization": f"Bearer {token}"}, method="POST")
        with urllib.request.urlopen(request, timeout=10) as answer:
            assert answer.status in (200, 201)
        query = sql.SQL("SELECT min(position) FROM {}.rm_tracking").format(
            sql.Identifier(pg_schema))
        deadline = time.monotonic() + 30
        position = 0
        while position < 1:
            assert server.proc is not None and server.proc.poll() is None, \
                server.log_path.read_text()
            assert time.monotonic() < deadline, server.log_path.read_text()
            time.sleep(0.1)
            with psycopg.connect(PG_URL, autocommit=True) as conn:
                try:
                    row = conn.execute(query).fetchone()
                except psycopg.errors.UndefinedTable:
                    continue
            position = int(row[0] or 0) if row else 0
    finally:
        server.stop()
    assert server.proc.returncode == 0, server.log_path.read_text()


@pytest.mark.parametrize(("sig", "code", "how"), [(signal.SIGTERM, 143, "terminated"),
                                                (signal.SIGINT, 130, "interrupted")])
def test_replay_stopped_by_a_signal_drops_its_fresh_tables(
    tmp_path: Path, sig: int, code: int, how: str
) -> None:
    """SIGTERM (a service manager's stop) killed a replay without its clean-up: its
    rm_*__next tables and tracking rows stayed, as after a SIGKILL. Now it cleans up as on
    Ctrl-C, says so in one line and exits 143 (130 for Ctrl-C). Both stop it between two
    pages: raised at once, inside the driver or the swap, they left tables too."""
    import sqlite3

    store = Store(StoreConfig(data_dir=tmp_path))
    try:
        for n in range(40):
            doc = Document.create(f"doc {n}", "", "ann")
            for i in range(50):
                doc.edit([i, "x"] if i else ["x"], "ann")
            store.save(doc.collect_events())
    finally:
        store.close()
    env = {k: v for k, v in os.environ.items() if not k.startswith("COSCRIBE_")}
    proc = subprocess.Popen(
        [sys.executable, "-m", "ops.projections_cli", "replay", "--quiet", "--page", "1",
         "--data-dir", str(tmp_path)], env=env, stderr=subprocess.PIPE, text=True)
    readmodels = tmp_path / "readmodels.sqlite"

    def leftovers() -> set[str]:
        if not readmodels.exists():
            return set()
        with contextlib.closing(sqlite3.connect(readmodels, timeout=10)) as conn:
            rows = conn.execute("SELECT name FROM sqlite_master WHERE type = 'table'")
            return {name for (name,) in rows if name.endswith("__next")}

    deadline = time.monotonic() + 30
    while not leftovers():  # the rebuild is under way
        assert proc.poll() is None and time.monotonic() < deadline, proc.stderr
        time.sleep(0.05)
    proc.send_signal(sig)
    _, err = proc.communicate(timeout=30)
    assert proc.returncode == code, err
    assert err.strip().splitlines() == [
        f"coscribe replay: {how}; its unfinished rebuild was dropped (the live read "
        "models are untouched)"]
    assert leftovers() == set()
