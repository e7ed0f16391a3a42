"""The summary plots of ``ops/PERFORMANCE.md``, drawn from JSON reports of the tools.

    python -m ops.perf.plots --saturate SAT.json --cost LOAD.json SAT.json \\
        --sessions A.json B.json ... --rebuild R1.json R2.json ... --out ops/perf

- ``latency-vs-rate.png``: fan-out p50/p99 against acknowledged edits/s, one point per step
  of a ``coscribe loadtest saturate --json`` report.
- ``cost-vs-rate.png``: server CPU per acknowledged op (gateways, PostgreSQL, Redis) and
  the load generator's, against acknowledged edits/s, with the ops each received frame
  carried: one point per step of the ``--cost`` reports (``load-curve`` and ``saturate``
  together draw it from 200 to ~8,000 edits/s), or of the saturate report without it.
- ``memory-vs-sessions.png``: server peak memory (PSS of gateways + PostgreSQL + Redis, and
  the sum of their VmRSS) against sessions joined, one point per loadtest report.
- ``rebuild-vs-events.png``: rebuild time against stored events, one point per
  ``python -m ops.bench.projections --json`` report.

Needs matplotlib (``pip install 'coscribe[plot]'``).
"""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

import orjson


def _steps(path: Path) -> list[dict[str, Any]]:
    report = orjson.loads(path.read_bytes())
    return list(report.get("steps") or [report])


def _cost(plt: Any, steps: list[dict[str, Any]], out: Path) -> None:
    """Stacked server CPU per acked op by group, the load generator's, and ops per frame."""
    steps = sorted(steps, key=lambda s: s["acked_edits_s"])
    rate = [s["acked_edits_s"] for s in steps]
    fig, ax = plt.subplots(figsize=(6, 4.4), dpi=90)
    below = [0.0] * len(steps)
    for group, label in (("gateway", "gateways"), ("postgres", "PostgreSQL"), ("redis", "Redis")):
        per_op = [1e6 * s["server"]["groups"][group]["cpu_s"] / (s["acked_ops_s"] * s["window_s"])
                  for s in steps]
        top = [b + v for b, v in zip(below, per_op, strict=True)]
        ax.fill_between(rate, below, top, alpha=0.5, label=label)
        below = top
    ax.plot(rate, [s["loadgen"]["cpu_us_per_op"] for s in steps], color="black",
            linestyle="--", marker="o", label="load generator")
    ax.axhline(100, color="grey", linestyle=":", label="target 100 µs")
    if rate and max(rate) > 8 * min(rate):  # below standard the cost per op climbs steeply
        ax.set_xscale("log")
        ax.set_yscale("log")
    ax.set_xlabel("acknowledged edits/s (an op carries the edits composed while one is in flight)")
    ax.set_ylabel("CPU µs per acked op")
    if ax.get_yscale() == "linear":
        ax.set_ylim(bottom=0)
    ax.set_title("standard's 200 sessions, --workers 2: cost against load")
    ax.grid(alpha=0.3)
    frames = ax.twinx()
    frames.plot(rate, [s["loadgen"]["ops_per_frame"] for s in steps], color="tab:red",
                marker="s", label="ops per frame received")
    frames.set_ylabel("ops per frame received", color="tab:red")
    frames.set_ylim(bottom=0)
    handles, labels = ax.get_legend_handles_labels()
    more, more_labels = frames.get_legend_handles_labels()
    fig.legend(handles + more, labels + more_labels, fontsize=7, ncol=3, loc="lower center")
    fig.tight_layout(rect=(0, 0.12, 1, 1))
    fig.savefig(out)
    plt.close(fig)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m ops.perf.plots", description=__doc__)
    p.add_argument("--saturate", type=Path)
    p.add_argument("--cost", type=Path, nargs="*", default=[],
                   help="reports whose steps draw cost-vs-rate (default: --saturate's)")
    p.add_argument("--sessions", type=Path, nargs="*", default=[])
    p.add_argument("--rebuild", type=Path, nargs="*", default=[])
    p.add_argument("--out", type=Path, default=Path("ops/perf"))
    args = p.parse_args(argv)
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    args.out.mkdir(parents=True, exist_ok=True)
    if args.saturate:
        steps = _steps(args.saturate)
        rate = [s["acked_edits_s"] for s in steps]
        fig, ax = plt.subplots(figsize=(6, 3.6), dpi=90)
        for q in ("p50", "p99"):
            ax.plot(rate, [s["fanout_ms"][q] for s in steps], marker="o", label=f"fan-out {q}")
        ax.set_xlabel("acknowledged edits/s")
        ax.set_ylabel("ms")
        ax.set_title("saturate, --workers 2: latency against load")
        ax.grid(alpha=0.3)
        ax.legend()
        fig.tight_layout()
        fig.savefig(args.out / "latency-vs-rate.png")
        plt.close(fig)
    if args.cost or args.saturate:
        paths = args.cost or [args.saturate]
        _cost(plt, [s for path in paths for s in _steps(path)], args.out / "cost-vs-rate.png")
    if args.sessions:
        points = sorted(
            (s["sessions"]["joined"], s["server"]["peak_rss_mb"], s["server"]["peak_vmrss_mb"])
            for path in args.sessions for s in _steps(path)
        )
        fig, ax = plt.subplots(figsize=(6, 3.6), dpi=90)
        ax.plot([x for x, _, _ in points], [y for _, y, _ in points], marker="o",
                label="PSS, gateways + PostgreSQL + Redis")
        ax.plot([x for x, _, _ in points], [z for _, _, z in points], marker="s",
                label="sum of VmRSS (counts shared pages twice)")
        ax.axhline(1536, color="grey", linestyle="--", label="target 1.5 GB")
        ax.set_xlabel("sessions joined")
        ax.set_ylabel("MB")
        ax.set_title("server memory against sessions")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
        fig.tight_layout()
        fig.savefig(args.out / "memory-vs-sessions.png")
        plt.close(fig)
    if args.rebuild:
        runs = [orjson.loads(path.read_bytes()) for path in args.rebuild]
        pts = sorted((r["rebuild_events"], r["rebuild_s"]) for r in runs)
        fig, ax = plt.subplots(figsize=(6, 3.6), dpi=90)
        ax.plot([e / 1000 for e, _ in pts], [s for _, s in pts], marker="o", linestyle="none")
        ax.set_xlabel("stored events (thousands)")
        ax.set_ylabel("rebuild seconds")
        ax.set_title("projections rebuild time against events (each run)")
        ax.set_xlim(left=0)
        ax.set_ylim(bottom=0)
        ax.grid(alpha=0.3)
        fig.tight_layout()
        fig.savefig(args.out / "rebuild-vs-events.png")
        plt.close(fig)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
