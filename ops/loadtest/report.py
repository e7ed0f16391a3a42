"""Turning a step's raw measurements into the report: the JSON object, the SLO verdict, tables.

The JSON shape is documented in ``ops/loadtest/README.md``; every key listed there is always
present (a figure that could not be measured is ``null``).
"""

from __future__ import annotations

import os
from dataclasses import asdict, dataclass, field
from typing import Any

from rich.table import Table

from ops.loadtest.recorder import StepMetrics
from ops.loadtest.scenario import Scenario, Slo, Step
from ops.loadtest.stats import Histogram, percentile, summary_ms

MIN_DELIVERY = 1.0
"""Below this share of owed ops received a step fails: broadcasts were lost or too late."""
SATURATED_UTIL = 0.9
"""A load process busier than this (CPU seconds per second) could not keep its schedule."""
SATURATED_LAG_MS = 20.0
"""Or: its event loop ran a 100 ms timer this late at p99."""


@dataclass(slots=True)
class Cost:
    """CPU seconds and peak memory per group of processes, over the measured window."""

    cpu_s: dict[str, float] = field(default_factory=dict)
    peak_rss: dict[str, int] = field(default_factory=dict)
    peak_server_rss: int = 0
    peak_server_vmrss: int = 0
    pids: dict[str, list[int]] = field(default_factory=dict)
    server_found: bool = False
    machine_busy_s: float = 0.0


@dataclass(slots=True)
class StepOutcome:
    """Everything measured in one step."""

    step: Step
    metrics: StepMetrics
    window_s: float
    cost: Cost
    convergence: dict[str, Any]
    procs: int
    projection_lag: list[tuple[float, int]] = field(default_factory=list)
    """``(seconds, events)`` of the read models' lag, sampled through the measured window."""


SERVER_GROUPS = ("gateway", "postgres", "redis")
"""Groups whose CPU and memory are the server's cost."""


def _rate(n: float, seconds: float) -> float:
    return round(n / seconds, 1) if seconds > 0 else 0.0


def _per_op(cpu_s: float | None, ops: int) -> float | None:
    if cpu_s is None or ops <= 0:
        return None
    return round(cpu_s / ops * 1e6, 1)


def _mb(n: int) -> float:
    return round(n / (1 << 20), 1)


def figures(
    metrics: StepMetrics,
    window_s: float,
    cost: Cost,
    convergence: dict[str, Any],
    procs: int,
) -> dict[str, Any]:
    """The measured figures of one step, or of several merged (the shared JSON keys)."""
    c = metrics.counters
    acks = c["acks_window"]
    http_n = c["http_window"]
    server_cpu = (
        round(sum(cost.cpu_s.get(g, 0.0) for g in SERVER_GROUPS), 3) if cost.server_found else None
    )
    loadgen_cpu = round(cost.cpu_s.get("loadgen", 0.0), 3)
    util = loadgen_cpu / (window_s * procs) if window_s > 0 else 0.0
    lag = summary_ms(metrics.lag)
    groups = {
        g: {
            "cpu_s": round(cost.cpu_s.get(g, 0.0), 3),
            "peak_rss_mb": _mb(cost.peak_rss.get(g, 0)),
            "pids": sorted(cost.pids.get(g, [])),
        }
        for g in SERVER_GROUPS
        if g in cost.cpu_s or g in cost.peak_rss
    }
    measured = sum(cost.cpu_s.values())
    out: dict[str, Any] = {
        "window_s": round(window_s, 3),
        "sessions": {
            "planned": c["sessions"],
            "connected": c["connected"],
            "joined": c["joined"],
            "connect_failed": c["connect_failed"],
            "never_connected": max(0, c["sessions"] - c["connected"] - c["connect_failed"]),
            "join_failed": c["join_failed"],
            "disconnected": c["disconnected"],
            "desynced": c["desynced"],
        },
        "offered_ops_s": _rate(c["edits_window"], window_s),
        "acked_ops_s": _rate(acks, window_s),
        "acked_edits_s": _rate(c["acked_edits_window"], window_s),
        "received_ops_s": _rate(c["ops_rx_window"], window_s),
        "fanout_ms": summary_ms(metrics.fanout),
        "fanout_delivery": (
            round(convergence["ops_received"] / convergence["ops_owed"], 4)
            if convergence.get("ops_owed")
            else None
        ),
        "ack_ms": summary_ms(metrics.ack),
        "join_ms": summary_ms(metrics.join),
        "http": {"req_s": _rate(http_n, window_s), "latency_ms": summary_ms(metrics.http)},
        "presence": {"sent": c["presence_tx"], "received": c["presence_rx"]},
        "errors": dict(sorted(metrics.errors.items())),
        "connection_failures": c["connect_failed"],
        "lost": convergence["lost"],
        "unacked": c["pending_edits"],
        "abandoned_edits": c["abandoned_edits"],
        "converged": convergence["converged"],
        "convergence": convergence,
        "machine_cpu": {
            "capacity_s": round(window_s * (os.cpu_count() or 1), 3),
            "busy_s": round(cost.machine_busy_s, 3),
            "other_s": round(max(0.0, cost.machine_busy_s - measured), 3),
        },
        "server": {
            "cpu_s": server_cpu,
            "peak_rss_mb": _mb(cost.peak_server_rss) if cost.server_found else None,
            "peak_vmrss_mb": _mb(cost.peak_server_vmrss) if cost.server_found else None,
            "cpu_us_per_op": _per_op(server_cpu, acks),
            "cpu_us_per_request": _per_op(server_cpu, http_n),
            "groups": groups,
        },
        "loadgen": {
            "cpu_s": loadgen_cpu,
            "cpu_us_per_op": _per_op(loadgen_cpu, acks),
            "procs": procs,
            "cpu_util": round(util, 3),
            "loop_lag_ms": lag,
            "edits_skipped": c["edits_skipped"],
            "ops_per_frame": round(c["ops_rx"] / c["frames_rx"], 2) if c["frames_rx"] else None,
            "saturated": util > SATURATED_UTIL
            or (lag["p99"] is not None and lag["p99"] > SATURATED_LAG_MS)
            or c["edits_skipped"] > 0,
        },
    }
    return out


def step_report(o: StepOutcome) -> dict[str, Any]:
    """The JSON object of one step: its parameters, figures and SLO verdict."""
    s = o.step
    out: dict[str, Any] = {
        "name": s.name,
        "params": {
            "documents": s.documents,
            "writers": s.writers,
            "observers": s.observers,
            "full": s.full,
            "sessions": s.sessions,
            "text_size": s.text_size,
            "op_interval_ms": s.op_interval_ms,
            "planned_ops_s": round(s.offered_ops_s, 1) if s.writers else 0.0,
            "delete_ratio": s.delete_ratio,
            "presence_interval_s": s.presence_interval_s,
            "protocol": s.protocol,
            "warmup_s": s.warmup_s,
            "measure_s": s.measure_s,
            "http_concurrency": s.http.concurrency if s.http else 0,
        },
    }
    out.update(figures(o.metrics, o.window_s, o.cost, o.convergence, o.procs))
    out["projection_lag"] = lag_figures(o.projection_lag)
    failed = slo_failures(s.slo, out, has_writers=s.writers > 0)
    out["slo"] = {"ok": not failed, "failed": failed, "thresholds": _thresholds(s.slo)}
    return out


def lag_figures(samples: list[tuple[float, int]]) -> dict[str, Any] | None:
    """``{"samples", "seconds": {p50, p95, p99, max}, "events": {same}}`` of the read models'
    lag through the window; None when the server did not tell."""
    if not samples:
        return None
    out: dict[str, Any] = {"samples": len(samples)}
    for i, unit in ((0, "seconds"), (1, "events")):
        ordered = sorted(float(s[i]) for s in samples)
        out[unit] = {"p50": round(percentile(ordered, 0.50), 3),
                     "p95": round(percentile(ordered, 0.95), 3),
                     "p99": round(percentile(ordered, 0.99), 3), "max": round(ordered[-1], 3)}
    return out


def _thresholds(slo: Slo) -> dict[str, float]:
    return {k: v for k, v in asdict(slo).items() if v is not None}


def slo_failures(slo: Slo, r: dict[str, Any], *, has_writers: bool) -> list[str]:
    """Why step report ``r`` misses its thresholds (empty when it meets them all)."""
    failed = []
    if r["lost"]:
        failed.append(f"lost {r['lost']} acknowledged edits")
    if r["converged"] is False:
        failed.append("clients did not converge")
    if r["connection_failures"]:
        failed.append(f"{r['connection_failures']} connection failures")
    if r["sessions"].get("never_connected"):
        failed.append(
            f"{r['sessions']['never_connected']} sessions were still waiting to connect at the"
            " end (the server was slow to finish earlier handshakes)"
        )
    if r["sessions"]["desynced"]:
        failed.append(f"{r['sessions']['desynced']} writers had an op refused")
    if r["errors"]:
        top = ", ".join(
            f"{k}={v}" for k, v in sorted(r["errors"].items(), key=lambda kv: -kv[1])[:3]
        )
        failed.append(f"{sum(r['errors'].values())} errors ({top})")
    if has_writers and r["fanout_ms"]["count"] == 0 and r["sessions"]["planned"] > 1:
        failed.append("no fan-out samples")
    delivery = r.get("fanout_delivery")
    if delivery is not None and delivery < MIN_DELIVERY:
        failed.append(f"only {delivery:.2%} of the ops owed to sessions arrived")
    checks: list[tuple[str, float | None, float | None, bool]] = [
        ("fanout_p50_ms", slo.fanout_p50_ms, r["fanout_ms"]["p50"], True),
        ("fanout_p95_ms", slo.fanout_p95_ms, r["fanout_ms"]["p95"], True),
        ("fanout_p99_ms", slo.fanout_p99_ms, r["fanout_ms"]["p99"], True),
        ("ack_p99_ms", slo.ack_p99_ms, r["ack_ms"]["p99"], True),
        ("join_p50_ms", slo.join_p50_ms, r["join_ms"]["p50"], True),
        ("join_p99_ms", slo.join_p99_ms, r["join_ms"]["p99"], True),
        ("http_p99_ms", slo.http_p99_ms, r["http"]["latency_ms"]["p99"], True),
        ("server_cpu_us_per_op", slo.server_cpu_us_per_op, r["server"]["cpu_us_per_op"], True),
        ("server_peak_rss_mb", slo.server_peak_rss_mb, r["server"]["peak_rss_mb"], True),
        ("min_acked_ops_s", slo.min_acked_ops_s, r["acked_ops_s"], False),
        ("min_http_req_s", slo.min_http_req_s, r["http"]["req_s"], False),
        ("projection_lag_p99_s", slo.projection_lag_p99_s,
         (r.get("projection_lag") or {}).get("seconds", {}).get("p99"), True),
    ]
    for name, limit, value, upper in checks:
        if limit is None:
            continue
        if value is None:
            failed.append(f"{name}: not measured")
        elif upper and value > limit:
            failed.append(f"{name} {value:g} > {limit:g}")
        elif not upper and value < limit:
            failed.append(f"{name} {value:g} < {limit:g}")
    return failed


def run_report(
    scenario: Scenario, outcomes: list[StepOutcome], meta: dict[str, Any]
) -> dict[str, Any]:
    """The whole run: scenario, figures over all steps merged, ``steps`` and ``best``."""
    steps = [step_report(o) for o in outcomes]
    merged = StepMetrics(0)
    cost = Cost()
    for o in outcomes:
        merged.counters.update(o.metrics.counters)
        merged.errors.update(o.metrics.errors)
        for name in ("fanout", "ack", "join", "http", "lag"):
            getattr(merged, name).merge(getattr(o.metrics, name))
        for g, v in o.cost.cpu_s.items():
            cost.cpu_s[g] = cost.cpu_s.get(g, 0.0) + v
        for g, v in o.cost.peak_rss.items():
            cost.peak_rss[g] = max(cost.peak_rss.get(g, 0), v)
        for g, pids in o.cost.pids.items():
            cost.pids[g] = sorted(set(cost.pids.get(g, [])) | set(pids))
        cost.peak_server_rss = max(cost.peak_server_rss, o.cost.peak_server_rss)
        cost.peak_server_vmrss = max(cost.peak_server_vmrss, o.cost.peak_server_vmrss)
        cost.server_found = cost.server_found or o.cost.server_found
        cost.machine_busy_s += o.cost.machine_busy_s
    convergence = {
        "converged": all(s["converged"] for s in steps),
        "lost": sum(s["lost"] for s in steps),
        "version_gap": sum(s["convergence"]["version_gap"] for s in steps),
        "settled": all(s["convergence"]["settled"] for s in steps),
        "checked_clients": sum(s["convergence"]["checked_clients"] for s in steps),
        "ops_owed": sum(s["convergence"]["ops_owed"] for s in steps),
        "ops_received": sum(s["convergence"]["ops_received"] for s in steps),
        "mismatches": [m for s in steps for m in s["convergence"]["mismatches"]][:20],
        "method": ",".join(sorted({s["convergence"]["method"] for s in steps})),
    }
    window = sum(o.window_s for o in outcomes)
    procs = max((o.procs for o in outcomes), default=1)
    out: dict[str, Any] = {
        "scenario": scenario.name,
        "description": scenario.description,
        "source": scenario.source,
        **meta,
    }
    out.update(figures(merged, window, cost, convergence, procs))
    passing = [s for s in steps if s["slo"]["ok"]]
    editing = any(s["params"]["writers"] for s in steps)
    # The highest offered rate that passed (issue 5). A step where the load generator was
    # saturated measured the generator, not the server: it is the best only if no step
    # with the generator within its limits passed.
    best = max(
        passing,
        key=lambda s: (
            not s["loadgen"]["saturated"],
            s["offered_ops_s"] if editing else s["http"]["req_s"],
        ),
        default=None,
    )
    out["slo_ok"] = len(passing) == len(steps)
    out["best"] = (
        None
        if best is None
        else {
            "step": best["name"],
            "offered_ops_s": best["offered_ops_s"],
            "acked_ops_s": best["acked_ops_s"],
            "fanout_p99_ms": best["fanout_ms"]["p99"],
            "http_req_s": best["http"]["req_s"],
            "loadgen_saturated": best["loadgen"]["saturated"],
        }
    )
    out["steps"] = steps
    return out


def _fmt(v: Any, unit: str = "") -> str:
    if v is None:
        return "–"
    if isinstance(v, bool):
        return "yes" if v else "NO"
    if isinstance(v, float):
        text = f"{v:,.1f}" if abs(v) >= 100 else f"{v:,.2f}"
    elif isinstance(v, int):
        text = f"{v:,}"
    else:
        text = str(v)
    return f"{text}{unit}"


def summary_table(report: dict[str, Any]) -> Table:
    """A rich table of the headline figures, one column per step."""
    steps = report["steps"]
    table = Table(title=f"coscribe loadtest · {report['scenario']}", title_justify="left")
    table.add_column("")
    for s in steps:
        table.add_column(s["name"], justify="right")

    def row(label: str, get: Any, unit: str = "") -> None:
        table.add_row(label, *(_fmt(get(s), unit) for s in steps))

    row("sessions joined", lambda s: f"{s['sessions']['joined']:,}/{s['sessions']['planned']:,}")
    row("offered ops/s", lambda s: s["offered_ops_s"])
    row("acked ops/s", lambda s: s["acked_ops_s"])
    row("acked edits/s", lambda s: s["acked_edits_s"])
    for q in ("p50", "p95", "p99", "max"):
        row(f"fan-out {q}", lambda s, q=q: s["fanout_ms"][q], " ms")
    row(
        "fan-out delivered",
        lambda s: None if s["fanout_delivery"] is None else f"{s['fanout_delivery']:.1%}",
    )
    row("ack p50", lambda s: s["ack_ms"]["p50"], " ms")
    row("ack p99", lambda s: s["ack_ms"]["p99"], " ms")
    row("join p50", lambda s: s["join_ms"]["p50"], " ms")
    row("join p99", lambda s: s["join_ms"]["p99"], " ms")
    if any(s["http"]["req_s"] for s in steps):
        row("http req/s", lambda s: s["http"]["req_s"])
        row("http p99", lambda s: s["http"]["latency_ms"]["p99"], " ms")
    if any(s.get("projection_lag") for s in steps):
        row("projection lag p99",
            lambda s: (s.get("projection_lag") or {}).get("seconds", {}).get("p99"), " s")
    row("errors", lambda s: sum(s["errors"].values()))
    row("lost", lambda s: s["lost"])
    row("converged", lambda s: s["converged"])
    row("server CPU", lambda s: s["server"]["cpu_s"], " s")
    row("server µs/op", lambda s: s["server"]["cpu_us_per_op"])
    row("server peak RSS", lambda s: s["server"]["peak_rss_mb"], " MB")
    row("loadgen CPU", lambda s: s["loadgen"]["cpu_s"], " s")
    row("loadgen µs/op", lambda s: s["loadgen"]["cpu_us_per_op"])
    row("loadgen saturated", lambda s: "YES" if s["loadgen"]["saturated"] else "no")
    row("SLO", lambda s: "pass" if s["slo"]["ok"] else "FAIL")
    return table


def notes(report: dict[str, Any]) -> list[str]:
    """Lines worth reading under the table: SLO failures, errors, load-generator limits."""
    out = []
    if report.get("failed"):
        out.append(f"the run failed {report['failed']}: the figures are those of the steps "
                   "that finished before it")
    for s in report["steps"]:
        for why in s["slo"]["failed"]:
            out.append(f"{s['name']}: {why}")
        abandoned = s["abandoned_edits"]
        if s["unacked"] or abandoned:
            out.append(
                f"{s['name']}: the server fell behind: {abandoned:,} buffered edits were "
                f"dropped unsent after the drain, {s['unacked']:,} still unacknowledged at the end"
            )
        if s["loadgen"]["saturated"]:
            out.append(
                f"{s['name']}: the load generator was saturated "
                f"(CPU {s['loadgen']['cpu_util']:.0%} per process, loop lag p99 "
                f"{_fmt(s['loadgen']['loop_lag_ms']['p99'])} ms, "
                f"{s['loadgen']['edits_skipped']} edits skipped): latencies include its delay"
            )
        m = s["machine_cpu"]
        if m["capacity_s"] and m["other_s"] > 0.1 * m["capacity_s"]:
            out.append(
                f"{s['name']}: other processes used {m['other_s']:.1f} CPU-s "
                f"({m['other_s'] / m['capacity_s']:.0%} of the machine) during the window; "
                "latencies and costs are disturbed"
            )
        if s["server"]["cpu_s"] is None:
            out.append(f"{s['name']}: no coscribe serve process found; server cost not measured")
    probe = (report.get("machine") or {}).get("cpu_probe_us")
    if probe:
        out.append(
            f"machine speed: CPU probe {probe['before']:,.0f} µs before the run, "
            f"{probe['after']:,.0f} after (lower is faster; compare runs by it)"
        )
    if report["best"] is not None and len(report["steps"]) > 1:
        b = report["best"]
        if b["offered_ops_s"]:
            out.append(
                f"best passing step: {b['step']} — {b['offered_ops_s']:,} ops/s offered, "
                f"{b['acked_ops_s']:,} acked, fan-out p99 {_fmt(b['fanout_p99_ms'])} ms"
                + (" (the load generator was saturated there: its limit, not the server's)"
                   if b["loadgen_saturated"] else "")
            )
        else:
            out.append(f"best passing step: {b['step']} — {b['http_req_s']:,} requests/s")
    return out


def merged_histogram(outcomes: list[StepOutcome], name: str) -> Histogram:
    """The ``name`` histogram (``fanout``, ``ack``, ...) over all steps."""
    return Histogram.merged(getattr(o.metrics, name) for o in outcomes)
