"""``coscribe audit verify|show``: the hash chain catches edited, garbled and removed rows."""

from __future__ import annotations

import sqlite3
from pathlib import Path
from typing import Any
from uuid import UUID

import psycopg
import pytest
from psycopg import sql

from domain.document import Document
from gateway.store import Store, StoreConfig
from ops.projections_cli import main
from projections.history import BAD_LINK
from schema.transcoder import MsgpackTranscoder
from tests.conftest import PG_URL


@pytest.fixture(autouse=True)
def _no_env_settings(monkeypatch: pytest.MonkeyPatch) -> None:
    """Only the flags given here choose the store."""
    for name in ("DATABASE_URL", "DATABASE_SCHEMA", "DATA_DIR", "REDIS_URL"):
        monkeypatch.delenv(f"COSCRIBE_{name}", raising=False)


def _flags(cfg: StoreConfig) -> list[str]:
    flags = ["--data-dir", str(cfg.data_dir)]
    if cfg.database_url:
        flags += ["--database-url", cfg.database_url, "--database-schema", str(cfg.database_schema)]
    return flags


def _docs(cfg: StoreConfig) -> list[UUID]:
    """Three documents with a few events each."""
    store = Store(cfg)
    try:
        ids = []
        for n in range(3):
            d = Document.create(f"doc {n}", "abc", "ann")
            d.edit([1, "x"], "ann")
            d.edit([{"d": 1}], "ann")
            d.rename("renamed", "ann")
            d.add_member("bob", "viewer", "ann")
            store.save(d.collect_events())
            ids.append(d.id)
        return ids
    finally:
        store.close()


class Rows:
    """Raw access to the events table of either adapter, to tamper with it."""

    def __init__(self, cfg: StoreConfig) -> None:
        self.cfg = cfg

    def _run(self, query: str, params: tuple[Any, ...]) -> list[Any]:
        if self.cfg.database_url:
            with psycopg.connect(PG_URL, autocommit=True) as conn:
                conn.execute(sql.SQL("SET search_path TO {}").format(
                    sql.Identifier(str(self.cfg.database_schema))))
                cur = conn.execute(query.replace("?", "%s"), params)
                return cur.fetchall() if cur.description else []
        # The library names the SQLite table stored_events (Postgres: <app>_events).
        query = query.replace("coscribe_events", "stored_events")
        with sqlite3.connect(self.cfg.data_dir / "events.sqlite") as conn:
            return conn.execute(query, params).fetchall()

    def _id(self, doc: UUID) -> Any:
        return doc if self.cfg.database_url else doc.hex

    def state(self, doc: UUID, version: int) -> bytes:
        """The stored state bytes of one event."""
        rows = self._run("SELECT state FROM coscribe_events WHERE originator_id = ?"
                         " AND originator_version = ?", (self._id(doc), version))
        return bytes(rows[0][0])

    def set_state(self, doc: UUID, version: int, state: bytes) -> None:
        """Overwrite the stored state of one event (what an attacker with SQL access does)."""
        self._run("UPDATE coscribe_events SET state = ? WHERE originator_id = ?"
                  " AND originator_version = ?", (state, self._id(doc), version))

    def delete(self, doc: UUID, version: int) -> None:
        """Remove one event row."""
        self._run("DELETE FROM coscribe_events WHERE originator_id = ?"
                  " AND originator_version = ?", (self._id(doc), version))

    def set_topic(self, doc: UUID, version: int, topic: str) -> None:
        """Overwrite the stored topic of one event."""
        self._run("UPDATE coscribe_events SET topic = ? WHERE originator_id = ?"
                  " AND originator_version = ?", (topic, self._id(doc), version))

    def swap_log_order(self, doc: UUID, first: int, second: int) -> None:
        """Swap the log positions (notification ids) of two events of ``doc``."""
        column = "notification_id" if self.cfg.database_url else "rowid"
        ids = [self._run(f"SELECT {column} FROM coscribe_events WHERE originator_id = ?"
                         " AND originator_version = ?", (self._id(doc), v))[0][0]
               for v in (first, second)]
        for old, new in ((ids[0], -1), (ids[1], ids[0]), (-1, ids[1])):
            self._run(f"UPDATE coscribe_events SET {column} = ? WHERE {column} = ?", (new, old))


def test_verify_passes_on_untouched_events(
    store_config: StoreConfig, capsys: pytest.CaptureFixture[str]
) -> None:
    """Every document's chain checks out: exit 0 and a count of what was verified."""
    ids = _docs(store_config)
    assert main(["audit", "verify", *_flags(store_config)]) == 0
    assert "ok: 3 documents, 15 events verified, 0 broken" in capsys.readouterr().out
    assert main(["audit", "verify", str(ids[1]), *_flags(store_config)]) == 0
    assert "ok: 1 documents, 5 events verified" in capsys.readouterr().out


def test_verify_reports_the_first_edited_row(
    store_config: StoreConfig, capsys: pytest.CaptureFixture[str]
) -> None:
    """An op rewritten in the events table breaks that event's link, and only that doc's."""
    ids = _docs(store_config)
    rows = Rows(store_config)
    codec = MsgpackTranscoder()
    state = codec.decode(rows.state(ids[1], 2))
    assert state["op"] == [1, "x"]
    state["op"] = [1, "y"]
    rows.set_state(ids[1], 2, codec.encode(state))
    assert main(["audit", "verify", *_flags(store_config)]) == 1
    out = capsys.readouterr().out
    assert f"BROKEN {ids[1]} at event 2: {BAD_LINK}" in out
    assert out.count("BROKEN") == 1
    assert main(["audit", "verify", str(ids[0]), *_flags(store_config)]) == 0


def test_verify_reports_a_rehashed_row_at_the_next_link(
    store_config: StoreConfig, capsys: pytest.CaptureFixture[str]
) -> None:
    """Rewriting a row together with a recomputed h still breaks the following link."""
    from domain.document import chain_hash
    from projections.history import payload_of

    ids = _docs(store_config)
    store = Store(store_config)
    try:
        events = store.events_after(ids[0], 0)
    finally:
        store.close()
    rows = Rows(store_config)
    codec = MsgpackTranscoder()
    state = codec.decode(rows.state(ids[0], 4))
    forged = events[3]
    payload = {**payload_of(forged), "title": "forged"}
    state["title"] = "forged"
    state["h"] = chain_hash(events[2].h, "Renamed", ids[0], 4, forged.timestamp, payload)
    rows.set_state(ids[0], 4, codec.encode(state))
    assert main(["audit", "verify", str(ids[0]), *_flags(store_config)]) == 1
    out = capsys.readouterr().out
    assert f"BROKEN {ids[0]} at event 5: {BAD_LINK}" in out
    assert "or the one before it with its hash recomputed" in out


def test_verify_reports_garbled_and_removed_rows(
    store_config: StoreConfig, capsys: pytest.CaptureFixture[str]
) -> None:
    """Undecodable state and a missing event in the middle are both broken links."""
    ids = _docs(store_config)
    rows = Rows(store_config)
    rows.set_state(ids[0], 3, b"\xc1garbage")
    rows.delete(ids[2], 2)
    assert main(["audit", "verify", *_flags(store_config)]) == 1
    out = capsys.readouterr().out
    assert f"BROKEN {ids[0]} at event 3: undecodable" in out
    assert f"BROKEN {ids[2]} at event 2: event missing" in out
    assert "2 broken" in out


def test_show_prints_history_and_the_text_at_a_version(
    store_config: StoreConfig, capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """audit show lists every event (renames from and to) and prints the text at --at."""
    monkeypatch.setenv("COLUMNS", "200")  # a table row per line
    ids = _docs(store_config)
    assert main(["audit", "show", str(ids[0]), "--at", "1", *_flags(store_config)]) == 0
    out = capsys.readouterr().out
    for action in ("created", "edited", "renamed", "member_added"):
        assert action in out
    assert out.rstrip().endswith("axbc")
    assert "from=doc 0, to=renamed" in out
    assert main(["audit", "show", str(ids[0]), *_flags(store_config)]) == 0
    assert capsys.readouterr().out.rstrip().endswith("xbc")


def _save(cfg: StoreConfig, doc: Document) -> None:
    """Store ``doc``'s pending events."""
    store = Store(cfg)
    try:
        store.save(doc.collect_events())
    finally:
        store.close()


def _exit_code(argv: list[str]) -> int:
    with pytest.raises(SystemExit) as stop:
        main(argv)
    return int(stop.value.code or 0)


def test_bad_arguments_exit_2(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """Unknown or malformed document ids, versions the document lacks and unknown read
    models are bad arguments (exit 2, a message), never a broken chain (exit 1)."""
    cfg = StoreConfig(data_dir=tmp_path)
    (doc, *_) = _docs(cfg)  # at version 2
    flags = _flags(cfg)
    for argv in (["audit", "verify", str(UUID(int=1))], ["audit", "verify", "nope"],
                 ["audit", "show", str(UUID(int=1))], ["audit", "show", "nope"],
                 ["audit", "show", str(doc), "--at", "3"],
                 ["audit", "show", str(doc), "--at", "-1"],
                 ["replay", "--projection", "nope", "--quiet"]):
        assert _exit_code([*argv, *flags]) == 2, argv
        err = capsys.readouterr().err
        assert err.startswith("coscribe: ") and err.count("\n") == 1, err
    assert main(["audit", "show", str(doc), "--at", "2", *flags]) == 0


def test_verify_names_events_out_of_log_order_alike_for_one_document_and_all(
    store_config: StoreConfig, capsys: pytest.CaptureFixture[str]
) -> None:
    """Two events of a document swapped in the log were "event missing" over the whole
    store and "ok" for that document alone (read in version order)."""
    ids = _docs(store_config)
    Rows(store_config).swap_log_order(ids[1], 2, 3)
    expected = (f"BROKEN {ids[1]} at event 2: out of order: the log holds event 3 of this"
                " document before it")
    assert main(["audit", "verify", *_flags(store_config)]) == 1
    assert expected in capsys.readouterr().out
    assert main(["audit", "verify", str(ids[1]), *_flags(store_config)]) == 1
    assert expected in capsys.readouterr().out


def test_the_upcasting_recipe_keeps_the_chain_valid(
    store_config: StoreConfig, capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """schema/events.md's recipe (class_version 2, upcast_v1_v2, the chain over the payload
    as stored): stored v1 events load upcast, and verify still passes on them and on new
    v2 events (it hashed the upcast payload: every document BROKEN)."""
    ids = _docs(store_config)

    def upcast_v1_v2(state: dict[str, Any]) -> None:
        state["source"] = "unknown"

    monkeypatch.setattr(Document.Edited, "class_version", 2, raising=False)
    monkeypatch.setattr(Document.Edited, "upcast_v1_v2", staticmethod(upcast_v1_v2),
                        raising=False)
    store = Store(store_config)
    try:
        doc = store.load(ids[0])
        assert doc is not None
        edits = [e for e in store.events_after(ids[0], 0) if isinstance(e, Document.Edited)]
        assert edits and all(e.source == "unknown" for e in edits)  # type: ignore[attr-defined]
        doc.edit([2, "v2"], "ann")  # a v2 event (without the new field: still a valid one)
        store.save(doc.collect_events())
    finally:
        store.close()
    assert main(["audit", "verify", *_flags(store_config)]) == 0
    assert "ok: 3 documents, 16 events verified, 0 broken" in capsys.readouterr().out


def test_show_prints_titles_and_names_as_they_are_not_as_markup(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    """A title "[/oops]" was a 47-line MarkupError; "[red]x[/red]" lost its brackets."""
    monkeypatch.setenv("COLUMNS", "200")
    cfg = StoreConfig(data_dir=tmp_path)
    doc = Document.create("[/oops]", "hi", "[bold]ann")
    doc.rename("[red]x[/red] :smile:", "[bold]ann")
    _save(cfg, doc)
    assert main(["audit", "show", str(doc.id), *_flags(cfg)]) == 0
    out = capsys.readouterr().out
    assert "from=[/oops], to=[red]x[/red] :smile:" in out
    assert "title=[/oops]" in out and "[bold]ann" in out
    assert "[red]x[/red] :smile: at version 0:\n" in out


TEXT = (("word " * 40).strip() + "\n\tindented\ttab  \ntrailing   \n"
        "[bold]no[/bold] :smile: \x1b[31mred\rx")
"""A text that rich wrapped, de-tabbed, turned into an emoji and passed to the terminal."""


def test_show_prints_the_exact_text_when_not_on_a_terminal(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """Piped, everything after the header line is the text's bytes, nothing added."""
    cfg = StoreConfig(data_dir=tmp_path)
    doc = Document.create("t", TEXT, "ann")
    _save(cfg, doc)
    assert main(["audit", "show", str(doc.id), *_flags(cfg)]) == 0
    out = capsys.readouterr().out
    assert out.split("t at version 0:\n", 1)[1] == TEXT


def test_show_on_a_terminal_shows_control_characters_without_obeying_them(
    tmp_path: Path,
) -> None:
    """On a terminal the text's escape sequences are shown as \\x1b (they recoloured it)."""
    import os
    import pty
    import subprocess
    import sys

    cfg = StoreConfig(data_dir=tmp_path)
    doc = Document.create("t", TEXT, "ann")
    _save(cfg, doc)
    env = {k: v for k, v in os.environ.items() if not k.startswith("COSCRIBE_")}
    env["COLUMNS"] = "200"
    primary, secondary = pty.openpty()
    proc = subprocess.Popen([sys.executable, "-m", "ops.projections_cli", "audit", "show",
                             str(doc.id), *_flags(cfg)], stdout=secondary, env=env)
    os.close(secondary)
    chunks = []
    while True:
        try:
            chunk = os.read(primary, 65536)
        except OSError:  # EIO: the child closed the terminal
            break
        if not chunk:
            break
        chunks.append(chunk)
    os.close(primary)
    assert proc.wait(30) == 0
    shown = b"".join(chunks).decode().replace("\r\n", "\n").split("at version 0:", 1)[1]
    assert "\x1b[31mred" not in shown and "\\x1b[31mred\\rx\n" in shown
    assert "\tindented\ttab  \n" in shown and ":smile:" in shown


@pytest.mark.parametrize("tamper", ["garbage", "topic", "delete"])
def test_show_refuses_a_broken_chain_in_one_line(
    store_config: StoreConfig, capsys: pytest.CaptureFixture[str], tamper: str
) -> None:
    """Undecodable state and an unknown topic were 36- and 43-line tracebacks; a removed
    middle event printed a text that never existed, exit 0."""
    ids = _docs(store_config)
    rows = Rows(store_config)
    if tamper == "garbage":
        rows.set_state(ids[0], 3, b"\xc1garbage")
    elif tamper == "topic":
        rows.set_topic(ids[0], 3, "domain.document:Document.Nope")
    else:
        rows.delete(ids[0], 3)
    assert main(["audit", "show", str(ids[0]), *_flags(store_config)]) == 1
    out, err = capsys.readouterr()
    assert out == ""
    assert err.startswith(f"coscribe: BROKEN {ids[0]} at event 3: ") and err.count("\n") == 1
    assert {"garbage": "undecodable: MapperDeserialisationError",
            "topic": "undecodable: TopicError", "delete": "event missing"}[tamper] in err
