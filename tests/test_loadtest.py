"""The load-test tool: scenarios, arrival plans, latency stamps, statistics, client-side OT,
convergence and SLO verdicts, /proc accounting, the command line, and one real run."""

from __future__ import annotations

import argparse
import itertools
import json
import os
import random
import re
import shutil
import socket
import subprocess
import sys
import time
from collections import Counter, deque
from pathlib import Path
from typing import Any

import msgpack
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from domain import ot
from ops.loadtest import httpclient, plan, procstat, provision, receipts, stamp, wsclient
from ops.loadtest.command import register, resolve_secret, shipped
from ops.loadtest.convergence import check
from ops.loadtest.editor import (
    DocClient,
    LightEditor,
    ProtocolViolation,
    delete_op,
    insert_op,
    transform,
)
from ops.loadtest.provision import DocState, filler_text
from ops.loadtest.recorder import StepMetrics, Window
from ops.loadtest.report import Cost, StepOutcome, notes, run_report, slo_failures
from ops.loadtest.scenario import Phase, ScenarioError, Slo, load, parse, parse_size
from ops.loadtest.session import text_digest
from ops.loadtest.stats import (
    Histogram,
    SampleLog,
    Series,
    bucket,
    bucket_bounds,
    percentile,
    summary_ms,
)
from tests import strategies as gen

ROOT = Path(__file__).resolve().parent.parent
SCENARIOS = ROOT / "ops" / "loadtest" / "scenarios"
PROPERTY = settings(max_examples=200, deadline=None)


# --- scenarios ----------------------------------------------------------------------------


def test_every_shipped_scenario_loads() -> None:
    """Each scenario the issue asks for ships and validates."""
    names = set(shipped())
    assert {
        "standard",
        "saturate",
        "observers",
        "authors",
        "sessions",
        "join-storm",
        "http-read",
    } <= names
    for name in names:
        assert load(SCENARIOS / f"{name}.toml").steps


def test_standard_scenario_has_the_issue_parameters() -> None:
    """standard: 10 documents × 20 editors, 100 ms, 3 s warm-up, 20 s measured, 2,000 ops/s."""
    (step,) = load(SCENARIOS / "standard.toml").steps
    assert (step.documents, step.writers, step.sessions) == (10, 20, 200)
    assert (step.op_interval_ms, step.warmup_s, step.measure_s) == (100, 3, 20)
    assert step.offered_ops_s == pytest.approx(2000)
    assert step.slo.fanout_p99_ms == 20


def test_saturate_steps_shorten_the_interval() -> None:
    """saturate repeats standard at the issue's 100, 50, 20, 10 and 5 ms (and at 33 and 25 ms,
    between 4,000 and 10,000 edits/s offered), each with the 100 ms p99 SLO."""
    steps = load(SCENARIOS / "saturate.toml").steps
    assert [s.op_interval_ms for s in steps] == [100, 50, 33, 25, 20, 10, 5]
    assert all(s.sessions == 200 and s.slo.fanout_p99_ms == 100 for s in steps)


def test_load_curve_runs_standard_below_its_rate() -> None:
    """load-curve is standard's 200 sessions at 200, 667 and 2,000 ops/s offered."""
    steps = load(SCENARIOS / "load-curve.toml").steps
    assert [s.op_interval_ms for s in steps] == [1000, 300, 100]
    assert all((s.documents, s.writers, s.sessions) == (10, 20, 200) for s in steps)
    assert [round(s.offered_ops_s) for s in steps] == [200, 667, 2000]


def test_other_scenarios_match_the_issue() -> None:
    """observers, authors, sessions and join-storm have the sizes the issue gives."""
    (obs,) = load(SCENARIOS / "observers.toml").steps
    assert (obs.documents, obs.writers, obs.observers, obs.offered_ops_s) == (1, 1, 1500, 10)
    authors = load(SCENARIOS / "authors.toml").steps
    assert [(s.writers, 1000 / s.op_interval_ms) for s in authors] == [(200, 5), (400, 5)]
    (sess,) = load(SCENARIOS / "sessions.toml").steps
    assert (sess.sessions, sess.documents, sess.presence_interval_s) == (10_000, 1000, 5)
    assert len(plan.arrival_offsets(sess.phases, sess.sessions)) == 10_000
    (storm,) = load(SCENARIOS / "join-storm.toml").steps
    assert (storm.sessions, storm.text_size) == (150, 4 << 20)
    assert plan.arrival_offsets(storm.phases, 150) == [0.0] * 150


def test_steps_override_the_base_and_merge_slo() -> None:
    """A step overrides top-level keys; its [slo] adds to the base thresholds."""
    s = parse(
        {
            "name": "x",
            "writers": 2,
            "slo": {"fanout_p99_ms": 50},
            "steps": [{"name": "a"}, {"name": "b", "writers": 4, "slo": {"ack_p99_ms": 9}}],
        }
    )
    a, b = s.steps
    assert (a.writers, b.writers) == (2, 4)
    assert b.slo == Slo(fanout_p99_ms=50, ack_p99_ms=9)


@pytest.mark.parametrize(
    ("data", "message"),
    [
        ({"writers": 1, "writerz": 2}, "writerz: unknown key"),
        ({"writers": -1}, "writers: must be >= 0"),
        ({"writers": 1, "op_interval_ms": 0}, "op_interval_ms: must be > 0"),
        ({"writers": 1, "protocol": "xml"}, "protocol: must be one of"),
        ({"writers": 1, "documents": 1.5}, "documents: must be an integer"),
        ({"writers": "2"}, "writers: must be a number"),
        ({"writers": 1, "steps": [{"nme": "a"}]}, "steps[0].nme: unknown key"),
        ({"writers": 1, "phases": [{"arrival_rate": 3}]}, "duration_s: required"),
        ({"writers": 1, "phases": [{"duration_s": 1, "ramp_to": 3}]}, "ramp_to: needs"),
        ({"writers": 0}, "a step needs sessions"),
        ({"http": {"requests": [{"path": "v1"}]}}, "path: must be a string starting"),
        ({"writers": 1, "steps": [{"name": "a"}, {"name": "a"}]}, "names must be distinct"),
    ],
)
def test_bad_scenarios_name_the_key(data: dict[str, Any], message: str) -> None:
    """Validation errors say which key is wrong."""
    with pytest.raises(ScenarioError, match=message.replace("[", r"\[").replace("]", r"\]")):
        parse(data)


@pytest.mark.parametrize(
    ("data", "message"),
    [
        ({"writers": 1, "warmup_s": 1e20}, "warmup_s: must be <= 86,400"),
        ({"writers": 1, "measure_s": 1e300}, "measure_s: must be <= 86,400"),
        ({"writers": 1, "drain_s": 1e300}, "drain_s: must be <= 86,400"),
        ({"writers": 1, "presence_interval_s": 86_401}, "presence_interval_s: must be <= 86,400"),
        ({"writers": 1, "phases": [{"duration_s": 1e300}]}, "duration_s: must be <= 86,400"),
        ({"writers": 1, "phases": [{"duration_s": 1, "arrival_count": 10**17}]}, "arrival_count"),
        ({"writers": 1, "phases": [{"duration_s": 86_400, "arrival_rate": 3}]}, "259,200 sess"),
        ({"writers": 1, "op_interval_ms": 1e-300}, "op_interval_ms: must be >= 1"),
        ({"writers": 1, "presence_interval_s": 0.0005}, "presence_interval_s: must be 0"),
        ({"writers": 1, "op_interval_ms": 1e300}, "op_interval_ms: must be <= 86,400,000"),
        ({"writers": 2**63 - 1}, "writers: must be <= 200,000"),
        ({"writers": 1, "observers": 200_001}, "observers: must be <= 200,000"),
        ({"writers": 1, "full": 10**30}, "full: must be <= 200,000"),
        ({"writers": 1, "documents": 10**20}, "documents: must be <= 100,000"),
        ({"writers": 3, "documents": 100_000}, "300,000 sessions"),
        ({"writers": 1, "users": 100_001}, "users: must be <= 100,000"),
        ({"writers": 10**400}, "writers: too large"),
        ({"writers": 1, "text_size": "99999999999999GiB"}, "text_size: must be <= 268,435,456"),
        ({"writers": 1, "text_size": "9" * 400 + "GiB"}, "text_size: too large"),
        ({"http": {"concurrency": 10_001}}, "concurrency: must be <= 10,000"),
        ({"http": {"rate": 1e-300}}, "rate: must be >= 0.01"),
        ({"http": {"requests": [{"path": "/", "weight": 1e308}]}}, "weight: must be <= 1,000,0"),
    ],
)
def test_values_beyond_their_bounds_are_refused(data: dict[str, Any], message: str) -> None:
    """Durations past a day, counts past one load machine, sizes past 256 MiB: one-line errors."""
    with pytest.raises(ScenarioError, match=message):
        parse(data)


def test_a_value_past_its_bound_exits_2_before_the_run(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """``coscribe loadtest`` with drain_s = 1e300: status 2 and one line naming the key."""
    scenario = tmp_path / "huge.toml"
    scenario.write_text("writers = 2\ndrain_s = 1e300\n")
    args = _parse(["loadtest", str(scenario), "--secret", "s", "--url", "http://127.0.0.1:9"])
    assert args.func(args) == 2
    err = " ".join(capsys.readouterr().err.split())  # rich wraps at the console width
    assert "huge.toml: drain_s: must be <= 86,400" in err and "Traceback" not in err


def test_the_bounds_themselves_are_accepted() -> None:
    """A step at every upper bound validates (and offers what it says)."""
    step = parse(
        {
            "documents": 1000,
            "writers": 100,
            "observers": 100,
            "users": 100_000,
            "text_size": "256MiB",
            "op_interval_ms": 1,
            "warmup_s": 86_400,
            "measure_s": 86_400,
            "drain_s": 86_400,
            "phases": [{"duration_s": 86_400, "arrival_count": 200_000}],
            "http": {"concurrency": 10_000, "rate": 0.01},
        }
    ).steps[0]
    assert (step.sessions, step.text_size, step.offered_ops_s) == (200_000, 256 << 20, 1e8)


def test_load_reports_toml_errors_with_the_path(tmp_path: Path) -> None:
    """A file that is not TOML (or not text) fails with its path in the message."""
    bad = tmp_path / "bad.toml"
    bad.write_text("writers = \n")
    with pytest.raises(ScenarioError, match=r"bad\.toml: not valid TOML"):
        load(bad)
    bad.write_bytes(b"\xff\xfe garbage")
    with pytest.raises(ScenarioError, match=r"bad\.toml: not valid TOML: not UTF-8"):
        load(bad)


@pytest.mark.parametrize(
    ("value", "size"),
    [(2000, 2000), ("2000", 2000), ("10KB", 10_000), ("4MiB", 4 << 20), ("1.5k", 1500)],
)
def test_sizes_accept_units(value: object, size: int) -> None:
    """text_size takes plain counts and K/M (1000) or Ki/Mi (1024) suffixes."""
    assert parse_size(value, "text_size") == size


# --- arrival plans ------------------------------------------------------------------------


def test_constant_rate_arrivals_are_evenly_spaced() -> None:
    """arrival_rate r over d seconds: r·d sessions at k/r."""
    assert plan.phase_arrivals(Phase(2.0, arrival_rate=2.0)) == [0.0, 0.5, 1.0, 1.5]


@given(
    r0=st.floats(0, 500),
    r1=st.floats(0, 500),
    d=st.floats(0.1, 30),
)
@PROPERTY
def test_ramp_arrivals_follow_the_ramp(r0: float, r1: float, d: float) -> None:
    """A ramp yields ceil((r0+r1)·d/2) arrivals, ascending, inside the phase, on N(t)=k."""
    got = plan.phase_arrivals(Phase(d, arrival_rate=r0, ramp_to=r1))
    total = (r0 + r1) * d / 2
    assert abs(len(got) - total) < 1 + 1e-6
    assert got == sorted(got)
    assert all(0 <= t <= d for t in got)
    a = (r1 - r0) / (2 * d)
    for k, t in enumerate(got):
        assert r0 * t + a * t * t == pytest.approx(k, abs=1e-6 * max(1.0, k))


def test_phases_run_in_sequence_and_leftovers_arrive_at_the_end() -> None:
    """Phases follow each other; sessions beyond the phases' arrivals arrive when they end."""
    phases = (Phase(1.0, arrival_count=2), Phase(2.0), Phase(1.0, arrival_count=1))
    assert plan.arrival_offsets(phases, 5) == [0.0, 0.5, 3.0, 4.0, 4.0]
    assert plan.arrival_offsets(phases, 2) == [0.0, 0.5]
    assert plan.arrival_offsets((), 3) == [0.0, 0.0, 0.0]
    assert plan.arrivals_end(phases, 2) == 4.0


def test_sessions_fill_documents_evenly_writers_and_full_first() -> None:
    """Slot-major order; writers then observers on each document; the first slots are full."""
    step = parse({"documents": 2, "writers": 2, "observers": 1, "full": 2, "protocol": "mixed"})
    step = step.steps[0]
    got = plan.sessions(step)
    assert [(s.doc, s.slot) for s in got] == [(0, 0), (1, 0), (0, 1), (1, 1), (0, 2), (1, 2)]
    assert [s.writer for s in got] == [True, True, True, True, False, False]
    assert [s.full for s in got] == [True, True, True, True, False, False]
    assert [s.codec for s in got] == ["msgpack", "msgpack", "json", "json", "msgpack", "msgpack"]
    assert [len(p) for p in plan.split(got, 4)] == [2, 2, 1, 1]


def test_a_client_id_names_one_user_in_every_scenario() -> None:
    """Across the shipped scenarios' steps a client id always goes with the same user (it
    is that user's for ever on the server), and is unique within a step."""
    owners: dict[str, int] = {}
    for name in shipped():
        for i, step in enumerate(load(SCENARIOS / f"{name}.toml").steps):
            ids = [(provision.client_id(s.user, i, s.index), s.user) for s in plan.sessions(step)]
            assert len({c for c, _ in ids}) == len(ids), name
            for c, user in ids:
                assert owners.setdefault(c, user) == user, (name, c)


# --- stamps -------------------------------------------------------------------------------


@given(t=st.integers(0, 2**62), delay=st.integers(0, stamp.MAX_AGE_NS - stamp.UNIT_NS))
@PROPERTY
def test_stamp_round_trip_measures_the_delay(t: int, delay: int) -> None:
    """A stamp made at t read at t + delay gives the delay to within one 10 µs unit."""
    text = stamp.encode(t)
    assert len(text) == stamp.WIDTH == 8
    (digits,) = stamp.find(text)
    assert digits == text[1:-1]
    assert abs(stamp.age_ns(digits, t + delay) - delay) < stamp.UNIT_NS


def test_stamp_from_the_future_is_flagged() -> None:
    """A reading before the stamp (clock stepped back) is reported as -1, not a huge age."""
    digits = stamp.encode(10**18)[1:-1]
    assert stamp.age_ns(digits, 10**18 - 5 * stamp.UNIT_NS) == -1


@given(
    base=st.text(alphabet="abc xyz", max_size=30),
    times=st.lists(st.integers(0, 2**60), min_size=1, max_size=12),
    data=st.data(),
)
@PROPERTY
def test_stamps_inserted_anywhere_are_all_found(base: str, times: list[int], data: Any) -> None:
    """Stamps inserted at random positions, even inside other stamps, are all recovered."""
    text = base
    for t in times:
        pos = data.draw(st.integers(0, len(text)))
        text = text[:pos] + stamp.encode(t) + text[pos:]
    want = Counter(stamp.encode(t)[1:-1] for t in times)
    assert Counter(stamp.find(text)) == want


def test_stamps_survive_composition_in_an_op() -> None:
    """Composed buffered edits keep every stamp readable from the op's inserts."""
    a = insert_op(3, stamp.encode(1_000_000_000))
    b = insert_op(6, stamp.encode(2_000_000_000))  # inside a's stamp
    c = insert_op(0, stamp.encode(3_000_000_000))
    op = ot.compose(ot.compose(a, b), c)
    assert len(stamp.in_op(op)) == 3
    assert stamp.in_op([5, {"d": 2}]) == []


# --- statistics ---------------------------------------------------------------------------


def test_percentile_is_nearest_rank() -> None:
    """percentile follows the nearest-rank definition."""
    values = [1, 2, 3, 4, 5, 6, 7, 8, 9, 10]
    assert percentile(values, 0.5) == 5
    assert percentile(values, 0.95) == 10
    assert percentile(values, 0.1) == 1
    assert percentile([7], 0.99) == 7
    with pytest.raises(ValueError):
        percentile([], 0.5)


@given(st.integers(0, 2**40))
@PROPERTY
def test_buckets_contain_their_values(v: int) -> None:
    """Every value lies within the bounds of its bucket, whose width is under 1/128 of it."""
    low, high = bucket_bounds(bucket(v))
    assert low <= v <= high
    assert high - low <= max(0, low) / 128


@given(
    st.lists(st.integers(0, 10**9), min_size=1, max_size=300),
    st.sampled_from([0.5, 0.95, 0.99, 1.0]),
)
@PROPERTY
def test_histogram_quantiles_bound_the_exact_ones(values: list[int], q: float) -> None:
    """A histogram quantile is never below the exact one and at most 1/128 above it."""
    h = Histogram()
    h.extend(values)
    exact = percentile(sorted(values), q)
    got = h.quantile(q)
    assert exact <= got <= exact + exact / 128
    assert (h.count, h.min, h.max, h.total) == (len(values), min(values), max(values), sum(values))


@given(st.lists(st.integers(0, 10**7)), st.lists(st.integers(0, 10**7)))
@PROPERTY
def test_merged_histograms_equal_one_histogram(a: list[int], b: list[int]) -> None:
    """Merging two histograms (also through to_dict) equals recording all values in one."""
    ha, hb, both = Histogram(), Histogram(), Histogram()
    ha.extend(a)
    hb.extend(b)
    both.extend(a + b)
    merged = Histogram.from_dict(json.loads(json.dumps(ha.to_dict())))
    merged.merge(hb)
    assert merged.to_dict() == both.to_dict()


def test_summary_is_in_milliseconds_and_null_when_empty() -> None:
    """summary_ms reports ms with p50/p95/p99/max/mean/count; no samples means nulls."""
    h = Histogram()
    h.extend([1000, 2000, 3000, 4000])
    got = summary_ms(h)
    assert got == {"p50": got["p50"], "p95": 4.0, "p99": 4.0, "max": 4.0, "mean": 2.5, "count": 4}
    assert 2.0 <= got["p50"] <= 2.0 * (1 + 1 / 128)  # the top of the bucket holding 2 ms
    empty = summary_ms(Histogram())
    assert empty["count"] == 0 and empty["p99"] is None


def test_series_bins_by_observation_time() -> None:
    """A series keeps one histogram per time bin and merges bin by bin."""
    s = Series(origin_ns=0, bin_s=0.5)
    s.add(100_000_000, 10)
    s.add(700_000_000, 20)
    assert s.tail(650_000_000).count == 1  # walks back over the newest samples only
    other = Series(origin_ns=0, bin_s=0.5)
    other.add(600_000_000, 30)
    s.merge(Series.from_dict(other.to_dict()))
    assert [(t, n, mx) for t, n, _, _, mx in s.rows()] == [(0.0, 1, 10), (0.5, 2, 30)]


# --- client-side OT against a simulated server --------------------------------------------


class _SimServer:
    """The server's contract in miniature: transform late ops with "left", ack, broadcast."""

    def __init__(self, text: str) -> None:
        self.initial = self.text = text
        self.log: list[ot.Op] = []
        self.outboxes: dict[int, deque[dict[str, Any]]] = {}

    def text_at(self, version: int) -> str:
        text = self.initial
        for op in self.log[:version]:
            text = ot.apply(text, op)
        return text

    def submit(self, client: int, msg: dict[str, Any]) -> None:
        op = msg["op"]
        for applied in self.log[msg["v"] :]:
            op = ot.transform(op, applied, "left")
        self.text = ot.apply(self.text, op)
        self.log.append(op)
        v = len(self.log)
        for c, box in self.outboxes.items():
            if c == client:
                box.append({"t": "ack", "seq": msg["seq"], "v": v})
            else:
                box.append({"t": "ops", "ops": [{"v": v, "op": op}]})


@given(
    seed=st.integers(0, 2**32),
    clients=st.integers(2, 4),
    kinds=st.lists(st.sampled_from(["full", "length", "light"]), min_size=4, max_size=4),
    steps=st.integers(1, 120),
)
@PROPERTY
def test_clients_converge_with_the_simulated_server(
    seed: int, clients: int, kinds: list[str], steps: int
) -> None:
    """Random edits, deliveries and interleavings: every client ends on the server's text.

    Full clients (both texts), length-only DocClients and LightEditors (lazy buffers) mix.
    """
    rng = random.Random(seed)
    server = _SimServer("hello world")
    kinds[0] = "full"
    docs: list[DocClient | LightEditor] = [
        LightEditor("d", 0, len(server.text), random.Random(i))
        if kinds[i] == "light"
        else DocClient("d", 0, server.text, keep_text=kinds[i] == "full")
        for i in range(clients)
    ]
    uplinks: list[deque[dict[str, Any]]] = [deque() for _ in docs]
    for i in range(clients):
        server.outboxes[i] = deque()
    acked: Counter[str] = Counter()
    typed: Counter[str] = Counter()
    now = 0

    def pump(i: int, kind: str) -> None:
        nonlocal now
        now += 1
        if kind == "up" and uplinks[i]:
            server.submit(i, uplinks[i].popleft())
        elif kind == "down" and server.outboxes[i]:
            msg = server.outboxes[i].popleft()
            if msg["t"] == "ack":
                done = docs[i].ack(msg["seq"], msg["v"], now)
                acked.update(done.stamps)
                if done.send is not None:
                    uplinks[i].append(done.send)
            else:
                for entry in msg["ops"]:
                    docs[i].remote(entry["v"], entry["op"])

    for _ in range(steps):
        i = rng.randrange(clients)
        action = rng.random()
        c = docs[i]
        if action < 0.4:
            msg: dict[str, Any] | None
            if c.can_delete and c.length > 3 and rng.random() < 0.3:
                n = rng.randint(1, 3)
                if isinstance(c, LightEditor):
                    msg = c.delete(n, now)
                else:
                    msg = c.edit(delete_op(rng.randrange(c.length - n + 1), n), now)
            else:
                s = stamp.encode(rng.randrange(2**50))
                typed[s[1:-1]] += 1
                if isinstance(c, LightEditor):
                    msg = c.insert(s, now)
                else:
                    msg = c.edit(insert_op(rng.randrange(c.length + 1), s), now, (s[1:-1],))
            if msg is not None:
                uplinks[i].append(msg)
        else:
            pump(i, "up" if action < 0.7 else "down")
    for c in docs:  # mid-flight: the confirmed text is the server's at the client's version
        if isinstance(c, DocClient) and c.confirmed is not None:
            assert c.confirmed == server.text_at(c.version)
        if isinstance(c, LightEditor):
            assert c.length == len(server.text_at(c.version))
    while any(uplinks) or any(server.outboxes.values()):
        for i in range(clients):
            pump(i, "up")
            pump(i, "down")
    for c in docs:
        assert not c.pending
        assert c.version == len(server.log)
        assert c.length == len(server.text)
        if isinstance(c, DocClient) and c.text is not None:
            assert c.text == c.confirmed == server.text
    assert sum(c.acked for c in docs) == len(server.log)
    assert acked == typed  # every typed stamp went out once and was acknowledged


@given(
    length=st.integers(0, 50),
    data=st.data(),
    side=st.sampled_from(["left", "right"]),
)
@PROPERTY
def test_fast_transform_equals_domain_transform(length: int, data: Any, side: ot.Side) -> None:
    """The single-insert shortcut gives exactly what domain.ot.transform gives."""
    text = "x" * length
    ops = st.one_of(
        st.builds(insert_op, st.integers(0, length), st.text("ab", min_size=1, max_size=3)),
        gen.ops(text),
    )
    a, b = data.draw(ops), data.draw(ops)
    assert transform(a, b, side) == ot.transform(a, b, side)


def test_client_rejects_out_of_order_messages() -> None:
    """A version gap or an ack for the wrong seq is a protocol violation."""
    c = DocClient("d", 5, "abc")
    with pytest.raises(ProtocolViolation):
        c.remote(7, ["x"])
    msg = c.edit(["y"], 0)
    assert msg == {"t": "op", "doc": "d", "v": 5, "op": ["y"], "seq": 1}
    with pytest.raises(ProtocolViolation):
        c.ack(2, 6, 1)
    assert c.reject() == (1, 1)
    assert not c.pending


def test_edits_during_flight_are_composed_into_one_op() -> None:
    """While an op is in flight later edits compose into the buffer and go out on the ack."""
    c = DocClient("d", 0, "")
    assert c.edit(["a"], 1, ("s1",)) is not None
    assert c.edit([1, "b"], 2, ("s2",)) is None
    assert c.edit([2, "c"], 3, ("s3",)) is None
    done = c.ack(1, 1, 10)
    assert (done.edits, done.stamps, done.sent_ns) == (1, ("s1",), 1)
    assert done.send == {"t": "op", "doc": "d", "v": 1, "op": [1, "bc"], "seq": 2}
    assert c.ack(2, 2, 11).stamps == ("s2", "s3")


def test_abandoning_the_buffer_keeps_the_texts_consistent() -> None:
    """Dropping unsent edits leaves the user's text = server state + the op in flight."""
    full, light = DocClient("d", 0, "abc"), DocClient("d", 0, "abc", keep_text=False)
    for c in (full, light):
        c.edit(["x"], 0)
        c.edit([1, "yy"], 1)
        c.edit([{"d": 2}], 2)
        assert c.abandon_buffer() == 2
        assert c.length == 4 and c.pending and c.buffer is None
    assert full.text == "xabc" and full.confirmed == "abc"
    assert full.ack(1, 1, 3).send is None
    assert full.text == full.confirmed == "xabc"


def test_light_editor_sends_what_was_typed_meanwhile_as_one_insert() -> None:
    """Edits typed while an op is in flight leave together on the ack, as one insert."""
    c = LightEditor("d", 0, 10, random.Random(1))
    first = c.insert("[000001]", 1)
    assert first is not None and first["v"] == 0 and c.pending
    assert c.insert("[000002]", 2) is None and c.insert("[000003]", 3) is None
    assert not c.can_delete
    c.remote(1, [4, "abc"])  # another client's op: length only, nothing transformed
    done = c.ack(1, 2, 10)
    assert (done.edits, done.stamps, done.sent_ns) == (1, ("000001",), 1)
    assert c.length == 10 + 3 + 8
    assert done.send is not None and done.send["v"] == 2 and done.send["seq"] == 2
    op = done.send["op"]
    assert op[-1] == "[000002][000003]" and (len(op) == 1 or 0 < op[0] <= c.length)
    assert c.ack(2, 3, 11).stamps == ("000002", "000003")
    assert c.length == 10 + 3 + 8 + 16 and not c.pending


def test_light_editor_keeps_a_delete_in_flight_exact() -> None:
    """A delete in flight shrinks against a concurrent delete; the length stays exact."""
    rng = random.Random(3)
    c = LightEditor("d", 0, 20, rng)
    msg = c.delete(4, 0)
    assert msg is not None
    ours = msg["op"]
    start = ours[0] if isinstance(ours[0], int) else 0
    theirs = [start, {"d": 2}] if start else [{"d": 2}]  # deletes 2 of our 4
    c.remote(1, theirs)
    assert c.length == 18
    c.ack(1, 2, 1)
    assert c.length == 20 - 2 - 2


def test_light_editor_abandons_and_rejects_like_a_doc_client() -> None:
    """Dropping the buffer or a refused op leaves nothing pending and counts the edits."""
    c = LightEditor("d", 0, 5, random.Random(1))
    c.insert("[000001]", 0)
    c.insert("[000002]", 1)
    c.insert("[000003]", 2)
    assert c.abandon_buffer() == 2 and c.pending
    assert c.ack(1, 1, 3).send is None and c.length == 13
    c.insert("[000004]", 4)
    c.insert("[000005]", 5)
    assert c.reject() == (2, 2) and not c.pending


def _ops_msg(doc: str, *entries: tuple[int, list[Any]]) -> dict[str, Any]:
    return {"t": "ops", "doc": doc, "ops": [{"v": v, "op": op, "by": "u"} for v, op in entries]}


def test_ops_run_summarises_versions_length_and_stamps() -> None:
    """A run knows its versions, whether they are consecutive, its length change, stamps."""
    a, b = stamp.encode(10**18), stamp.encode(2 * 10**18)
    run = receipts.ops_run(
        [_ops_msg("d", (4, [3, a]), (5, [{"d": 2}])), _ops_msg("d", (6, [1, b + a, {"d": 1}]))]
    )
    assert (run.count, run.first_v, run.last_v, run.in_order) == (3, 4, 6, True)
    assert run.delta == 8 - 2 + 16 - 1
    assert sorted(run.stamps) == sorted(stamp.units(x[1:-1]) for x in (a, b, a))
    assert [v for v, _ in run.entries] == [4, 5, 6]
    assert not receipts.ops_run([_ops_msg("d", (4, ["x"]), (6, ["y"]))]).in_order
    assert receipts.ops_run([_ops_msg("d")]).count == 0
    with pytest.raises(receipts.Malformed):
        receipts.ops_run([{"t": "ops", "ops": [{"v": "1", "op": []}]}])


def test_frame_cache_decodes_each_ops_payload_once_and_memo_checks_the_op() -> None:
    """Equal ops payloads share one Frame; other frames are not kept; the memo compares ops."""
    cache = receipts.FrameCache(msgpack.unpackb)
    shared = msgpack.packb([_ops_msg("d", (1, [2, "[000001]"]))])
    first = cache.get(bytes(shared))
    assert cache.get(bytes(shared)) is first and first.run is not None
    ack = msgpack.packb([{"t": "ack", "doc": "d", "seq": 1, "v": 2}])
    assert cache.get(ack).run is None and cache.get(ack) is not cache.get(ack)
    presence = {"t": "presence", "doc": "d", "session": "s", "user": "u", "data": None}
    both = cache.get(msgpack.packb([presence, _ops_msg("d", (2, ["x"])), presence]))
    assert both.presence == 2 and both.run is not None and both.run.count == 1
    # Another op under the same (doc, v) is not taken from the memo.
    other = cache.run([_ops_msg("d", (1, ["[000002]", {"d": 3}]))])
    assert (other.delta, other.stamps) == (5, (stamp.units("000002"),))
    with pytest.raises(ValueError):
        cache.get(b"\xc1")


def test_sample_log_folds_by_start_time_and_bins_by_observation() -> None:
    """Samples count when their edit began in the window; series bins by receipt time."""
    log = SampleLog(origin_ns=0)
    log.add(1_100_000_000, 200_000)  # began at 0.9 s: before the window
    log.add(1_300_000_000, 200_000)  # began at 1.1 s: inside
    log.add(2_050_000_000, 100_000)  # began at 1.95 s: inside
    assert log.tail(2_000_000_000).count == 1
    h, series = Histogram(), Series(origin_ns=0)
    log.fold(h, series, 1_000_000_000, 2_000_000_000)
    assert (h.count, h.min, h.max) == (2, 100_000, 200_000)
    assert [(t, n) for t, n, _, _, _ in series.rows()] == [(1.0, 2), (2.0, 1)]
    assert len(log) == 0


@given(st.lists(st.integers(0, 10**9), max_size=60))
def test_histogram_add_counts_equals_adding_each(values: list[int]) -> None:
    one, many = Histogram(), Histogram()
    one.extend(values)
    many.add_counts(Counter(values))
    assert one.to_dict() == many.to_dict()


def test_sample_log_works_out_logged_runs_at_fold() -> None:
    """A run's stamps become one sample each, aged at fold as the hot path would have;
    a stamp from the future (a clock stepped back) is counted out, not sampled."""
    unit = stamp.UNIT_NS
    log = SampleLog(origin_ns=0)
    now = 1_500_000_000
    stamps = (now // unit - 20_000, now // unit - 30_000)  # 0.2 s and 0.3 s old
    log.log_run((now // 1000, now // unit, stamps))
    log.log_run((now // 1000, now // unit, (now // unit + 5,)))  # 50 us in the future
    log.add(1_600_000_000, 100_000)
    assert len(log) == 4
    assert log.tail(1_000_000_000).count == 3
    h, series = Histogram(), Series(origin_ns=0)
    assert log.fold(h, series, 1_250_000_000, 2_000_000_000) == 1
    # the 0.3 s sample began at 1.2 s, before the window; it is still in the series
    assert (h.count, h.min, h.max, h.total) == (2, 100_000, 200_000, 300_000)
    assert len(series.values) == 3 and len(log) == 0


def test_metrics_settle_moves_the_tally_and_log_into_the_shipped_figures() -> None:
    """Hot counters and fan-out samples reach to_dict only through settle, once."""
    m = StepMetrics(origin_ns=0)
    m.tally.ops_rx += 3
    m.counters["joined"] += 1
    m.fanout_log.add(1_500_000_000, 1000)
    assert m.counts() == {"joined": 1, "ops_rx": 3}
    m.settle(Window(1_000_000_000, 2_000_000_000))
    m.settle(Window(1_000_000_000, 2_000_000_000))
    back = StepMetrics.from_dict(m.to_dict())
    assert back.counters["ops_rx"] == 3 and back.fanout.count == 1
    assert back.fanout_series.rows()[0][1] == 1


# --- the WebSocket client's framing -------------------------------------------------------


def test_accept_key_matches_rfc_6455() -> None:
    """The handshake accept key is the RFC 6455 example's."""
    assert wsclient.accept_key("dGhlIHNhbXBsZSBub25jZQ==") == "s3pPLMBiTxaQ9kYGzzhZRbK+xOo="


def test_handshake_checks_status_key_and_subprotocol() -> None:
    """Only a 101 with the right accept key and the asked subprotocol passes."""
    key = "dGhlIHNhbXBsZSBub25jZQ=="
    ok = (
        "HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\n"
        "Sec-WebSocket-Accept: s3pPLMBiTxaQ9kYGzzhZRbK+xOo=\r\nSec-WebSocket-Protocol: p"
    )
    wsclient.check_handshake(ok.encode(), key, "p")
    for head, why in [
        (ok.replace("101 Switching Protocols", "403 Forbidden"), "refused"),
        (ok.replace("s3pP", "XXXX"), "Accept"),
        (ok.replace("Protocol: p", "Protocol: q"), "subprotocol"),
    ]:
        with pytest.raises(wsclient.WsError, match=why):
            wsclient.check_handshake(head.encode(), key, "p")


def _server_frame(opcode: int, payload: bytes, fin: bool = True) -> bytes:
    """An unmasked frame as a server sends it."""
    n = len(payload)
    first = (0x80 if fin else 0) | opcode
    if n < 126:
        return bytes((first, n)) + payload
    if n < 1 << 16:
        return bytes((first, 126)) + n.to_bytes(2, "big") + payload
    return bytes((first, 127)) + n.to_bytes(8, "big") + payload


@given(
    payloads=st.lists(st.binary(max_size=300), min_size=1, max_size=6),
    big=st.booleans(),
    cuts=st.lists(st.integers(0, 10_000), max_size=8),
)
@PROPERTY
def test_parser_reassembles_any_byte_split(
    payloads: list[bytes], big: bool, cuts: list[int]
) -> None:
    """Frames fed in arbitrary pieces come out whole, fragments joined, pings in between."""
    if big:
        payloads = [*payloads, b"x" * 70_000]
    wire = b"".join(_server_frame(wsclient.OP_BINARY, p) for p in payloads)
    wire += _server_frame(wsclient.OP_TEXT, b"ab", fin=False)
    wire += _server_frame(wsclient.OP_PING, b"!")
    wire += _server_frame(wsclient.OP_CONT, b"cd")
    parser = wsclient.FrameParser()
    out: list[tuple[int, bytes]] = []
    points = sorted({min(c, len(wire)) for c in cuts} | {0, len(wire)})
    for a, b in itertools.pairwise(points):
        out += parser.feed(wire[a:b])
    want = [(wsclient.OP_BINARY, p) for p in payloads]
    want += [(wsclient.OP_PING, b"!"), (wsclient.OP_TEXT, b"abcd")]
    assert out == want


class _NullTransport:
    def write(self, data: bytes) -> None:
        pass

    def is_closing(self) -> bool:
        return False

    def close(self) -> None:
        pass

    def abort(self) -> None:
        pass


@given(
    payloads=st.lists(st.binary(max_size=300), min_size=1, max_size=6),
    cuts=st.lists(st.integers(0, 2_000), max_size=8),
)
@PROPERTY
def test_protocol_delivers_the_same_messages_however_reads_fall(
    payloads: list[bytes], cuts: list[int]
) -> None:
    """One whole frame per read (the fast path) or any split: the same messages, in order."""
    got: list[tuple[int, bytes]] = []
    errors: list[BaseException] = []
    proto = wsclient.WsProtocol.__new__(wsclient.WsProtocol)
    proto.on_message, proto.on_error = lambda o, p: got.append((o, p)), errors.append
    proto.transport, proto.close_sent, proto._parser = _NullTransport(), False, None
    proto.key, proto.subprotocol = "k", "p"
    proto._head = bytearray()
    proto._parser = wsclient.FrameParser()
    frames = [_server_frame(wsclient.OP_BINARY, p) for p in payloads]
    for f in frames[:2]:
        proto.data_received(f)  # whole frames
    wire = b"".join(frames[2:])
    points = sorted({min(c, len(wire)) for c in cuts} | {0, len(wire)})
    for a, b in itertools.pairwise(points):
        proto.data_received(wire[a:b])
    assert got == [(wsclient.OP_BINARY, p) for p in payloads] and not errors


@given(st.binary(max_size=70_000), st.binary(min_size=4, max_size=4))
@settings(max_examples=50, deadline=None)
def test_client_frames_are_masked_and_parse_back(payload: bytes, key: bytes) -> None:
    """A masked client frame parses back to its payload (masking is an involution)."""
    frame = wsclient.encode_frame(wsclient.OP_BINARY, payload, key)
    assert frame[1] & 0x80
    assert wsclient.FrameParser().feed(frame) == [(wsclient.OP_BINARY, payload)]
    assert wsclient.mask(wsclient.mask(payload, key), key) == payload


def test_parser_rejects_reserved_bits_and_stray_continuations() -> None:
    """Reserved bits, continuation without a start and fragmented control frames are errors."""
    for wire in (
        bytes((0xC2, 1)) + b"x",
        _server_frame(wsclient.OP_CONT, b"x"),
        _server_frame(wsclient.OP_PING, b"x", fin=False),
        _server_frame(0x3, b"x"),
    ):
        with pytest.raises(wsclient.WsError):
            wsclient.FrameParser().feed(wire)


# --- the HTTP client's parser -------------------------------------------------------------

_RESPONSES = (
    b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: 5\r\n\r\nhello"
    b"HTTP/1.1 100 Continue\r\n\r\n"
    b"HTTP/1.1 404 Not Found\r\nTransfer-Encoding: chunked\r\n\r\n"
    b"3;ext=1\r\nabc\r\n4\r\ndefg\r\n0\r\nX-Trailer: 1\r\n\r\n"
    b"HTTP/1.1 204 No Content\r\n\r\n"
    b"HTTP/1.1 200 OK\r\nContent-Length: 0\r\nConnection: close\r\n\r\n"
)
_PARSED = [
    httpclient.Response(200, 5, False),
    httpclient.Response(404, 7, False),
    httpclient.Response(204, 0, False),
    httpclient.Response(200, 0, True),
]


@given(cuts=st.lists(st.integers(0, len(_RESPONSES)), max_size=10))
@PROPERTY
def test_response_parser_handles_any_split(cuts: list[int]) -> None:
    """Content-Length, chunked (with extensions and trailers), 1xx and 204 in any pieces."""
    parser = httpclient.ResponseParser()
    out: list[httpclient.Response] = []
    points = sorted({*cuts, 0, len(_RESPONSES)})
    for a, b in itertools.pairwise(points):
        out += parser.feed(_RESPONSES[a:b])
    assert out == _PARSED


def test_response_without_length_ends_at_close() -> None:
    """A body with neither length nor chunking runs to the end of the connection."""
    parser = httpclient.ResponseParser()
    assert parser.feed(b"HTTP/1.0 200 OK\r\n\r\nab") == []
    assert parser.feed(b"cd") == []
    assert parser.eof() == httpclient.Response(200, 4, True)
    with pytest.raises(httpclient.HttpError):
        httpclient.ResponseParser().feed(b"SMTP nonsense\r\n\r\n")


def test_request_bytes_are_a_keep_alive_get() -> None:
    """Requests carry the host and the given headers, and no body."""
    raw = httpclient.request_bytes("GET", "127.0.0.1", 8080, "/v1/x", {"Authorization": "B t"})
    assert raw == b"GET /v1/x HTTP/1.1\r\nHost: 127.0.0.1:8080\r\nAuthorization: B t\r\n\r\n"


# --- convergence, lost ops and verdicts ---------------------------------------------------


def _metrics_with(doc: str, stamps: list[str], reports: list[dict[str, Any]]) -> StepMetrics:
    m = StepMetrics(0)
    m.acked_stamps[doc] = Counter(stamps)
    m.acks_by_doc[doc] = len(stamps)
    m.freeze_lost_basis()
    m.full_reports = reports
    return m


def test_check_counts_acked_stamps_missing_from_the_text() -> None:
    """An acknowledged edit whose stamp is not in the final text is lost; the rest converge."""
    s1, s2 = stamp.encode(10**15), stamp.encode(2 * 10**15)
    final = DocState("d", 2, "ab" + s1)
    report = {"doc": "d", "session": 0, "joined": True, "desynced": False, "version": 2}
    report["local_consistent"] = True
    report |= {"length": len(final.text), "digest": text_digest(final.text)}
    m = _metrics_with("d", [s1[1:-1], s2[1:-1]], [report])
    m.delivery["d"] = [3, 1, 3, 2]  # 3 sessions (one joined at v1) saw 3 ops, acked 2
    got = check([DocState("d", 0, "ab")], [final], [final], m, stamps_exact=True)
    assert (got["lost"], got["converged"], got["version_gap"]) == (1, True, 0)
    assert (got["ops_owed"], got["ops_received"]) == (3 * 2 - 1 - 2, 3)
    by_version = check([DocState("d", 0, "ab")], [final], [final], m, stamps_exact=False)
    assert by_version["lost"] == 0  # two ops applied for two acks


def test_check_ignores_acks_after_the_read_and_matches_the_later_read() -> None:
    """Acks that came after the read-back are not lost; a client ahead matches the 2nd read."""
    s1, s2 = stamp.encode(10**15), stamp.encode(2 * 10**15)
    read, final = DocState("d", 1, s1), DocState("d", 2, s1 + s2)
    m = _metrics_with("d", [s1[1:-1]], [])
    m.acked_stamps["d"][s2[1:-1]] += 1  # acked after the freeze, not in the first read
    ahead = {"doc": "d", "session": 1, "joined": True, "desynced": False, "version": 2}
    ahead |= {"length": 16, "digest": text_digest(final.text), "local_consistent": True}
    m.full_reports = [ahead]
    got = check([DocState("d", 0, "")], [read], [final], m, stamps_exact=True)
    assert (got["lost"], got["converged"], got["settled"]) == (0, True, False)


def test_check_judges_loss_on_the_later_read() -> None:
    """A first read from a process a commit behind does not count an acked edit as lost."""
    s1, s2 = stamp.encode(10**15), stamp.encode(2 * 10**15)
    stale, final = DocState("d", 1, s1), DocState("d", 2, s1 + s2)
    m = _metrics_with("d", [s1[1:-1], s2[1:-1]], [])
    got = check([DocState("d", 0, "")], [stale], [final], m, stamps_exact=True)
    assert (got["lost"], got["version_gap"]) == (0, 0)
    gone = check([DocState("d", 0, "")], [stale], [stale], m, stamps_exact=True)
    assert gone["lost"] == 1  # still missing once everything settled: lost


def test_check_does_not_call_edits_nobody_compared_converged() -> None:
    """Edits were acked but no full client reported: nothing was compared, not converged."""
    m = _metrics_with("d", [], [])
    m.basis_acks["d"] = 3
    final = DocState("d", 3, "abc")
    got = check([DocState("d", 0, "")], [final], [final], m, stamps_exact=False)
    assert (got["checked_clients"], got["converged"]) == (0, False)


def test_check_flags_a_client_with_another_text() -> None:
    """A full client whose digest or version differs from the server's is a mismatch."""
    final = DocState("d", 1, "xyz")
    bad = {"doc": "d", "session": 3, "joined": True, "desynced": False, "version": 1}
    bad |= {"length": 3, "digest": text_digest("xzy")}
    got = check(
        [DocState("d", 0, "")], [final], [final], _metrics_with("d", [], [bad]), stamps_exact=True
    )
    assert not got["converged"]
    assert got["mismatches"][0]["session"] == 3
    shown = bad | {"digest": text_digest("xyz"), "local_consistent": False}
    got = check(
        [DocState("d", 0, "")], [final], [final], _metrics_with("d", [], [shown]), stamps_exact=True
    )
    assert got["mismatches"][0]["reason"] == "its user's text differs from the confirmed text"


def _outcome(**counters: int) -> StepOutcome:
    step = parse({"writers": 2, "slo": {"fanout_p99_ms": 10}}).steps[0]
    m = StepMetrics(0)
    m.counters.update(counters)
    m.fanout.extend([5_000, 20_000])
    convergence = {
        "converged": True,
        "lost": 0,
        "version_gap": 0,
        "checked_clients": 1,
        "settled": True,
        "ops_owed": 10,
        "ops_received": 10,
        "mismatches": [],
        "method": "stamps",
    }
    cost = Cost(cpu_s={"gateway": 1.0, "postgres": 0.5, "loadgen": 0.25}, server_found=True)
    return StepOutcome(step, m, 10.0, cost, convergence, procs=2)


def test_run_report_has_the_issue_keys_and_per_op_costs() -> None:
    """The report carries every key the issue lists; CPU per op is over acked ops."""
    report = run_report(
        parse({"name": "t", "writers": 1}), [_outcome(acks_window=1000, edits_window=1000)], {}
    )
    for key in (
        "scenario",
        "offered_ops_s",
        "acked_ops_s",
        "fanout_ms",
        "ack_ms",
        "errors",
        "lost",
        "converged",
        "server",
        "loadgen",
        "steps",
    ):
        assert key in report
    assert set(report["fanout_ms"]) >= {"p50", "p95", "p99", "max"}
    assert report["acked_ops_s"] == 100.0
    assert report["server"]["cpu_s"] == 1.5
    assert report["server"]["cpu_us_per_op"] == 1500.0
    assert report["loadgen"]["cpu_us_per_op"] == 250.0
    assert report["steps"][0]["slo"]["failed"] == ["fanout_p99_ms 20 > 10"]
    assert report["best"] is None


def test_best_is_not_a_step_where_the_load_generator_was_saturated() -> None:
    """Of the passing steps, the highest offered rate with the generator within its limits;
    a saturated step is the best only when no other passed, and then it says so."""
    scenario = parse({
        "name": "t", "writers": 2, "slo": {"fanout_p99_ms": 100},
        "steps": [{"name": "slow", "op_interval_ms": 100}, {"name": "fast", "op_interval_ms": 5}],
    })

    def outcome(step: Any, skipped: int) -> StepOutcome:
        base = _outcome(acks_window=1000, edits_window=1000, edits_skipped=skipped)
        return StepOutcome(step, base.metrics, 10.0, base.cost, base.convergence, procs=2)

    slow, fast = scenario.steps
    report = run_report(scenario, [outcome(slow, 0), outcome(fast, 50)], {})
    assert [s["loadgen"]["saturated"] for s in report["steps"]] == [False, True]
    assert report["best"]["step"] == "slow" and not report["best"]["loadgen_saturated"]
    alone = run_report(scenario, [outcome(fast, 50)], {})
    assert alone["best"]["step"] == "fast" and alone["best"]["loadgen_saturated"]


def test_notes_give_the_machine_speed_when_the_report_has_it() -> None:
    """The summary says how fast the machine was, so that runs can be compared by it."""
    scenario = parse({"name": "t", "writers": 1})
    outcomes = [_outcome(acks_window=1000, edits_window=1000)]
    probe = {"before": 8520.4, "after": 9101.0}
    lines = notes(run_report(scenario, outcomes, {"machine": {"cpu_probe_us": probe}}))
    assert any("CPU probe 8,520 µs before the run, 9,101 after" in line for line in lines)
    assert not any("CPU probe" in line for line in notes(run_report(scenario, outcomes, {})))


def test_slo_failures_cover_loss_convergence_and_thresholds() -> None:
    """Lost ops, divergence, connection failures and missed thresholds each fail a step."""
    r = run_report(parse({"name": "t", "writers": 1}), [_outcome(connect_failed=2)], {})
    step = r["steps"][0]
    step["lost"] = 3
    step["converged"] = False
    step["fanout_delivery"] = 0.5
    step["errors"] = {"bad_op": 2, "http_500": 1}
    failed = slo_failures(Slo(fanout_p99_ms=100, min_acked_ops_s=1), step, has_writers=True)
    assert failed == [
        "lost 3 acknowledged edits",
        "clients did not converge",
        "2 connection failures",
        "3 errors (bad_op=2, http_500=1)",
        "only 50.00% of the ops owed to sessions arrived",
        "min_acked_ops_s 0 < 1",
    ]


def test_projection_lag_is_summarised_and_checked() -> None:
    """The read models' lag samples become percentiles; the threshold fails a step past it;
    a server that does not tell the lag gets None (and a step that asks fails as unmeasured)."""
    o = _outcome(acks_window=10, edits_window=10)
    o.projection_lag = [(0.01 * i, 2 * i) for i in range(1, 101)]
    step = run_report(parse({"name": "t", "writers": 1}), [o], {})["steps"][0]
    assert step["projection_lag"] == {
        "samples": 100,
        "seconds": {"p50": 0.5, "p95": 0.95, "p99": 0.99, "max": 1.0},
        "events": {"p50": 100.0, "p95": 190.0, "p99": 198.0, "max": 200.0},
    }
    assert slo_failures(Slo(projection_lag_p99_s=1), step, has_writers=True) == []
    assert slo_failures(Slo(projection_lag_p99_s=0.5), step, has_writers=True) == [
        "projection_lag_p99_s 0.99 > 0.5"
    ]
    silent = run_report(parse({"name": "t", "writers": 1}), [_outcome()], {})["steps"][0]
    assert silent["projection_lag"] is None
    assert slo_failures(Slo(projection_lag_p99_s=1), silent, has_writers=True) == [
        "projection_lag_p99_s: not measured"
    ]


def test_window_membership_is_half_open() -> None:
    """The measured window includes its start and excludes its end."""
    w = Window(10, 20)
    assert 10 in w and 19 in w and 20 not in w and 9 not in w
    assert w.seconds == 1e-8


def test_filler_text_has_no_brackets_and_the_size_asked() -> None:
    """Initial texts are deterministic, exactly sized and free of stamp brackets."""
    text = filler_text(10_000, 3)
    assert len(text) == 10_000 and text == filler_text(10_000, 3)
    assert "[" not in text and "]" not in text
    assert filler_text(0, 1) == ""


# --- /proc accounting ---------------------------------------------------------------------


def test_proc_reads_this_process() -> None:
    """read() parses our own stat: pid, parent, start time, some CPU and memory."""
    st_ = procstat.read(os.getpid())
    assert st_ is not None
    assert (st_.pid, st_.ppid) == (os.getpid(), os.getppid())
    assert st_.rss_bytes > 0 and st_.self_ticks >= 0
    assert procstat.read(2**22 + 7) is None


@pytest.mark.parametrize(
    ("argv", "serve"),
    [
        (["/x/.venv/bin/python", "/x/.venv/bin/coscribe", "serve", "--port", "1"], True),
        (["python", "-m", "ops.cli", "serve"], True),
        (["/x/.venv/bin/coscribe", "loadtest", "serve.toml"], False),
        (["/x/.venv/bin/coscribe", "token", "serve"], True),
        (["postgres: checkpointer"], False),
    ],
)
def test_coscribe_serve_is_recognised_by_argv(argv: list[str], serve: bool) -> None:
    """Server discovery by command line matches ``coscribe serve`` however started."""
    assert procstat.is_coscribe_serve(argv) is serve


def test_cpu_account_reads_pss_every_few_scans() -> None:
    """PSS (smaps_rollup) is read again only every PSS_EVERY scans; VmRSS every scan."""
    account = procstat.CpuAccount(roots={"me": {os.getpid()}}, databases=False)
    account.begin()
    for _ in range(procstat.PSS_EVERY - 1):
        account.sample()
    # Only this process: others in the suite may have left children (a multiprocessing
    # resource tracker, say), which count as descendants of the root.
    (key,) = [k for k in account.pss_cache if k[0] == os.getpid()]
    assert account.pss_cache[key][1] == 1  # read at the first scan only
    account.sample()
    assert account.pss_cache[key][1] == procstat.PSS_EVERY + 1
    assert len(account.vmrss_samples) == procstat.PSS_EVERY + 1


def test_cpu_account_counts_a_reaped_child_once() -> None:
    """A grandchild that burns CPU and is reaped inside the window is charged once, in full."""
    burn = "import time\nt = time.process_time()\nwhile time.process_time() - t < 0.4: pass"
    parent_code = (
        "import subprocess, sys, time\n"
        f"subprocess.run([sys.executable, '-c', {burn!r}])\n"
        "print('done', flush=True)\n"
        "time.sleep(60)\n"
    )
    parent = subprocess.Popen([sys.executable, "-c", parent_code], stdout=subprocess.PIPE)
    try:
        account = procstat.CpuAccount(roots={"gateway": {parent.pid}}, databases=False)
        account.begin()
        time.sleep(0.2)
        account.sample()  # the grandchild is (most likely) seen running
        assert parent.stdout is not None
        assert parent.stdout.readline() == b"done\n"
        account.sample()  # ...and now it is gone, its time in the parent's cutime
        cpu = account.cpu_seconds()["gateway"]
    finally:
        parent.kill()
        parent.wait()
        if parent.stdout is not None:
            parent.stdout.close()
    assert 0.35 <= cpu <= 0.8
    assert account.peak_rss["gateway"] > 0


def test_cpu_account_charges_a_database_process_its_own_time_only() -> None:
    """The postmaster's reaped children are every client's backends: not the gateway's."""

    def stat(pid: int, ppid: int, own: int, children: int) -> procstat.ProcStat:
        return procstat.ProcStat(pid, ppid, "postgres", 7, own, children, 0)

    account = procstat.CpuAccount(roots={"gateway": set()}, started=True)
    tick = procstat._TICK
    postmaster = (stat(10, 1, 100, 0), stat(10, 1, 100 + tick, 50 * tick))
    backend = (stat(11, 10, 0, 0), stat(11, 10, 2 * tick, 0))  # exited after its last sample
    account.tracked = {
        (10, 7): procstat._Tracked("postgres", *postmaster),
        (11, 7): procstat._Tracked("postgres", *backend),
    }
    account.alive = {(10, 7)}
    assert account.cpu_seconds()["postgres"] == pytest.approx(3.0)


# --- command line -------------------------------------------------------------------------


def _parse(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="coscribe")
    register(parser.add_subparsers(dest="command", required=True))
    return parser.parse_args(argv)


def test_register_adds_the_issue_flags() -> None:
    """``coscribe loadtest`` takes the scenario, --url, --json, --procs, --server-pid, --plot."""
    args = _parse(
        [
            *("loadtest", "s.toml", "--url", "http://127.0.0.1:1", "--json", "o.json"),
            *("--procs", "3", "--server-pid", "10", "11", "--server-pid", "12", "--plot", "p.png"),
        ]
    )
    assert args.scenario == "s.toml" and args.procs == 3
    assert args.server_pids == [10, 11, 12]
    assert (args.json_out, args.plot) == (Path("o.json"), Path("p.png"))
    assert callable(args.func)


def test_secret_comes_from_flag_env_or_data_dir(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """--secret wins, then COSCRIBE_SECRET, then <data-dir>/secret; none is an error."""
    monkeypatch.delenv("COSCRIBE_SECRET", raising=False)
    monkeypatch.delenv("COSCRIBE_DATA_DIR", raising=False)
    with pytest.raises(ValueError, match="no secret"):
        resolve_secret(None, tmp_path)
    assert not (tmp_path / "secret").exists()  # never invents one
    (tmp_path / "secret").write_text("abc\n")
    assert resolve_secret(None, tmp_path) == b"abc"
    monkeypatch.setenv("COSCRIBE_SECRET", "env")
    assert resolve_secret(None, tmp_path) == b"env"
    assert resolve_secret("flag", tmp_path) == b"flag"


def test_bad_arguments_exit_2(tmp_path: Path) -> None:
    """A missing scenario or a non-loopback URL fails fast with status 2, sending nothing."""
    args = _parse(["loadtest", str(tmp_path / "none.toml"), "--secret", "s"])
    assert args.func(args) == 2
    args = _parse(["loadtest", "standard", "--secret", "s", "--url", "http://10.1.2.3:80"])
    assert args.func(args) == 2
    for flag in ("--json", "--plot"):  # checked before the run, not after it
        args = _parse(["loadtest", "standard", "--secret", "s", flag, "/nonexistent/d/out.png"])
        assert args.func(args) == 2
        args = _parse(["loadtest", "standard", "--secret", "s", flag, str(tmp_path)])
        assert args.func(args) == 2  # a directory
    for name in ("out.xyz", "noext"):  # a format matplotlib would refuse, or guess at
        args = _parse(["loadtest", "standard", "--secret", "s", "--plot", str(tmp_path / name)])
        assert args.func(args) == 2


def test_procs_and_server_pids_out_of_range_exit_2(capsys: pytest.CaptureFixture[str]) -> None:
    """--procs outside 1..64 (100,000 once started that many processes) and a --server-pid
    with no process are bad arguments, found before anything starts."""
    for procs in ("0", "65", "100000"):
        args = _parse(["loadtest", "standard", "--secret", "s", "--procs", procs])
        assert args.func(args) == 2
        assert "--procs must be in 1..64" in capsys.readouterr().err
    with open("/proc/sys/kernel/pid_max") as f:
        missing = int(f.read()) + 1  # above the largest PID the kernel hands out
    args = _parse(["loadtest", "standard", "--secret", "s", "--server-pid", str(missing)])
    assert args.func(args) == 2
    assert f"--server-pid {missing}: no such process" in capsys.readouterr().err


def test_plot_without_a_working_matplotlib_exits_2_before_the_run(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """matplotlib that cannot be imported (missing, or broken) is found before the run."""
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # import matplotlib: ImportError
    args = _parse(["loadtest", "standard", "--secret", "s", "--plot", str(tmp_path / "p.png")])
    assert args.func(args) == 2
    assert "--plot needs matplotlib" in capsys.readouterr().err


def test_a_run_that_reports_nothing_removes_an_older_report(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """No step finished (here the server is not there at all): exit 1, and the files at the
    --json and --plot paths from an earlier run are gone, so none passes for this run's."""
    with socket.socket() as s:  # a port nobody listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    old_json, old_plot = tmp_path / "r.json", tmp_path / "r.png"
    old_json.write_text('{"scenario": "an older run"}')
    old_plot.write_bytes(b"old")
    args = _parse(["loadtest", "standard", "--secret", "s", "--url", f"http://127.0.0.1:{port}",
                   "--json", str(old_json), "--plot", str(old_plot), "--procs", "1"])
    assert args.func(args) == 1
    assert not old_json.exists() and not old_plot.exists()
    assert "removed the older" in capsys.readouterr().err


def test_a_message_keeps_its_square_brackets(capsys: pytest.CaptureFixture[str]) -> None:
    """Errors are printed as text, not read as rich markup ("[plot]" stays)."""
    args = _parse(["loadtest", "standard", "--secret", "s", "--url", "http://10.0.0.1/[plot]"])
    assert args.func(args) == 2
    assert "[plot]" in capsys.readouterr().err


def test_the_live_panel_counts_the_sessions_of_its_own_step() -> None:
    """A finished step still shows 21/21 joined; the next one starts at 0 of its own plan."""
    import io

    from rich.console import Console

    from ops.loadtest.progress import Progress

    first, second = parse(
        {"writers": 7, "documents": 3, "steps": [{"name": "a"}, {"name": "b", "writers": 4}]}
    ).steps
    console = Console(file=io.StringIO(), width=200)
    progress = Progress(console, "two", live=False)

    def sessions_line() -> str:
        console.file = io.StringIO()
        console.print(progress._render())
        return next(x for x in console.file.getvalue().splitlines() if x.startswith("sessions"))

    progress.stage(first, 0, 2, "creating documents")
    assert sessions_line().startswith("sessions 0/21 joined")
    progress.begin_step(first, 0, 2, time.time_ns(), Window(0, 10**9), 0.0)
    progress.update({"worker": 0, "counters": {"joined": 21}, "errors": {}})
    progress.stage(first, 0, 2, "verifying")
    assert sessions_line().startswith("sessions 21/21 joined")
    progress.end_step()
    assert sessions_line().startswith("sessions 21/21 joined")
    progress.stage(second, 1, 2, "creating documents")
    assert sessions_line().startswith("sessions 0/12 joined")


def test_every_error_code_the_tool_counts_is_documented() -> None:
    """Each code (or code prefix) the tool counts in ``errors`` is in the README's table."""
    readme = (ROOT / "ops" / "loadtest" / "README.md").read_text()
    made = {
        code
        for path in (ROOT / "ops" / "loadtest").glob("*.py")
        for line in path.read_text().splitlines()
        if "errors[" in line
        for code in re.findall(r'"([a-z]+[:_][a-z_]*)', line)
    }
    assert {"close:dropped", "http:", "connect:", "client:version_gap"} <= made
    assert sorted(c for c in made if f"`{c}" not in readme) == []


def test_a_run_in_which_no_session_joined_failed() -> None:
    """A step that planned sessions and joined none measured nothing."""
    from ops.loadtest.command import _nobody_joined

    assert _nobody_joined({"sessions": {"planned": 7, "joined": 0}})
    assert not _nobody_joined({"sessions": {"planned": 7, "joined": 7}})
    assert not _nobody_joined({"sessions": {"planned": 0, "joined": 0}})  # HTTP only


# --- the OT benchmark ---------------------------------------------------------------------


def test_ot_benchmark_builds_valid_ops_and_times_every_case() -> None:
    """ops.bench.ot makes ops that fit its text and reports a rate for every case."""
    from ops.bench import ot as bench

    rng = random.Random(5)
    text = bench.random_text(5000, rng)
    for _ in range(20):
        for op in (bench.typing_op(len(text), rng), bench.scattered_op(len(text), 50, rng)):
            assert ot.validate(op, len(text)) == op
    rows = bench.run(size=2000, edits=20, seconds=0.001, seed=1)
    assert len(rows) == len(bench.cases(2000, 20, 1))
    assert all(r["ops_s"] > 0 for r in rows)


def test_cpu_probe_is_the_median_of_its_rounds(monkeypatch: pytest.MonkeyPatch) -> None:
    """The probe reports the median round in µs, so one preempted round does not move it."""
    from ops.loadtest import runner

    ticks = iter([0.0, 0.010, 1.0, 1.011, 2.0, 2.5, 3.0, 3.009, 4.0, 4.012])
    monkeypatch.setattr(runner.time, "perf_counter", lambda: next(ticks))
    assert runner.cpu_probe_us(rounds=5) == 11000.0
    monkeypatch.undo()
    assert runner.cpu_probe_us(rounds=1) > 0


# --- a real server ------------------------------------------------------------------------


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _wait_healthy(port: int, proc: subprocess.Popen[bytes], timeout: float = 30.0) -> None:
    import urllib.request

    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"server exited with {proc.returncode}")
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/healthz", timeout=1) as r:
                if r.status == 200:
                    return
        except OSError:
            time.sleep(0.1)
    raise RuntimeError("server did not become healthy")


COSCRIBE = shutil.which("coscribe", path=str(Path(sys.executable).parent))


def _serve(data: Path) -> tuple[int, subprocess.Popen[bytes], dict[str, str]]:
    """A ``coscribe serve`` on a free port with ``data`` as its data dir, healthy: its port,
    process and the environment it runs in (no ``COSCRIBE_*`` of the caller's)."""
    assert COSCRIBE is not None
    port = _free_port()
    env = {k: v for k, v in os.environ.items() if not k.startswith("COSCRIBE_")}
    server = subprocess.Popen(
        [COSCRIBE, "serve", "--port", str(port), "--data-dir", str(data)],
        env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )
    _wait_healthy(port, server)
    return port, server, env


@pytest.mark.slow
@pytest.mark.skipif(
    COSCRIBE is None or not (ROOT / "gateway" / "app.py").exists(),
    reason="needs the coscribe server (gateway/app.py and the coscribe script)",
)
def test_tiny_run_against_a_real_server(tmp_path: Path) -> None:
    """A 2 s run of every client kind on a real server: all keys, converged, nothing lost."""
    data = tmp_path / "data"
    scenario = tmp_path / "tiny.toml"
    scenario.write_text(
        'name = "tiny"\ndocuments = 2\nwriters = 3\nobservers = 2\nfull = 2\n'
        'op_interval_ms = 50\nprotocol = "mixed"\nwarmup_s = 0.5\nmeasure_s = 2\n'
        "presence_interval_s = 0.5\n[http]\nconcurrency = 2\n"
    )
    port, server, env = _serve(data)
    try:
        out = tmp_path / "report.json"
        run = subprocess.run(
            [
                *(sys.executable, "-m", "ops.loadtest", str(scenario), "--procs", "1"),
                *("--url", f"http://127.0.0.1:{port}", "--data-dir", str(data), "--json", str(out)),
            ],
            env=env,
            cwd=ROOT,
            capture_output=True,
            timeout=120,
        )
        assert run.returncode == 0, run.stderr.decode()[-2000:]
        report = json.loads(out.read_text())
    finally:
        server.terminate()
        try:
            server.wait(timeout=15)
        except subprocess.TimeoutExpired:
            server.kill()
            server.wait()
    for key in ("scenario", "offered_ops_s", "acked_ops_s", "errors", "steps"):
        assert key in report
    for key in ("fanout_ms", "ack_ms"):
        assert set(report[key]) >= {"p50", "p95", "p99", "max"}
    assert set(report["server"]) >= {"cpu_s", "peak_rss_mb", "cpu_us_per_op"}
    assert set(report["loadgen"]) >= {"cpu_s", "cpu_us_per_op"}
    assert report["converged"] is True
    assert report["lost"] == 0
    assert report["sessions"]["joined"] == 10
    assert report["acked_ops_s"] > 0 and report["fanout_ms"]["count"] > 0
    assert report["convergence"]["checked_clients"] == 4
    assert report["fanout_delivery"] == 1.0
    assert report["http"]["req_s"] > 0
    assert report["errors"] == {}
    assert report["presence"]["sent"] > 0
    assert report["server"]["cpu_s"] is not None  # found the server by its port
    probe = report["machine"]["cpu_probe_us"]  # the machine's speed, before and after
    assert probe["before"] > 0 and probe["after"] > 0


@pytest.mark.slow
@pytest.mark.skipif(
    COSCRIBE is None or not (ROOT / "gateway" / "app.py").exists(),
    reason="needs the coscribe server (gateway/app.py and the coscribe script)",
)
def test_a_server_gone_mid_run_still_gives_the_finished_steps(tmp_path: Path) -> None:
    """The server killed in step 2 of 2: the run stops at once (not at the end of the
    window), exits 1, and writes the report of step 1 with ``failed``."""
    data = tmp_path / "data"
    scenario = tmp_path / "two.toml"
    scenario.write_text(
        'name = "two"\ndocuments = 1\nwriters = 2\nop_interval_ms = 50\n'
        'warmup_s = 0.2\nmeasure_s = 1\n'
        '[[steps]]\nname = "first"\n[[steps]]\nname = "second"\nmeasure_s = 30\n'
    )
    port, server, env = _serve(data)
    out = tmp_path / "report.json"
    try:
        run = subprocess.Popen(
            [
                *(sys.executable, "-m", "ops.loadtest", str(scenario), "--procs", "1"),
                *("--url", f"http://127.0.0.1:{port}", "--data-dir", str(data), "--json", str(out)),
            ],
            env=env, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        )
        assert run.stderr is not None
        for line in run.stderr:  # progress lines: kill the server once step 2's load runs
            if "step 2/2" in line and "sessions" in line:
                server.kill()
                server.wait()
                break
        killed = time.monotonic()
        _, err = run.communicate(timeout=120)
        stopped_s = time.monotonic() - killed
    finally:
        if server.poll() is None:
            server.kill()
            server.wait()
    assert run.returncode == 1, err[-2000:]
    report = json.loads(out.read_text())
    assert [s["name"] for s in report["steps"]] == ["first"]
    assert report["failed"].startswith("after step 1: ")
    assert "the server is gone" in report["failed"]
    assert stopped_s < 20, "the run went on with its 30 s window, the server dead"
    assert report["steps"][0]["converged"] is True and report["steps"][0]["lost"] == 0
