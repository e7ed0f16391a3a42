"""Start-up failures of the commands are one line on stderr and an exit code, no traceback:
1 for a runtime failure of ``serve`` (port in use, database unreachable, a worker failed),
2 for no event store where a read-side command looks, 4 for an unreachable database."""

from __future__ import annotations

import argparse
import multiprocessing
import os
import signal
import socket
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import psycopg
import pytest

from ops import cli
from tests.conftest import PG_URL
from tests.procs import ServerProcess


def _closed_port() -> int:
    """A port nothing listens on (bound, then released)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@pytest.fixture
def held_port() -> Iterator[int]:
    """A port another socket listens on (without SO_REUSEPORT)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen()
        yield int(s.getsockname()[1])


def _serve(args: list[str], tmp_path: Path) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("COSCRIBE_")}
    return subprocess.run(
        [sys.executable, "-m", "ops.cli", "serve", "--data-dir", str(tmp_path / "data"), *args],
        env=env, capture_output=True, text=True, timeout=60,
    )


def _one_line(err: str) -> str:
    assert "Traceback" not in err, err
    lines = [line for line in err.splitlines() if line.startswith("coscribe")]
    assert lines, err
    return lines[0]


def test_serve_on_a_port_in_use_exits_1_naming_the_port(tmp_path: Path, held_port: int) -> None:
    """OSError 98 was a traceback; now the port and the cause, exit 1, no "serving on"."""
    run = _serve(["--port", str(held_port)], tmp_path)
    assert run.returncode == 1
    assert f":{held_port}: the port is in use" in _one_line(run.stderr)
    assert "serving on" not in run.stdout


@pytest.mark.redis
def test_serve_workers_exit_non_zero_when_they_fail_at_start(
    tmp_path: Path, held_port: int, redis_url: str, redis_prefix: str
) -> None:
    """Every worker dying at start made the parent exit 0 after "serving on ... workers"."""
    run = _serve(["--port", str(held_port), "--workers", "2", "--projections", "off",
                  "--redis-url", redis_url, "--redis-prefix", redis_prefix], tmp_path)
    assert run.returncode == 1
    assert "the port is in use" in _one_line(run.stderr)
    assert "serving on" not in run.stdout


@pytest.mark.redis
def test_serve_workers_share_no_port_with_another_program_using_reuseport(
    tmp_path: Path, redis_url: str, redis_prefix: str
) -> None:
    """Another program listening with SO_REUSEPORT (nginx's ``reuseport``) let the workers
    bind beside it, and the kernel split the connections; now exit 1, the port in use."""
    with socket.socket() as holder:
        holder.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
        holder.bind(("127.0.0.1", 0))
        holder.listen()
        port = int(holder.getsockname()[1])
        run = _serve(["--port", str(port), "--workers", "2", "--projections", "off",
                      "--redis-url", redis_url, "--redis-prefix", redis_prefix], tmp_path)
    assert run.returncode == 1, run.stdout
    assert f":{port}: the port is in use" in _one_line(run.stderr)
    assert "serving on" not in run.stdout


@pytest.mark.redis
@pytest.mark.parametrize(("first", "second"), [(2, 2), (1, 2), (2, 1)])
def test_a_second_serve_on_the_port_of_a_running_one_exits_1(
    tmp_path: Path, redis_url: str, redis_prefix: str, first: int, second: int
) -> None:
    """Two ``serve --workers 2`` on one port both served (their workers bind with
    SO_REUSEPORT) and the kernel split the connections between them: with another secret,
    a token got 401 or 200 at random. Now the second exits 1 with the port-in-use line,
    whichever kind comes first."""
    server = ServerProcess(tmp_path / "first", workers=str(first), redis_url=redis_url,
                           redis_prefix=redis_prefix, projections="off")
    server.start()
    env = {k: v for k, v in os.environ.items() if not k.startswith("COSCRIBE_")}
    proc = subprocess.Popen(
        [sys.executable, "-m", "ops.cli", "serve", "--port", str(server.port),
         "--workers", str(second), "--redis-url", redis_url, "--redis-prefix", redis_prefix,
         "--projections", "off", "--secret", "another", "--data-dir", str(tmp_path / "2nd")],
        env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        start_new_session=True)
    try:
        out, err = proc.communicate(timeout=20)
        assert proc.returncode == 1, (out, err)
        assert f"cannot listen on 127.0.0.1:{server.port}: the port is in use" in _one_line(err)
        assert "serving on" not in out
    finally:
        if proc.poll() is None:  # it served: its workers are in its process group
            os.killpg(proc.pid, signal.SIGKILL)
            proc.communicate()
        server.stop()
    assert server.proc is not None and server.proc.returncode == 0


@pytest.mark.parametrize("host", ["999.1.1.1", "example.invalid"])
@pytest.mark.parametrize("workers", [1, 2])
def test_serve_on_a_host_that_does_not_resolve_exits_1_in_one_line(
    tmp_path: Path, host: str, workers: int
) -> None:
    """An unresolvable ``--host`` was a 25-line socket.gaierror traceback."""
    run = _serve(["--host", host, "--port", str(_closed_port()), "--workers", str(workers),
                  "--redis-url", "redis://127.0.0.1:1/0"], tmp_path)
    assert run.returncode == 1
    assert run.stderr.count("\n") == 1, run.stderr
    assert (f"cannot listen on {host}:" in _one_line(run.stderr)
            and "does not resolve" in run.stderr)
    assert "serving on" not in run.stdout


def test_serve_with_an_unreachable_database_exits_1(tmp_path: Path) -> None:
    """A closed PostgreSQL port: one line naming the URL, exit 1 (with or without workers)."""
    url = f"postgresql://postgres:pw@127.0.0.1:{_closed_port()}/postgres"
    for extra in ([], ["--workers", "2", "--redis-url", "redis://127.0.0.1:1/0"]):
        run = _serve(["--port", str(_closed_port()), "--database-url", url, *extra], tmp_path)
        assert run.returncode == 1, run.stderr
        line = _one_line(run.stderr)
        assert "cannot open the event store at postgresql://postgres:***@" in line
        assert "pw" not in line


def test_serve_with_a_data_dir_that_is_a_file_exits_1_naming_it(tmp_path: Path) -> None:
    """The data dir as a plain file was a FileExistsError traceback."""
    plain = tmp_path / "afile"
    plain.write_text("")
    run = _serve(["--port", str(_closed_port()), "--data-dir", str(plain)], tmp_path)
    assert run.returncode == 1
    assert str(plain) in _one_line(run.stderr)


@pytest.mark.parametrize("command", [["audit", "verify"], ["replay", "--quiet"],
                                     ["projections", "run"]])
def test_read_side_commands_exit_4_when_the_database_is_unreachable(
    capsys: pytest.CaptureFixture[str], command: list[str]
) -> None:
    """Exit 1 is ``audit verify``'s broken chain; an unreachable database is 4, one line."""
    url = f"postgresql://postgres@127.0.0.1:{_closed_port()}/postgres"
    assert cli.main([*command, "--database-url", url]) == 4
    assert "database unreachable" in _one_line(capsys.readouterr().err)


@pytest.mark.parametrize("command", [["audit", "verify"], ["replay", "--quiet"],
                                     ["audit", "show", str(uuid.uuid4())]])
def test_read_only_commands_make_no_store_in_a_mistyped_data_dir(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], command: list[str]
) -> None:
    """``audit verify --data-dir typo`` made an empty store and said "ok: 0 documents"."""
    typo = tmp_path / "typo"
    with pytest.raises(SystemExit) as stop:
        cli.main([*command, "--data-dir", str(typo)])
    assert stop.value.code == 2
    assert f"no event store at {typo / 'events.sqlite'}" in _one_line(capsys.readouterr().err)
    assert not typo.exists()


@pytest.mark.postgres
@pytest.mark.parametrize("command", [["audit", "verify"], ["replay", "--quiet"]])
def test_read_only_commands_make_no_schema_for_a_mistyped_one(
    capsys: pytest.CaptureFixture[str], command: list[str]
) -> None:
    """``--database-schema typo`` made the schema and its tables; now nothing, exit 2."""
    schema = f"fixc_typo_{uuid.uuid4().hex[:8]}"
    try:
        with pytest.raises(SystemExit) as stop:
            cli.main([*command, "--database-url", PG_URL, "--database-schema", schema])
        assert stop.value.code == 2
        assert f"(schema {schema})" in _one_line(capsys.readouterr().err)
        assert not _schema_exists(schema)
    finally:
        _drop_schema(schema)


def _schema_exists(schema: str) -> bool:
    with psycopg.connect(PG_URL) as conn:
        return conn.execute("SELECT 1 FROM information_schema.schemata WHERE schema_name = %s",
                            (schema,)).fetchone() is not None


def _drop_schema(schema: str) -> None:
    with psycopg.connect(PG_URL, autocommit=True) as conn:
        conn.execute(f'DROP SCHEMA IF EXISTS "{schema}" CASCADE')


def _projections_run(args: list[str]) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("COSCRIBE_")}
    return subprocess.run([sys.executable, "-m", "ops.cli", "projections", "run", *args],
                          env=env, capture_output=True, text=True, timeout=30)


def test_projections_run_makes_no_store_in_a_mistyped_data_dir(tmp_path: Path) -> None:
    """It made an empty store there and followed it for good; now exit 2, one line saying
    where it looked and that the gateway makes the store, and nothing made."""
    typo = tmp_path / "typo"
    run = _projections_run(["--data-dir", str(typo)])
    assert run.returncode == 2, run.stderr
    assert run.stderr.strip().splitlines() == [_one_line(run.stderr)]
    assert f"no event store at {typo / 'events.sqlite'}" in run.stderr
    assert "the gateway (coscribe serve) creates it" in run.stderr
    assert not typo.exists() and run.stdout == ""


@pytest.mark.postgres
def test_projections_run_makes_no_schema_for_a_mistyped_one() -> None:
    """``--database-schema typo`` got the schema, the event table and the read models made."""
    schema = f"fixc_typo_{uuid.uuid4().hex[:8]}"
    try:
        run = _projections_run(["--database-url", PG_URL, "--database-schema", schema])
        assert run.returncode == 2, run.stderr
        assert f"(schema {schema}): the gateway (coscribe serve)" in _one_line(run.stderr)
        assert not _schema_exists(schema)
    finally:
        _drop_schema(schema)


def _deaf() -> None:
    """A child that ignores SIGTERM (as a stuck one would) and sleeps."""
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    time.sleep(60)


def test_serve_kills_a_process_that_does_not_stop_within_the_grace(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """Once stopping, ``serve --workers`` waits ``STOP_GRACE`` for its processes, then kills
    the one still running and says so (it used to wait on a stuck runner for good)."""
    monkeypatch.setattr(cli, "STOP_GRACE", 0.5)
    child = multiprocessing.get_context("spawn").Process(target=_deaf, name="deaf")
    child.start()
    try:
        time.sleep(0.5)  # its handler is set
        child.terminate()
        started = time.monotonic()
        cli._join([child], lambda: True)
        assert time.monotonic() - started < 5
        assert child.exitcode == -signal.SIGKILL
        assert "deaf did not stop within 0.5 s; killed" in capsys.readouterr().err
    finally:
        if child.is_alive():
            child.kill()
            child.join()


def test_a_stop_requested_by_a_signal_ends_the_wait_at_once() -> None:
    """``projections run`` waits on a flag its signal handler sets (an Event's set() from a
    handler could deadlock on the lock the waiting thread holds)."""
    from ops.projections_cli import Stop

    stop = Stop()
    previous = signal.signal(signal.SIGUSR1, stop.handle)
    try:
        timer = threading.Timer(0.2, os.kill, (os.getpid(), signal.SIGUSR1))
        timer.start()
        started = time.monotonic()
        stop.wait(30)
        assert stop.is_set() and time.monotonic() - started < 2
        timer.join()
    finally:
        signal.signal(signal.SIGUSR1, previous)


@pytest.mark.parametrize("workers", [1, 2])
def test_a_second_signal_during_the_stop_does_not_break_it_off(
    tmp_path: Path, workers: int, redis_url: str, redis_prefix: str
) -> None:
    """SIGTERM to the whole process group (what systemd sends), so that a worker gets its
    parent's SIGTERM too, or a second Ctrl-C: every process stops and the exit is 0 (a
    second signal broke off aiohttp's graceful stop, and the process exited 1)."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("COSCRIBE_")}
    args = ["--port", str(_closed_port()), "--data-dir", str(tmp_path / "data")]
    if workers > 1:
        args += ["--workers", str(workers), "--redis-url", redis_url,
                 "--redis-prefix", redis_prefix, "--projections", "off"]
    proc = subprocess.Popen([sys.executable, "-m", "ops.cli", "serve", *args], env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            start_new_session=True)
    try:
        assert proc.stdout is not None and proc.stderr is not None
        line = proc.stdout.readline()
        assert "serving on" in line, (line, proc.poll(), proc.stderr.read())
        for _ in range(3):
            os.killpg(proc.pid, signal.SIGTERM)
            time.sleep(0.02)
        assert proc.wait(timeout=40) == 0, proc.stderr.read() if proc.stderr else ""
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
        proc.communicate()


def test_a_host_that_is_not_this_machines_names_the_host(tmp_path: Path) -> None:
    """EADDRNOTAVAIL said "the port is not an address of this machine"; it is the host."""
    run = _serve(["--host", "192.0.2.1", "--port", "19999"], tmp_path)  # TEST-NET-1
    assert run.returncode == 1
    assert "192.0.2.1:19999: the host is not an address of this machine" in _one_line(run.stderr)


def test_ctrl_c_before_a_command_handles_it_is_one_line_and_130(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """Ctrl-C in the first half second of ``serve`` (imports, before its handlers) was a
    KeyboardInterrupt traceback."""
    def interrupted(args: object) -> int:
        raise KeyboardInterrupt

    monkeypatch.setattr(cli, "dispatch", interrupted)
    assert cli.main(["token", "alice"]) == 130
    assert capsys.readouterr().err == "coscribe token: interrupted\n"


def test_a_read_side_command_waits_for_the_writer_of_the_sqlite_store(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """Opening the store read before it wrote, in a deferred transaction: while the server
    held the write lock, ``audit verify`` failed at once with "database is locked" (exit 4)
    instead of waiting out the busy timeout."""
    import sqlite3

    from domain.document import Document
    from gateway.store import Store, StoreConfig

    store = Store(StoreConfig(data_dir=tmp_path))
    try:
        store.save(Document.create("T", "", "ann").collect_events())
    finally:
        store.close()
    writer = sqlite3.connect(tmp_path / "events.sqlite", isolation_level=None,
                             check_same_thread=False)
    writer.execute("BEGIN IMMEDIATE")  # what a commit of the server holds
    release = threading.Timer(0.5, writer.commit)
    release.start()
    try:
        assert cli.main(["audit", "verify", "--data-dir", str(tmp_path)]) == 0
    finally:
        release.join()
        writer.close()
    assert "ok: 1 documents" in capsys.readouterr().out


def test_a_store_still_locked_after_the_busy_timeout_says_locked(
    capsys: pytest.CaptureFixture[str]
) -> None:
    """SQLite's "database is locked" past the busy timeout was "database unreachable"."""
    from eventsourcing.persistence import OperationalError

    from ops.projections_cli import _store_errors

    def command(args: object) -> int:
        raise OperationalError("database is locked")

    assert _store_errors(command)(argparse.Namespace()) == 4
    line = _one_line(capsys.readouterr().err)
    assert line.startswith("coscribe: database locked: database is locked") and "10 s" in line


@pytest.mark.parametrize("command", [["replay", "--quiet"], ["projections", "run"]])
def test_a_read_model_database_that_fails_is_exit_4_in_one_line(
    tmp_path: Path, command: list[str]
) -> None:
    """A read-model database that cannot be opened (here readmodels.sqlite a directory; on
    PostgreSQL "too many clients") was a ReadDBError traceback and exit 1."""
    from domain.document import Document
    from gateway.store import Store, StoreConfig

    store = Store(StoreConfig(data_dir=tmp_path))
    try:
        store.save(Document.create("T", "", "ann").collect_events())
    finally:
        store.close()
    (tmp_path / "readmodels.sqlite").mkdir()
    env = {k: v for k, v in os.environ.items() if not k.startswith("COSCRIBE_")}
    run = subprocess.run([sys.executable, "-m", "ops.projections_cli", *command, "--data-dir",
                          str(tmp_path)], env=env, capture_output=True, text=True, timeout=60)
    assert run.returncode == 4, run.stderr
    assert ("coscribe: read-model database failed: unable to open database file"
            in _one_line(run.stderr))
