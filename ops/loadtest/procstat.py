"""CPU seconds and resident memory of other processes, read from ``/proc`` (Linux).

The server's cost is measured from outside: the ``coscribe serve`` processes (the ones given,
or the ones listening on the URL's port, or any ``coscribe serve``) with their descendants,
plus the database processes that work *for them*. Other programs using the same PostgreSQL
or Redis (test suites, other servers) are left out:

- a PostgreSQL backend counts when the client port in its process title (``postgres: user db
  127.0.0.1(PORT) ...``) is the local port of one of the gateway's TCP connections;
  backends of other clients (and ``[local]`` ones) do not. Once any backend counts, the
  cluster's shared processes (postmaster, WAL writer, checkpointer, autovacuum...) count too,
  whole: they serve every client of the cluster, and cannot be split among them;
- ``redis-server`` counts when the gateway holds a TCP connection to its port, whole (one
  process serves every client: other programs' commands in the window count too).

So an embedded (SQLite) server costs only its own processes. A server that reaches
PostgreSQL over a Unix socket is under-counted (its backends are ``[local]``).

Accounting (:class:`CpuAccount`): each gateway or load process contributes its own ``utime
+ stime`` plus its reaped children's ``cutime + cstime`` over the window; a database process
only its own (the postmaster reaps every backend of the cluster, whoever it served, so a
database process that exits counts up to its last sample). A tracked process that exits
during the window and is reaped by a tracked parent shows up again in the parent's children's
time, for its whole life; it then contributes minus what it had used before the window, so
the window is counted once. A process first seen after the window opened counts from zero if
it was born after that, else from when it was first seen. Memory is the sum of PSS
(``/proc/PID/smaps_rollup``: shared pages such as PostgreSQL's shared buffers split among
the processes using them, so the sum is the memory really used) over the tracked processes
at each sample, or of ``VmRSS`` where PSS cannot be read; the plain VmRSS sum, which counts
shared pages once per process, is kept too.
"""

from __future__ import annotations

import os
import re
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path

PROC = Path("/proc")
_TICK = os.sysconf("SC_CLK_TCK") if hasattr(os, "sysconf") else 100
_PAGE = os.sysconf("SC_PAGE_SIZE") if hasattr(os, "sysconf") else 4096
DATABASE_COMMS = {"postgres": "postgres", "postmaster": "postgres", "redis-server": "redis"}
DATABASE_GROUPS = frozenset(DATABASE_COMMS.values())
"""Process names (``comm``) that may be the server's databases, and their group."""
_PG_CLIENT = re.compile(r"\((\d+)\)")
RECLASSIFY_EVERY = 40
"""Scans between two full classifications of the database processes."""
PSS_EVERY = 3
"""Scans between two PSS readings of one process (VmRSS is read at every scan)."""
_REDIS_PORT = re.compile(r":(\d+)$")


@dataclass(frozen=True, slots=True)
class ProcStat:
    """One reading of one process (times in clock ticks)."""

    pid: int
    ppid: int
    comm: str
    start: int
    self_ticks: int
    child_ticks: int
    rss_bytes: int

    @property
    def key(self) -> tuple[int, int]:
        """Identifies the process across pid reuse."""
        return (self.pid, self.start)


def read(pid: int) -> ProcStat | None:
    """Read ``/proc/PID``; None if the process is gone or unreadable."""
    base = f"{PROC}/{pid}/"  # plain strings: this runs for every process every second
    try:
        with open(base + "stat", encoding="utf-8", errors="replace") as f:
            raw = f.read()
        with open(base + "statm", encoding="ascii") as f:
            statm = f.read().split()
    except (OSError, ValueError):
        return None
    lpar, rpar = raw.find("("), raw.rfind(")")
    f = raw[rpar + 2 :].split()
    # After "pid (comm) ": state ppid pgrp session tty tpgid flags minflt cminflt majflt
    # cmajflt utime stime cutime cstime priority nice threads itrealvalue starttime ...
    return ProcStat(
        pid=pid,
        ppid=int(f[1]),
        comm=raw[lpar + 1 : rpar],
        start=int(f[19]),
        self_ticks=int(f[11]) + int(f[12]),
        child_ticks=int(f[13]) + int(f[14]),
        rss_bytes=int(statm[1]) * _PAGE if len(statm) > 1 else 0,
    )


def pss_bytes(pid: int) -> int | None:
    """The process's proportional set size (``smaps_rollup``); None when unreadable."""
    try:
        with (PROC / str(pid) / "smaps_rollup").open() as f:
            for line in f:
                if line.startswith("Pss:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        return None
    return None


def all_pids() -> list[int]:
    """Every pid currently in ``/proc``."""
    return [int(p.name) for p in PROC.iterdir() if p.name.isdigit()]


def cmdline(pid: int) -> list[str]:
    """The process's argv (empty if unreadable)."""
    try:
        raw = (PROC / str(pid) / "cmdline").read_bytes()
    except OSError:
        return []
    return [a.decode("utf-8", "replace") for a in raw.split(b"\0") if a]


def is_coscribe_serve(argv: list[str]) -> bool:
    """True for ``coscribe serve ...`` however it was started (script, ``-m ops.cli``)."""
    for i, arg in enumerate(argv):
        name = os.path.basename(arg)
        if name == "coscribe" or arg == "ops.cli" or name == "cli.py":
            return "serve" in argv[i + 1 :]
    return False


def listening_pids(port: int) -> set[int]:
    """The pids holding a listening TCP socket on ``port`` (IPv4 or IPv6)."""
    inodes = {i for i, (local, _) in _tcp_table(("0A",)).items() if local == port}
    if not inodes:
        return set()
    return {pid for pid in all_pids() if _socket_inodes(pid) & inodes}


def _tcp_table(states: tuple[str, ...]) -> dict[str, tuple[int, int]]:
    """Socket inode -> (local port, remote port) for TCP sockets in ``states`` (hex codes)."""
    out: dict[str, tuple[int, int]] = {}
    for table in ("tcp", "tcp6"):
        try:
            lines = (PROC / "net" / table).read_text().splitlines()[1:]
        except OSError:
            continue
        for line in lines:
            cols = line.split()
            if len(cols) > 9 and cols[3] in states:
                local = int(cols[1].rsplit(":", 1)[1], 16)
                remote = int(cols[2].rsplit(":", 1)[1], 16)
                out[cols[9]] = (local, remote)
    return out


def _socket_inodes(pid: int) -> set[str]:
    """Inodes of the sockets ``pid`` holds (empty if its fds are unreadable)."""
    out = set()
    try:
        fds = list((PROC / str(pid) / "fd").iterdir())
    except OSError:
        return out
    for fd in fds:
        try:
            link = os.readlink(fd)
        except OSError:
            continue
        if link.startswith("socket:["):
            out.add(link[8:-1])
    return out


def connection_ports(pids: Iterable[int]) -> tuple[set[int], set[int]]:
    """(local ports, remote ports) of the established TCP connections held by ``pids``."""
    table = _tcp_table(("01",))
    local: set[int] = set()
    remote: set[int] = set()
    for pid in pids:
        for inode in _socket_inodes(pid):
            ports = table.get(inode)
            if ports is not None:
                local.add(ports[0])
                remote.add(ports[1])
    return local, remote


def classify_database(st: ProcStat, local: set[int], remote: set[int]) -> str | None:
    """``st``'s group if it works for a gateway whose TCP ports are ``local``/``remote``.

    ``"postgres"``/``"redis"`` for a backend of the gateway's connections or the Redis it
    talks to, ``"shared"`` for a PostgreSQL process serving no one client (postmaster, WAL
    writer...), None for anything else.
    """
    group = DATABASE_COMMS.get(st.comm)
    if group is None:
        return None
    argv = cmdline(st.pid)
    if group == "redis":
        m = _REDIS_PORT.search(argv[1] if len(argv) > 1 else "")
        port = int(m.group(1)) if m else 6379
        if "--port" in argv[:-1]:
            port = int(argv[argv.index("--port") + 1])
        return group if port in remote else None
    title = " ".join(argv)
    m = _PG_CLIENT.search(title)
    if m is not None:
        return group if int(m.group(1)) in local else None
    return None if "[local]" in title else "shared"


def database_groups(stats: dict[int, ProcStat], gateway: set[int]) -> dict[int, str]:
    """The database processes working for the ``gateway`` pids, with their group."""
    if not gateway:
        return {}
    local, remote = connection_ports(gateway)
    return _with_shared({pid: classify_database(st, local, remote) for pid, st in stats.items()})


def _with_shared(classes: dict[int, str | None]) -> dict[int, str]:
    """The classified processes; the shared ones count (as postgres) once a backend does."""
    out = {pid: g for pid, g in classes.items() if g is not None and g != "shared"}
    if any(g == "postgres" for g in out.values()):
        out.update({pid: "postgres" for pid, g in classes.items() if g == "shared"})
    return out


def machine_busy_ticks() -> int:
    """Clock ticks all CPUs spent not idle since boot (``/proc/stat``, idle and iowait out)."""
    try:
        first = (PROC / "stat").read_text().split("\n", 1)[0].split()
    except OSError:
        return 0
    # cpu user nice system idle iowait irq softirq steal (guest time is inside user)
    values = [int(v) for v in first[1:9]]
    return sum(values) - values[3] - values[4]


def boot_ticks() -> int:
    """Clock ticks since boot (the unit of a process's start time)."""
    try:
        return int(float((PROC / "uptime").read_text().split()[0]) * _TICK)
    except (OSError, ValueError, IndexError):
        return 0


def find_servers(port: int | None) -> set[int]:
    """The ``coscribe serve`` processes: those on ``port`` and their coscribe parents, or all."""
    if port is not None:
        roots = listening_pids(port)
        for pid in list(roots):
            st = read(pid)
            while st is not None and st.ppid > 1 and is_coscribe_serve(cmdline(st.ppid)):
                roots.add(st.ppid)
                st = read(st.ppid)
        if roots:
            return roots
    return {pid for pid in all_pids() if is_coscribe_serve(cmdline(pid))}


def descendants(roots: Iterable[int], stats: dict[int, ProcStat]) -> set[int]:
    """``roots`` and every process below them, by the parent links in ``stats``."""
    children: dict[int, list[int]] = {}
    for st in stats.values():
        children.setdefault(st.ppid, []).append(st.pid)
    out: set[int] = set()
    todo = [r for r in roots if r in stats]
    while todo:
        pid = todo.pop()
        if pid not in out:
            out.add(pid)
            todo.extend(children.get(pid, ()))
    return out


@dataclass(slots=True)
class _Tracked:
    group: str
    first: ProcStat | None  # None: born during the window, started from zero
    last: ProcStat


@dataclass(slots=True)
class CpuAccount:
    """CPU time and peak memory of groups of processes over a window.

    ``roots`` maps a group name to pids whose whole process trees belong to it; with
    ``databases`` the PostgreSQL and Redis processes serving group ``gateway`` join as groups
    ``postgres``/``redis`` (see the module docstring).
    Call :meth:`sample` at the window start, periodically, and at the end; :meth:`begin`
    marks where the window opens and :meth:`cpu_seconds` reads the result.
    """

    roots: dict[str, set[int]]
    databases: bool = True
    tracked: dict[tuple[int, int], _Tracked] = field(default_factory=dict)
    started: bool = False
    peak_rss: dict[str, int] = field(default_factory=dict)
    peak_total_rss: int = 0
    pids: dict[str, set[int]] = field(default_factory=dict)
    alive: set[tuple[int, int]] = field(default_factory=set)
    rss_samples: list[dict[str, int]] = field(default_factory=list)
    vmrss_samples: list[dict[str, int]] = field(default_factory=list)
    begin_ticks: int = 0
    machine_first: int = 0
    machine_last: int = 0
    db_classes: dict[tuple[int, int], str | None] = field(default_factory=dict)
    """Database processes by key, classified once (see :func:`classify_database`)."""
    scans: int = 0
    pss_cache: dict[tuple[int, int], tuple[int | None, int]] = field(default_factory=dict)
    """Per process: (last PSS read, scan it was read at)."""

    def _scan(self) -> dict[tuple[int, int], tuple[str, ProcStat]]:
        stats = {pid: st for pid in all_pids() if (st := read(pid)) is not None}
        found: dict[tuple[int, int], tuple[str, ProcStat]] = {}
        for group, roots in self.roots.items():
            for pid in descendants(roots, stats):
                found.setdefault(stats[pid].key, (group, stats[pid]))  # first group wins
        if self.databases:
            gateway = {st.pid for g, st in found.values() if g == "gateway"}
            for pid, group in self._database_groups(stats, gateway).items():
                found.setdefault(stats[pid].key, (group, stats[pid]))
        self.scans += 1
        return found

    def _database_groups(self, stats: dict[int, ProcStat], gateway: set[int]) -> dict[int, str]:
        """:func:`database_groups`, reading the gateway's sockets only for new processes.

        A backend's client port is fixed when it is forked, after the connection is up, so
        one look decides it. Every ``RECLASSIFY_EVERY`` scans all are looked at again (a
        Redis the gateway connected to later, a pid reused).
        """
        if not gateway:
            return {}
        if self.scans % RECLASSIFY_EVERY == 0:
            self.db_classes.clear()
        classes = self.db_classes
        new = [st for st in stats.values() if st.comm in DATABASE_COMMS and st.key not in classes]
        if new:
            local, remote = connection_ports(gateway)  # the costly part: every socket
            for st in new:
                classes[st.key] = classify_database(st, local, remote)
        return _with_shared(
            {pid: classes[st.key] for pid, st in stats.items() if st.key in classes}
        )

    def begin(self) -> None:
        """Open the window now: what every process used so far is not counted."""
        self.begin_ticks = boot_ticks()
        self.machine_first = self.machine_last = machine_busy_ticks()
        self.tracked = {k: _Tracked(g, st, st) for k, (g, st) in self._scan().items()}
        self.alive = set(self.tracked)
        self.started = True
        self._memory(self.tracked.values())

    def sample(self) -> None:
        """Read every tracked process again and pick up new ones (before begin: memory only)."""
        found = self._scan()
        if self.started:
            self.machine_last = machine_busy_ticks()
        if not self.started:
            self._memory(_Tracked(g, st, st) for g, st in found.values())
            return
        alive = []
        for key, (group, st) in found.items():
            t = self.tracked.get(key)
            if t is None:
                born_inside = st.start >= self.begin_ticks
                t = self.tracked[key] = _Tracked(group, None if born_inside else st, st)
            t.last = st
            alive.append(t)
        self._memory(alive)
        self.alive = set(found)

    def _pss(self, st: ProcStat) -> int | None:
        """``st``'s PSS, read again only every ``PSS_EVERY`` scans (``smaps_rollup`` walks
        the page tables: costly for backends that map all of PostgreSQL's shared buffers).
        """
        seen = self.pss_cache.get(st.key)
        if seen is not None and self.scans - seen[1] < PSS_EVERY:
            return seen[0]
        pss = pss_bytes(st.pid)
        self.pss_cache[st.key] = (pss, self.scans)
        return pss

    def _memory(self, items: Iterable[_Tracked]) -> None:
        per: dict[str, int] = {}
        raw: dict[str, int] = {}
        for t in items:
            pss = self._pss(t.last)
            per[t.group] = per.get(t.group, 0) + (pss if pss is not None else t.last.rss_bytes)
            raw[t.group] = raw.get(t.group, 0) + t.last.rss_bytes
            self.pids.setdefault(t.group, set()).add(t.last.pid)
        for group, mem in per.items():
            self.peak_rss[group] = max(self.peak_rss.get(group, 0), mem)
        self.peak_total_rss = max(self.peak_total_rss, sum(per.values()))
        self.rss_samples.append(per)
        self.vmrss_samples.append(raw)

    def peak_of(self, groups: Iterable[str], *, vmrss: bool = False) -> int:
        """The highest summed memory of ``groups`` at any one sample, in bytes.

        PSS by default (shared pages split among their users, so the sum is real memory);
        with ``vmrss`` the plain sum of VmRSS, which counts shared pages once per process.
        """
        wanted = set(groups)
        samples = self.vmrss_samples if vmrss else self.rss_samples
        return max(
            (sum(v for g, v in per.items() if g in wanted) for per in samples),
            default=0,
        )

    def machine_busy_seconds(self) -> float:
        """CPU seconds the whole machine was busy between :meth:`begin` and the last sample."""
        return (self.machine_last - self.machine_first) / _TICK

    def cpu_seconds(self) -> dict[str, float]:
        """CPU seconds per group between :meth:`begin` and the latest :meth:`sample`."""
        alive = self.alive
        live_pids = {key[0] for key in alive}
        out: dict[str, float] = {g: 0.0 for g in self.roots}
        for key, t in self.tracked.items():
            first_self = t.first.self_ticks if t.first else 0
            first_child = t.first.child_ticks if t.first else 0
            if t.group in DATABASE_GROUPS:
                # The postmaster reaps every backend, whoever it served: its children's time
                # is not the gateway's. A database process counts its own time only.
                ticks = t.last.self_ticks - first_self
            elif key in alive or t.last.ppid not in live_pids:
                ticks = t.last.self_ticks + t.last.child_ticks - first_self - first_child
            else:
                ticks = -(first_self + first_child)  # the live parent now counts its whole life
            out[t.group] = out.get(t.group, 0.0) + ticks / _TICK
        return out
