"""Scenario files: TOML in, frozen and validated :class:`Scenario` values out.

The format is documented in ``ops/loadtest/README.md``. In short: top-level keys describe one
step of load (documents, clients per document, edit rate, timing, session arrival
``[[phases]]``, ``[http]`` reads, ``[slo]`` thresholds); ``[[steps]]`` repeat the run with
some of those keys overridden, each step on fresh documents. Unknown keys are errors, so a
typo never silently falls back to a default.
"""

from __future__ import annotations

import math
import re
import tomllib
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field, fields, replace
from pathlib import Path
from typing import Any

PROTOCOLS = ("msgpack", "json", "mixed")
"""``protocol`` values: every client on one subprotocol, or alternating by client slot."""

MAX_SECONDS = 86_400.0
"""The longest warm-up, window, drain, presence interval or phase: one day."""
MIN_OP_INTERVAL_MS = 1.0
"""The shortest edit interval: the event loop's timers are millisecond-grained."""
MIN_PRESENCE_INTERVAL_S = 0.001
"""The shortest presence interval (0 is "never"), for the same reason."""
MAX_DOCUMENTS = 100_000
"""Most documents one step creates."""
MAX_SESSIONS = 200_000
"""Most WebSocket sessions in one step, and most arrivals one phase produces."""
MAX_USERS = 100_000
"""Most distinct users per document."""
MAX_HTTP_CONCURRENCY = 10_000
"""Most closed-loop HTTP readers (each holds a connection)."""
MIN_HTTP_RATE = 0.01
"""The slowest ``[http] rate`` in requests/s (a reader waits at most concurrency / rate)."""
MAX_HTTP_WEIGHT = 1e6
"""The largest weight of one HTTP request kind."""
MAX_TEXT_SIZE = 256 << 20
"""The largest initial text, in code points (256 MiB)."""


class ScenarioError(ValueError):
    """A scenario file that cannot be read or does not validate; the message names the key."""


@dataclass(frozen=True, slots=True)
class Phase:
    """One arrival phase, as in Artillery: how many sessions connect, and when.

    Over ``duration_s`` sessions arrive at ``arrival_rate`` per second, ramping linearly to
    ``ramp_to`` when given; or ``arrival_count`` arrive evenly spread (all at once when the
    duration is 0). A phase with neither is a pause.
    """

    duration_s: float
    arrival_rate: float | None = None
    ramp_to: float | None = None
    arrival_count: int | None = None
    name: str = ""


@dataclass(frozen=True, slots=True)
class HttpRequest:
    """One kind of HTTP read: ``path`` (``{doc}`` becomes a random document id) and weight."""

    path: str
    weight: float = 1.0


@dataclass(frozen=True, slots=True)
class HttpLoad:
    """Closed-loop HTTP reads: ``concurrency`` loops in all, each waiting for its response.

    ``rate`` (requests/s over all loops) caps the pace when given.
    """

    concurrency: int
    requests: tuple[HttpRequest, ...]
    rate: float | None = None


@dataclass(frozen=True, slots=True)
class Slo:
    """Pass/fail thresholds for a step; None means not checked.

    Every step also fails on lost ops, on a failed convergence check and on connection
    failures, whether or not any threshold is set.
    """

    fanout_p50_ms: float | None = None
    fanout_p95_ms: float | None = None
    fanout_p99_ms: float | None = None
    ack_p99_ms: float | None = None
    join_p50_ms: float | None = None
    join_p99_ms: float | None = None
    http_p99_ms: float | None = None
    server_cpu_us_per_op: float | None = None
    server_peak_rss_mb: float | None = None
    min_acked_ops_s: float | None = None
    min_http_req_s: float | None = None
    projection_lag_p99_s: float | None = None


@dataclass(frozen=True, slots=True)
class Step:
    """One measured run: the load, its timeline and its thresholds.

    Per document there are ``writers`` editing clients and ``observers`` light receivers;
    the first ``full`` of them (writers first; all of them if there are fewer) apply every
    op to the text and take part in the convergence check, the rest only keep the length
    (writers) or count (observers).
    Timeline: sessions arrive by ``phases``; ``warmup_s`` after the last arrival the measured
    window of ``measure_s`` opens; writers stop at its end and get ``drain_s`` to see their
    last ops acknowledged.
    """

    name: str
    documents: int = 1
    text_size: int = 1000
    writers: int = 0
    observers: int = 0
    full: int = 2
    users: int | None = None
    op_interval_ms: float = 100.0
    jitter: float = 0.1
    delete_ratio: float = 0.0
    presence_interval_s: float = 0.0
    protocol: str = "msgpack"
    warmup_s: float = 3.0
    measure_s: float = 20.0
    drain_s: float = 5.0
    phases: tuple[Phase, ...] = ()
    http: HttpLoad | None = None
    slo: Slo = field(default_factory=Slo)

    @property
    def clients_per_doc(self) -> int:
        """Sessions on each document."""
        return self.writers + self.observers

    @property
    def sessions(self) -> int:
        """WebSocket sessions in the step."""
        return self.documents * self.clients_per_doc

    @property
    def distinct_users(self) -> int:
        """Users per document: ``users`` or, by default, one per client up to 10."""
        if self.users is not None:
            return self.users
        return max(1, min(10, self.clients_per_doc))

    @property
    def offered_ops_s(self) -> float:
        """The edit rate the step offers once every writer is editing."""
        return self.documents * self.writers * 1000.0 / self.op_interval_ms


@dataclass(frozen=True, slots=True)
class Scenario:
    """A named list of steps, read from ``source``."""

    name: str
    steps: tuple[Step, ...]
    description: str = ""
    seed: int = 1
    source: str = ""


_STEP_SCALARS = {f.name: f for f in fields(Step) if f.name not in ("name", "phases", "http", "slo")}
_TOP_ONLY = {"name", "description", "seed", "steps"}
_TABLES = {"phases", "http", "slo"}
_SIZE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([kKmMgG]i?)?[bB]?\s*$")
_AT_MOST_A_DAY = f"must be <= {MAX_SECONDS:,.0f} (one day)"
_SIZE_UNITS = {"": 1, "k": 10**3, "m": 10**6, "g": 10**9, "ki": 2**10, "mi": 2**20, "gi": 2**30}


def load(path: str | Path) -> Scenario:
    """Read and validate a scenario file; raise :class:`ScenarioError` on any problem."""
    p = Path(path)
    try:
        with p.open("rb") as f:
            data = tomllib.load(f)
    except OSError as exc:
        raise ScenarioError(f"{p}: cannot read: {exc.strerror}") from exc
    except tomllib.TOMLDecodeError as exc:
        raise ScenarioError(f"{p}: not valid TOML: {exc}") from exc
    except UnicodeDecodeError as exc:
        raise ScenarioError(f"{p}: not valid TOML: not UTF-8 text") from exc
    try:
        return parse(data, default_name=p.stem, source=str(p))
    except ScenarioError as exc:
        raise ScenarioError(f"{p}: {exc}") from None


def parse(data: Mapping[str, Any], default_name: str = "scenario", source: str = "") -> Scenario:
    """Validate decoded TOML ``data``; raise :class:`ScenarioError` naming the bad key."""
    try:
        return _parse(data, default_name, source)
    except OverflowError as exc:  # a value no check foresaw, too large for a float
        raise ScenarioError(f"a value is out of range: {exc}") from None


def _parse(data: Mapping[str, Any], default_name: str, source: str) -> Scenario:
    allowed = _TOP_ONLY | _TABLES | set(_STEP_SCALARS)
    _no_unknown(data, allowed, "")
    name = _str(data, "name", "", default_name)
    base = _step_from(data, Step(name=name), "")
    raw_steps = data.get("steps", [])
    if not isinstance(raw_steps, list) or not all(isinstance(s, dict) for s in raw_steps):
        raise ScenarioError("steps: must be an array of tables ([[steps]])")
    steps: list[Step] = []
    for i, raw in enumerate(raw_steps):
        where = f"steps[{i}]."
        _no_unknown(raw, {"name"} | _TABLES | set(_STEP_SCALARS), where)
        step_name = _str(raw, "name", where, f"step{i + 1}")
        steps.append(_step_from(raw, replace(base, name=step_name), where))
    if not steps:
        steps = [base]
    names = [s.name for s in steps]
    if len(set(names)) != len(names):
        raise ScenarioError(f"steps: names must be distinct, got {names}")
    for i, step in enumerate(steps):
        _check_step(step, f"steps[{i}]." if raw_steps else "")
    seed = data.get("seed", 1)
    if type(seed) is not int:
        raise ScenarioError("seed: must be an integer")
    return Scenario(
        name=name,
        description=_str(data, "description", "", ""),
        seed=seed,
        steps=tuple(steps),
        source=source,
    )


def parse_size(value: object, where: str) -> int:
    """A count of code points: an int, or a string such as ``"4MiB"``, ``"10KB"``, ``"2000"``.

    K/M/G are powers of 1000 and Ki/Mi/Gi powers of 1024 (the text is ASCII, so characters
    and bytes agree).
    """
    if type(value) is int:
        n = value
    elif isinstance(value, str) and (m := _SIZE.match(value)):
        size = float(m.group(1)) * _SIZE_UNITS[(m.group(2) or "").lower()]
        if not math.isfinite(size):
            raise ScenarioError(f"{where}: too large")
        n = int(size)
    else:
        raise ScenarioError(f'{where}: must be a size like 2000, "10KB" or "4MiB"')
    if n < 0:
        raise ScenarioError(f"{where}: must be >= 0")
    return n


def _no_unknown(data: Mapping[str, Any], allowed: set[str], where: str) -> None:
    unknown = sorted(set(data) - allowed)
    if unknown:
        known = ", ".join(sorted(allowed))
        raise ScenarioError(f"{where}{unknown[0]}: unknown key (allowed: {known})")


def _str(data: Mapping[str, Any], key: str, where: str, default: str) -> str:
    value = data.get(key, default)
    if not isinstance(value, str):
        raise ScenarioError(f"{where}{key}: must be a string")
    return value


def _number(value: object, where: str, *, integer: bool = False) -> float:
    if type(value) is bool or not isinstance(value, int | float):
        raise ScenarioError(f"{where}: must be a number")
    try:
        finite = math.isfinite(value)
    except OverflowError:  # an integer beyond every float (TOML integers are unbounded here)
        raise ScenarioError(f"{where}: too large") from None
    if not finite:
        raise ScenarioError(f"{where}: must be a number")
    if integer and type(value) is not int:
        raise ScenarioError(f"{where}: must be an integer")
    return value


def _step_from(data: Mapping[str, Any], base: Step, where: str) -> Step:
    changes: dict[str, Any] = {}
    for key, f in _STEP_SCALARS.items():
        if key not in data:
            continue
        value = data[key]
        at = where + key
        if key == "text_size":
            changes[key] = parse_size(value, at)
        elif key == "protocol":
            if value not in PROTOCOLS:
                raise ScenarioError(f"{at}: must be one of {', '.join(PROTOCOLS)}")
            changes[key] = value
        elif f.type in ("int", "int | None"):
            changes[key] = int(_number(value, at, integer=True))
        else:
            changes[key] = float(_number(value, at))
    if "phases" in data:
        changes["phases"] = _phases(data["phases"], where + "phases")
    if "http" in data:
        changes["http"] = _http(data["http"], where + "http")
    if "slo" in data:
        changes["slo"] = _slo(data["slo"], base.slo, where + "slo")
    return replace(base, **changes)


def _phases(raw: object, where: str) -> tuple[Phase, ...]:
    if not isinstance(raw, list) or not all(isinstance(p, dict) for p in raw):
        raise ScenarioError(f"{where}: must be an array of tables ([[phases]])")
    out = []
    for i, p in enumerate(raw):
        at = f"{where}[{i}]."
        _no_unknown(p, {"name", "duration_s", "arrival_rate", "ramp_to", "arrival_count"}, at)
        if "duration_s" not in p:
            raise ScenarioError(f"{at}duration_s: required")
        duration = float(_number(p["duration_s"], at + "duration_s"))
        rate = _opt_number(p, "arrival_rate", at)
        ramp = _opt_number(p, "ramp_to", at)
        count = p.get("arrival_count")
        if count is not None:
            count = int(_number(count, at + "arrival_count", integer=True))
        if duration < 0:
            raise ScenarioError(f"{at}duration_s: must be >= 0")
        if count is not None and rate is not None:
            raise ScenarioError(f"{at}arrival_count: give arrival_count or arrival_rate, not both")
        if ramp is not None and rate is None:
            raise ScenarioError(f"{at}ramp_to: needs arrival_rate (the rate it ramps from)")
        if rate is not None and duration <= 0:
            raise ScenarioError(f"{at}duration_s: an arrival_rate phase needs a duration > 0")
        for key, v in (("arrival_rate", rate), ("ramp_to", ramp), ("arrival_count", count)):
            if v is not None and v < 0:
                raise ScenarioError(f"{at}{key}: must be >= 0")
        if duration > MAX_SECONDS:
            raise ScenarioError(f"{at}duration_s: {_AT_MOST_A_DAY}")
        if count is not None and count > MAX_SESSIONS:
            raise ScenarioError(f"{at}arrival_count: must be <= {MAX_SESSIONS:,}")
        arrivals = 0.0 if rate is None else (rate + (rate if ramp is None else ramp)) / 2 * duration
        if arrivals > MAX_SESSIONS:  # plan.phase_arrivals lists every one of them
            raise ScenarioError(
                f"{at}arrival_rate: the phase brings {arrivals:,.0f} sessions, "
                f"more than the {MAX_SESSIONS:,} a step may have"
            )
        out.append(Phase(duration, rate, ramp, count, _str(p, "name", at, "")))
    return tuple(out)


def _opt_number(data: Mapping[str, Any], key: str, where: str) -> float | None:
    return None if key not in data else float(_number(data[key], where + key))


def _http(raw: object, where: str) -> HttpLoad:
    if not isinstance(raw, dict):
        raise ScenarioError(f"{where}: must be a table ([http])")
    _no_unknown(raw, {"concurrency", "rate", "requests"}, where + ".")
    concurrency = int(_number(raw.get("concurrency", 32), where + ".concurrency", integer=True))
    if concurrency < 1:
        raise ScenarioError(f"{where}.concurrency: must be >= 1")
    if concurrency > MAX_HTTP_CONCURRENCY:
        raise ScenarioError(f"{where}.concurrency: must be <= {MAX_HTTP_CONCURRENCY:,}")
    rate = _opt_number(raw, "rate", where + ".")
    if rate is not None and rate < MIN_HTTP_RATE:
        raise ScenarioError(f"{where}.rate: must be >= {MIN_HTTP_RATE} (requests/s)")
    reqs = raw.get("requests", [{"path": "/v1/documents/{doc}"}])
    if not isinstance(reqs, list) or not reqs or not all(isinstance(r, dict) for r in reqs):
        raise ScenarioError(f"{where}.requests: must be a non-empty array of tables")
    out = []
    for i, r in enumerate(reqs):
        at = f"{where}.requests[{i}]."
        _no_unknown(r, {"path", "weight"}, at)
        path = r.get("path")
        if not isinstance(path, str) or not path.startswith("/"):
            raise ScenarioError(f"{at}path: must be a string starting with '/'")
        weight = float(_number(r.get("weight", 1.0), at + "weight"))
        if weight <= 0:
            raise ScenarioError(f"{at}weight: must be > 0")
        if weight > MAX_HTTP_WEIGHT:
            raise ScenarioError(f"{at}weight: must be <= {MAX_HTTP_WEIGHT:,.0f}")
        out.append(HttpRequest(path, weight))
    return HttpLoad(concurrency, tuple(out), rate)


def _slo(raw: object, base: Slo, where: str) -> Slo:
    if not isinstance(raw, dict):
        raise ScenarioError(f"{where}: must be a table ([slo])")
    _no_unknown(raw, {f.name for f in fields(Slo)}, where + ".")
    changes = {k: float(_number(v, f"{where}.{k}")) for k, v in raw.items()}
    return replace(base, **changes)


def _check_step(step: Step, where: str) -> None:
    def bad(key: str, why: str) -> ScenarioError:
        return ScenarioError(f"{where}{key}: {why}")

    if step.documents < 1:
        raise bad("documents", "must be >= 1")
    for key in ("writers", "observers", "full"):
        if getattr(step, key) < 0:
            raise bad(key, "must be >= 0")
    if step.users is not None and step.users < 1:
        raise bad("users", "must be >= 1")
    if step.op_interval_ms <= 0:
        raise bad("op_interval_ms", "must be > 0")
    if not 0 <= step.jitter < 1:
        raise bad("jitter", "must be in [0, 1)")
    if not 0 <= step.delete_ratio < 1:
        raise bad("delete_ratio", "must be in [0, 1)")
    for key in ("presence_interval_s", "warmup_s", "drain_s"):
        if getattr(step, key) < 0:
            raise bad(key, "must be >= 0")
    if step.measure_s <= 0:
        raise bad("measure_s", "must be > 0")
    _check_bounds(step, bad)
    if step.sessions == 0 and step.http is None:
        raise bad("writers", "a step needs sessions (writers/observers) or [http] reads")


def _check_bounds(step: Step, bad: Callable[[str, str], ScenarioError]) -> None:
    """The upper bounds: what one machine's load generator can mean, and no overflow later."""
    if step.documents > MAX_DOCUMENTS:
        raise bad("documents", f"must be <= {MAX_DOCUMENTS:,}")
    for key in ("writers", "observers", "full"):
        if getattr(step, key) > MAX_SESSIONS:
            raise bad(key, f"must be <= {MAX_SESSIONS:,}")
    if step.sessions > MAX_SESSIONS:
        raise bad(
            "writers",
            f"documents × (writers + observers) = {step.sessions:,} sessions, "
            f"more than the {MAX_SESSIONS:,} a step may have",
        )
    if step.users is not None and step.users > MAX_USERS:
        raise bad("users", f"must be <= {MAX_USERS:,}")
    if step.text_size > MAX_TEXT_SIZE:
        raise bad("text_size", f'must be <= {MAX_TEXT_SIZE:,} ("256MiB")')
    if step.op_interval_ms < MIN_OP_INTERVAL_MS:
        raise bad("op_interval_ms", f"must be >= {MIN_OP_INTERVAL_MS:g} (timers are per ms)")
    if step.op_interval_ms > MAX_SECONDS * 1000:
        raise bad("op_interval_ms", f"must be <= {MAX_SECONDS * 1000:,.0f} (one day)")
    for key in ("presence_interval_s", "warmup_s", "measure_s", "drain_s"):
        if getattr(step, key) > MAX_SECONDS:
            raise bad(key, _AT_MOST_A_DAY)
    if 0 < step.presence_interval_s < MIN_PRESENCE_INTERVAL_S:
        raise bad("presence_interval_s",
                  f"must be 0 (never) or >= {MIN_PRESENCE_INTERVAL_S:g} (timers are per ms)")
