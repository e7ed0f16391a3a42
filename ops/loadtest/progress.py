"""Live progress on the terminal (rich), fed by the load processes' progress messages.

On a terminal a live panel redraws four times a second; otherwise (CI, pipes) one line is
printed per stage, so logs stay readable. Rates are computed over the last second or so of
the summed counters.
"""

from __future__ import annotations

import time
from collections import deque
from typing import Any

from rich.console import Console, Group
from rich.live import Live
from rich.text import Text

from ops.loadtest.recorder import Window
from ops.loadtest.scenario import Step
from ops.loadtest.stats import Histogram


class Progress:
    """Use as a context manager around the run; the runner calls the other methods."""

    def __init__(self, console: Console, scenario: str, live: bool | None = None) -> None:
        self.console = console
        self.scenario = scenario
        self.live_enabled = console.is_terminal if live is None else live
        self._live: Live | None = None
        self._title = ""
        self._stage = "starting"
        self._step: Step | None = None
        self._origin = 0
        self._window: Window | None = None
        self._arrivals_s = 0.0
        self._counters: dict[int, dict[str, int]] = {}
        self._errors: dict[int, dict[str, int]] = {}
        self._recent: dict[int, Histogram] = {}
        self._history: deque[tuple[float, dict[str, int]]] = deque(maxlen=12)

    def __enter__(self) -> Progress:
        if self.live_enabled:
            self._live = Live(
                get_renderable=self._render,
                console=self.console,
                refresh_per_second=4,
                transient=True,
            )
            self._live.__enter__()
        return self

    def __exit__(self, *exc: object) -> None:
        if self._live is not None:
            self._live.__exit__(None, None, None)
            self._live = None

    def stage(self, step: Step, index: int, total: int, what: str) -> None:
        """Name what the run is doing now (creating documents, verifying, ...).

        The panel's figures are those of ``step``: a new step starts from none joined.
        """
        if step is not self._step:
            self._step = step
            self._window = None
            self._clear()
        self._title = f"step {index + 1}/{total} {step.name!r}"
        self._stage = what
        if self._live is None:
            self.console.print(f"[dim]{self.scenario} · {self._title} · {what}[/dim]")

    def begin_step(
        self, step: Step, index: int, total: int, origin: int, window: Window, arrivals_s: float
    ) -> None:
        """A step's sessions were sent out; its timeline starts at ``origin``."""
        self._step = step
        self._origin = origin
        self._window = window
        self._arrivals_s = arrivals_s
        self._clear()
        self.stage(
            step,
            index,
            total,
            f"{step.sessions:,} sessions, {step.offered_ops_s:,.0f} edits/s planned, "
            f"window {window.seconds:g} s",
        )
        self._stage = "running"

    def update(self, msg: dict[str, Any]) -> None:
        """Take one ``progress`` message from a load process."""
        w = msg["worker"]
        self._counters[w] = msg["counters"]
        self._errors[w] = msg["errors"]
        if msg.get("recent"):
            self._recent[w] = Histogram.from_dict(msg["recent"])
        totals: dict[str, int] = {}
        for c in self._counters.values():
            for k, v in c.items():
                totals[k] = totals.get(k, 0) + v
        self._history.append((time.monotonic(), totals))

    def end_step(self) -> None:
        """The step is over; the panel keeps its final figures until the next one starts."""
        self._stage = "done"

    def _clear(self) -> None:
        self._counters.clear()
        self._errors.clear()
        self._recent.clear()
        self._history.clear()

    def _phase(self) -> str:
        if self._step is None or self._window is None:
            return self._stage
        now = time.time_ns()
        if self._stage != "running":
            return self._stage
        if now < self._origin + int(self._arrivals_s * 1e9):
            return "sessions arriving"
        if now < self._window.start_ns:
            return f"warm-up, window in {(self._window.start_ns - now) / 1e9:.1f} s"
        if now < self._window.end_ns:
            done = (now - self._window.start_ns) / 1e9
            return f"measuring {done:.1f}/{self._window.seconds:g} s"
        return "draining"

    def _rates(self) -> dict[str, float]:
        if len(self._history) < 2:
            return {}
        (t0, a), (t1, b) = self._history[0], self._history[-1]
        dt = t1 - t0
        if dt <= 0:
            return {}
        return {k: (b.get(k, 0) - a.get(k, 0)) / dt for k in ("edits", "acks", "ops_rx", "http")}

    def _render(self) -> Group:
        totals = self._history[-1][1] if self._history else {}
        rates = self._rates()
        errors = sum(sum(e.values()) for e in self._errors.values())
        recent = Histogram.merged(self._recent.values())
        head = Text.assemble(
            ("coscribe loadtest ", "bold"),
            (f"{self.scenario} · {self._title} · ", ""),
            (self._phase(), "cyan"),
        )
        planned = self._step.sessions if self._step is not None else 0
        sessions = Text(
            f"sessions {totals.get('joined', 0):,}/{planned:,} joined · "
            f"{totals.get('connect_failed', 0):,} failed · "
            f"{totals.get('disconnected', 0):,} dropped"
        )
        load = Text(
            f"edits {rates.get('edits', 0):,.0f}/s · acks {rates.get('acks', 0):,.0f}/s · "
            f"received {rates.get('ops_rx', 0):,.0f} ops/s · http {rates.get('http', 0):,.0f}/s"
        )
        if recent.count:
            lat = (
                f"fan-out (last 0.5 s) p50 {recent.quantile(0.5) / 1000:.1f} ms · "
                f"p99 {recent.quantile(0.99) / 1000:.1f} ms · max {recent.max / 1000:.1f} ms"
            )
        else:
            lat = "fan-out: no samples yet"
        tail = Text(f"{lat} · errors {errors:,}", style="red" if errors else "")
        return Group(head, sessions, load, tail)
