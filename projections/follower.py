"""Drives a ``Runner`` from a thread of its own and lets coroutines wait for it.

The runner's database calls are synchronous, so they run on one dedicated thread that polls
the log every ``poll`` seconds when idle, sooner when ``nudge``d (a write this process knows
about, or a Postgres NOTIFY). Steps that find only a few events are spaced ``batch`` seconds
apart, so that a busy store's commits are taken in by a few steps rather than one each;
``wait_for`` does not wait for that. Coroutines on the loop see how far it got through
``position`` and can ``wait_for`` a position: read-your-writes for the read models.

``position`` only moves after the runner's observer ran for the events it covers, and the
observer's loop-side work (cache invalidation, then ``confirm`` with the new position) is
awaited before waiters wake, so a reader that waited never gets a cache entry older than the
events it waited for. ``confirm`` is also called once at start, before the first step, and
at least every ``HEARTBEAT_SECONDS`` when idle (it retries what it could not send).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import threading
import time
from collections.abc import Awaitable, Callable, Sequence
from typing import Any

from projections.generations import Health
from projections.runner import Runner

log = logging.getLogger(__name__)

POLL_SECONDS = 0.05
"""How often an idle runner looks at the log (a fallback: writes nudge it)."""
STOP_SECONDS = 5.0
"""Longest wait, at ``stop``, for the invalidations already published (then cancelled)."""
BATCH_SECONDS = 0.02
"""After a step that found less than a full page, the next one waits this long even when
nudged, so that the commits of a busy store (each one a NOTIFY) are taken in one step: a
step's fixed cost (a read, a transaction) is paid once per this interval, not per commit.
A coroutine waiting for a position (``wait_for``) cuts the wait short."""
ERROR_BACKOFF = 1.0
"""Pause after a failed step before retrying (the database may be restarting)."""
HEARTBEAT_SECONDS = 0.5
"""Longest an idle follower goes without calling ``confirm``."""

Invalidate = Callable[[str, Sequence[tuple[int, Any]]], Awaitable[None]]
"""Loop-side hook run for every batch of events a model has taken in, before waiters wake."""

Confirm = Callable[[int], Awaitable[None]]
"""Loop-side hook run with the position every model reached, after its invalidations."""


class Follower:
    """Runs ``runner`` on a thread; ``start``/``stop`` from the loop."""

    def __init__(
        self,
        runner: Runner,
        poll: float = POLL_SECONDS,
        invalidate: Invalidate | None = None,
        batch: float = BATCH_SECONDS,
        confirm: Confirm | None = None,
    ) -> None:
        self.runner = runner
        self._health = Health("projections", f"the read models wait; retried every "
                              f"{ERROR_BACKOFF:g} s", dependency="a step", traceback=True)
        self.poll = poll
        self.batch = batch
        self.invalidate = invalidate
        self.confirm = confirm
        self.position = 0
        """Lowest position every model reached, as published on the loop."""
        self.last_error: str | None = None
        self._ready = False
        self._stop = threading.Event()
        self._wake = threading.Event()
        self._urgent = threading.Event()
        self._thread: threading.Thread | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._moved = asyncio.Event()
        self._pending: list[tuple[str, Sequence[tuple[int, Any]]]] = []
        self._lock = threading.Lock()
        self._queue: asyncio.Queue[
            tuple[int, list[tuple[str, Sequence[tuple[int, Any]]]]] | None
        ] = asyncio.Queue()
        self._consumer: asyncio.Task[None] | None = None
        self._beat = 0.0
        runner.observe = self._observe

    async def start(self) -> None:
        """Create tables as needed (off the loop), then follow the log on the thread.

        If the tables cannot be set up now (database down), the thread keeps trying: the
        gateway still starts, and reads report their lag until the runner is going.
        """
        self._loop = asyncio.get_running_loop()
        try:
            await self._loop.run_in_executor(None, self.runner.setup)
            self._ready = True
        except Exception as exc:
            log.exception("read models not set up yet; retrying in the background")
            self.last_error = f"{type(exc).__name__}: {exc}"
        self.position = self.runner.seen()
        if self._ready:  # confirm where we start before any step (not a position before setup)
            self._queue.put_nowait((self.position, []))
        self._consumer = self._loop.create_task(self._consume(), name="projections-publish")
        self._thread = threading.Thread(target=self._run, name="projections", daemon=True)
        self._thread.start()

    async def stop(self) -> None:
        """Stop the thread after its current step (which commits or rolls back whole)."""
        self._stop.set()
        self._urgent.set()
        self._wake.set()
        if self._thread is not None:
            await asyncio.get_running_loop().run_in_executor(None, self._thread.join, 30)
        consumer = self._consumer
        if consumer is None:
            return
        # End the consumer with a sentinel after what the thread published, not only by
        # cancelling it: on 3.11 an ``asyncio.wait_for`` inside an invalidation (aiocache
        # wraps every call in one) can swallow the cancellation, and the consumer then waits
        # on its queue for ever (seen: a gateway's shutdown hung in 1 of 15 test runs).
        self._queue.put_nowait(None)
        await asyncio.wait({consumer}, timeout=STOP_SECONDS)  # neither cancels nor raises
        if not consumer.done():
            consumer.cancel()
            await asyncio.wait({consumer}, timeout=STOP_SECONDS)

    def nudge(self) -> None:
        """Look at the log now rather than at the next poll."""
        self._wake.set()

    async def wait_for(self, position: int, max_wait: float) -> bool:
        """Wait until every model took in events up to ``position``; False on timeout."""
        if self.position >= position:
            return True
        self._urgent.set()
        self.nudge()
        loop = asyncio.get_running_loop()
        deadline = loop.time() + max_wait
        while True:
            self._moved.clear()
            if self.position >= position:
                return True
            left = deadline - loop.time()
            if left <= 0:
                return False
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._moved.wait(), left)

    # -- the thread -------------------------------------------------------------------------

    def _run(self) -> None:
        while not self._stop.is_set():
            self._wake.clear()
            self._urgent.clear()
            try:
                if not self._ready:
                    self.runner.setup()
                    self._ready = True
                n = self.runner.step()
                self.last_error = None
            except Exception as exc:  # keep following: the database may come back
                self._health.failed(exc)
                self.last_error = f"{type(exc).__name__}: {exc}"
                self._stop.wait(ERROR_BACKOFF)
                continue
            self._health.ok()
            self._publish(self.runner.seen())
            if n == 0:
                self._wake.wait(self.poll)
            elif n < self.runner.page_size and self.batch > 0:
                self._urgent.wait(self.batch)  # let a few more commits arrive first

    def _observe(self, name: str, events: Sequence[tuple[int, Any]]) -> None:
        if self.invalidate is not None:
            with self._lock:
                self._pending.append((name, list(events)))

    def _publish(self, position: int) -> None:
        loop = self._loop
        if loop is None or loop.is_closed():
            return
        with self._lock:
            pending, self._pending = self._pending, []
        now = time.monotonic()
        beat = self.confirm is not None and now - self._beat >= HEARTBEAT_SECONDS
        if not pending and position == self.position and not beat:
            return
        self._beat = now
        try:
            loop.call_soon_threadsafe(self._advance, position, pending)
        except RuntimeError:  # the loop closed between the check and the call
            return

    def _advance(self, position: int, pending: list[tuple[str, Sequence[tuple[int, Any]]]]) -> None:
        # One consumer applies invalidations in order, so the published position never runs
        # ahead of an invalidation still in flight.
        self._queue.put_nowait((position, pending))

    async def _consume(self) -> None:
        task = asyncio.current_task()
        while True:
            item = await self._queue.get()
            if item is None:  # stop(): everything published before it is applied
                return
            position, pending = item
            if self.invalidate is not None:
                for name, events in pending:
                    try:
                        await self.invalidate(name, events)
                    except Exception:  # a failed invalidation must not wedge the readers
                        log.exception("cache invalidation failed for %s", name)
                    if task is not None and task.cancelling():
                        raise asyncio.CancelledError  # one that the invalidation swallowed
            if self.confirm is not None:
                try:
                    await self.confirm(position)
                except Exception:  # like a failed invalidation
                    log.exception("cache confirm failed at %s", position)
                if task is not None and task.cancelling():
                    raise asyncio.CancelledError
            if position > self.position:
                self.position = position
            self._moved.set()
