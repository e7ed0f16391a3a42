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
