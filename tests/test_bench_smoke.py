"""Smoke runs of the benchmarks in ``ops/bench``: the smallest parameters, real databases.

These check that each benchmark runs end to end, reports positive rates and leaves no schema
behind; they assert nothing about speed (the figures are in ``ops/bench/README.md``). And
that arguments a benchmark cannot use, or a database it cannot reach, stop it with one line.
"""

from __future__ import annotations

import socket
from collections.abc import Callable
from pathlib import Path
from typing import Any

import orjson
import psycopg
import pytest

from ops.bench import commit, fanout, frames, projections, store
from ops.bench import ot as ot_bench


def _report(path: Path) -> Any:
    return orjson.loads(path.read_bytes())


def _leftover_schemas(pg_url: str, names: list[str]) -> list[str]:
    with psycopg.connect(pg_url, autocommit=True) as conn:
        rows = conn.execute(
            "SELECT nspname FROM pg_namespace WHERE nspname = ANY(%s)", (names,)
        ).fetchall()
    return [r[0] for r in rows]


def test_frames_bench_reports_positive_rates(tmp_path: Path) -> None:
    """The frames benchmark reports positive codec and broadcast rates for every case."""
    out = tmp_path / "frames.json"
    assert frames.main(["--quick", "--json", str(out)]) == 0
    report = _report(out)
    assert len(report["codec"]) == 2 * 2 * 2 * len(frames.OPS_PER_FRAME)
    assert all(r["frames_s"] > 0 and r["ops_s"] >= r["frames_s"] for r in report["codec"])
    assert len(report["broadcast"]) == 3 * len(frames.SUBSCRIBERS)
    for r in report["broadcast"]:
        assert r["encode_once_broadcasts_s"] > 0 and r["per_subscriber_broadcasts_s"] > 0


@pytest.mark.postgres
def test_store_bench_reports_rates_and_drops_its_schemas(tmp_path: Path, pg_url: str) -> None:
    """The store benchmark reports positive events/s and a COPY ratio, and drops its schemas."""
    out = tmp_path / "store.json"
    argv = ["--quick", "--seconds", "0.05", "--database-url", pg_url, "--json", str(out)]
    assert store.main(argv) == 0
    report = _report(out)
    methods = {r["method"] for r in report["cases"]}
    assert {"Store.save", "raw COPY (bare table)", "SQLite Store.save"} <= methods
    assert any(m.startswith("library as-is") for m in methods)
    for r in report["cases"]:
        assert r["events"] > 0 and r["events_s"] > 0
        assert r["ratio_to_raw_copy"] is not None and r["ratio_to_raw_copy"] > 0
    assert all(r["us_per_event"] > 0 for r in report["cpu"] if "us_per_event" in r)
    assert report["schemas"]
    assert _leftover_schemas(pg_url, report["schemas"]) == []


@pytest.mark.postgres
def test_projections_bench_rebuilds_every_event(tmp_path: Path, pg_url: str) -> None:
    """The rebuild benchmark generates, reads and replays every event, then drops its schema."""
    out = tmp_path / "projections.json"
    argv = ["--events", "1500", "--events-per-doc", "50", "--docs", "5", "--database-url",
            pg_url, "--json", str(out)]
    assert projections.main(argv) == 0
    report = _report(out)
    assert report["events"] >= 1500
    assert report["rebuild_events"] == report["events"]
    assert report["read_events_s"] > 0 and report["rebuild_events_s"] > 0
    assert report["generate_events_s"] > 0
    assert _leftover_schemas(pg_url, report["schemas"]) == []


def test_commit_bench_times_both_writers(tmp_path: Path, pg_url: str) -> None:
    """The commit-latency benchmark runs both writers against PostgreSQL and cleans up."""
    from ops.bench import commit

    out = tmp_path / "commit.json"
    argv = ["--database-url", pg_url, "--commits", "20", "--batch", "5", "--json", str(out)]
    assert commit.main(argv) == 0
    results = _report(out)["results"]
    assert set(results) == {"thread", "asyncio"}
    assert all(r["commits"] == 10 and r["wall_ms_p50"] > 0 for r in results.values())


@pytest.mark.postgres
def test_tick_bench_reports_both_sides_of_each_commit(tmp_path: Path, pg_url: str) -> None:
    """The tick benchmark runs checked and locked commits and reports the gateway's and the
    PostgreSQL backend's CPU for each, then drops its schema."""
    from ops.bench import tick

    out = tmp_path / "tick.json"
    argv = ["--database-url", pg_url, "--batches", "1", "3", "--commits", "30",
            "--json", str(out)]
    assert tick.main(argv) == 0
    report = _report(out)
    cases = {(r["kind"], r["batch"]): r for r in report["results"]}
    assert set(cases) == {(k, b) for k in ("checked", "locked") for b in (1, 3)}
    for r in cases.values():
        assert r["commits"] == 30 and r["wall_us_per_commit"] > 0
        assert r["gateway_cpu_us_per_commit"] > 0
        assert r["postgres_cpu_us_per_commit"] is not None
        assert r["postgres_cpu_us_per_commit"] > 0
    assert _leftover_schemas(pg_url, report["schemas"]) == []


def test_fanout_bench_reports_the_cost_of_a_write(tmp_path: Path) -> None:
    """The fan-out floor benchmark writes to real sockets and reports CPU per write."""
    from ops.bench import fanout

    out = tmp_path / "fanout.json"
    assert fanout.main(["--sockets", "3", "--rounds", "50", "--json", str(out)]) == 0
    result = _report(out)["result"]
    assert result["writes"] == 150 and result["wall_us_per_write"] > 0


def test_summary_plots_are_drawn_from_reports(tmp_path: Path) -> None:
    """ops.perf.plots draws its four PNGs from loadtest and rebuild reports."""
    pytest.importorskip("matplotlib")
    from ops.perf import plots

    groups = {g: {"cpu_s": 4.0} for g in ("gateway", "postgres", "redis")}
    server = {"peak_rss_mb": 400.0, "peak_vmrss_mb": 900.0, "groups": groups}
    step = {"acked_edits_s": 2000.0, "acked_ops_s": 2000.0, "window_s": 20.0,
            "fanout_ms": {"p50": 50.0, "p99": 150.0}, "sessions": {"joined": 200},
            "server": server, "loadgen": {"cpu_us_per_op": 200.0, "ops_per_frame": 1.5}}
    load = tmp_path / "load.json"
    load.write_bytes(orjson.dumps({"steps": [step, step]}))
    rebuild = tmp_path / "rebuild.json"
    rebuild.write_bytes(orjson.dumps({"rebuild_events": 1000, "rebuild_s": 0.5}))
    argv = ["--saturate", str(load), "--sessions", str(load), "--rebuild", str(rebuild),
            "--out", str(tmp_path)]
    assert plots.main(argv) == 0
    for name in ("latency-vs-rate", "cost-vs-rate", "memory-vs-sessions", "rebuild-vs-events"):
        assert (tmp_path / f"{name}.png").stat().st_size > 1000
    # cost-vs-rate from several reports' steps (load-curve and saturate), 200 to 6,000 ops/s
    light = tmp_path / "light.json"
    slow = {"acked_edits_s": 200.0, "acked_ops_s": 200.0}
    light.write_bytes(orjson.dumps({"steps": [step | slow]}))
    fast = tmp_path / "fast.json"
    fast.write_bytes(orjson.dumps({"steps": [step | {"acked_edits_s": 6000.0}]}))
    (tmp_path / "cost-vs-rate.png").unlink()
    assert plots.main(["--cost", str(light), str(load), str(fast), "--out", str(tmp_path)]) == 0
    assert (tmp_path / "cost-vs-rate.png").stat().st_size > 1000


BENCHES: dict[str, Callable[[list[str]], int]] = {
    "commit": commit.main,
    "fanout": fanout.main,
    "frames": frames.main,
    "projections": projections.main,
    "store": store.main,
}


@pytest.mark.parametrize(
    ("bench", "argv", "message"),
    [
        ("commit", ["--commits", "10"], "--commits: must be >= 20"),
        ("commit", ["--batch", "0"], "--batch: must be >= 1"),
        ("commit", ["--busy", "1.5"], "--busy: must be in [0, 0.95]"),
        ("commit", ["--busy", "-3"], "--busy: must be in [0, 0.95]"),
        ("fanout", ["--rounds", "0"], "--rounds: must be >= 1"),
        ("fanout", ["--sockets", "0"], "--sockets: must be >= 1"),
        ("fanout", ["--size", "x"], "--size: not an integer"),
        ("store", ["--seconds", "inf"], "--seconds: must be in [0, 86400]"),
        ("frames", ["--seconds", "nan"], "--seconds: must be in [0, 86400]"),
        ("projections", ["--follow-page", "0"], "--follow-page"),
    ],
)
def test_unusable_arguments_are_usage_errors(
    bench: str, argv: list[str], message: str, capsys: pytest.CaptureFixture[str]
) -> None:
    """A count or fraction a benchmark cannot compute with exits 2 with a message, at once."""
    with pytest.raises(SystemExit) as exit_:
        BENCHES[bench](argv)
    assert exit_.value.code == 2
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err


@pytest.mark.parametrize("bench", sorted([*BENCHES, "ot"]))
def test_a_json_path_that_cannot_be_written_is_refused_before_any_work(
    bench: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """--json in a missing directory, or naming a directory: exit 2 at once, one message."""
    main = BENCHES.get(bench) or ot_bench.main
    for path in (tmp_path / "missing" / "out.json", tmp_path):
        with pytest.raises(SystemExit) as exit_:
            main(["--json", str(path)])
        assert exit_.value.code == 2
        err = capsys.readouterr().err
        assert f"--json: {path}: " in err and "Traceback" not in err


def test_a_json_write_that_fails_after_the_run_is_one_line_and_exit_1(
    capsys: pytest.CaptureFixture[str]
) -> None:
    """A full disk (``/dev/full``) found only when the report is written: status 1."""
    assert frames.main(["--quick", "--seconds", "0.001", "--json", "/dev/full"]) == 1
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "--json /dev/full: No space left on device" in err


@pytest.mark.parametrize("bench", ["store", "projections", "commit"])
def test_an_unreachable_database_is_one_line_and_exit_1(
    bench: str, capsys: pytest.CaptureFixture[str]
) -> None:
    """--database-url naming a closed port: one line on stderr, status 1, no traceback."""
    with socket.socket() as s:  # a port that was free a moment ago: connections are refused
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    assert BENCHES[bench](["--database-url", f"postgresql://postgres@127.0.0.1:{port}/x"]) == 1
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "cannot connect to PostgreSQL" in err
