"""Helpers shared by the projection tests (no tests here): stores, histories, table dumps."""

from __future__ import annotations

import contextlib
import random
import tempfile
import uuid
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import psycopg
from psycopg import sql

from domain.document import Document
from domain.errors import DomainError
from gateway.readmodels import StoreSource, read_db_config
from gateway.store import Store, StoreConfig
from projections.db import ReadDB, open_db
from projections.model import ReadModel
from tests.conftest import PG_URL

USERS = ("ann", "bob", "cy", "dee")


@contextlib.contextmanager
def store_and_db(kind: str) -> Iterator[tuple[Store, ReadDB]]:
    """A fresh store and read-model database of ``kind`` (sqlite/postgres), removed after."""
    with tempfile.TemporaryDirectory() as tmp:
        schema = None
        if kind == "postgres":
            schema = f"t_{uuid.uuid4().hex[:12]}"
            with psycopg.connect(PG_URL, autocommit=True) as conn:
                conn.execute(sql.SQL("CREATE SCHEMA {}").format(sql.Identifier(schema)))
            cfg = StoreConfig(data_dir=Path(tmp), database_url=PG_URL, database_schema=schema)
        else:
            cfg = StoreConfig(data_dir=Path(tmp))
        store = Store(cfg)
        db = open_db(read_db_config(cfg))
        try:
            yield store, db
        finally:
            db.close()
            store.close()
            if schema is not None:
                with psycopg.connect(PG_URL, autocommit=True) as conn:
                    conn.execute(
                        sql.SQL("DROP SCHEMA {} CASCADE").format(sql.Identifier(schema))
                    )


def source(store: Store) -> StoreSource:
    """The store's log as a runner reads it."""
    return StoreSource(store)


def dump(db: ReadDB, model: ReadModel, suffix: str = "") -> dict[str, list[tuple[Any, ...]]]:
    """Every row of every table of ``model``, sorted, as comparable tuples."""
    out: dict[str, list[tuple[Any, ...]]] = {}
    for logical, table in model.physical(suffix).items():
        rows = db.query(f"SELECT * FROM {table}")
        out[logical] = sorted(
            (tuple((k, repr(v)) for k, v in sorted(r.items())) for r in rows), key=repr
        )
    return out


Step = tuple[str, int, str, int]
"""``(command, document index, text argument, integer argument)``."""

COMMANDS = ("create", "edit", "edit", "edit", "rename", "add_member", "remove_member",
            "add_context", "update_context", "remove_context")


@dataclass
class History:
    """Documents driven by ``Step`` commands; ``pending`` events not yet saved."""

    docs: list[Document] = field(default_factory=list)

    def apply(self, step: Step) -> None:
        """Run one step; a command the domain refuses is skipped (as a client's would be)."""
        cmd, i, text, n = step
        if cmd == "create" or not self.docs:
            self.docs.append(Document.create(f"t{len(self.docs)}{text}", text, USERS[n % 2]))
            return
        d = self.docs[i % len(self.docs)]
        user = d.owner if n % 3 else USERS[n % len(USERS)]
        try:
            if cmd == "edit":
                d.edit(random_op(d.text, text, n), user)
            elif cmd == "rename":
                d.rename(f"{d.title[:20]}{text}", user)
            elif cmd == "add_member":
                d.add_member(USERS[(n + 1) % len(USERS)], ("editor", "viewer")[n % 2], d.owner)
            elif cmd == "remove_member":
                d.remove_member(USERS[n % len(USERS)], d.owner)
            elif cmd == "add_context":
                d.add_context_item(("note", "reference", "snippet")[n % 3], text, text * 2, user)
            elif cmd == "update_context" and d.context_items:
                item = sorted(d.context_items)[n % len(d.context_items)]
                d.update_context_item(item, user, title=text or None, position=n % 7)
            elif cmd == "remove_context" and d.context_items:
                d.remove_context_item(sorted(d.context_items)[n % len(d.context_items)], user)
        except DomainError:
            pass

    def collect(self) -> list[Any]:
        """The events triggered since the last call, every document's, in order."""
        return [e for d in self.docs for e in d.collect_events()]


def random_op(text: str, insert: str, n: int) -> list[Any]:
    """A valid op on ``text`` derived from ``insert`` and ``n`` (deterministic)."""
    length = len(text)
    pos = n % (length + 1)
    op: list[Any] = [pos] if pos else []
    if n % 4 == 0 and pos < length:
        op.append({"d": 1 + (n // 4) % (length - pos)})
        if insert:
            op.append(insert)
    else:
        op.append(insert or "z")
    return op


def make_history(store: Store, docs: int, edits: int, seed: int = 1, chunk: int = 50) -> int:
    """Save a seeded random history of ``docs`` documents; returns how many events."""
    rng = random.Random(seed)
    h = History()
    saved = 0
    for _ in range(docs):
        h.apply(("create", 0, rng.choice(["", "a", "bc"]), rng.randrange(100)))
    events = h.collect()
    store.save(events)
    saved += len(events)
    for k in range(edits):
        cmd = rng.choice(COMMANDS[1:])
        h.apply((cmd, rng.randrange(docs), rng.choice(["x", "yz", "é", ""]), rng.randrange(1000)))
        if k % chunk == chunk - 1:
            events = h.collect()
            store.save(events)
            saved += len(events)
    events = h.collect()
    store.save(events)
    return saved + len(events)


def positions(db: ReadDB) -> dict[str, int]:
    """Each tracking row's position."""
    return {r["name"]: int(r["position"]) for r in db.query("SELECT * FROM rm_tracking")}


def audit_positions(db: ReadDB) -> Sequence[int]:
    """The notification ids the audit model holds, in order."""
    return [int(r["position"]) for r in db.query("SELECT position FROM rm_audit ORDER BY 1")]
