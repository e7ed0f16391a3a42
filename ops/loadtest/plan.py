"""From a step to concrete sessions: who connects where, as what, and when.

Pure functions of the step, so the coordinator and the tests agree on every arrival time.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from ops.loadtest.scenario import Phase, Step


@dataclass(frozen=True, slots=True)
class SessionPlan:
    """One WebSocket session: document index, slot on it, role and codec.

    ``writer`` sessions edit; ``full`` sessions apply every op to the text and are checked
    for convergence; the rest are light. ``user`` indexes the step's users (0 = the owner).
    """

    index: int
    doc: int
    slot: int
    writer: bool
    full: bool
    user: int
    codec: str


def phase_arrivals(phase: Phase) -> list[float]:
    """Arrival offsets (seconds from the phase start, ascending, all < duration unless 0).

    Constant rate r: ``k / r``. A ramp from r0 to r1 over D has cumulative arrivals
    ``N(t) = r0 t + (r1 - r0) t² / 2D``; arrival k is where ``N(t) = k``. A count n is
    spread evenly, all at 0 for a zero duration.
    """
    d = phase.duration_s
    if phase.arrival_count is not None:
        n = phase.arrival_count
        return [0.0] * n if d == 0 else [i * d / n for i in range(n)]
    if phase.arrival_rate is None:
        return []
    r0 = phase.arrival_rate
    r1 = phase.ramp_to if phase.ramp_to is not None else r0
    total = (r0 + r1) * d / 2
    n = max(0, math.ceil(total - 1e-9))
    a = (r1 - r0) / (2 * d)
    out = []
    for k in range(n):
        # Root of a t² + r0 t - k = 0 in the form that is stable for a = 0 and a < 0.
        disc = r0 * r0 + 4 * a * k
        t = 2 * k / (r0 + math.sqrt(disc)) if k else 0.0
        out.append(min(t, d))
    return out


def arrival_offsets(phases: tuple[Phase, ...], n: int) -> list[float]:
    """Offsets (seconds from the step start) for ``n`` sessions, in arrival order.

    Phases run one after another. Without phases every session arrives at 0; when the phases
    produce fewer than ``n`` arrivals, the rest arrive when the last phase ends; extra
    arrivals are not used.
    """
    out: list[float] = []
    start = 0.0
    for phase in phases:
        out.extend(start + t for t in phase_arrivals(phase))
        start += phase.duration_s
        if len(out) >= n:
            return out[:n]
    out.extend([start] * (n - len(out)))
    return out


def arrivals_end(phases: tuple[Phase, ...], n: int) -> float:
    """When the last of ``n`` sessions arrives or the phases end, whichever is later."""
    offsets = arrival_offsets(phases, n)
    span = sum(p.duration_s for p in phases)
    return max([span, *offsets[-1:]])


def sessions(step: Step) -> list[SessionPlan]:
    """Every session of ``step`` in arrival order.

    Slot-major (slot 0 of every document, then slot 1, ...) so that each document fills up
    at the same pace; on a document the writers come first, and the first ``full`` slots
    are full clients. With ``protocol = "mixed"`` even slots speak msgpack, odd ones JSON.
    """
    out = []
    users = step.distinct_users
    for slot in range(step.clients_per_doc):
        if step.protocol == "mixed":
            codec = "msgpack" if slot % 2 == 0 else "json"
        else:
            codec = step.protocol
        for doc in range(step.documents):
            out.append(
                SessionPlan(
                    index=len(out),
                    doc=doc,
                    slot=slot,
                    writer=slot < step.writers,
                    full=slot < step.full,
                    user=slot % users,
                    codec=codec,
                )
            )
    return out


def split(items: list[SessionPlan], procs: int) -> list[list[SessionPlan]]:
    """Deal sessions round-robin to ``procs`` load processes (arrival order is kept in each)."""
    return [items[i::procs] for i in range(procs)]
