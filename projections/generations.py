"""Tag generations in Redis that survive outages: raises kept until Redis has them, and a stamp
that says how far the generations are complete.

The read cache (``projections.cache``) serves an entry only while its tags have the
generations it was computed with. That is only as good as the raises: one that never reached
Redis (Redis down, or the runner killed between its commit and the raise) or one that Redis
lost (restarted from an older AOF, emptied, failed over to a lagging replica) would leave old
entries valid for their whole TTL. So:

- **A runner keeps its raises until Redis confirms them** (``Raises``: the highest position
  per tag). One script (``FLUSH``) sends them, with the runner's position, at every step;
  after a failure they go with the next attempt, at most every ``RETRY_SECONDS``.
- **The stamp.** The key ``<where>stamp`` holds ``"G R"``. Invariant: every event up to
  position ``R`` has its tags raised in Redis, or is older than the *global generation* ``G``,
  which every tagged entry depends on as well. The script raises ``R`` to the runner's
  position once its tags are in. A runner cannot tell which of its raises Redis has when
  ``R`` is below what it had confirmed (Redis lost writes), below its tracking position at
  start (it may have been killed between a commit and the raise), or below the tags it had
  to drop (``MAX_PENDING``): the script then raises ``G`` to the runner's position, which
  retires every entry computed before it. A restored Redis is an older state of itself, so
  the invariant held in it too.
- **Readers need the stamp.** An entry counts only if ``R`` is at least the read-model
  position the reader relies on (``ReadCache.reached``). Until a runner's raise lands (an
  outage, a restart, the instant between a commit and the raise) readers compute from the
  tables instead of trusting generations that may lag. The stamp is one more key in the
  reader's MGET, no extra round trip.

Generation keys expire ``GEN_TTL_SECONDS`` after the raise that last moved them (the
stamp never does): see there why no entry can be served stale by it.

``Raises`` does no I/O: ``ReadCache`` (asyncio, a gateway's own runner) and ``RedisRaiser``
(a ``coscribe projections run`` thread) drive it. ``Health`` keeps their logs to one line when
Redis starts failing and one when it works again.
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field

log = logging.getLogger(__name__)

RETRY_SECONDS = 1.0
"""While Redis fails, how often a runner tries its raises again."""
CHECK_SECONDS = 5.0
"""How often an idle runner checks that Redis still has its raises (it may have lost them
without any call failing: restarted in between)."""
MAX_PENDING = 10_000
"""Most tags kept waiting for Redis; past that they are dropped and the global generation
covers them (one raise retires every entry)."""
GEN_TTL_SECONDS = 86_400
"""How long a tag's generation key lives in Redis after the last raise that moved it.

Safe because no entry outlives ``projections.cache.TTL_SECONDS`` (600 s) counted from the
moment its generations were read, in either level (see ``ReadCache.fetch``). An entry is
valid only while the key reads what it read. For the key to read that value again after a
change raised it past it, the key must first expire, at least ``GEN_TTL_SECONDS`` after that
raise (each raise sets the expiry anew), and so after the read: then it reads 0 (the value of
an entry read while the key was missing), or a runner lagging behind sets it to an older
position (the value of an entry read before the raise). Every such entry was read before
the raise, so it has been gone for most of a day. An entry that reads a key after it expired
is computed from the tables as they are, and the next change raises the key past it again.
A day leaves room for clocks of the processes that disagree by hours (entries' lives are
counted by the clock of the process that holds them, keys' by Redis's); an evicted key
would break this like a lost one, hence ``maxmemory-policy noeviction`` (ops/DEPLOYMENT.md).
The stamp has no expiry: it is one key.
"""

GLOBAL = "*"
"""The name of the global generation in an entry's generations."""

FLUSH = """
for i = 2, #KEYS do
  local want = tonumber(ARGV[i + 1])
  if tonumber(redis.call('GET', KEYS[i]) or '0') < want then
    redis.call('SET', KEYS[i], want, 'EX', GEN_TTL)
  end
end
local at = tonumber(ARGV[2])
if at < 0 then return 0 end
local g, r = 0, 0
local stamp = redis.call('GET', KEYS[1])
if stamp then
  local sg, sr = string.match(stamp, '^(%d+) (%d+)$')
  if sg then g, r = tonumber(sg), tonumber(sr) end
end
local bumped = 0
if r < tonumber(ARGV[1]) and g < at then
  g = at
  bumped = 1
end
if r < at then r = at end
redis.call('SET', KEYS[1], string.format('%d %d', g, r))
return bumped
""".replace("GEN_TTL", str(GEN_TTL_SECONDS))
"""Redis script: raise each generation in ``KEYS[2..]`` to its position in ``ARGV[3..]`` (never
lower one; each raise makes the key expire ``GEN_TTL_SECONDS`` later), then, unless
``ARGV[2]`` (the runner's position) is negative, update the stamp ``KEYS[1]``: raise ``G`` to
that position if ``R`` is below ``ARGV[1]`` (the position up to which the runner cannot tell
what Redis has), and raise ``R`` to it. Returns 1 if ``G`` moved.

Generations are log positions, so every process that observes an event sets the same value:
invalidation is idempotent, and a second process seeing the event later does not spoil
entries computed in between.
"""


def parse_stamp(raw: bytes | str | None) -> tuple[int, int]:
    """``(G, R)`` from the stamp's value; ``(0, 0)`` when missing (nothing is confirmed)."""
    if raw is None:
        return 0, 0
    parts = raw.split()
    if len(parts) != 2:
        return 0, 0
    return int(parts[0]), int(parts[1])


@dataclass(frozen=True, slots=True)
class Flush:
    """One attempt to get the raises into Redis (see ``FLUSH``)."""

    tags: dict[str, int]
    doubt: int
    position: int
    """The runner's position to confirm, or -1 (tags only, the stamp untouched)."""

    def args(self, where: str) -> tuple[int, list[str | int]]:
        """``numkeys`` and ``keys + args`` of ``EVAL FLUSH`` for keys under ``where``."""
        keys: list[str | int] = [f"{where}stamp", *(f"{where}gen:{t}" for t in self.tags)]
        return len(keys), [*keys, self.doubt, self.position, *self.tags.values()]


@dataclass(slots=True)
class Raises:
    """A runner's raises not yet confirmed by Redis, and what it may no longer rely on.

    Protocol: ``add`` the tags of every event observed, ``reached`` the position observed up
    to (the first call is the start: everything up to it is in doubt), and when ``due``, send
    ``take()`` and report ``sent`` or ``failed``. No I/O; use from one thread (or the loop).
    """

    clock: Callable[[], float] = time.monotonic
    tags: dict[str, int] = field(default_factory=dict)
    position: int = -1
    """How far the runner observed the log (-1: not said yet)."""
    confirmed: int = -1
    """The position Redis last confirmed."""
    doubt: int = 0
    """Up to here the runner's raises may be missing from Redis unless its ``R`` covers them."""
    dropped: int = 0
    """The highest position of the tags dropped (``MAX_PENDING``) and not yet covered."""
    failing: bool = False
    _last: float = -math.inf

    def add(self, tags: Mapping[str, int]) -> None:
        """Keep ``tags`` (each with its event's position) until Redis confirms them."""
        for t, pos in tags.items():
            if pos > self.tags.get(t, -1):
                self.tags[t] = pos
        if len(self.tags) > MAX_PENDING:
            self.dropped = max(self.dropped, max(self.tags.values()))
            self.tags.clear()

    def reached(self, position: int) -> None:
        """The runner observed (and ``add``ed the tags of) every event up to ``position``."""
        if self.position < 0:
            self.doubt = max(self.doubt, position)
        self.position = max(self.position, position)

    def due(self) -> bool:
        """Whether to send now: something to send, or a retry or a check is due."""
        since = self.clock() - self._last
        if self.failing:
            return since >= RETRY_SECONDS
        return bool(self.tags) or self.position > self.confirmed or (
            self.position >= 0 and since >= CHECK_SECONDS
        )

    def take(self) -> Flush:
        """What to send now (``sent``/``failed`` with it after)."""
        self._last = self.clock()
        return Flush(dict(self.tags), max(self.doubt, self.dropped), self.position)

    def sent(self, flush: Flush) -> None:
        """Redis ran ``flush``: its tags are in (unless raised further since), and so is the
        stamp at its position."""
        self.failing = False
        for t, pos in flush.tags.items():
            if self.tags.get(t) == pos:
                del self.tags[t]
        if flush.position >= 0:
            self.confirmed = max(self.confirmed, flush.position)
            self.doubt = max(self.doubt, flush.position)
            if flush.doubt >= self.dropped:
                self.dropped = 0

    def failed(self) -> None:
        """Redis did not run it: everything stays for the next attempt."""
        self.failing = True


class Health:
    """Logs a dependency (Redis by default) going bad once, with the reason (and, with
    ``traceback``, the first failure's traceback), and once when it works again, however
    many calls fail in between."""

    def __init__(self, what: str, meanwhile: str, dependency: str = "Redis",
                 traceback: bool = False) -> None:
        self.what = what
        self.meanwhile = meanwhile
        self.dependency = dependency
        self.traceback = traceback
        self.failures = 0

    @property
    def failing(self) -> bool:
        """Whether the last call failed."""
        return self.failures > 0

    def failed(self, exc: BaseException) -> None:
        """A call failed with ``exc``."""
        if self.failures == 0:
            log.warning("%s: %s failing (%s: %s); %s", self.what, self.dependency,
                        type(exc).__name__, exc, self.meanwhile,
                        exc_info=exc if self.traceback else None)
        self.failures += 1

    def ok(self) -> None:
        """A call worked."""
        if self.failures:
            log.warning("%s: %s works again (after %d failed calls)", self.what,
                        self.dependency, self.failures)
            self.failures = 0


def settle(raises: Raises, health: Health, flush: Flush, bumped: object,
           error: BaseException | None = None) -> None:
    """Record how an ``EVAL FLUSH`` of ``flush`` went: failed with ``error`` (the raises are
    kept for the next attempt), or done, ``bumped`` its answer (1: ``G`` moved)."""
    if error is not None:
        raises.failed()
        health.failed(error)
        return
    raises.sent(flush)
    health.ok()
    if bumped:
        log.info("cache generations: Redis may lack raises up to %s; every cached entry goes "
                 "stale", flush.position)
