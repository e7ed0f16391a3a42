"""The read cache: aiocache in memory, Redis as a second level shared by every process.

Staleness is ruled out with *tag generations* rather than by deleting keys:

- An entry is stored with the generation of each of its tags, read BEFORE its value was
  computed (``fetch``). A tag's generation is the log position of the latest event that
  changed what it covers; invalidating raises it (in this process, and in Redis when
  configured, so every process sees it). Every process observes every event, and raising to
  a position is idempotent, so N processes invalidate once, not N times.
- ``get`` accepts an entry only if its tags still have the generations it was stored with.
  An entry computed from data older than an invalidation therefore never counts, even if it
  was written after the invalidation (the classic read-compute-write race).
- The runner invalidates (``invalidate``) for every event a model takes in, before the
  follower publishes that position (see ``projections.follower``). So a reader that waited
  for its writes to reach the read models never gets an entry that predates them.

Entries without tags (time travel at a version, diffs, blame at a version) never change.
Redis errors are logged and turn the second level off for the call; the cache is an
optimisation, never a source of failures.
"""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, TypeVar

import orjson

from domain.document import Document

log = logging.getLogger(__name__)

T = TypeVar("T")

TTL_SECONDS = 600
"""How long an entry lives at most, in either level."""


@dataclass(slots=True)
class CacheStats:
    """Counters exposed in ``GET /v1/projections``."""

    hits: int = 0
    misses: int = 0
    stale: int = 0
    sets: int = 0
    invalidations: int = 0


def tags_for(model: str, events: Sequence[tuple[int, Any]]) -> dict[str, int]:
    """The tags the events just taken in by ``model`` make stale, each with the position of the
    latest of those events.

    Analytics entries depend on the analytics tables and on membership (they count only what
    the caller may read) and titles (top documents), so both models invalidate them.
    """
    tags: dict[str, int] = {}
    for pos, e in events:
        doc = str(getattr(e, "originator_id", ""))
        if model == "analytics" or (
            model == "documents"
            and isinstance(
                e,
                Document.Created | Document.Renamed | Document.MemberAdded
                | Document.MemberRemoved,
            )
        ):
            tags[f"an-doc:{doc}"] = pos
            tags["an-all"] = pos
    return tags


RAISE_TO = """
for i, key in ipairs(KEYS) do
  local want = tonumber(ARGV[i])
  if tonumber(redis.call('GET', key) or '0') < want then redis.call('SET', key, want) end
end
return #KEYS
"""
"""Redis script: raise each generation in KEYS to the position in ARGV (never lower it).

Generations are log positions, so every process that observes an event sets the same value:
invalidation is idempotent, and a second process seeing the event later does not spoil
entries computed in between.
"""


class ReadCache:
    """Two-level cache of JSON-ready values. ``start`` before use, ``close`` after."""

    def __init__(
        self, redis_url: str | None = None, prefix: str = "coscribe:", enabled: bool = True
    ) -> None:
        self.redis_url = redis_url
        self.prefix = f"{prefix}rm:"
        self.enabled = enabled
        self.stats_ = CacheStats()
        self._gens: dict[str, int] = {}
        self._memory: Any = None
        self._redis: Any = None

    async def start(self) -> None:
        """Create the backends (no I/O happens before this)."""
        if not self.enabled:
            return
        from aiocache import SimpleMemoryCache  # type: ignore[import-untyped]

        self._memory = SimpleMemoryCache()
        if self.redis_url:
            import redis.asyncio as aioredis

            self._redis = aioredis.Redis.from_url(self.redis_url)

    async def close(self) -> None:
        """Release the backends."""
        if self._memory is not None:
            await self._memory.close()
        if self._redis is not None:
            await self._redis.aclose()

    def stats(self) -> dict[str, int | bool]:
        """Hit, miss, stale, set and invalidation counts, and whether Redis is the 2nd level."""
        s = self.stats_
        return {"hits": s.hits, "misses": s.misses, "stale": s.stale, "sets": s.sets,
                "invalidations": s.invalidations, "redis": self._redis is not None}

    # -- generations ------------------------------------------------------------------------

    async def _current(self, tags: Iterable[str]) -> dict[str, int]:
        tags = sorted(set(tags))
        if not tags:
            return {}
        if self._redis is not None:
            try:
                raw = await self._redis.mget([self.prefix + "gen:" + t for t in tags])
                return {t: int(v or 0) for t, v in zip(tags, raw, strict=True)}
            except Exception:  # Redis is an optimisation: fall back to this process's view
                log.warning("redis generations unavailable", exc_info=True)
                return {t: -1 for t in tags}  # never matches: no hits without Redis
        return {t: self._gens.get(t, 0) for t in tags}

    async def invalidate(self, model: str, events: Sequence[tuple[int, Any]]) -> None:
        """Make every entry depending on what ``events`` changed in ``model`` stale."""
        await self.raise_tags(tags_for(model, events))

    async def raise_tags(self, tags: Mapping[str, int]) -> None:
        """Raise the generation of each tag to (at least) the log position given for it."""
        if not tags:
            return
        self.stats_.invalidations += len(tags)
        for t, pos in tags.items():
            self._gens[t] = max(self._gens.get(t, 0), pos)
        if self._redis is not None:
            try:
                keys = [self.prefix + "gen:" + t for t in tags]
                await self._redis.eval(RAISE_TO, len(keys), *keys, *tags.values())
            except Exception:
                log.warning("redis invalidation failed", exc_info=True)

    async def invalidate_tags(self, tags: Iterable[str]) -> None:
        """Make entries under ``tags`` stale now (past any position seen so far)."""
        current = await self._current(tags)
        await self.raise_tags({t: max(g, self._gens.get(t, 0)) + 1 for t, g in current.items()})

    # -- entries ----------------------------------------------------------------------------

    async def get(self, key: str) -> Any:
        """The value stored under ``key`` if it is still valid, else None."""
        if self._memory is None:
            return None
        entry = await self._memory.get(key)
        from_redis = False
        if entry is None and self._redis is not None:
            try:
                raw = await self._redis.get(self.prefix + key)
            except Exception:
                log.warning("redis get failed", exc_info=True)
                raw = None
            if raw is not None:
                entry = orjson.loads(raw)
                from_redis = True
        if entry is None:
            self.stats_.misses += 1
            return None
        gens = entry["g"]
        if gens and await self._current(gens) != gens:
            self.stats_.stale += 1
            self.stats_.misses += 1
            return None
        if from_redis:
            await self._memory.set(key, entry, ttl=TTL_SECONDS)
        self.stats_.hits += 1
        return entry["v"]

    async def fetch(
        self, key: str, tags: Iterable[str], compute: Callable[[], Awaitable[T]]
    ) -> T:
        """The cached value of ``key``, or ``compute()`` stored with the current ``tags``."""
        hit = await self.get(key)
        if hit is not None:
            return hit  # type: ignore[no-any-return]
        gens = await self._current(tags)  # read before computing: see the module docstring
        value = await compute()
        await self._store(key, {"v": value, "g": gens})
        return value

    async def _store(self, key: str, entry: dict[str, Any]) -> None:
        if self._memory is None:
            return
        self.stats_.sets += 1
        await self._memory.set(key, entry, ttl=TTL_SECONDS)
        if self._redis is not None:
            try:
                await self._redis.set(self.prefix + key, orjson.dumps(entry), ex=TTL_SECONDS)
            except Exception:
                log.warning("redis set failed", exc_info=True)
