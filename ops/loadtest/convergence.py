"""The end-of-step check: did every full client end on the server's text, and was anything lost?

Pure function of what the coordinator gathered: the documents before and after (from
``GET /v1/documents/{id}``) and the merged metrics of the load processes.

- *Converged*: every full client joined, never had an op refused, reached the final version
  and reconstructs the same text as the server's (its *confirmed* text, see
  :class:`~ops.loadtest.editor.DocClient`, so edits still pending do not count against it),
  and, with nothing pending, shows its user exactly that text.
- *Lost*: acknowledged edits missing from the final text. Each acked edit left a stamp, so
  lost = acked stamps minus stamps found in the text, as multisets (two writers may stamp
  the same 10 µs). With deletes in the mix a delete can cut a stamp, so the check falls back
  to versions: ``acked - (final version - initial version)``, floored at 0.
- ``version_gap``: ops the server applied beyond those acknowledged (positive) — e.g. an op
  whose ack a dropped connection never delivered. Reported, not counted as lost.
- *Delivery*: a session still connected that joined at version J and had A of its own ops
  acked owes ``final version - J - A`` ops (the protocol sends every other op, in order,
  once); ``ops_received / ops_owed`` below 1 means broadcasts were lost or still late.
"""

from __future__ import annotations

from collections import Counter
from typing import Any

from ops.loadtest import stamp
from ops.loadtest.provision import DocState
from ops.loadtest.recorder import StepMetrics
from ops.loadtest.session import text_digest


def check(
    initial: list[DocState], final: list[DocState], metrics: StepMetrics, *, stamps_exact: bool
) -> dict[str, Any]:
    """``{"converged", "lost", "version_gap", "checked_clients", "mismatches", "method"}``.

    ``stamps_exact`` is true when nothing deleted text during the step (no deletes), so
    the stamp multiset check is valid.
    """
    start = {d.id: d.version for d in initial}
    by_doc: dict[str, list[dict[str, Any]]] = {}
    for r in metrics.full_reports:
        by_doc.setdefault(r["doc"], []).append(r)
    mismatches: list[dict[str, Any]] = []
    owed = received = 0
    lost = 0
    gap = 0
    checked = 0
    for doc in final:
        digest = text_digest(doc.text)
        for r in by_doc.get(doc.id, ()):
            checked += 1
            reason = None
            if not r.get("joined"):
                reason = "never joined"
            elif r.get("desynced"):
                reason = "an op was refused"
            elif r["version"] != doc.version:
                reason = f"at v{r['version']}, server at v{doc.version}"
            elif r["digest"] != digest:
                reason = f"text differs (length {r['length']} vs {len(doc.text)})"
            elif not r.get("local_consistent", True):
                reason = "its user's text differs from the confirmed text"
            if reason is not None:
                mismatches.append({"doc": doc.id, "session": r["session"], "reason": reason})
        sessions, joins, got, own = metrics.delivery.get(doc.id, (0, 0, 0, 0))
        owed += sessions * doc.version - joins - own
        received += got
        acked = metrics.acks_by_doc.get(doc.id, 0)
        applied = doc.version - start.get(doc.id, 0)
        gap += applied - acked
        if stamps_exact:
            want = metrics.acked_stamps.get(doc.id, Counter())
            lost += sum((want - Counter(stamp.find(doc.text))).values())
        else:
            lost += max(0, acked - applied)
    return {
        "converged": not mismatches,
        "lost": lost,
        "version_gap": gap,
        "checked_clients": checked,
        "ops_owed": owed,
        "ops_received": received,
        "mismatches": mismatches[:20],
        "method": "stamps" if stamps_exact else "versions",
    }
