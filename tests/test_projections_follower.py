"""The follower thread: steps spaced to batch a busy store's commits, waiters served at once."""

from __future__ import annotations

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
