"""The follower thread: steps spaced to batch a busy store's commits, waiters served at once."""

from __future__ import annotations

import asyncio
import contextlib
import logging

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


async def test_failing_steps_are_logged_once_and_the_recovery_once(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    """With the database unreachable every failed step logged a full traceback (~80 lines a
    second); now the first failure is logged (with its traceback), then its recovery."""
    monkeypatch.setattr("projections.follower.ERROR_BACKOFF", 0.01)
    with store_and_db("sqlite") as (store, db):
        make_history(store, docs=1, edits=3)
        runner = Runner(db, source(store), MODELS)
        real, fails = runner.step, [5]

        def flaky() -> int:
            if fails[0]:
                fails[0] -= 1
                raise ConnectionError("database unreachable")
            return real()

        monkeypatch.setattr(runner, "step", flaky)
        follower = Follower(runner)
        caplog.set_level(logging.WARNING, logger="projections.generations")
        await follower.start()
        try:
            assert await follower.wait_for(source(store).head(), 20)
        finally:
            await follower.stop()
    lines = [r for r in caplog.records if r.name == "projections.generations"]
    assert [r.getMessage().split(" (")[0] for r in lines] == [
        "projections: a step failing", "projections: a step works again"]
    assert lines[0].exc_info is not None and "after 5 failed calls" in lines[1].getMessage()
