"""``coscribe projections run`` raises the gateways' cache generations under their prefix."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
import redis

from domain.document import Document
from gateway.store import Store, StoreConfig

pytestmark = [pytest.mark.redis]


@pytest.fixture
def keys(redis_url: str, redis_prefix: str) -> Iterator[redis.Redis]:
    """A Redis client; the test's keys are deleted afterwards."""
    client = redis.Redis.from_url(redis_url)
    try:
        yield client
    finally:
        found = list(client.scan_iter(f"{redis_prefix}*"))
        if found:
            client.delete(*found)
        client.close()


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
    tmp_path: Path, redis_url: str, redis_prefix: str, keys: redis.Redis
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
                     lambda: keys.get(generation) == b"1")
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
