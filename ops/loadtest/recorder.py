"""What one load process counts during a step, in a form that merges across processes.

Rates and latencies count only inside the measured window: an edit by when it was typed, an
ack by when it arrived (ack latency by when its op was sent), a fan-out sample by the time
in its stamp (when the edit was typed). Joins and errors count over the whole step. The
time series keep every sample, warm-up included, for the plot.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass
from typing import Any

from ops.loadtest.stats import Histogram, SampleLog, Series

COUNTERS = (
    "sessions",  # sessions planned in this process
    "connected",  # WebSocket handshakes that succeeded
    "joined",  # sessions that got their snapshot
    "connect_failed",  # handshakes that failed (see errors "connect:*")
    "join_failed",  # sessions refused at hello/sub
    "disconnected",  # sessions the server closed before the end
    "desynced",  # writers that stopped after the server refused their op
    "edits",  # edits typed, whole step
    "edits_window",  # edits typed in the window (offered load)
    "edits_skipped",  # edits not typed because the process fell behind its schedule
    "acks",  # acks received, whole step
    "acks_window",  # acks received in the window
    "acked_edits_window",  # typed edits those acks carried (more than acks when composed)
    "ops_rx",  # remote ops received, whole step
    "ops_rx_window",  # remote ops received in the window
    "frames_rx",  # frames received, whole step
    "presence_tx",  # presence updates sent
    "presence_rx",  # presence messages received
    "http",  # HTTP responses, whole step
    "http_window",  # HTTP responses in the window
    "rejected_edits",  # edits dropped with an op the server refused
    "clock_anomalies",  # stamps that looked older than an hour (clock stepped back): at settle
    "pending_edits",  # edits still unacknowledged when the drain timed out (twice)
    "abandoned_edits",  # edits never sent: the drain timed out once, buffers were dropped
)

HOT_COUNTERS = (
    "frames_rx",
    "ops_rx",
    "ops_rx_window",
    "presence_rx",
    "edits",
    "edits_window",
    "acks",
    "acks_window",
    "acked_edits_window",
)
"""The counters bumped for every receipt or edit: kept in a :class:`Tally`."""


class Tally:
    """The hot counters of one process as plain int slots (cheaper than a Counter's keys).

    Only :class:`StepMetrics` reads them, into ``counters`` (see :meth:`StepMetrics.counts`).
    """

    __slots__ = HOT_COUNTERS
    frames_rx: int
    ops_rx: int
    ops_rx_window: int
    presence_rx: int
    edits: int
    edits_window: int
    acks: int
    acks_window: int
    acked_edits_window: int

    def __init__(self) -> None:
        self.reset()

    def reset(self) -> None:
        """Set every counter to 0 (in place: sessions hold this object)."""
        for name in HOT_COUNTERS:
            setattr(self, name, 0)

    def items(self) -> list[tuple[str, int]]:
        """``(name, value)`` of every counter that is not 0."""
        return [(n, v) for n in HOT_COUNTERS if (v := getattr(self, n))]


@dataclass(frozen=True, slots=True)
class Window:
    """The measured window, wall-clock nanoseconds, start inclusive, end exclusive."""

    start_ns: int
    end_ns: int

    def __contains__(self, t_ns: object) -> bool:
        return isinstance(t_ns, int) and self.start_ns <= t_ns < self.end_ns

    @property
    def seconds(self) -> float:
        """The window's length in seconds."""
        return (self.end_ns - self.start_ns) / 1e9


class StepMetrics:
    """Counters, errors by code, latency histograms (µs) and lost-op bookkeeping for a step.

    Latencies: ``fanout`` (edit typed -> another client received it), ``ack`` (op sent ->
    its ack), ``join`` (connect started -> snapshot), ``http`` (request -> response body),
    ``lag`` (event-loop lateness of a 100 ms timer, to spot a saturated load process).

    In a load process the hot path writes fan-out samples to ``fanout_log`` and the hot
    counters to ``tally``; :meth:`settle` moves them into ``fanout``, ``fanout_series`` and
    ``counters`` before the metrics are shipped (:meth:`to_dict` carries only those).
    """

    def __init__(self, origin_ns: int) -> None:
        self.counters: Counter[str] = Counter()
        self.tally = Tally()
        self.fanout_log = SampleLog(origin_ns)
        self.errors: Counter[str] = Counter()
        self.fanout = Histogram()
        self.ack = Histogram()
        self.join = Histogram()
        self.http = Histogram()
        self.lag = Histogram()
        self.fanout_series = Series(origin_ns)
        self.ack_series = Series(origin_ns)
        self.acked_stamps: dict[str, Counter[str]] = {}
        self.acks_by_doc: Counter[str] = Counter()
        self.full_reports: list[dict[str, Any]] = []
        self.exceptions: list[str] = []
        self.delivery: dict[str, list[int]] = {}
        """Per document: [sessions, sum of join versions, ops received, own acks]."""
        self.max_version: dict[str, int] = {}
        """Per document: the highest version any session saw by the end."""
        self.basis_stamps: dict[str, Counter[str]] = {}
        self.basis_acks: Counter[str] = Counter()
        """Acked stamps and acks as they were when the process reported drained."""

    def counts(self) -> dict[str, int]:
        """Every counter so far, the tally's included (for progress messages)."""
        out = dict(self.counters)
        for name, v in self.tally.items():
            out[name] = out.get(name, 0) + v
        return out

    def settle(self, window: Window) -> None:
        """Fold the tally into ``counters`` and the fan-out log into ``fanout`` (samples
        whose edit was typed inside ``window``) and ``fanout_series``. Idempotent.
        """
        for name, v in self.tally.items():
            self.counters[name] += v
        self.tally.reset()
        self.counters["clock_anomalies"] += self.fanout_log.fold(
            self.fanout, self.fanout_series, window.start_ns, window.end_ns
        )

    def freeze_lost_basis(self) -> None:
        """Remember what was acked so far: the documents are read back after this moment.

        Everything acknowledged before the read must be in its text (ack after commit);
        acks that come later, for ops the read may not show, are kept out of the count.
        """
        self.basis_stamps = {d: Counter(c) for d, c in self.acked_stamps.items()}
        self.basis_acks = Counter(self.acks_by_doc)

    def merge(self, other: StepMetrics) -> None:
        """Add everything ``other`` counted (same step, same origin)."""
        self.counters.update(other.counters)
        self.errors.update(other.errors)
        for name in ("fanout", "ack", "join", "http", "lag"):
            getattr(self, name).merge(getattr(other, name))
        self.fanout_series.merge(other.fanout_series)
        self.ack_series.merge(other.ack_series)
        for doc, stamps in other.acked_stamps.items():
            self.acked_stamps.setdefault(doc, Counter()).update(stamps)
        self.acks_by_doc.update(other.acks_by_doc)
        self.full_reports.extend(other.full_reports)
        self.exceptions.extend(other.exceptions[: max(0, 5 - len(self.exceptions))])
        for doc, stamps in other.basis_stamps.items():
            self.basis_stamps.setdefault(doc, Counter()).update(stamps)
        self.basis_acks.update(other.basis_acks)
        for doc, v in other.max_version.items():
            self.max_version[doc] = max(self.max_version.get(doc, -1), v)
        for doc, row in other.delivery.items():
            mine = self.delivery.setdefault(doc, [0, 0, 0, 0])
            for i, v in enumerate(row):
                mine[i] += v

    def to_dict(self) -> dict[str, Any]:
        """A picklable form that :meth:`from_dict` reads back."""
        return {
            "origin_ns": self.fanout_series.origin_ns,
            "counters": dict(self.counters),
            "errors": dict(self.errors),
            "fanout": self.fanout.to_dict(),
            "ack": self.ack.to_dict(),
            "join": self.join.to_dict(),
            "http": self.http.to_dict(),
            "lag": self.lag.to_dict(),
            "fanout_series": self.fanout_series.to_dict(),
            "ack_series": self.ack_series.to_dict(),
            "acked_stamps": {d: dict(c) for d, c in self.acked_stamps.items()},
            "acks_by_doc": dict(self.acks_by_doc),
            "full_reports": list(self.full_reports),
            "exceptions": list(self.exceptions),
            "delivery": {d: list(r) for d, r in self.delivery.items()},
            "max_version": dict(self.max_version),
            "basis_stamps": {d: dict(c) for d, c in self.basis_stamps.items()},
            "basis_acks": dict(self.basis_acks),
        }

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> StepMetrics:
        """The metrics :meth:`to_dict` described."""
        m = cls(int(data["origin_ns"]))
        m.counters = Counter(data["counters"])
        m.errors = Counter(data["errors"])
        for name in ("fanout", "ack", "join", "http", "lag"):
            setattr(m, name, Histogram.from_dict(data[name]))
        m.fanout_series = Series.from_dict(data["fanout_series"])
        m.ack_series = Series.from_dict(data["ack_series"])
        m.acked_stamps = {d: Counter(c) for d, c in data["acked_stamps"].items()}
        m.acks_by_doc = Counter(data["acks_by_doc"])
        m.full_reports = list(data["full_reports"])
        m.exceptions = list(data.get("exceptions", []))
        m.delivery = {d: list(r) for d, r in data.get("delivery", {}).items()}
        m.max_version = dict(data.get("max_version", {}))
        m.basis_stamps = {d: Counter(c) for d, c in data.get("basis_stamps", {}).items()}
        m.basis_acks = Counter(data.get("basis_acks", {}))
        return m
