"""``serve --workers`` supervises its processes: a gateway worker or the projection runner
that dies while the server is not stopping is started again, with one line on stderr; one
that keeps dying soon after its start makes the parent give up and exit 1, for the service
manager to restart the lot. Real processes, killed with SIGKILL."""

from __future__ import annotations

import json
import multiprocessing
import os
import signal
import sys
import time
import urllib.request
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from gateway.auth import sign_token
from ops import cli
from ops.loadtest.procstat import all_pids, cmdline, listening_pids, read
from tests.procs import TEST_SECRET, ServerProcess

pytestmark = pytest.mark.redis


@pytest.fixture
def group(tmp_path: Path, redis_url: str, redis_prefix: str) -> Iterator[ServerProcess]:
    """``serve --workers 2`` with its projection runner, on SQLite; stopped after."""
    server = ServerProcess(tmp_path / "data", workers="2", redis_url=redis_url,
                           redis_prefix=redis_prefix)
    server.start()  # /healthz answers once one worker listens
    _until(lambda: "coscribe serving on" in (log := _log(server))
           and "projections running from position" in log)
    try:
        yield server
    finally:
        server.stop()


def _until(what: Callable[[], object], timeout: float = 20.0) -> object:
    """``what()`` once it is truthy (polled), else fail."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if found := what():
            return found
        time.sleep(0.05)
    raise AssertionError(f"not within {timeout:g} s: the condition on line "
                         f"{what.__code__.co_firstlineno}")


def _runners(server: ServerProcess, workers: set[int] | None = None) -> set[int]:
    """The pids of the group's projection runner (a killed one until it is reaped): its
    children that are ``spawn`` processes and not ``workers`` (default: those listening)."""
    assert server.proc is not None
    if workers is None:
        workers = listening_pids(server.port)
    return {pid for pid in all_pids()
            if (st := read(pid)) is not None and st.ppid == server.proc.pid
            and pid not in workers and any("spawn_main" in arg for arg in cmdline(pid))}


def _log(server: ServerProcess) -> str:
    return server.log_path.read_text()


def _request(server: ServerProcess, path: str, body: object = None) -> tuple[int, dict[str, str]]:
    token = sign_token(TEST_SECRET.encode(), "sup")
    req = urllib.request.Request(server.url + path, headers={"Authorization": f"Bearer {token}"},
                                 data=None if body is None else json.dumps(body).encode())
    with urllib.request.urlopen(req, timeout=10) as r:
        return r.status, dict(r.headers)


def test_killed_gateway_workers_are_restarted_and_the_port_serves_again(
    group: ServerProcess,
) -> None:
    """Both workers killed: nothing listened and the parent waited for good on the runner
    (systemd's Restart= never came into play); now each is started again and said so."""
    killed = listening_pids(group.port)
    assert len(killed) == 2
    for pid in killed:
        os.kill(pid, signal.SIGKILL)
    _until(lambda: len(listening_pids(group.port) - killed) == 2)
    assert _request(group, "/healthz")[0] == 200
    log = _log(group)
    for pid in killed:
        assert f"(pid {pid}) was killed by SIGKILL; restarted" in log, log
    assert "coscribe-worker-0 (pid" in log and "coscribe-worker-1 (pid" in log
    group.stop()
    assert group.proc is not None and group.proc.returncode == 0, _log(group)


def test_a_killed_projection_runner_is_restarted(group: ServerProcess) -> None:
    """The runner killed: nothing was said, the read models froze and every read waited
    2 s for them (X-Projection-Lag); now it is started again and follows the log."""
    runners = _until(lambda: _runners(group))
    assert isinstance(runners, set) and len(runners) == 1
    pid = runners.pop()
    os.kill(pid, signal.SIGKILL)
    _until(lambda: f"coscribe-projections (pid {pid}) was killed by SIGKILL; restarted"
           in _log(group))
    _until(lambda: _log(group).count("projections running from position") == 2)
    assert _request(group, "/v1/documents", {"title": "after the kill"})[0] == 201
    status, headers = _request(group, "/v1/documents")
    assert status == 200 and "X-Projection-Lag" not in headers, headers
    group.stop()
    assert group.proc is not None and group.proc.returncode == 0, _log(group)


def test_a_runner_that_keeps_dying_at_start_stops_the_group_with_exit_1(
    group: ServerProcess,
) -> None:
    """Killed again each time it is started, the runner ends within ``CRASH_WINDOW`` of its
    start ``CRASH_LIMIT`` times in a row: the parent gives up with one line, stops the
    workers and exits 1."""
    assert group.proc is not None
    workers = listening_pids(group.port)  # they stop listening once the parent gives up
    killed: set[int] = set()
    deadline = time.monotonic() + 60
    while group.proc.poll() is None and "giving up" not in _log(group):
        assert time.monotonic() < deadline, _log(group)
        for pid in _runners(group, workers) - killed:
            os.kill(pid, signal.SIGKILL)
            killed.add(pid)
        time.sleep(0.02)
    assert group.proc.wait(20) == 1, _log(group)
    log = _log(group)
    # The first may have lived longer than the window (a slow start of the group).
    assert len(killed) in (cli.CRASH_LIMIT, cli.CRASH_LIMIT + 1)
    assert log.count("coscribe-projections (pid") == len(killed) - 1
    assert (f"coscribe serve: coscribe-projections was killed by SIGKILL, and ended within "
            f"{cli.CRASH_WINDOW:g} s of its start {cli.CRASH_LIMIT} times in a row; "
            f"giving up") in log
    assert "Traceback" not in log
    assert not listening_pids(group.port)


def test_the_crash_loop_guard_counts_quick_ends_in_a_row() -> None:
    """A fake clock: three ends within the window in a row give up; one after a longer
    life starts the count again."""
    guard = cli.CrashLoop(limit=3, window=10.0)
    for start, end, gives_up in [(0, 1, False), (1, 2, False), (2, 30, False),  # lived 28 s
                                 (30, 31, False), (31, 39, False), (39, 48.9, True)]:
        guard.started(start)
        assert guard.ended(end) is gives_up, (start, end)


def test_supervise_gives_up_on_a_child_that_ends_at_once(
    capsys: pytest.CaptureFixture[str],
) -> None:
    """A real child that exits 3 as soon as it starts: started again ``CRASH_LIMIT - 1``
    times with a line each, then the reason is returned (``serve`` prints it and exits 1)."""
    ctx = multiprocessing.get_context("spawn")
    child = cli._Child(ctx, "doomed", sys.exit, (3,), (3,))
    child.start()
    started = time.monotonic()
    reason = cli._supervise([child], lambda: False)
    assert time.monotonic() - started < 20
    assert reason == (f"doomed exited with code 3, and ended within {cli.CRASH_WINDOW:g} s of "
                      f"its start {cli.CRASH_LIMIT} times in a row; giving up")
    err = capsys.readouterr().err
    assert err.count("exited with code 3; restarted") == cli.CRASH_LIMIT - 1, err


def test_supervise_restarts_nothing_once_stopping() -> None:
    """A child that ends once the server is stopping is not started again."""
    ctx = multiprocessing.get_context("spawn")
    child = cli._Child(ctx, "last", sys.exit, (0,), (0,))
    child.start()
    first = child.proc
    child.proc.join(20)
    assert cli._supervise([child], lambda: True) is None
    assert child.proc is first


def test_the_children_stop_when_the_parent_is_killed(group: ServerProcess) -> None:
    """The parent killed with SIGKILL (outside a service manager that kills the group): its
    workers and runner went on serving, orphaned, and a new group could share their port.
    Now each gets SIGTERM from the kernel and stops; the port is free, and nothing warns of
    leaked semaphores."""
    assert group.proc is not None
    workers = listening_pids(group.port)
    children = workers | _runners(group, workers)
    assert len(children) == 3
    group.proc.kill()
    group.proc.wait(10)
    try:
        _until(lambda: all(read(pid) is None for pid in children), timeout=40)
        assert not listening_pids(group.port)
        time.sleep(0.5)  # the resource tracker cleans up (and warned) once the parent is gone
        assert "leaked semaphore" not in group.log_path.read_text()  # a Queue's, before
    finally:
        for pid in children:  # orphans, if the kernel did not stop them: ours to end
            if read(pid) is not None:
                os.kill(pid, signal.SIGKILL)


def _exit_with_sigint_disposition() -> None:
    sys.exit(3 if signal.getsignal(signal.SIGINT) is signal.SIG_IGN else 4)


def test_children_start_with_sigint_ignored_and_the_parent_keeps_its_handler() -> None:
    """A Ctrl-C to the process group while the children imported printed a KeyboardInterrupt
    traceback from each; they now start with SIGINT ignored (their own handlers come with
    their servers), and the parent's handler is as it was."""
    ctx = multiprocessing.get_context("spawn")
    before = signal.getsignal(signal.SIGINT)
    child = cli._Child(ctx, "probe", _exit_with_sigint_disposition, (), ())
    child.start()
    child.proc.join(30)
    assert child.proc.exitcode == 3
    assert signal.getsignal(signal.SIGINT) is before
