"""Latency statistics: a mergeable log-linear histogram, exact percentiles and summaries.

Load processes record every sample into a :class:`Histogram` (constant memory, one dict update
per sample) and ship it to the coordinator, which merges them. Percentiles use the
nearest-rank definition; a histogram answers with the top of the bucket holding that rank,
capped at the true maximum, so it never under-reports and over-reports by less than 1/128
(0.8 %). Values below 256 (µs) are exact.
"""

from __future__ import annotations

import math
from array import array
from bisect import bisect_left
from collections import Counter
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

from ops.loadtest import stamp

SUB_BITS = 8
"""Buckets per power of two above the exact range: 2**(SUB_BITS-1)."""
_EXACT = 1 << SUB_BITS
_HALF = 1 << (SUB_BITS - 1)

_U32 = 2**32 - 1

STAMP_MASK = stamp.MODULUS - 1
STAMP_UNIT_US = stamp.UNIT_NS // 1000
STAMP_MAX_AGE_US = stamp.MAX_AGE_NS // 1000

QUANTILES: tuple[tuple[str, float], ...] = (("p50", 0.50), ("p95", 0.95), ("p99", 0.99))
"""The percentiles every summary reports, by key."""


def bucket(value: int) -> int:
    """The bucket index of a non-negative int."""
    if value < _EXACT:
        return value
    shift = value.bit_length() - SUB_BITS
    return (shift << (SUB_BITS - 1)) + (value >> shift)


def bucket_bounds(index: int) -> tuple[int, int]:
    """The smallest and largest value that fall into bucket ``index``."""
    if index < _EXACT:
        return index, index
    shift = (index >> (SUB_BITS - 1)) - 1
    low = (index - (shift << (SUB_BITS - 1))) << shift
    return low, low + (1 << shift) - 1


def percentile(ordered: Sequence[float], q: float) -> float:
    """The nearest-rank ``q``-quantile (0 < q <= 1) of ascending, non-empty ``ordered``."""
    if not ordered:
        raise ValueError("percentile of no values")
    if not 0.0 < q <= 1.0:
        raise ValueError(f"quantile must be in (0, 1], got {q}")
    rank = max(1, math.ceil(q * len(ordered) - 1e-9))
    return ordered[rank - 1]


class Histogram:
    """Counts of non-negative ints (microseconds, by convention) in log-linear buckets.

    ``add`` is the hot path; ``merge`` and ``to_dict``/``from_dict`` move histograms between
    processes. Count, sum, min and max are exact.
    """

    __slots__ = ("count", "counts", "max", "min", "total")

    def __init__(self) -> None:
        self.counts: dict[int, int] = {}
        self.count = 0
        self.total = 0
        self.min = 0
        self.max = 0

    def add(self, value: int) -> None:
        """Record one sample (a negative value is recorded as 0)."""
        if value < 0:
            value = 0
        if value < _EXACT:
            index = value
        else:
            shift = value.bit_length() - SUB_BITS
            index = (shift << (SUB_BITS - 1)) + (value >> shift)
        counts = self.counts
        counts[index] = counts.get(index, 0) + 1
        if self.count == 0 or value < self.min:
            self.min = value
        if value > self.max:
            self.max = value
        self.count += 1
        self.total += value

    def add_counts(self, counts: Mapping[int, int]) -> None:
        """Record ``n`` samples of ``value`` for each ``value: n`` (values >= 0)."""
        if not counts:
            return
        buckets = self.counts
        total = 0
        for value, n in counts.items():
            index = bucket(value)
            buckets[index] = buckets.get(index, 0) + n
            total += value * n
        low, high = min(counts), max(counts)
        self.min = low if self.count == 0 else min(self.min, low)
        self.max = max(self.max, high)
        self.count += sum(counts.values())
        self.total += total

    def extend(self, values: Iterable[int]) -> None:
        """Record every value of ``values``."""
        for v in values:
            self.add(v)

    def merge(self, other: Histogram) -> None:
        """Add every sample of ``other`` into this histogram."""
        if not other.count:
            return
        counts = self.counts
        for index, n in other.counts.items():
            counts[index] = counts.get(index, 0) + n
        self.min = other.min if self.count == 0 else min(self.min, other.min)
        self.max = max(self.max, other.max)
        self.count += other.count
        self.total += other.total

    def quantile(self, q: float) -> int:
        """The nearest-rank ``q``-quantile, as the top of its bucket capped at ``max``."""
        if not self.count:
            raise ValueError("quantile of an empty histogram")
        if not 0.0 < q <= 1.0:
            raise ValueError(f"quantile must be in (0, 1], got {q}")
        rank = max(1, math.ceil(q * self.count - 1e-9))
        seen = 0
        for index in sorted(self.counts):
            seen += self.counts[index]
            if seen >= rank:
                return max(self.min, min(bucket_bounds(index)[1], self.max))
        return self.max  # unreachable: the counts add up to count

    def mean(self) -> float:
        """The exact mean (0.0 when empty)."""
        return self.total / self.count if self.count else 0.0

    def to_dict(self) -> dict[str, Any]:
        """A picklable, JSON-able form that :meth:`from_dict` reads back."""
        return {
            "counts": dict(self.counts),
            "count": self.count,
            "total": self.total,
            "min": self.min,
            "max": self.max,
        }

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> Histogram:
        """The histogram :meth:`to_dict` described (JSON turns the keys into strings)."""
        h = cls()
        h.counts = {int(k): int(v) for k, v in data["counts"].items()}
        h.count = int(data["count"])
        h.total = int(data["total"])
        h.min = int(data["min"])
        h.max = int(data["max"])
        return h

    @classmethod
    def merged(cls, parts: Iterable[Histogram]) -> Histogram:
        """One histogram holding the samples of all ``parts``."""
        out = cls()
        for p in parts:
            out.merge(p)
        return out


def summary_ms(h: Histogram) -> dict[str, float | int | None]:
    """``{"p50", "p95", "p99", "max", "mean", "count"}`` in milliseconds from µs samples.

    With no samples every figure is None and ``count`` is 0.
    """
    out: dict[str, float | int | None] = {}
    for key, q in QUANTILES:
        out[key] = round(h.quantile(q) / 1000, 3) if h.count else None
    out["max"] = round(h.max / 1000, 3) if h.count else None
    out["mean"] = round(h.mean() / 1000, 3) if h.count else None
    out["count"] = h.count
    return out


class Series:
    """Every sample over time, for plots: two flat arrays, (ms since origin, value).

    Appending is the cheapest record there is; the bins and their percentiles are computed
    once, by :meth:`rows`. Values are clamped to 32 bits (71 minutes in µs).
    """

    __slots__ = ("bin_ns", "origin_ns", "times", "values")

    def __init__(self, origin_ns: int, bin_s: float = 0.5) -> None:
        self.origin_ns = origin_ns
        self.bin_ns = int(bin_s * 1e9)
        self.times = array("I")
        self.values = array("I")

    def add(self, at_ns: int, value: int) -> None:
        """Record ``value`` observed at wall-clock ``at_ns`` (not before the origin)."""
        self.times.append(max(0, at_ns - self.origin_ns) // 1_000_000)
        self.values.append(min(max(0, value), _U32))

    def merge(self, other: Series) -> None:
        """Add ``other`` (same origin) into this series."""
        self.times.extend(other.times)
        self.values.extend(other.values)

    def to_dict(self) -> dict[str, Any]:
        """A picklable form that :meth:`from_dict` reads back."""
        return {
            "origin_ns": self.origin_ns,
            "bin_ns": self.bin_ns,
            "times": self.times.tobytes(),
            "values": self.values.tobytes(),
        }

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> Series:
        """The series :meth:`to_dict` described."""
        s = cls(int(data["origin_ns"]))
        s.bin_ns = int(data["bin_ns"])
        s.times.frombytes(data["times"])
        s.values.frombytes(data["values"])
        return s

    def tail(self, since_ns: int) -> Histogram:
        """The samples observed at or after wall-clock ``since_ns``, newest first.

        Samples are appended in observation order, so this walks back from the end only as
        far as it must (for progress lines).
        """
        since = (since_ns - self.origin_ns) // 1_000_000
        h = Histogram()
        times, values = self.times, self.values
        i = len(times) - 1
        while i >= 0 and times[i] >= since:
            h.add(values[i])
            i -= 1
        return h

    def rows(self) -> list[tuple[float, int, int, int, int]]:
        """``(seconds since origin, count, p50, p99, max)`` per non-empty bin, in time order."""
        width = self.bin_ns // 1_000_000
        bins: dict[int, list[int]] = {}
        for t, v in zip(self.times, self.values, strict=True):
            bins.setdefault(t // width, []).append(v)
        out = []
        for index in sorted(bins):
            values = sorted(bins[index])
            t = index * width / 1000
            out.append(
                (t, len(values), percentile(values, 0.5), percentile(values, 0.99), values[-1])
            )
        return out


class SampleLog:
    """Latency samples as they are observed, kept raw; nothing is computed per sample.

    The hot path appends one tuple per received run of ops with the bound
    :attr:`log_run`: ``(at, now_units, stamps)``, where ``at`` is the observation time
    (µs since ``origin_ns``), ``now_units`` the wall clock in stamp units
    (``stamp.UNIT_NS``) and ``stamps`` the run's stamp times (``stamp.units``, shared by
    every session that got the run). A run of 75 ops is one append instead of 75 ages
    computed and logged (measured: that loop was ~15 % of a load process at 400 authors).
    Ages, which samples count, their histogram and their time bins are worked out once, by
    :meth:`fold`, after the measured window; :meth:`tail` is for progress lines.
    :meth:`add` records one finished sample (tests).
    """

    __slots__ = ("at", "log_run", "origin_ns", "runs", "values")

    def __init__(self, origin_ns: int) -> None:
        self.origin_ns = origin_ns
        self.at = array("q")
        self.values = array("q")
        self.runs: list[tuple[int, int, tuple[int, ...]]] = []
        self.log_run = self.runs.append

    def __len__(self) -> int:
        return len(self.values) + sum(len(r[2]) for r in self.runs)

    def add(self, at_ns: int, value: int) -> None:
        """Record ``value`` (µs) observed at wall-clock ``at_ns`` (for tests; not the hot path)."""
        self.at.append((at_ns - self.origin_ns) // 1000)
        self.values.append(max(0, value))

    def _samples(self, runs: Iterable[tuple[int, int, tuple[int, ...]]]) -> tuple[
        list[tuple[int, int]], int
    ]:
        """``(at, age)`` of every stamp of ``runs`` and how many looked older than the
        longest age a stamp can tell (a clock stepped back): those are left out."""
        out: list[tuple[int, int]] = []
        append = out.append
        anomalies = 0
        mask, unit_us, max_age = STAMP_MASK, STAMP_UNIT_US, STAMP_MAX_AGE_US
        for at, now_units, stamps in runs:
            for units in stamps:
                age = ((now_units - units) & mask) * unit_us
                if age > max_age:
                    anomalies += 1
                else:
                    append((at, age))
        return out, anomalies

    def tail(self, since_ns: int, limit: int = 500) -> Histogram:
        """About ``limit`` of the samples observed at or after ``since_ns`` (a thinned look
        for progress lines: its maximum is the sample's). Observation times only grow, so
        the start is found by bisection."""
        since = (since_ns - self.origin_ns) // 1000
        runs = self.runs
        first = bisect_left(runs, since, key=lambda r: r[0])
        step = max(1, (len(runs) - first) // limit)
        samples, _ = self._samples(runs[first::step])
        h = Histogram()
        h.extend(age for _, age in samples)
        start = bisect_left(self.at, since)
        recent = self.values[start:]
        h.extend(recent[:: max(1, len(recent) // limit)])
        return h

    def fold(self, into: Histogram, series: Series, start_ns: int, end_ns: int) -> int:
        """Add every sample to ``series`` (by observation time) and those that *began* in
        ``[start_ns, end_ns)`` (observation time minus latency) to ``into``, then empty the
        log. Returns how many stamps were left out as clock anomalies.

        ``series`` must have the same origin.
        """
        samples, anomalies = self._samples(self.runs)
        samples += zip(self.at, self.values, strict=True)
        origin = self.origin_ns
        lo, hi = (start_ns - origin) / 1000, (end_ns - origin) / 1000
        into.add_counts(Counter(value for at, value in samples if lo <= at - value < hi))
        series.times.extend(max(0, at) // 1000 for at, _ in samples)
        series.values.extend(min(value, _U32) for _, value in samples)
        del self.at[:]
        del self.values[:]
        self.runs.clear()  # in place: the hot path holds the bound append
        return anomalies
