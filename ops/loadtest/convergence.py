"""The end-of-step check: did every full client end on the server's text, and was anything lost?

Pure function of what the coordinator gathered: the documents before and after (from
``GET /v1/documents/{id}``) and the merged metrics of the load processes.

- *Converged*: every full client joined, never had an op refused, reached the final version
  and reconstructs the same text as the server's (its *confirmed* text, see
  :class:`~ops.loadtest.editor.DocClient`, so edits still pending do not count against it),
  and, with nothing pending, shows its user exactly that text.
- *Lost*: edits acknowledged before the documents were read back, missing from that text.
  Each acked edit left a stamp, so lost = those acked stamps minus the stamps found in the
  text, as multisets (two writers may stamp
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
    initial: list[DocState],
    read: list[DocState],
    final: list[DocState],
    metrics: StepMetrics,
    *,
    stamps_exact: bool,
) -> dict[str, Any]:
    """``{"converged", "lost", "version_gap", "settled", "checked_clients", "ops_owed",
    "ops_received", "mismatches", "method"}``.

    ``read`` is each document as read right after every load process drained (and froze
    its count of acked edits, see :meth:`StepMetrics.freeze_lost_basis`); ``final`` as read
    again after the clients caught up. Normally both are the same; they differ when the
    server was still applying late ops, and a full client is then compared with whichever
    read has its version. ``stamps_exact`` is true when nothing deleted text during the step,
    so the stamp multiset check is valid.
    """
    start = {d.id: d.version for d in initial}
    later = {d.id: d for d in final}
    by_doc: dict[str, list[dict[str, Any]]] = {}
    for r in metrics.full_reports:
        by_doc.setdefault(r["doc"], []).append(r)
    mismatches: list[dict[str, Any]] = []
    owed = received = lost = gap = checked = 0
    settled = True
    for doc in read:
        end = later.get(doc.id, doc)
        settled = settled and end.version == doc.version
        texts = {doc.version: text_digest(doc.text), end.version: text_digest(end.text)}
        lengths = {doc.version: len(doc.text), end.version: len(end.text)}
        for r in by_doc.get(doc.id, ()):
            checked += 1
            reason = None
            if not r.get("joined"):
                reason = "never joined"
            elif r.get("desynced"):
                reason = "an op was refused"
            elif r["version"] not in texts:
                reason = f"at v{r['version']}, server at v{end.version}"
            elif r["digest"] != texts[r["version"]]:
                reason = f"text differs (length {r['length']} vs {lengths[r['version']]})"
            elif not r.get("local_consistent", True):
                reason = "its user's text differs from the confirmed text"
            if reason is not None:
                mismatches.append({"doc": doc.id, "session": r["session"], "reason": reason})
        sessions, joins, got, own = metrics.delivery.get(doc.id, (0, 0, 0, 0))
        top = max(end.version, metrics.max_version.get(doc.id, -1))
        owed += sessions * top - joins - own
        received += got
        # Lost is judged on the later read: with several gateway processes the first read
        # may come from one whose hub delivery of the last commit is a few ms behind (an
        # acked op is durable, and every process has it shortly after); anything acked
        # before the first read must be in the later one.
        acked = metrics.basis_acks.get(doc.id, 0)
        applied = end.version - start.get(doc.id, 0)
        gap += applied - acked
        if stamps_exact:
            want = metrics.basis_stamps.get(doc.id, Counter())
            lost += sum((want - Counter(stamp.find(end.text))).values())
        else:
            lost += max(0, acked - applied)
    # Converged means every client's text was compared and equal: with edits made and not
    # one full client to compare (a scenario with ``full = 0``), it is not shown.
    edited = any(metrics.basis_acks.values())
    return {
        "converged": not mismatches and (checked > 0 or not edited),
        "lost": lost,
        "version_gap": gap,
        "settled": settled and not metrics.counters["pending_edits"],
        "checked_clients": checked,
        "ops_owed": owed,
        "ops_received": received,
        "mismatches": mismatches[:20],
        "method": "stamps" if stamps_exact else "versions",
    }
