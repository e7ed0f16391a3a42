"""Properties and examples of the text-unicode OT type in ``domain.ot``."""

from __future__ import annotations

from itertools import pairwise
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from domain import ot
from domain.errors import BadOp, DomainError
from schema.codes import Code
from tests import strategies as gen

PROPERTY = settings(max_examples=250, deadline=None)
SIDES = st.sampled_from(["left", "right"])


def _other(side: ot.Side) -> ot.Side:
    return "right" if side == "left" else "left"


def _is_normal(op: ot.Op) -> bool:
    """True if ``op`` is in the module's normal form (and structurally valid)."""
    if op and isinstance(op[-1], int):
        return False
    for prev, cur in pairwise(op):
        if type(prev) is type(cur):
            return False
    return ot.check(op) == op


# --- properties ---------------------------------------------------------------------------


@PROPERTY
@given(gen.concurrent_ops(), SIDES)
def test_transform_converges(case: tuple[str, ot.Op, ot.Op], side: ot.Side) -> None:
    """TP1: a then b-after-a equals b then a-after-b, for either side assignment."""
    text, a, b = case
    via_a = ot.apply(ot.apply(text, a), ot.transform(b, a, side))
    via_b = ot.apply(ot.apply(text, b), ot.transform(a, b, _other(side)))
    assert via_a == via_b


@PROPERTY
@given(gen.concurrent_ops(normalized=False), SIDES)
def test_transform_converges_on_raw_ops(case: tuple[str, ot.Op, ot.Op], side: ot.Side) -> None:
    """TP1 also holds for valid but unnormalized ops (adjacent runs, deletes before inserts)."""
    text, a, b = case
    via_a = ot.apply(ot.apply(text, a), ot.transform(b, a, side))
    via_b = ot.apply(ot.apply(text, b), ot.transform(a, b, _other(side)))
    assert via_a == via_b


@PROPERTY
@given(gen.concurrent_ops(normalized=False), SIDES)
def test_transform_result_is_normal_and_fits(case: tuple[str, ot.Op, ot.Op], side: ot.Side) -> None:
    """A transformed op is normalized and validates against the document after the other op."""
    text, a, b = case
    moved = ot.transform(b, a, side)
    assert _is_normal(moved)
    assert ot.validate(moved, ot.target_length(a, len(text))) == moved


@PROPERTY
@given(gen.concurrent_ops())
def test_transform_against_noop_is_identity(case: tuple[str, ot.Op, ot.Op]) -> None:
    """Transforming against the empty op (or the empty op against anything) changes nothing."""
    _, a, _ = case
    assert ot.transform(a, [], "left") == a
    assert ot.transform(a, [], "right") == a
    assert ot.transform([], a, "left") == []


@PROPERTY
@given(gen.sequential_ops(normalized=False))
def test_compose_equals_sequential_apply(case: tuple[str, ot.Op, ot.Op]) -> None:
    """compose(a, b) applied once gives the same text as a then b, and is normalized."""
    text, a, b = case
    both = ot.compose(a, b)
    assert _is_normal(both)
    assert ot.apply(text, both) == ot.apply(ot.apply(text, a), b)


@PROPERTY
@given(gen.text_and_op(normalized=False))
def test_normalize_is_idempotent_and_preserves_meaning(case: tuple[str, ot.Op]) -> None:
    """normalize gives the normal form, is idempotent, and applies like the original."""
    text, op = case
    normal = ot.normalize(op)
    assert _is_normal(normal)
    assert ot.normalize(normal) == normal
    assert ot.apply(text, normal) == ot.apply(text, op)


@PROPERTY
@given(gen.text_and_op(normalized=False))
def test_generated_ops_validate(case: tuple[str, ot.Op]) -> None:
    """Every generated op validates against its text's length and comes back normalized."""
    text, op = case
    assert ot.validate(op, len(text)) == ot.normalize(op)
    assert ot.check(op) == ot.normalize(op)
    assert ot.base_length(op) <= len(text)


@PROPERTY
@given(gen.text_and_op())
def test_validate_rejects_an_op_longer_than_the_document(case: tuple[str, ot.Op]) -> None:
    """An op whose retains and deletes pass the document's end is refused by validate and apply."""
    _, op = case
    span = ot.base_length(op)
    if span == 0:
        return
    with pytest.raises(BadOp, match="document has only"):
        ot.validate(op, span - 1)
    with pytest.raises(BadOp):
        ot.apply("x" * (span - 1), op)


@settings(max_examples=600, deadline=None)
@given(gen.garbage(), gen.texts())
def test_garbage_only_ever_raises_bad_op(value: Any, text: str) -> None:
    """check, validate and apply raise BadOp (and nothing else) on arbitrary input, and agree."""
    try:
        checked = ot.check(value)
    except BadOp as exc:
        assert exc.code == Code.BAD_OP
        checked = None
    try:
        validated = ot.validate(value, len(text))
    except BadOp:
        validated = None
    try:
        result = ot.apply(text, value)
    except BadOp:
        result = None
    if validated is None:
        assert result is None
    else:
        assert checked == validated
        assert result is not None
        assert result == ot.apply(text, validated)
        assert len(result) == ot.target_length(validated, len(text))


@PROPERTY
@given(gen.text_and_op(normalized=False))
def test_invert_undoes(case: tuple[str, ot.Op]) -> None:
    """Applying invert(op, text) after op restores the text; inverting twice gives op back."""
    text, op = case
    inverse = ot.invert(op, text)
    after = ot.apply(text, op)
    assert _is_normal(inverse)
    assert ot.apply(after, inverse) == text
    assert ot.invert(inverse, after) == ot.normalize(op)


@PROPERTY
@given(gen.text_and_op(normalized=False))
def test_length_helpers_agree_with_apply(case: tuple[str, ot.Op]) -> None:
    """target_length, inserted_chars and deleted_chars match what apply does."""
    text, op = case
    after = ot.apply(text, op)
    assert ot.target_length(op, len(text)) == len(after)
    assert len(text) + ot.inserted_chars(op) - ot.deleted_chars(op) == len(after)
    assert ot.inserted_chars(op) == sum(len(c) for c in op if isinstance(c, str))


@PROPERTY
@given(gen.text_and_op(normalized=False), st.data())
def test_cursor_keeps_its_neighbour(case: tuple[str, ot.Op], data: st.DataObject) -> None:
    """A right cursor keeps the char to its right, a left one the char to its left, if kept."""
    text, op = case
    pos = data.draw(st.integers(0, len(text)))
    after = ot.apply(text, op)
    # Mark each original code point as surviving or not by applying the op to indices.
    kept = _surviving_indices(len(text), op)
    right = ot.transform_position(pos, op, "right")
    left = ot.transform_position(pos, op, "left")
    assert 0 <= left <= right <= len(after)
    right_char = kept[pos] if pos < len(text) else None
    if right_char is not None:
        assert right == right_char
        assert after[right] == text[pos]
    left_char = kept[pos - 1] if pos > 0 else None
    if left_char is not None:
        assert left == left_char + 1
        assert after[left - 1] == text[pos - 1]


def _surviving_indices(length: int, op: ot.Op) -> list[int | None]:
    """For each code point of the old text, its index after ``op``, or None if deleted."""
    result: list[int | None] = []
    new = 0
    for c in op:
        if isinstance(c, int):
            result.extend(range(new, new + c))
            new += c
        elif isinstance(c, str):
            new += len(c)
        else:
            result.extend([None] * c["d"])
    result.extend(range(new, new + length - len(result)))
    return result


@PROPERTY
@given(gen.text_and_op(), st.data(), SIDES)
def test_cursor_moves_like_an_insert(
    case: tuple[str, ot.Op], data: st.DataObject, side: ot.Side
) -> None:
    """transform_position(pos, op, side) is where an insert at pos lands after transform."""
    text, op = case
    pos = data.draw(st.integers(0, len(text)))
    marker = ot.transform(ot.normalize([pos, "\x00"]), op, side)
    landed = marker[0] if isinstance(marker[0], int) else 0
    assert ot.transform_position(pos, op, side) == landed


@PROPERTY
@given(gen.text_and_op(normalized=False), st.data(), SIDES)
def test_cursor_ignores_run_order(
    case: tuple[str, ot.Op], data: st.DataObject, side: ot.Side
) -> None:
    """An op and its normal form move every cursor to the same place."""
    text, op = case
    pos = data.draw(st.integers(0, len(text)))
    assert ot.transform_position(pos, op, side) == ot.transform_position(
        pos, ot.normalize(op), side
    )


@PROPERTY
@given(gen.text_and_op(normalized=False), st.data())
def test_cursors_keep_their_order(case: tuple[str, ot.Op], data: st.DataObject) -> None:
    """transform_position never swaps two cursors."""
    text, op = case
    first = data.draw(st.integers(0, len(text)))
    second = data.draw(st.integers(first, len(text)))
    for side in ("left", "right"):
        assert ot.transform_position(first, op, side) <= ot.transform_position(second, op, side)


# --- examples -----------------------------------------------------------------------------


def test_apply_counts_code_points() -> None:
    """Positions count code points, so an emoji is one character (ShareDB's README example)."""
    assert ot.apply("hi there", [3, {"d": 5}, "🤖👻💃"]) == "hi 🤖👻💃"
    assert ot.apply("😀é\u0301x", [1, {"d": 2}, "!"]) == "😀!x"
    assert ot.apply("abc", []) == "abc"
    assert ot.apply("", ["new"]) == "new"


def test_insert_tie_break() -> None:
    """At one position the left op's insert comes first, whichever op is being transformed."""
    a: ot.Op = [1, "A"]
    b: ot.Op = [1, "B"]
    assert ot.transform(a, b, "left") == [1, "A"]
    assert ot.transform(b, a, "right") == [2, "B"]
    assert ot.apply(ot.apply("xy", b), ot.transform(a, b, "left")) == "xABy"
    assert ot.apply(ot.apply("xy", a), ot.transform(b, a, "right")) == "xABy"
    assert ot.transform(a, b, "right") == [2, "A"]


def test_overlapping_deletes_apply_once() -> None:
    """Text deleted by both ops is deleted once; each op keeps its own part of the range."""
    a: ot.Op = [1, {"d": 3}]  # "abcdef" -> "aef"
    b: ot.Op = [2, {"d": 3}]  # "abcdef" -> "abf"
    assert ot.transform(a, b, "left") == [1, {"d": 1}]
    assert ot.transform(b, a, "right") == [1, {"d": 1}]
    assert ot.apply(ot.apply("abcdef", b), ot.transform(a, b, "left")) == "af"
    assert ot.transform([{"d": 2}], [{"d": 2}], "left") == []


def test_delete_then_insert_at_same_spot() -> None:
    """Normalizing keeps a delete-first replacement delete-first (clients transform with it)."""
    delete_first: ot.Op = [2, {"d": 1}, "X"]
    insert_first: ot.Op = [2, "X", {"d": 1}]
    assert ot.normalize(delete_first) == delete_first
    assert ot.apply("abcd", delete_first) == ot.apply("abcd", insert_first) == "abXd"
    merged = [2, "ab", {"d": 1}, "c", {"d": 2}]
    assert ot.normalize([1, 1, "a", "b", {"d": 1}, "c", {"d": 2}, 4]) == merged


def test_order_matters_against_an_insert_in_the_deleted_range() -> None:
    """The two orders of a replacement place a concurrent insert differently; each converges."""
    typing: ot.Op = [3, "!"]
    for replace in ([1, {"d": 3}, "X"], [1, "X", {"d": 3}]):
        left = ot.apply(ot.apply("abcde", replace), ot.transform(typing, replace, "right"))
        right = ot.apply(ot.apply("abcde", typing), ot.transform(replace, typing, "left"))
        assert left == right


def test_insert_into_deleted_text_survives() -> None:
    """An insert inside text the other op deleted stays, after the other op's replacement."""
    replace: ot.Op = [1, "X", {"d": 3}]  # "abcde" -> "aXe"
    typing: ot.Op = [2, "!"]  # "abcde" -> "ab!cde"
    moved = ot.transform(typing, replace, "left")
    assert ot.apply(ot.apply("abcde", replace), moved) == "aX!e"
    assert ot.apply(ot.apply("abcde", typing), ot.transform(replace, typing, "right")) == "aX!e"


def test_compose_cancels_insert_then_delete() -> None:
    """Text inserted by a and deleted by b leaves nothing behind."""
    assert ot.compose([2, "hello"], [2, {"d": 5}]) == []
    assert ot.compose([{"d": 1}], [{"d": 1}]) == [{"d": 2}]
    assert ot.compose(["ab"], [1, "X"]) == ["aXb"]


def test_invert_restores_deleted_text() -> None:
    """invert turns deletes into inserts of the text they removed and inserts into deletes."""
    assert ot.invert([1, "Z", {"d": 2}], "a😀bc") == [1, {"d": 1}, "😀b"]


def test_transform_position_examples() -> None:
    """A left cursor stays before an insert at its position, a right one moves past it."""
    assert ot.transform_position(1, [1, "xx"]) == 1
    assert ot.transform_position(1, [1, "xx"], "right") == 3
    assert ot.transform_position(4, [1, {"d": 2}]) == 2
    assert ot.transform_position(2, [1, "X", {"d": 2}]) == 2
    assert ot.transform_position(9, ["ab", 1, {"d": 1}]) == 10


def test_measuring_helpers() -> None:
    """The counting helpers read retains, inserts and deletes."""
    op: ot.Op = [3, "héllo", {"d": 2}, 1, "😀"]
    assert ot.base_length(op) == 6
    assert ot.target_length(op, 10) == 14
    assert ot.inserted_chars(op) == 6
    assert ot.deleted_chars(op) == 2


@pytest.mark.parametrize(
    ("value", "message"),
    [
        ("abc", "must be a list"),
        ((1, "a"), "must be a list"),
        ([True], "bool"),
        ([0], "must be > 0"),
        ([-3], "must be > 0"),
        ([1.0], "float"),
        ([""], "must not be empty"),
        (["a\ud800"], "surrogate"),
        ([{"d": 0}], "must be > 0"),
        ([{"d": True}], "must be an int"),
        ([{"d": "abc"}], "must be an int"),
        ([{"d": 1, "x": 1}], "exactly"),
        ([{"i": "a"}], "exactly"),
        ([None], "NoneType"),
        ([[1]], "list"),
    ],
)
def test_check_rejects_malformed_ops(value: object, message: str) -> None:
    """check explains each kind of malformed op with a BadOp carrying the bad_op code."""
    with pytest.raises(BadOp, match=message) as info:
        ot.check(value)
    assert isinstance(info.value, DomainError)
    assert info.value.code == Code.BAD_OP
    with pytest.raises(BadOp):
        ot.apply("abcdef", value)


def test_check_returns_a_fresh_normal_list() -> None:
    """check never hands back the caller's list, so later mutation cannot alias."""
    op: list[object] = [2, "x"]
    checked = ot.check(op)
    assert checked == op
    assert checked is not op


def test_bad_side_raises_value_error() -> None:
    """transform and transform_position accept only "left" and "right"."""
    with pytest.raises(ValueError, match="side"):
        ot.transform([1], [1], "up")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="side"):
        ot.transform_position(0, [], "")  # type: ignore[arg-type]


@PROPERTY
@given(gen.concurrent_ops(), SIDES)
def test_single_component_fast_path_equals_general(
    case: tuple[str, ot.Op, ot.Op], side: ot.Side
) -> None:
    """The O(1) transform of one insert/delete against another equals the general walk."""
    _, a, b = case
    assert ot.transform(a, b, side) == ot._transform_general(a, b, side == "left")


@PROPERTY
@given(gen.concurrent_ops(), st.integers(0, 40), st.integers(1, 6), SIDES, st.booleans())
def test_fast_path_against_one_edit_equals_general(
    case: tuple[str, ot.Op, ot.Op], q: int, m: int, side: ot.Side, insert: bool
) -> None:
    """Any op transformed against a single insert or delete equals the general walk."""
    text, a, _ = case
    q = min(q, len(text))
    b: ot.Op = ot.normalize([q, "Y" * m] if insert else [q, {"d": min(m, len(text) - q)}])
    assert ot.transform(a, b, side) == ot._transform_general(a, b, side == "left")


@st.composite
def _op_and_history(draw: st.DrawFn) -> tuple[ot.Op, list[ot.Op]]:
    """An op on a text and a run of ops applied to that text meanwhile (mostly single)."""
    text = draw(gen.texts(max_size=30))
    op = draw(gen.ops(text))
    history: list[ot.Op] = []
    cur = text
    for _ in range(draw(st.integers(0, 8))):
        if draw(st.integers(0, 3)) == 0:
            other = draw(gen.ops(cur))
        else:
            q = draw(st.integers(0, len(cur)))
            if draw(st.booleans()) or q == len(cur):
                other = ot.normalize([q, draw(st.text(alphabet="xyz", min_size=1, max_size=3))])
            else:
                other = ot.normalize([q, {"d": draw(st.integers(1, len(cur) - q))}])
        history.append(other)
        cur = ot.apply(cur, other)
    return op, history


@PROPERTY
@given(_op_and_history(), SIDES, st.booleans())
def test_transform_many_equals_a_loop_of_transform(
    case: tuple[ot.Op, list[ot.Op]], side: ot.Side, inserts_only: bool
) -> None:
    """transform_many(op, others) is transform applied past each of others in turn."""
    op, history = case
    if inserts_only:  # typing, like a client's composed buffer: deletes become retains
        op = ot.normalize([c if not isinstance(c, dict) else c["d"] for c in op])
    want = op
    for other in history:
        want = ot.transform(want, other, side)
    assert ot.transform_many(op, history, side) == want


@given(st.integers(0, 30), st.integers(1, 5), st.integers(0, 30), st.integers(1, 5), SIDES,
       st.booleans(), st.booleans())
def test_fast_path_on_single_edits(
    p: int, n: int, q: int, m: int, side: ot.Side, a_ins: bool, b_ins: bool
) -> None:
    """Every pair of single inserts/deletes transforms like the general walk, and converges."""
    text = "abcdefghij" * 7
    a: ot.Op = ot.normalize([p, "X" * n] if a_ins else [p, {"d": n}])
    b: ot.Op = ot.normalize([q, "Y" * m] if b_ins else [q, {"d": m}])
    assert ot.transform(a, b, side) == ot._transform_general(a, b, side == "left")
    other: ot.Side = "right" if side == "left" else "left"
    left = ot.apply(ot.apply(text, b), ot.transform(a, b, side))
    right = ot.apply(ot.apply(text, a), ot.transform(b, a, other))
    assert left == right


def test_validate_fast_path_rejects_like_the_general_one() -> None:
    """The insert-at-position shortcut of validate keeps every rule of the general check."""
    assert ot.validate([3, "x"], 3) == [3, "x"]
    for bad, length in (([4, "x"], 3), ([0, "x"], 9), ([True, "x"], 9), ([2, ""], 9),
                        ([2, "\ud800"], 9)):
        with pytest.raises(BadOp):
            ot.validate(bad, length)


# -- chunked texts (the Document's text: an edit rebuilds only the pieces it touches) -----


@st.composite
def _chunked(draw: st.DrawFn) -> tuple[str, ot.Chunks]:
    """A text and some cutting of it into non-empty pieces (as edits leave them)."""
    text = draw(gen.texts(max_size=40))
    cuts = sorted(draw(st.sets(st.integers(1, max(1, len(text) - 1)), max_size=6)))
    bounds = [0, *(c for c in cuts if c < len(text)), len(text)]
    return text, tuple(text[a:b] for a, b in pairwise(bounds) if b > a)


@given(_chunked(), st.data(), st.sampled_from([1, 2, 3, 5, 4096]))
def test_apply_chunks_equals_apply(chunked: tuple[str, ot.Chunks], data: st.DataObject,
                                   chunk: int) -> None:
    """Any op on any cutting of a text gives the pieces of what ``apply`` gives (never an
    empty piece), leaves the input untouched, and refuses exactly what ``apply`` refuses."""
    text, chunks = chunked
    op = data.draw(st.one_of(gen.ops(text, normalized=False), gen.garbage()))
    try:
        expected: str | BadOp = ot.apply(text, op)
    except BadOp as exc:
        expected = exc
    saved = ot.CHUNK
    ot.CHUNK = chunk
    try:
        got: tuple[ot.Chunks, int] | BadOp = ot.apply_chunks(chunks, len(text), op)
    except BadOp as exc:
        got = exc
    finally:
        ot.CHUNK = saved
    if isinstance(expected, BadOp):
        assert isinstance(got, BadOp) and str(got) == str(expected)
        return
    assert not isinstance(got, BadOp)
    pieces, size = got
    assert "".join(pieces) == expected and size == len(expected)
    assert all(pieces)
    assert "".join(chunks) == text


def test_chunks_stay_near_the_chunk_size() -> None:
    """Typing at random places keeps the pieces between a few and ``CHUNK`` code points."""
    import random

    rng = random.Random(7)
    chunks, size = ot.chunks_of("x" * 50_000), 50_000
    for _ in range(3000):
        pos = rng.randrange(size + 1)
        op: ot.Op = [pos, "abc"] if rng.random() < 0.7 or size < 10 else [
            min(pos, size - 5), {"d": 5}]
        op = ot.normalize(op)
        chunks, size = ot.apply_chunks(chunks, size, op)
    assert size == sum(map(len, chunks))
    assert max(map(len, chunks)) <= ot.CHUNK
    assert len(chunks) <= 2 * size // ot.CHUNK + 2
