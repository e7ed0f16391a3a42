"""Hypothesis strategies shared by the test suite: texts, text ops and hostile input.

Ops come in two flavours: *raw* ops are structurally valid but may have adjacent components
of one kind, deletes before inserts and trailing retains (what a client may send); the
default ops are normalized (what ``domain.ot.validate`` hands the server).
"""

from __future__ import annotations

from typing import Any

from hypothesis import strategies as st

from domain import ot

# Characters that break code-unit or byte counting: non-BMP emoji, a skin-tone modifier,
# a zero-width joiner, combining marks, a precomposed letter, CJK, a regional indicator,
# NUL and a newline.
TRICKY_CHARS = [
    "a",
    "b",
    " ",
    "\n",
    "\x00",
    "é",
    "\u0301",
    "\u0308",
    "😀",
    "👍",
    "\U0001f3fd",
    "\u200d",
    "中",
    "\U0001f1eb",
    "\U00010348",
]

_chars = st.one_of(st.sampled_from(TRICKY_CHARS), st.characters(codec="utf-8"))


def texts(min_size: int = 0, max_size: int = 24) -> st.SearchStrategy[str]:
    """Documents and inserts: mostly tricky code points, never lone surrogates; may be empty."""
    return st.text(alphabet=_chars, min_size=min_size, max_size=max_size)


@st.composite
def raw_ops(draw: st.DrawFn, length: int) -> ot.Op:
    """A structurally valid op that fits a document of ``length``, not necessarily normal."""
    op: ot.Op = []
    pos = 0
    for _ in range(draw(st.integers(0, 8))):
        kind = draw(
            st.sampled_from(("retain", "delete", "insert") if pos < length else ("insert",))
        )
        if kind == "insert":
            op.append(draw(texts(min_size=1, max_size=6)))
            continue
        n = draw(st.integers(1, length - pos))
        pos += n
        op.append(n if kind == "retain" else {"d": n})
    if pos < length and draw(st.booleans()):
        op.append(draw(st.integers(1, length - pos)))
    return op


def ops(text: str, *, normalized: bool = True) -> st.SearchStrategy[ot.Op]:
    """Ops that fit ``text``; normalized unless ``normalized=False``."""
    strategy = raw_ops(len(text))
    return strategy.map(ot.normalize) if normalized else strategy


@st.composite
def text_and_op(draw: st.DrawFn, *, normalized: bool = True) -> tuple[str, ot.Op]:
    """A text and one op that fits it."""
    text = draw(texts())
    return text, draw(ops(text, normalized=normalized))


@st.composite
def concurrent_ops(draw: st.DrawFn, *, normalized: bool = True) -> tuple[str, ot.Op, ot.Op]:
    """A text and two ops made concurrently against it (to transform against each other)."""
    text = draw(texts())
    return text, draw(ops(text, normalized=normalized)), draw(ops(text, normalized=normalized))


@st.composite
def sequential_ops(draw: st.DrawFn, *, normalized: bool = True) -> tuple[str, ot.Op, ot.Op]:
    """A text, an op ``a`` that fits it, and an op ``b`` that fits the result of ``a``."""
    text = draw(texts())
    a = draw(ops(text, normalized=normalized))
    b = draw(ops(ot.apply(text, a), normalized=normalized))
    return text, a, b


_leaves = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(),
    st.integers(min_value=2**63),
    st.integers(max_value=0),
    st.floats(allow_nan=True, allow_infinity=True),
    st.text(max_size=4),
    st.sampled_from(["", "d", "\ud800", "x\udfff"]),
    st.binary(max_size=4),
)


def _containers(children: st.SearchStrategy[Any]) -> st.SearchStrategy[Any]:
    keys = st.one_of(st.just("d"), st.text(max_size=2), st.integers(), st.binary(max_size=2))
    return st.one_of(
        st.lists(children, max_size=5),
        st.lists(children, max_size=3).map(tuple),
        st.dictionaries(keys, children, max_size=3),
        st.fixed_dictionaries({"d": children}),
    )


_nested = st.recursive(_leaves, _containers, max_leaves=12)

_component_like = st.one_of(
    st.integers(1, 30),
    texts(min_size=1, max_size=4),
    st.integers(1, 30).map(lambda n: {"d": n}),
    st.fixed_dictionaries({"d": _leaves}),
    st.fixed_dictionaries({"d": st.integers(1, 5)}, optional={"x": _leaves}),
    _leaves,
)


def garbage() -> st.SearchStrategy[Any]:
    """Arbitrary decoded-JSON/msgpack-ish values, including near-valid ops.

    Nested lists, tuples and dicts, floats, bools, None, zero, negative and huge ints,
    bytes, lone surrogates, and lists of mostly valid components with a bad one mixed in.
    """
    return st.one_of(_nested, st.lists(_component_like, max_size=8))


def context_positions() -> st.SearchStrategy[int]:
    """Positions of context items, often at the ends of their range ``0..2**31``."""
    from domain.document import MAX_CONTEXT_POSITION

    edges = st.sampled_from((0, 1, MAX_CONTEXT_POSITION - 1, MAX_CONTEXT_POSITION))
    return st.one_of(edges, st.integers(0, MAX_CONTEXT_POSITION))
