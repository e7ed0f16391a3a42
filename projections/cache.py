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
- The runner invalidates (``invalidate``, then ``confirm``) for every event a model takes in,
  before the follower publishes that position (see ``projections.follower``). So a reader
  that waited for its writes to reach the read models never gets an entry that predates them.
- With Redis, entries also carry the global generation, and count only while Redis's stamp
  says its generations are complete up to the read-model position this process relies on
  (``projections.generations``): raises that failed are kept and sent again, and until they
  land, nothing tagged is served. While Redis is unreachable nothing tagged is served or
  stored, from either level.

Entries without tags (time travel at a version, diffs, blame at a version) never change.
Redis errors turn the second level off for the call (logged once until Redis works again);
the cache is an optimisation, never a source of failures.

``PageCache`` keeps rendered response bodies of read-model pages (document lists) in this
process, each valid only while the event log's head is still the one it was computed at;
``HeadProbe`` reads that head for many concurrent requests with one query.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import logging
import os
import time
from collections.abc import (
    AsyncIterator,
    Awaitable,
    Callable,
    Hashable,
    Iterable,
    Mapping,
    Sequence,
)
from dataclasses import dataclass
from typing import Any, Generic, TypeVar

import orjson

from domain.document import Document
from projections.generations import FLUSH, GLOBAL, Flush, Health, Raises, parse_stamp, settle

log = logging.getLogger(__name__)

T = TypeVar("T")

TTL_SECONDS = 600
"""How long an entry lives at most, in either level, counted from the moment its generations
were read (``fetch``): a slow computation leaves it less, and a copy of it from Redis into
the memory level lives only as long as it had left. ``generations.GEN_TTL_SECONDS`` relies on
this bound."""


LOCK_POLL_SECONDS = 0.1
"""How often a process waiting for ``ReadCache.exclusive`` tries again."""
REDIS_TIMEOUT_SECONDS = 1.0
"""Longest wait for one Redis call of the cache (a local Redis answers in well under 1 ms)."""
BACKOFF_SECONDS = 1.0
"""After a Redis call failed, how long every call fails at once without trying
(``FailFast``)."""


class FailFast:
    """A redis-py asyncio client whose calls, for ``BACKOFF_SECONDS`` after one failed, fail
    at once instead of trying: the cache is an optimisation, and a Redis that accepts
    connections but never answers cost every read the socket timeout of each of its calls
    (10 s for an analytics read). The callers handle the failure as any other Redis error:
    nothing is served from Redis, nothing is kept, the raises wait (``settle``)."""

    CALLS = frozenset({"get", "mget", "set", "eval"})

    def __init__(self, client: Any, backoff: float = BACKOFF_SECONDS) -> None:
        self._client = client
        self._backoff = backoff
        self._down_until = 0.0

    def __getattr__(self, name: str) -> Any:
        attr = getattr(self._client, name)
        if name not in self.CALLS:
            return attr

        async def call(*args: Any, **kwargs: Any) -> Any:
            if time.monotonic() < self._down_until:
                raise ConnectionError(f"Redis failed less than {self._backoff:g} s ago")
            try:
                return await attr(*args, **kwargs)
            except Exception:
                self._down_until = time.monotonic() + self._backoff
                raise

        return call

RELEASE = """
if redis.call('GET', KEYS[1]) == ARGV[1] then return redis.call('DEL', KEYS[1]) end
return 0
"""
"""Redis script: delete the lock ``KEYS[1]`` if it still holds this holder's token
``ARGV[1]`` (it may have lapsed and been taken by another)."""


@dataclass(slots=True)
class CacheStats:
    """Counters exposed in ``GET /v1/projections``."""

    hits: int = 0
    misses: int = 0
    stale: int = 0
    sets: int = 0
    invalidations: int = 0
    behind: int = 0
    """Lookups that found Redis's generations not yet complete (see ``ReadCache.reached``)."""


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


def redis_keys(prefix: str, log_id: str) -> str:
    """Where the cache's Redis keys of the event log ``log_id`` (``Store.log_id``) live.

    Generations are positions in one log: another log (a database reset, or restored from a
    dump) starts its positions again below them, so it must not share them, nor the entries.
    """
    return f"{prefix}rm:{log_id}:" if log_id else f"{prefix}rm:"


class ReadCache:
    """Two-level cache of JSON-ready values. ``start`` before use, ``close`` after.

    A process that runs projections calls ``invalidate`` for what each model took in and then
    ``confirm`` with the position reached; one that reads another runner's tables calls
    ``reached`` with every read-model position it relies on.
    """

    def __init__(
        self,
        redis_url: str | None = None,
        prefix: str = "coscribe:",
        enabled: bool = True,
        log_id: str = "",
    ) -> None:
        self.redis_url = redis_url
        self.prefix = redis_keys(prefix, log_id)
        self.enabled = enabled
        self.stats_ = CacheStats()
        self.need = 0
        """The highest read-model position this process relied on: Redis's generations must
        be complete up to it for a tagged entry to count."""
        self._gens: dict[str, int] = {}
        self._raises = Raises()
        self._health = Health("read cache", "nothing cached is served until it works again "
                              "and the runner's raises are in")
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

            self._redis = FailFast(aioredis.Redis.from_url(
                self.redis_url, socket_connect_timeout=REDIS_TIMEOUT_SECONDS,
                socket_timeout=REDIS_TIMEOUT_SECONDS,
            ))

    async def close(self) -> None:
        """Release the backends."""
        if self._memory is not None:
            await self._memory.close()
        if self._redis is not None:
            await self._redis.aclose()

    def stats(self) -> dict[str, int | bool]:
        """Hit, miss, stale, set, invalidation and behind counts, and whether Redis is the
        2nd level."""
        s = self.stats_
        return {"hits": s.hits, "misses": s.misses, "stale": s.stale, "sets": s.sets,
                "invalidations": s.invalidations, "behind": s.behind,
                "redis": self._redis is not None}

    # -- generations ------------------------------------------------------------------------

    def reached(self, position: int) -> None:
        """This process relies on the read models holding every event up to ``position``."""
        if position > self.need:
            self.need = position

    async def complete(self) -> bool:
        """Whether tagged entries can count now: always without Redis; with it, when Redis's
        stamp says its generations are complete up to ``need`` (one ``GET``)."""
        if self._redis is None:
            return True
        try:
            raw = await self._redis.get(self.prefix + "stamp")
        except Exception as exc:
            self._health.failed(exc)
            return False
        self._health.ok()
        return parse_stamp(raw)[1] >= self.need

    @contextlib.asynccontextmanager
    async def exclusive(self, name: str, seconds: float) -> AsyncIterator[None]:
        """Run the body in one process at a time of those sharing this Redis and event log:
        wait until no other holds ``name``, then hold it while the body runs, for at most
        ``seconds`` (a holder that dies or takes longer frees it by then).

        Only to save work done twice, never for correctness: without Redis, or while its
        calls fail, the body runs at once.
        """
        key = f"{self.prefix}lock:{name}"
        token = os.urandom(16).hex()
        held = False
        while self._redis is not None and not held:
            try:
                held = bool(await self._redis.set(key, token, nx=True,
                                                  px=int(seconds * 1000)))
            except Exception as exc:
                self._health.failed(exc)
                break
            if not held:
                await asyncio.sleep(LOCK_POLL_SECONDS)
        try:
            yield
        finally:
            if held:
                with contextlib.suppress(Exception):
                    await self._redis.eval(RELEASE, 1, key, token)

    async def _current(self, tags: Iterable[str]) -> tuple[dict[str, int], bool] | None:
        """The generations of ``tags`` now (with Redis, also ``GLOBAL``), and whether they are
        complete up to ``need``; None when Redis cannot say."""
        tags = sorted(set(tags))
        if not tags:
            return {}, True
        if self._redis is None:
            return {t: self._gens.get(t, 0) for t in tags}, True
        try:
            raw = await self._redis.mget(
                [self.prefix + "stamp", *(self.prefix + "gen:" + t for t in tags)]
            )
        except Exception as exc:  # Redis is an optimisation: no hits and no sets without it
            self._health.failed(exc)
            return None
        self._health.ok()
        g, r = parse_stamp(raw[0])
        gens = {t: int(v or 0) for t, v in zip(tags, raw[1:], strict=True)}
        gens[GLOBAL] = g
        return gens, r >= self.need

    async def invalidate(self, model: str, events: Sequence[tuple[int, Any]]) -> None:
        """Make every entry depending on what ``events`` changed in ``model`` stale: at once
        in this process, in Redis with the next ``confirm``."""
        self._note(tags_for(model, events))

    async def confirm(self, position: int) -> None:
        """This process's runner observed, and ``invalidate``d for, every event up to
        ``position``: send the raises to Redis (or keep them for the next call if it fails;
        the first call says where the runner started). Called after every step, and now and
        then when idle, so that a failed send is retried."""
        self.reached(position)
        if self._redis is None:
            return
        self._raises.reached(position)
        if self._raises.due():
            await self._flush()

    def _note(self, tags: Mapping[str, int]) -> None:
        self.stats_.invalidations += len(tags)
        for t, pos in tags.items():
            self._gens[t] = max(self._gens.get(t, 0), pos)
        if self._redis is not None:
            self._raises.add(tags)

    async def _flush(self) -> None:
        flush: Flush = self._raises.take()
        try:
            numkeys, keys_args = flush.args(self.prefix)
            bumped = await self._redis.eval(FLUSH, numkeys, *keys_args)
        except Exception as exc:
            settle(self._raises, self._health, flush, None, exc)
            return
        settle(self._raises, self._health, flush, bumped)

    async def raise_tags(self, tags: Mapping[str, int]) -> None:
        """Raise the generation of each tag to (at least) the log position given for it."""
        if not tags:
            return
        self._note(tags)
        if self._redis is not None:
            await self._flush()

    async def invalidate_tags(self, tags: Iterable[str]) -> None:
        """Make entries under ``tags`` stale now (past any position seen so far)."""
        tags = set(tags)
        current = await self._current(tags)
        known = {} if current is None else current[0]
        await self.raise_tags({t: max(known.get(t, 0), self._gens.get(t, 0)) + 1 for t in tags})

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
            except Exception as exc:
                self._health.failed(exc)
                raw = None
            if raw is not None:
                entry = orjson.loads(raw)
                from_redis = True
        if from_redis and entry.get("x", 0) - time.time() <= 0:
            entry = None  # at its end (or of a version without one): as if Redis had expired it
        if entry is None:
            self.stats_.misses += 1
            return None
        gens = entry["g"]
        if gens:
            current = await self._current(t for t in gens if t != GLOBAL)
            if current is None or not current[1] or current[0] != gens:
                if current is not None and not current[1]:
                    self.stats_.behind += 1
                self.stats_.stale += 1
                self.stats_.misses += 1
                return None
        if from_redis:  # until the entry's own end, not for a new TTL_SECONDS
            await self._memory.set(key, entry, ttl=max(entry["x"] - time.time(), 1e-3))
        self.stats_.hits += 1
        return entry["v"]

    async def fetch(
        self, key: str, tags: Iterable[str], compute: Callable[[], Awaitable[T]]
    ) -> T:
        """The cached value of ``key``, or ``compute()`` stored with the current ``tags``.

        Without an answer from Redis about the generations the value is computed and not
        kept: it could not be told stale later. The entry ends ``TTL_SECONDS`` after its
        generations were read (``"x"``, a wall-clock time), in both levels, however long the
        computation took: not kept at all if it took longer.
        """
        hit = await self.get(key)
        if hit is not None:
            return hit  # type: ignore[no-any-return]
        born = time.time()
        current = await self._current(tags)  # read before computing: see the module docstring
        value = await compute()
        if current is not None:
            await self._store(key, {"v": value, "g": current[0], "x": born + TTL_SECONDS})
        return value

    async def _store(self, key: str, entry: dict[str, Any]) -> None:
        ttl = entry["x"] - time.time()
        if self._memory is None or ttl <= 0:
            return
        self.stats_.sets += 1
        await self._memory.set(key, entry, ttl=ttl)
        if self._redis is not None:
            try:
                await self._redis.set(self.prefix + key, orjson.dumps(entry),
                                      px=max(1, int(ttl * 1000)))
            except Exception as exc:
                self._health.failed(exc)


class RedisRaiser:
    """The runner hooks of ``coscribe projections run``: ``observe`` and ``confirm`` raise the
    generations of the gateways' caches in Redis (see ``projections.generations``).

    Synchronous, for the runner's thread; never raises. Raises that fail are kept and sent
    again at most every ``RETRY_SECONDS``, logged once until Redis works again.
    """

    def __init__(self, redis_url: str, where: str) -> None:
        import redis

        self.where = where
        self.client = redis.Redis.from_url(redis_url, socket_connect_timeout=2,
                                           socket_timeout=5)
        self.raises = Raises()
        self.health = Health("cache generations", "the raises are kept and retried; "
                             "the gateways compute cached answers afresh meanwhile")

    def observe(self, model: str, events: Sequence[tuple[int, Any]]) -> None:
        """The runner's ``observe``: keep the tags ``events`` make stale."""
        self.raises.add(tags_for(model, events))

    def confirm(self, position: int) -> None:
        """The runner's ``confirm``: send what is due."""
        self.raises.reached(position)
        if not self.raises.due():
            return
        flush = self.raises.take()
        try:
            numkeys, keys_args = flush.args(self.where)
            bumped = self.client.eval(FLUSH, numkeys, *keys_args)
        except Exception as exc:
            settle(self.raises, self.health, flush, None, exc)
            return
        settle(self.raises, self.health, flush, bumped)

    def close(self) -> None:
        """Release the connection."""
        self.client.close()


class HeadProbe:
    """Reads a monotonic counter (the log's head) for many waiters with one call at a time.

    ``read`` returns a value read by a call that *started after* ``read`` was called, so it
    is at least the counter's value at that moment: everything committed before a request
    arrived is at or below what it gets. Concurrent callers share the next call rather than
    each making one (the one in flight may have started before they arrived, so they wait for
    the one after it). ``probe`` is called on the loop and may raise; its error goes to every
    caller that shared it.
    """

    def __init__(self, probe: Callable[[], Awaitable[int]]) -> None:
        self._probe = probe
        self._next: asyncio.Future[int] | None = None
        self._task: asyncio.Task[None] | None = None
        self.calls = 0

    async def read(self) -> int:
        """The counter, read after this call began."""
        fut = self._next
        if fut is None:
            loop = asyncio.get_running_loop()
            fut = self._next = loop.create_future()
            if self._task is None:
                self._task = loop.create_task(self._run(), name="head-probe")
        return await asyncio.shield(fut)

    async def _run(self) -> None:
        try:
            while (fut := self._next) is not None:
                self._next = None  # later callers wait for the next call: this one starts now
                self.calls += 1
                try:
                    value = await self._probe()
                except asyncio.CancelledError:
                    fut.cancel()
                    raise
                except Exception as exc:
                    fut.set_exception(exc)
                    fut.exception()  # mark retrieved: each waiter re-raises it itself
                else:
                    fut.set_result(value)
        finally:
            self._task = None


@dataclass(frozen=True, slots=True)
class Page:
    """A rendered response: its bytes and strong ETag, and the log head it is valid for."""

    head: int
    body: bytes
    etag: str


def etag_of(body: bytes) -> str:
    """A strong entity tag for ``body``: the same bytes give the same tag in every process."""
    return '"' + hashlib.blake2b(body, digest_size=16).hexdigest() + '"'


class PageCache:
    """Rendered pages by key, in this process only; no invalidation messages needed.

    A page is stored with the log head ``h`` that the read models were known to have reached
    before it was queried, so it shows every event up to ``h``. It is handed out only to a
    request whose own head (read after it arrived, see ``HeadProbe``) is not past ``h``:
    nothing was committed since, so a fresh query would say the same. Any commit anywhere
    therefore retires every page (coarse, but exact, and free of cross-process messages).
    Bounded like ``Bounded``. Use from the loop only.
    """

    def __init__(self, size: int = 4096, max_bytes: int = 64 << 20) -> None:
        self.hits = 0
        self.misses = 0
        self._pages: Bounded[Page] = Bounded(size, max_bytes)

    def get(self, key: Hashable, head: int) -> Page | None:
        """The page under ``key`` if it is valid for a request that read ``head``."""
        page = self._pages.get(key)
        if page is None or page.head < head:
            self.misses += 1
            return None
        self.hits += 1
        return page

    def put(self, key: Hashable, head: int, body: bytes) -> Page:
        """Keep ``body``, computed once the read models had reached ``head``."""
        page = Page(head, body, etag_of(body))
        self._pages.put(key, page, len(body))
        return page


V = TypeVar("V")


class Bounded(Generic[V]):
    """Values by key, at most ``size`` of them and about ``max_bytes`` in all (their sizes as
    given to ``put``); the oldest go first. A value over a sixteenth of ``max_bytes`` is not
    kept at all, so one huge document cannot push out everything else. Not thread-safe."""

    def __init__(self, size: int, max_bytes: int) -> None:
        self.size = size
        self.max_bytes = max_bytes
        self.nbytes = 0
        self._items: dict[Hashable, tuple[V, int]] = {}

    def __len__(self) -> int:
        return len(self._items)

    def get(self, key: Hashable) -> V | None:
        """The value under ``key``, if kept."""
        item = self._items.get(key)
        return None if item is None else item[0]

    def put(self, key: Hashable, value: V, nbytes: int) -> None:
        """Keep ``value`` under ``key`` (replacing what was there), evicting the oldest."""
        old = self._items.pop(key, None)
        if old is not None:
            self.nbytes -= old[1]
        if nbytes > self.max_bytes // 16:
            return
        while self._items and (
            len(self._items) >= self.size or self.nbytes + nbytes > self.max_bytes
        ):
            oldest = next(iter(self._items))  # dicts keep insertion order
            self.nbytes -= self._items.pop(oldest)[1]
        self._items[key] = (value, nbytes)
        self.nbytes += nbytes
