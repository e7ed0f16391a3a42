"""The committer's own encodings equal the libraries' ones they replace.

``gateway.pgarrays`` (binary arrays) against what PostgreSQL reads back; ``EventEncoder``
against the library mapper's ``to_stored_event``; ``recordings_of`` against the library's
``Recording`` and ``Notification`` built by their constructors.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any
from uuid import UUID, uuid4

import psycopg
import pytest
from eventsourcing.persistence import Mapper, Notification, Recording
from hypothesis import given, settings
from hypothesis import strategies as st

from gateway import pgarrays
from gateway.store import EventEncoder, recordings_of
from schema.transcoder import MsgpackTranscoder
from tests.conftest import PG_URL, every_kind_of_event, fresh_pg_schema

OWNER = "alice"


@pytest.fixture(scope="module")
def conn() -> Iterator[psycopg.Connection[Any]]:
    with psycopg.connect(PG_URL, autocommit=True) as c:
        yield c


texts = st.text(st.characters(blacklist_categories=("Cs",), blacklist_characters="\x00"))


@settings(max_examples=60, deadline=None)
@given(
    ids=st.lists(st.uuids() | st.uuids().map(str), max_size=20),
    ints=st.lists(st.integers(-(2**63), 2**63 - 1), max_size=20),
    strs=st.lists(texts, max_size=20),
    blobs=st.lists(st.binary(max_size=300), max_size=20),
)
def test_binary_arrays_read_back_as_their_values(
    conn: psycopg.Connection[Any], ids: list[UUID | str], ints: list[int], strs: list[str],
    blobs: list[bytes],
) -> None:
    """Every encoder, empty arrays and repeated values included, as the server reads it."""
    ids += ids[:3]  # repeats take the memo's path
    strs += strs[:3]
    row = conn.execute(
        "SELECT %b::uuid[], %b::bigint[], %b::text[], %b::bytea[], cardinality(%b::uuid[])",
        (pgarrays.uuids(ids), pgarrays.int8s(ints), pgarrays.texts(strs),
         pgarrays.byteas(blobs), pgarrays.uuids(ids)),
    ).fetchone()
    assert row is not None
    assert row[0] == [u if isinstance(u, UUID) else UUID(u) for u in ids]
    assert (row[1], row[2], row[3], row[4]) == (ints, strs, blobs, len(ids))


@pytest.mark.parametrize("compress", [False, True])
def test_event_encoder_columns_are_the_mappers_stored_events(compress: bool) -> None:
    """Same ids, versions, topics and state bytes for every event type; a mapper with a
    compressor is asked instead of encoded directly."""
    from eventsourcing.compressor import ZlibCompressor

    mapper: Mapper[Any] = Mapper(
        transcoder=MsgpackTranscoder(), compressor=ZlibCompressor() if compress else None
    )
    encoder = EventEncoder(mapper)
    assert encoder.direct is not compress
    events = every_kind_of_event(OWNER)
    stored = [mapper.to_stored_event(e) for e in events]
    for _ in range(2):  # the second time from the class memo
        assert encoder.columns(events) == (
            [s.originator_id for s in stored],
            [s.originator_version for s in stored],
            [s.topic for s in stored],
            [s.state for s in stored],
        )


def test_recordings_equal_constructed_ones_and_skip_stale_documents() -> None:
    mapper: Mapper[Any] = Mapper(transcoder=MsgpackTranscoder())
    events = every_kind_of_event(OWNER)  # the last is another document's
    columns = EventEncoder(mapper).columns(events)
    stale = {events[-1].originator_id}
    got = recordings_of(events, columns, [10 + i for i in range(len(events) - 1)], stale)
    expected = [
        Recording(e, Notification(originator_id=s.originator_id,
                                  originator_version=s.originator_version,
                                  topic=s.topic, state=s.state, id=10 + i))
        for i, (e, s) in enumerate(
            (e, mapper.to_stored_event(e)) for e in events if e.originator_id not in stale
        )
    ]
    assert got == expected
    assert [r.notification.id for r in got] == list(range(10, 10 + len(events) - 1))
    with pytest.raises(ValueError, match="fewer"):  # one id per recorded event
        recordings_of(events, columns, [1], set())
    with pytest.raises(ValueError, match="more"):
        recordings_of(events, columns, list(range(len(events) + 1)), {uuid4()})


def test_transcoder_reuses_its_packer_cleanly_after_a_refused_value() -> None:
    """A value the transcoder refuses leaves nothing behind in its (reused) packer."""
    import threading

    transcoder = MsgpackTranscoder()
    state = {"op": [3, "x"], "h": b"\x00\x01", "at": uuid4()}
    first = transcoder.encode(state)
    with pytest.raises(TypeError, match="cannot store"):
        transcoder.encode({"op": [1, object()]})
    assert transcoder.encode(state) == first
    assert transcoder.decode(first) == state
    out: list[bytes] = []
    worker = threading.Thread(target=lambda: out.append(transcoder.encode(state)))
    worker.start()
    worker.join()
    assert out == [first]  # another thread, its own packer, the same bytes


@pytest.fixture(scope="module")
def pg_store(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Any]:
    """A Postgres store in a fresh schema, with a few documents' events stored."""
    from domain.document import Document
    from gateway.store import Store, StoreConfig

    with fresh_pg_schema() as name:
        store = Store(StoreConfig(data_dir=tmp_path_factory.mktemp("lockread"),
                                  database_url=PG_URL, database_schema=name))
        try:
            docs = [Document.create(f"d{i}", "", OWNER) for i in range(3)]
            for i, d in enumerate(docs):
                for n in range(4 * i):
                    d.edit(([n] if n else []) + ["x"], OWNER)
            store.save([e for d in docs for e in d.collect_events()])
            yield store, [d.id for d in docs]
        finally:
            store.close()


@settings(max_examples=40, deadline=None)
@given(data=st.data())
def test_lock_read_literals_read_what_bound_parameters_read(
    pg_store: tuple[Any, list[UUID]], data: st.DataObject
) -> None:
    """``begin_missed`` writes its uuid and bigint literals by hand: same rows as bound ones."""
    from gateway.recorders import LOCK_READ_FUNCTION

    store, ids = pg_store
    recorder = store.writer_recorder
    docs = data.draw(st.lists(st.sampled_from(ids) | st.uuids(), max_size=6, unique=True))
    heads = {d: data.draw(st.integers(0, 2**63 - 1) | st.integers(0, 14)) for d in docs}
    limit = data.draw(st.integers(1, 5))
    schema = store.cfg.database_schema
    with psycopg.connect(PG_URL) as c:
        with c.cursor() as curs:
            curs.execute(recorder.begin_missed(heads, limit))
            curs.nextset()
            got = curs.fetchall()
        c.rollback()
        want = c.execute(
            f'SELECT * FROM "{schema}"."{LOCK_READ_FUNCTION}"(%s::uuid[], %s::bigint[], %s)',
            (list(heads), list(heads.values()), limit),
        ).fetchall()
        c.rollback()
    assert got == want
    assert len(got) <= limit * len(docs)
