"""Pure history functions: time travel, blame and diffs equal applying the ops by hand."""

from __future__ import annotations

from itertools import pairwise
from typing import Any

from hypothesis import given, settings
from hypothesis import strategies as st

from domain import ot
from domain.document import Document
from projections import history

USERS = ("ann", "bob", "cy")


@st.composite
def edited_documents(draw: st.DrawFn) -> tuple[list[Any], list[str], list[list[tuple[str, str,
                                                                                     int]]]]:
    """A document's events with the text and per-character (char, author, v) per version."""
    text = draw(st.text(alphabet="ab😀\n", max_size=6))
    doc = Document.create("t", text, "ann")
    for u in USERS[1:]:
        doc.add_member(u, "editor", "ann")
    texts = [text]
    chars = [[(c, "ann", 0) for c in text]]
    for _ in range(draw(st.integers(0, 25))):
        v = doc.doc_version + 1
        cur, user = list(chars[-1]), draw(st.sampled_from(USERS))
        length = len(cur)
        op: list[Any] = []
        pos = 0
        # Walk the text: retain, delete or insert in random runs.
        while pos < length or not op:
            choice = draw(st.sampled_from(["retain", "delete", "insert", "stop"]))
            if choice == "stop" and op:
                break
            if choice == "insert" or (pos >= length and choice != "stop"):
                s = draw(st.text(alphabet="xyé😀", min_size=1, max_size=3))
                op.append(s)
                cur[pos:pos] = [(c, user, v) for c in s]
                pos += len(s)
                length += len(s)
            elif pos < length:
                n = draw(st.integers(1, length - pos))
                if choice == "delete":
                    op.append({"d": n})
                    del cur[pos:pos + n]
                    length -= n
                else:
                    op.append(n)
                    pos += n
        op = ot.normalize(op)
        if not op:
            continue
        doc.edit(op, user)
        if draw(st.booleans()):
            doc.rename(f"t{v}", user)
        texts.append(ot.apply(texts[-1], op))
        chars.append(cur)
        assert "".join(c for c, _, _ in cur) == texts[-1]
    return list(doc.collect_events()), texts, chars


@settings(max_examples=100, deadline=None)
@given(edited_documents())
def test_state_at_every_version_is_the_text_applied_by_hand(case: Any) -> None:
    """state_at(v) has the text after the first v edits and version v."""
    events, texts, _ = case
    for v, text in enumerate(texts):
        state = history.state_at(events, v)
        assert state is not None and (state.version, state.text) == (v, text)


@settings(max_examples=100, deadline=None)
@given(edited_documents())
def test_blame_attributes_each_character_to_its_insert(case: Any) -> None:
    """Blame spans cover the text and name the author and version of every character."""
    events, texts, chars = case
    spans = history.blame(events)
    assert "".join(s.text for s in spans) == texts[-1]
    assert [(c, s.by, s.v) for s in spans for c in s.text] == chars[-1]
    assert all(s.text for s in spans)
    assert all((a.by, a.v) != (b.by, b.v) for a, b in pairwise(spans))


@settings(max_examples=100, deadline=None)
@given(edited_documents(), st.data())
def test_diff_between_two_versions_rebuilds_both_texts(case: Any, data: st.DataObject) -> None:
    """The composed op turns text v1 into text v2; the readable diff spells out both."""
    events, texts, _ = case
    v1 = data.draw(st.integers(0, len(texts) - 1))
    v2 = data.draw(st.integers(v1, len(texts) - 1))
    op = history.compose_all([e.op for e in history.edits_between(events, v1, v2)])
    assert ot.apply(texts[v1], op) == texts[v2]
    diff = history.readable_diff(texts[v1], op)
    assert "".join(d["text"] for d in diff if d["op"] != "delete") == texts[v2]
    assert "".join(d["text"] for d in diff if d["op"] != "insert") == texts[v1]


def test_state_at_a_time_and_before_creation() -> None:
    """Time travel by time includes events up to that instant; before creation is None."""
    doc = Document.create("t", "a", "ann")
    doc.edit(["b"], "ann")
    doc.edit(["c"], "ann")
    events = list(doc.collect_events())
    at = events[1].timestamp
    state = history.state_at(events, at=at)
    assert state is not None and (state.version, state.text) == (1, "ba")
    assert history.state_at(events, at=events[0].timestamp.replace(year=2000)) is None


def test_verify_chain_accepts_real_events_and_flags_an_edit() -> None:
    """The chain of untouched events checks out; changing a payload breaks that link."""
    doc = Document.create("t", "a", "ann")
    doc.edit(["b"], "ann")
    doc.rename("u", "ann")
    events = list(doc.collect_events())
    assert history.verify_chain(events) == (3, None)
    object.__setattr__(events[1], "op", ["c"])
    checked, bad = history.verify_chain(events)
    assert checked == 1 and bad is not None and bad.position == 2
