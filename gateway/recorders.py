"""Application recorders that also record each op's ``(document, client, seq)`` for ever.

The library's recorders, plus one table ``coscribe_client_ops (doc, client, seq, v)`` whose
primary key makes a client's submission unique in the store for ever. Its rows are written
in the same transaction as the events (the recorders' ``_insert_events`` hook), from the
``client_ops`` keyword that ``Store.save`` passes through ``Application.save``. A clash on
it is an ``IntegrityError`` like a version conflict: the room re-reads and finds the op.

And ``coscribe_clients (client, "user")``: which user each client id belongs to, the first
to use it, for ever (``bind_clients``), so that one user's ``(client, seq)`` can never pass
for another's.
"""

from __future__ import annotations

import sqlite3
from collections.abc import Sequence
from typing import Any
from uuid import UUID

from eventsourcing.persistence import InterfaceError, OperationalError, StoredEvent
from eventsourcing.postgres import PostgresApplicationRecorder, PostgresDatastore
from eventsourcing.sqlite import (
    SQLiteApplicationRecorder,
    SQLiteCursor,
    SQLiteDatastore,
    SQLiteTransaction,
)
from psycopg import Cursor
from psycopg.rows import DictRow, tuple_row
from psycopg.sql import SQL, Identifier, Literal

from gateway import pgarrays

CLIENT_OPS_TABLE = "coscribe_client_ops"
"""Table of ``(doc, client, seq) -> v``: one row per op submitted with a client id."""

BIND_STATEMENT_SECONDS = 4.0
"""Longest the statement binding client ids may run (``SET LOCAL statement_timeout``):
under ``gateway.clients.BIND_SECONDS``, so that a batch caught behind a locked table ends,
and frees its reader thread, before the next request's wait is over."""
LOOKUP_STATEMENT_SECONDS = 4.0
"""Longest the look-up of one resent op (``find_client_op``) may run: a lock on the table
(a migration, a ``LOCK TABLE``) makes its op ``unavailable`` then, and frees its reader
thread, instead of holding both as long as the lock."""
CLIENTS_TABLE = "coscribe_clients"
"""Table of ``client -> user``: the user each client id belongs to (the first to use it)."""

LOG_TABLE = "coscribe_log"
"""One row: a random id made when the event table was, naming this log (``log_id``)."""

APPEND_FUNCTION = "coscribe_append"
"""Server-side function of one checked group commit (lock, NOTIFY, head check, inserts)."""
LOCK_READ_FUNCTION = "coscribe_lock_read"
"""Server-side function that takes the table lock and returns the events after heads."""

STATEMENT_TIMEOUT = 10.0
"""Seconds one statement of a commit may run (or wait on its client) before the server
cancels it and the table lock is released; the server's side of ``gateway.writer``'s
``COMMIT_TIMEOUT``."""

ClientOp = tuple[str, str, int, int]
"""``(document id, client id, seq, version produced)``."""
EventRow = tuple[int, UUID, int, str, bytes]
"""``(notification id, originator id, originator version, topic, state)``: one stored event."""


class PostgresClientOpsRecorder(PostgresApplicationRecorder):
    """The library's Postgres recorder plus the ``coscribe_client_ops`` table."""

    def __init__(self, datastore: PostgresDatastore, *, events_table_name: str = "stored_events"):
        super().__init__(datastore, events_table_name=events_table_name)
        schema = Identifier(self.datastore.schema)
        table = Identifier(CLIENT_OPS_TABLE)
        self.sql_create_statements.append(
            SQL(
                "CREATE TABLE IF NOT EXISTS {}.{} (doc uuid NOT NULL, client text NOT NULL, "
                "seq bigint NOT NULL, v bigint NOT NULL, PRIMARY KEY (doc, client, seq))"
            ).format(schema, table)
        )
        clients = Identifier(CLIENTS_TABLE)
        self.sql_create_statements.append(
            SQL(
                'CREATE TABLE IF NOT EXISTS {}.{} (client text PRIMARY KEY, "user" text NOT NULL)'
            ).format(schema, clients)
        )
        # One statement binds what is free and reads the owner of what is not. Its snapshot
        # predates its own inserts (``ins`` has those) and any row another transaction
        # commits meanwhile, which ``bind_clients`` then reads again. Inserted in the order
        # of the ids, as every process does: two binding the same ids wait on each other's
        # rows in one order, never in a deadlock.
        self._bind_clients = SQL(
            'WITH want AS (SELECT * FROM unnest(%s::text[], %s::text[]) AS w(client, "user")), '
            'ins AS (INSERT INTO {t} (client, "user") SELECT client, "user" FROM want '
            '  ORDER BY client ON CONFLICT (client) DO NOTHING RETURNING client, "user") '
            'SELECT client, "user" FROM ins UNION ALL '
            'SELECT c.client, c."user" FROM {t} c JOIN want USING (client)'
        ).format(t=SQL("{}.{}").format(schema, clients))
        log = Identifier(LOG_TABLE)
        self.sql_create_statements.append(
            SQL(
                "CREATE TABLE IF NOT EXISTS {s}.{log} (id uuid PRIMARY KEY); "
                "INSERT INTO {s}.{log} SELECT gen_random_uuid() "
                "WHERE NOT EXISTS (SELECT 1 FROM {s}.{log})"
            ).format(s=schema, log=log)
        )
        self._log_id = SQL(
            "SELECT (SELECT min(id::text) FROM {s}.{log}) || '.' || (SELECT c.oid FROM pg_class c"
            " JOIN pg_namespace n ON n.oid = c.relnamespace"
            " WHERE n.nspname = {schema} AND c.relname = {events}) AS log_id"
        ).format(
            s=schema, log=log,
            schema=Literal(self.datastore.schema), events=Literal(self.events_table_name),
        )
        self._set_statement_timeout = SQL("SET LOCAL statement_timeout = {}").format(
            Literal(f"{int(STATEMENT_TIMEOUT * 1000)}ms")
        )
        self._insert_client_ops = SQL(
            "INSERT INTO {}.{} (doc, client, seq, v) SELECT * FROM unnest("
            "%s::uuid[], %s::text[], %s::bigint[], %s::bigint[])"
        ).format(schema, table)
        self._insert_fast = SQL(
            "INSERT INTO {}.{} (originator_id, originator_version, topic, state) "
            "SELECT * FROM unnest(%b::uuid[], %b::bigint[], %b::text[], %b::bytea[]) "
            "RETURNING notification_id"
        ).format(schema, Identifier(self.events_table_name))
        # The head check reads one index entry per document (newest in the primary key), not
        # every event of the batch's documents: 0.3 ms against 14.8 ms at 25k events, and flat.
        events = Identifier(self.events_table_name)
        # A commit is one statement: a function that takes the library's table lock, sends
        # its NOTIFY and runs the checked insert (measured: the seven messages of BEGIN,
        # SET LOCAL, LOCK, NOTIFY, INSERT, COMMIT and Sync cost ~1.2 ms of client CPU per
        # commit in psycopg, whatever the batch size). The library itself appends through a
        # function of its own (es_insert_events_*); this one writes the same rows.
        self.sql_create_statements.append(
            SQL(
                "CREATE OR REPLACE FUNCTION {s}.{append}("
                " p_docs uuid[], p_heads bigint[], p_op_docs uuid[], p_op_clients text[],"
                " p_op_seqs bigint[], p_op_vs bigint[], p_ids uuid[], p_versions bigint[],"
                " p_topics text[], p_states bytea[], OUT ids bigint[], OUT stale uuid[]) "
                "LANGUAGE plpgsql SET lock_timeout = {timeout} AS $f$ "
                "BEGIN "
                "LOCK TABLE {s}.{ev} IN EXCLUSIVE MODE; "
                "PERFORM pg_notify({channel}, ''); "
                "WITH want AS (SELECT * FROM unnest(p_docs, p_heads) AS w(id, head)), "
                "moved AS (SELECT w.id FROM want w WHERE w.head <> coalesce(("
                "  SELECT e.originator_version FROM {s}.{ev} e WHERE e.originator_id = w.id "
                "  ORDER BY e.originator_version DESC LIMIT 1), 0)), "
                "ops AS (INSERT INTO {s}.{ops} (doc, client, seq, v) "
                "  SELECT * FROM unnest(p_op_docs, p_op_clients, p_op_seqs, p_op_vs) "
                "  AS c(doc, client, seq, v) WHERE c.doc NOT IN (SELECT id FROM moved)), "
                "ins AS (INSERT INTO {s}.{ev} (originator_id, originator_version, topic, state) "
                "  SELECT * FROM unnest(p_ids, p_versions, p_topics, p_states) "
                "  AS n(originator_id, originator_version, topic, state) "
                "  WHERE n.originator_id NOT IN (SELECT id FROM moved) "
                "  RETURNING notification_id) "
                "SELECT (SELECT array_agg(notification_id ORDER BY notification_id) FROM ins),"
                " (SELECT array_agg(id) FROM moved) INTO ids, stale; "
                "END $f$"
            ).format(
                s=schema, ev=events, ops=table, append=Identifier(APPEND_FUNCTION),
                timeout=Literal(f"{self.datastore.lock_timeout}s"),
                channel=Literal(self.channel_name),
            )
        )
        self.sql_create_statements.append(
            SQL(
                "CREATE OR REPLACE FUNCTION {s}.{lock_read}(p_docs uuid[], p_heads bigint[],"
                " p_limit bigint) RETURNS TABLE (originator_id uuid, originator_version bigint,"
                " topic text, state bytea) "
                "LANGUAGE plpgsql SET lock_timeout = {timeout} AS $f$ "
                "#variable_conflict use_column\n"
                "BEGIN "
                "LOCK TABLE {s}.{ev} IN EXCLUSIVE MODE; "
                "RETURN QUERY SELECT e.originator_id, e.originator_version, e.topic, e.state "
                "FROM unnest(p_docs, p_heads) AS w(id, head) CROSS JOIN LATERAL ("
                "  SELECT * FROM {s}.{ev} x WHERE x.originator_id = w.id "
                "  AND x.originator_version > w.head ORDER BY x.originator_version "
                "  LIMIT p_limit) e "
                "ORDER BY e.originator_id, e.originator_version; "
                "END $f$"
            ).format(
                s=schema, ev=events, lock_read=Identifier(LOCK_READ_FUNCTION),
                timeout=Literal(f"{self.datastore.lock_timeout}s"),
            )
        )
        # Rendered once: psycopg renders a Composed query again at every execution (~35 us).
        self._checked_insert = SQL(
            "SELECT ids, stale FROM {s}.{append}(%b::uuid[], %b::bigint[], %b::uuid[], "
            "%b::text[], %b::bigint[], %b::bigint[], %b::uuid[], %b::bigint[], %b::text[], "
            "%b::bytea[])"
        ).format(s=schema, append=Identifier(APPEND_FUNCTION)).as_bytes()
        # The same with ``$n`` placeholders, for the writer's own prepared statement
        # (``gateway.pgwire``), which psycopg does not convert.
        parts = self._checked_insert.split(b"%b")
        self._checked_insert_numbered = b"".join(
            [parts[0], *(b"$%d%s" % (i, part) for i, part in enumerate(parts[1:], 1))]
        )
        self._begin_missed = SQL("BEGIN; SELECT * FROM {}.{}(").format(
            schema, Identifier(LOCK_READ_FUNCTION)
        ).as_bytes()
        self._select_client_op = SQL(
            "SELECT v FROM {}.{} WHERE doc = %s AND client = %s AND seq = %s"
        ).format(schema, table)
        self._select_rows = SQL(
            "SELECT notification_id, originator_id, originator_version, topic, state"
            " FROM {}.{} WHERE notification_id > %b ORDER BY notification_id LIMIT %b"
        ).format(schema, events)
        self._bind_timeout = SQL("SET LOCAL statement_timeout = {}").format(
            Literal(int(BIND_STATEMENT_SECONDS * 1000)))
        self._lookup_timeout = SQL("SET LOCAL statement_timeout = {}").format(
            Literal(int(LOOKUP_STATEMENT_SECONDS * 1000)))
        self._select_document = SQL(
            "SELECT notification_id, originator_id, originator_version, topic, state"
            " FROM {}.{} WHERE originator_id = %s ORDER BY notification_id"
        ).format(schema, events)

    def insert_events(
        self, stored_events: Sequence[StoredEvent], **kwargs: Any
    ) -> Sequence[int] | None:
        """Two attempts without waiting, not the library's ten with waits.

        With the database down those retries (each waiting the pool timeout) stall the
        single writer, and so every document of the process, for about a minute. The second
        attempt is there for a connection that went stale (the server restarted): it gets a
        fresh one. A database that is really down fails in about twice
        ``POSTGRES_CONNECT_TIMEOUT``; the room refuses the ops with ``unavailable`` and the
        clients resend with the same ``seq``.
        """
        try:
            return self._insert_unpipelined(stored_events, **kwargs)
        except (InterfaceError, OperationalError):
            return self._insert_unpipelined(stored_events, **kwargs)

    def _insert_unpipelined(
        self, stored_events: Sequence[StoredEvent], **kwargs: Any
    ) -> Sequence[int] | None:
        """The library's transaction (client-op rows, table lock, NOTIFY, insert, ids), one
        statement at a time instead of in psycopg's pipeline mode.

        In pipeline mode psycopg's C implementation (with its bundled libpq 18) never sends
        the rest of a message over ~11 MiB: a save of 12 MiB of state waited in
        ``Pipeline.sync`` for good while the server, in ClientRead, held the table lock
        (measured: 1x11 MiB passes, 1x12 and 2x7 MiB hang; the ctypes implementation over
        libpq 15, and the same statements without a pipeline, pass). Nor could the server's
        ``idle_in_transaction_session_timeout`` end it: a pipeline is not idle until its
        Sync. Here each statement ends with its own Sync, so that timeout covers a client
        that stops between statements, and ``statement_timeout`` cancels any one statement
        (releasing the lock) after ``STATEMENT_TIMEOUT``.
        """
        with self.datastore.get_connection() as conn, conn.transaction(), conn.cursor() as curs:
            curs.execute(self._set_statement_timeout)
            self._insert_events(curs, stored_events, **kwargs)
            if not stored_events:
                return None
            self._insert_stored_events(curs, stored_events, **kwargs)
            return self._fetch_ids_after_insert_events(curs, stored_events, **kwargs)

    def ping(self) -> None:
        """Raise unless the database answers a trivial query (for /readyz)."""
        with self.datastore.transaction(commit=False) as curs:
            curs.execute("SELECT 1")

    def log_id(self) -> str:
        """This log's identity: its random id and the event table's OID (a table restored
        from a dump is a new table, whose positions may repeat ones of the old)."""
        with self.datastore.transaction(commit=False) as curs:
            curs.execute(self._log_id)
            row = curs.fetchone()
        assert row is not None
        return str(row["log_id"])

    def checked_params(
        self,
        columns: tuple[Sequence[Any], Sequence[int], Sequence[str], Sequence[bytes]],
        client_ops: Sequence[ClientOp],
        heads: dict[UUID, int],
    ) -> tuple[Any, ...]:
        """The parameters of ``checked_insert``, in its order (binary arrays, ``pgarrays``).

        ``columns``: the events' originator ids, versions, topics and states
        (``gateway.store.EventEncoder``).
        """
        docs = list(heads)
        op_docs, op_clients, op_seqs, op_vs = (
            zip(*client_ops, strict=True) if client_ops else ((), (), (), ())
        )
        ids, versions, topics, states = columns
        return (
            pgarrays.uuids(docs),
            pgarrays.int8s([heads[d] for d in docs]),
            pgarrays.uuids(op_docs),
            pgarrays.texts(op_clients),
            pgarrays.int8s(op_seqs),
            pgarrays.int8s(op_vs),
            pgarrays.uuids(ids),
            pgarrays.int8s(versions),
            pgarrays.texts(topics),
            pgarrays.byteas(states),
        )

    def begin_missed(self, heads: dict[UUID, int], limit: int) -> bytes:
        """``BEGIN``, then take the table lock and read the events after each ``(document,
        head)`` (up to ``limit`` each): one simple query, its values as literals.

        One round trip: through psycopg's pipeline mode the same two statements cost three
        (its Sync and flush messages: ~7 sends and ~4 receives per call, measured with
        strace, against 2 and 2 with the rollback that follows). The second result set is
        the events. The literals are written here: a UUID's and an int's text need no
        quoting (psycopg's ``Literal`` of two lists cost ~50 us a call).
        """
        uuids = ",".join([str(d) for d in heads])
        versions = ",".join([str(int(v)) for v in heads.values()])
        return b"%s'{%s}'::uuid[], '{%s}'::bigint[], %d)" % (
            self._begin_missed, uuids.encode(), versions.encode(), int(limit)
        )

    @staticmethod
    def checked_result(ids: Any, stale: Any) -> tuple[list[int], set[UUID]]:
        """``(notification ids, stale document ids)`` from the checked insert's two columns."""
        return [int(n) for n in ids or ()], {UUID(str(d)) for d in stale or ()}

    @property
    def checked_insert(self) -> bytes:
        """The checked insert: one statement (the function takes the lock and NOTIFYs)."""
        return self._checked_insert

    @property
    def checked_insert_numbered(self) -> bytes:
        """``checked_insert`` with ``$1``…``$10`` placeholders (libpq's own)."""
        return self._checked_insert_numbered

    def _insert_events(
        self, curs: Cursor[DictRow], stored_events: Sequence[StoredEvent], **kwargs: Any
    ) -> None:
        rows: Sequence[ClientOp] = kwargs.get("client_ops") or ()
        if rows:
            cols = list(zip(*rows, strict=True))
            curs.execute(self._insert_client_ops, [list(c) for c in cols], prepare=True)
        super()._insert_events(curs, stored_events, **kwargs)

    def _insert_stored_events(
        self, curs: Cursor[DictRow], stored_events: Sequence[StoredEvent], **kwargs: Any
    ) -> None:
        """The library's lock and NOTIFY, then one INSERT of four base-type arrays.

        Same table, same rows, same RETURNING as the library's composite-type insert, but
        psycopg dumps base-type arrays in C (binary), where a composite array is dumped in
        Python: the dominant cost of a large group commit.
        """
        self._lock_table(curs)
        self._notify_channel(curs)
        curs.execute(
            self._insert_fast,
            (
                [e.originator_id for e in stored_events],
                [e.originator_version for e in stored_events],
                [e.topic for e in stored_events],
                [e.state for e in stored_events],
            ),
            prepare=True,
        )

    def select_rows(self, after: int, limit: int) -> list[EventRow]:
        """Up to ``limit`` rows of the log after notification ``after``, as plain tuples.

        The library's ``select_notifications`` without its per-row work (a dict per row, a
        ``Notification``, a copy of the state): binary results straight into tuples. One
        attempt: the caller (the projection runner) retries a failed step itself.
        """
        with self.datastore.get_connection() as conn, conn.cursor(
            row_factory=tuple_row, binary=True
        ) as curs:
            curs.execute(self._select_rows, (after, limit), prepare=True)
            return curs.fetchall()

    def select_document(self, doc: UUID) -> list[EventRow]:
        """Every row of document ``doc``, in log (notification) order."""
        with self.datastore.get_connection() as conn, conn.cursor(
            row_factory=tuple_row, binary=True
        ) as curs:
            curs.execute(self._select_document, (doc,))
            return curs.fetchall()

    def find_client_op(self, doc: str, client: str, seq: int) -> int | None:
        """The version the op ``(doc, client, seq)`` produced, or None if never committed."""
        with self.datastore.transaction(commit=False) as curs:
            curs.execute(self._lookup_timeout)
            curs.execute(self._select_client_op, (doc, client, seq))
            row = curs.fetchone()
        return None if row is None else int(row["v"])

    def bind_clients(self, wanted: dict[str, str]) -> dict[str, str]:
        """Bind each client id of ``wanted`` (``client -> user``) that is free to its user;
        return the owner of every one (that user, or whoever had it first). One statement;
        a second only for an id another transaction bound while the first ran."""
        owners: dict[str, str] = {}
        todo = wanted
        for _ in range(3):
            with self.datastore.transaction(commit=True) as curs:
                # Ended by the server past this, rolled back (a locked or slow table): the
                # reader thread is free again, and an id never binds after its hello was
                # told unavailable.
                curs.execute(self._bind_timeout)
                curs.execute(self._bind_clients, (list(todo), list(todo.values())), prepare=True)
                owners.update((row["client"], row["user"]) for row in curs.fetchall())
            todo = {c: u for c, u in todo.items() if c not in owners}
            if not todo:
                break
        return owners


class _ImmediateTransaction(SQLiteTransaction):
    """The library's SQLite transaction, begun with the write lock (``BEGIN IMMEDIATE``).

    Its own ``BEGIN`` is deferred: a transaction that reads before it writes asks for the
    write lock only at its first write, and when another connection has committed since
    its read SQLite answers "database is locked" at once, without waiting the busy timeout.
    ``BEGIN IMMEDIATE`` waits for the lock (up to the timeout) before anything is read.
    """

    def __enter__(self) -> SQLiteCursor:
        cursor = self.connection.cursor()
        try:
            cursor.execute("BEGIN IMMEDIATE")
        except sqlite3.OperationalError as exc:  # as the library's __exit__ translates it
            cursor.sqlite_cursor.close()
            raise OperationalError(exc) from exc
        return cursor


class SQLiteClientOpsRecorder(SQLiteApplicationRecorder):
    """The library's SQLite recorder plus the ``coscribe_client_ops`` table."""

    def __init__(self, datastore: SQLiteDatastore, events_table_name: str = "stored_events"):
        super().__init__(datastore, events_table_name)

    def create_table(self) -> None:
        """The library's, in a transaction that holds the write lock from its start.

        The statements read first (``CREATE TABLE IF NOT EXISTS`` of tables that exist) and
        write last (``coscribe_log``'s row): in the library's deferred transaction, opening
        the store while the server commits failed at once with "database is locked" (seen:
        ``audit verify`` and ``replay`` exiting 4, one run in eight).
        """
        with self.datastore.get_connection(commit=True) as conn, _ImmediateTransaction(
            conn, commit=True
        ) as curs, curs:
            self._create_table(curs)

    def ping(self) -> None:
        """Raise unless the database answers a trivial query (for /readyz)."""
        with self.datastore.transaction(commit=False) as c:
            c.execute("SELECT 1")

    def construct_create_table_statements(self) -> list[str]:
        """The library's tables plus ours."""
        return [
            *super().construct_create_table_statements(),
            f"CREATE TABLE IF NOT EXISTS {CLIENT_OPS_TABLE} (doc TEXT NOT NULL, "
            "client TEXT NOT NULL, seq INTEGER NOT NULL, v INTEGER NOT NULL, "
            "PRIMARY KEY (doc, client, seq)) WITHOUT ROWID",
            f"CREATE TABLE IF NOT EXISTS {CLIENTS_TABLE} (client TEXT PRIMARY KEY, "
            '"user" TEXT NOT NULL) WITHOUT ROWID',
            f"CREATE TABLE IF NOT EXISTS {LOG_TABLE} (id TEXT PRIMARY KEY)",
            f"INSERT INTO {LOG_TABLE} SELECT lower(hex(randomblob(16))) "
            f"WHERE NOT EXISTS (SELECT 1 FROM {LOG_TABLE})",
        ]

    def log_id(self) -> str:
        """This log's identity: the random id made with its tables."""
        with self.datastore.transaction(commit=False) as c:
            c.execute(f"SELECT min(id) FROM {LOG_TABLE}")
            row = c.fetchone()
        assert row is not None
        return str(row[0])

    def _insert_events(
        self, c: SQLiteCursor, stored_events: Sequence[StoredEvent], **kwargs: Any
    ) -> Sequence[int] | None:
        rows: Sequence[ClientOp] = kwargs.get("client_ops") or ()
        if rows:
            c.executemany(
                f"INSERT INTO {CLIENT_OPS_TABLE} (doc, client, seq, v) VALUES (?, ?, ?, ?)",
                [(d.replace("-", ""), cl, s, v) for d, cl, s, v in rows],
            )
        return super()._insert_events(c, stored_events, **kwargs)

    def select_document(self, doc: UUID) -> list[EventRow]:
        """Every row of document ``doc``, in log (notification) order."""
        with self.datastore.transaction(commit=False) as c:
            c.execute(
                "SELECT rowid, originator_version, topic, state FROM"
                f" {self.events_table_name} WHERE originator_id = ? ORDER BY rowid",
                (doc.hex,),
            )
            return [(r[0], doc, r[1], r[2], r[3]) for r in c.fetchall()]

    def find_client_op(self, doc: str, client: str, seq: int) -> int | None:
        """The version the op ``(doc, client, seq)`` produced, or None if never committed."""
        with self.datastore.transaction(commit=False) as c:
            c.execute(
                f"SELECT v FROM {CLIENT_OPS_TABLE} WHERE doc = ? AND client = ? AND seq = ?",
                (doc.replace("-", ""), client, seq),
            )
            row = c.fetchone()
        return None if row is None else int(row[0])

    def bind_clients(self, wanted: dict[str, str]) -> dict[str, str]:
        """Bind each client id of ``wanted`` (``client -> user``) that is free to its user;
        return the owner of every one (that user, or whoever had it first). One transaction,
        its inserts first: it takes the write lock at once (a read first could not upgrade
        past another writer's commit)."""
        with self.datastore.transaction(commit=True) as c:
            c.executemany(
                f'INSERT INTO {CLIENTS_TABLE} (client, "user") VALUES (?, ?) '
                "ON CONFLICT (client) DO NOTHING",
                list(wanted.items()),
            )
            owners: dict[str, str] = {}
            for client in wanted:
                c.execute(f'SELECT "user" FROM {CLIENTS_TABLE} WHERE client = ?', (client,))
                row = c.fetchone()
                if row is not None:
                    owners[client] = str(row[0])
        return owners
