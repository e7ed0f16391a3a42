"""Process-wide settings of long-running coscribe processes (servers, load generators).

The cyclic garbage collector's full (generation 2) collections scan every tracked object:
in a gateway serving 1,500 sessions they took 40-190 ms every ~8 s, found nothing to free
almost every time, and stalled the event loop each time (the periodic spikes of fan-out
and ack p99 in the observers plot). ``tune_gc`` moves what exists after start-up (modules,
classes, the app) out of the collector's sight and makes full collections rare; reference
counting still frees everything that is not in a cycle at once, and cycles are still
collected, only less often.
"""

from __future__ import annotations

import gc

GC_THRESHOLDS = (10_000, 20, 100)
"""Young-generation allocations per collection, and collections per older collection
(CPython's defaults are 700, 10, 10)."""


def tune_gc() -> None:
    """Freeze the objects of start-up and space out collections (call once, after start-up)."""
    gc.collect()
    gc.freeze()
    gc.set_threshold(*GC_THRESHOLDS)
