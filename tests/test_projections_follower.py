"""The follower thread: steps spaced to batch a busy store's commits, waiters served at once."""

from __future__ import annotations

import asyncio
import contextlib

import pytest

from domain.document import Document
from projections.follower import Follower
from projections.registry import MODELS
from projections.runner import Runner
from tests.test_projections_support import make_history, source, store_and_db


async def test_a_waiter_cuts_short_the_pause_between_small_steps() -> None:
    """With long poll and batching pauses, ``wait_for`` still gets its position promptly."""
    with store_and_db("sqlite") as (store, db):
        make_history(store, docs=2, edits=10)
        follower = Follower(Runner(db, source(store), MODELS), poll=600, batch=600)
        await follower.start()
        try:
            assert await follower.wait_for(source(store).head(), 20)
            # The last step found less than a page: the thread now pauses for ``batch``.
            d = Document.create("later", "", "ann")
            d.rename("later still", "ann")
            store.save(d.collect_events())
            assert await follower.wait_for(source(store).head(), 20)
        finally:
            await follower.stop()
        assert follower.position == source(store).head()


async def test_stop_ends_even_when_an_invalidation_swallows_the_cancel(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """On 3.11 ``asyncio.wait_for`` (aiocache's, around every cache call) can swallow a
    cancellation; ``stop`` must still end the consumer, not wait on its queue for ever."""
    import projections.follower as follower_module

    monkeypatch.setattr(follower_module, "STOP_SECONDS", 0.1)
    started = asyncio.Event()

    async def invalidate(name: str, events: object) -> None:
        started.set()
        with contextlib.suppress(asyncio.CancelledError):  # swallowed, as that wait_for can
            await asyncio.sleep(0.3)

    with store_and_db("sqlite") as (store, db):
        make_history(store, docs=2, edits=3)
        follower = Follower(Runner(db, source(store), MODELS), invalidate=invalidate)
        await follower.start()
        await asyncio.wait_for(started.wait(), 5)
        stopping = asyncio.create_task(follower.stop())
        done, _ = await asyncio.wait({stopping}, timeout=5)  # the old stop() never returned
        if not done:
            assert follower._consumer is not None
            follower._consumer.cancel()  # a second cancel gets through; then fail
            await stopping
        assert done, "stop() waited on a consumer whose cancellation was swallowed"
    assert follower._consumer is not None and follower._consumer.done()


async def test_stop_applies_the_invalidations_published_before_it() -> None:
    """What the thread published before ``stop`` is invalidated, not dropped."""
    seen: list[str] = []

    async def invalidate(name: str, events: object) -> None:
        await asyncio.sleep(0)
        seen.append(name)

    with store_and_db("sqlite") as (store, db):
        make_history(store, docs=2, edits=3)
        follower = Follower(Runner(db, source(store), MODELS), invalidate=invalidate)
        await follower.start()
        await follower.stop()
        assert follower.position == source(store).head()
    assert seen
