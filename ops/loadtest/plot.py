"""``--plot out.png``: fan-out latency over time and its histogram (matplotlib, optional).

matplotlib is imported only here and only when a plot is asked for; without it the caller
gets :class:`PlotUnavailable` with the command that installs it.
"""

from __future__ import annotations

import bisect
import itertools
from pathlib import Path

from ops.loadtest.plan import arrivals_end
from ops.loadtest.report import StepOutcome
from ops.loadtest.stats import Histogram, bucket_bounds

HIST_BARS = 60
"""Bars of the latency histogram, evenly spaced on the log axis."""


class PlotUnavailable(Exception):
    """matplotlib is not installed."""


def plot(outcomes: list[StepOutcome], path: Path, title: str) -> None:
    """Draw the run into ``path`` (PNG): p50/p99/max over time per step, then the histogram."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError as exc:
        raise PlotUnavailable(
            "--plot needs matplotlib: pip install 'coscribe[plot]' (or pip install matplotlib)"
        ) from exc

    fig, (over_time, hist) = plt.subplots(2, 1, figsize=(10, 7.5))
    offset = 0.0
    for i, o in enumerate(outcomes):
        rows = o.metrics.fanout_series.rows()
        ack_rows = o.metrics.ack_series.rows()
        bin_s = o.metrics.fanout_series.bin_ns / 1e9
        start = offset
        if rows:
            t = [offset + r[0] for r in rows]
            over_time.plot(
                t,
                [r[2] / 1000 for r in rows],
                color="tab:blue",
                lw=1,
                label="fan-out p50" if i == 0 else None,
            )
            over_time.plot(
                t,
                [r[3] / 1000 for r in rows],
                color="tab:orange",
                lw=1,
                label="fan-out p99" if i == 0 else None,
            )
            over_time.plot(
                t,
                [r[4] / 1000 for r in rows],
                color="tab:red",
                lw=0.6,
                alpha=0.5,
                label="fan-out max" if i == 0 else None,
            )
        if ack_rows:
            over_time.plot(
                [offset + r[0] for r in ack_rows],
                [r[3] / 1000 for r in ack_rows],
                color="tab:green",
                lw=0.8,
                ls="--",
                label="ack p99" if i == 0 else None,
            )
        ends = [r[0] for r in rows] + [r[0] for r in ack_rows]
        span = max(ends, default=0.0) + bin_s
        window_start = start + o.step.warmup_s + arrivals_end(o.step.phases, o.step.sessions)
        over_time.axvspan(window_start, window_start + o.window_s, color="0.92", zorder=0)
        over_time.text(
            window_start,
            0.98,
            f" {o.step.name}",
            va="top",
            fontsize=8,
            transform=over_time.get_xaxis_transform(),
        )
        offset += max(span, window_start - start + o.window_s) + 1.0
    over_time.set_yscale("log")
    over_time.set_xlabel("seconds (measured windows shaded)")
    over_time.set_ylabel("latency (ms)")
    over_time.set_title(title)
    over_time.legend(loc="upper right", fontsize=8)

    merged = Histogram.merged(o.metrics.fanout for o in outcomes)
    if merged.count:
        # Re-bin the log-linear buckets onto evenly log-spaced bars (raw buckets would show
        # a sawtooth at every power of two).
        lo = max(merged.min, 10) / 1000
        hi = max(merged.max / 1000, lo * 1.01)
        edges = [lo * (hi / lo) ** (i / HIST_BARS) for i in range(HIST_BARS + 1)]
        counts = [0] * HIST_BARS
        for index, n in merged.counts.items():
            low, high = bucket_bounds(index)
            mid = (low + high) / 2000
            k = bisect.bisect_right(edges, mid) - 1
            counts[min(max(k, 0), HIST_BARS - 1)] += n
        widths = [b - a for a, b in itertools.pairwise(edges)]
        hist.bar(edges[:-1], counts, width=widths, align="edge", color="tab:blue")
        hist.set_xscale("log")
        for q, color in ((0.5, "tab:green"), (0.99, "tab:orange")):
            v = merged.quantile(q) / 1000
            hist.axvline(v, color=color, lw=1, ls="--", label=f"p{int(q * 100)} {v:.1f} ms")
        hist.legend(fontsize=8)
    hist.set_xlabel("fan-out latency, measured windows (ms)")
    hist.set_ylabel("samples")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
