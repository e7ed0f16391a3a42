"""``coscribe projections run`` killed mid-stream resumes with nothing doubled or missed."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from gateway.readmodels import read_db_config
from gateway.store import Store, StoreConfig
from projections.db import open_db
from projections.registry import MODELS
from projections.runner import Runner
from tests.test_projections_support import audit_positions, dump, make_history, source


def _start(cfg: StoreConfig, log: Path) -> subprocess.Popen[bytes]:
    args = [sys.executable, "-m", "ops.projections_cli", "projections", "run", "--page", "5",
            "--poll", "0.01", "--data-dir", str(cfg.data_dir), "--log-level", "warning"]
    if cfg.database_url:
        args += ["--database-url", cfg.database_url, "--database-schema",
                 str(cfg.database_schema)]
    env = {k: v for k, v in os.environ.items() if not k.startswith("COSCRIBE_")}
    with log.open("ab") as out:  # the child keeps its own copy of the descriptor
        return subprocess.Popen(args, env=env, stdout=out, stderr=subprocess.STDOUT,
                                start_new_session=True)


def _tracking(db: object, names: list[str]) -> dict[str, int]:
    from projections.db import ReadDB

    assert isinstance(db, ReadDB)
    try:
        rows = db.query("SELECT name, position FROM rm_tracking")
    except Exception:  # not created yet
        return {}
    return {r["name"]: int(r["position"]) for r in rows if r["name"] in names}


@pytest.mark.slow
def test_killed_runner_resumes_without_doubling_or_missing(store_config: StoreConfig) -> None:
    """SIGKILL mid-stream leaves whole pages only; a restart finishes exactly once."""
    store = Store(store_config)
    db = open_db(read_db_config(store_config))
    names = [m.name for m in MODELS]
    log = store_config.data_dir / "projections.log"
    try:
        head = make_history(store, docs=20, edits=2500, chunk=100)
        proc = _start(store_config, log)
        try:
            deadline = time.monotonic() + 60
            while time.monotonic() < deadline:
                pos = _tracking(db, names)
                if pos and min(pos.values()) > 200:
                    break
                assert proc.poll() is None, log.read_text()
                time.sleep(0.005)
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(10)
        finally:
            if proc.poll() is None:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait(10)
        killed_at = _tracking(db, names)
        assert min(killed_at.values()) > 0 and max(killed_at.values()) < head, killed_at
        # Whatever was committed is whole: the audit rows are exactly 1..its position.
        assert audit_positions(db) == list(range(1, killed_at["audit"] + 1))

        proc = _start(store_config, log)
        try:
            deadline = time.monotonic() + 60
            while min(_tracking(db, names).values()) < head:
                assert time.monotonic() < deadline, "restarted runner did not catch up"
                assert proc.poll() is None, log.read_text()
                time.sleep(0.02)
        finally:
            os.killpg(proc.pid, signal.SIGTERM)
            proc.wait(20)
        assert proc.returncode == 0, log.read_text()
        assert audit_positions(db) == list(range(1, head + 1))
        for model in MODELS:
            fresh = Runner(db, source(store), [model], suffix="__check")
            fresh.setup()
            fresh.catch_up()
            assert dump(db, model, "__check") == dump(db, model), model.name
    finally:
        db.close()
        store.close()
