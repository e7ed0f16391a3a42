"""The plain-text OT type, in ShareDB's ``text-unicode`` format. Pure functions, no I/O.

An op is a list of components walked left to right over the document it applies to:

- ``int n > 0``: retain (skip over) ``n`` code points;
- a non-empty ``str``: insert that text at the current position;
- ``{"d": n}`` with ``int n > 0``: delete the next ``n`` code points.

Positions and lengths count Unicode code points (Python's ``str`` indexing), never UTF-16
units or bytes, so "😀" is one. ``bool`` is not a count. An op need not reach the end of the
document: whatever follows its last component is retained implicitly.

**Trust protocol.** Ops from the outside world go through :func:`validate` (structure and
fit against the document length) or :func:`check` (structure only) first; both raise
:class:`~domain.errors.BadOp` and return the *normalized* op. :func:`apply` validates as it
goes and is also safe on untrusted input. Every other function (:func:`normalize`,
:func:`transform`, :func:`compose`, :func:`invert`, :func:`transform_position` and the
counting helpers) assumes a structurally valid op and may raise anything, or return
nonsense, on garbage.

**Normal form.** No two adjacent components of the same kind and no trailing retain. The
order of components is kept as given: ``[2, {"d": 1}, "x"]`` and ``[2, "x", {"d": 1}]`` mean
the same text change but transform differently against a concurrent insert inside the
deleted range, and a client computes its own transforms with the op it sent, so the server
must not reorder it (that would make the two sides diverge). Every op this module returns
is normalized.

**Cost.** Every function is linear in the sizes of its arguments: components are walked
with an index and an offset, text is built from slices with one ``"".join``.
"""

from __future__ import annotations

import re
import reprlib
from bisect import bisect_left, bisect_right
from collections.abc import Sequence
from itertools import accumulate
from typing import Any, Literal, TypeAlias, TypedDict

from domain.errors import BadOp

MAX_OP_COMPONENTS = 50_000
"""Most components a client's op may have. Checking, transforming and applying an op of
this many on a 1 MiB text took 27-33 ms of the event loop (100,000: 56 ms);
the server refuses a longer op before it does any of that work."""

__all__ = [
    "Component",
    "Delete",
    "Op",
    "Side",
    "apply",
    "base_length",
    "check",
    "compose",
    "deleted_chars",
    "inserted_chars",
    "invert",
    "normalize",
    "target_length",
    "transform",
    "transform_many",
    "transform_position",
    "validate",
]


class Delete(TypedDict):
    """A delete component: remove the next ``d`` code points (``d`` an int > 0)."""

    d: int


Component: TypeAlias = int | str | Delete
"""One step of an op: retain ``n`` (int > 0), insert text (non-empty str), or a :class:`Delete`."""

Op: TypeAlias = list[Component]
"""A text operation: components applied in order; the document's tail is retained implicitly."""

Side: TypeAlias = Literal["left", "right"]
"""Tie-break for concurrent inserts at one position: the "left" one ends up first."""

# Lone surrogates are valid in a Python str but cannot be encoded as UTF-8 (msgpack, orjson
# and Postgres all refuse them), so an insert carrying one would poison the event store.
_SURROGATE = re.compile("[\ud800-\udfff]")

_RETAIN = 0
_INSERT = 1
_DELETE = 2

_short = reprlib.Repr()
_short.maxstring = 40
_short.maxother = 40
_short.maxlevel = 2


# --- building and reading ops -------------------------------------------------------------


class _Builder:
    """Accumulates components into a normalized op, keeping their order.

    One pending component (a retain count, insert pieces, or a delete count) is held back
    until a component of another kind arrives, so merging is O(1) per component and inserts
    are joined once. Callers never pass empty text or zero counts.
    """

    __slots__ = ("_count", "_inserts", "_kind", "_out")

    def __init__(self) -> None:
        self._out: Op = []
        self._kind = _RETAIN
        self._count = 0
        self._inserts: list[str] = []

    def retain(self, n: int) -> None:
        if self._kind != _RETAIN:
            self._flush()
            self._kind = _RETAIN
        self._count += n

    def insert(self, text: str) -> None:
        if self._kind != _INSERT:
            self._flush()
            self._kind = _INSERT
        self._inserts.append(text)

    def delete(self, n: int) -> None:
        if self._kind != _DELETE:
            self._flush()
            self._kind = _DELETE
        self._count += n

    def _flush(self) -> None:
        kind = self._kind
        if kind == _INSERT:
            inserts = self._inserts
            if inserts:
                self._out.append(inserts[0] if len(inserts) == 1 else "".join(inserts))
                self._inserts = []
        elif self._count:
            self._out.append(self._count if kind == _RETAIN else {"d": self._count})
        self._count = 0

    def finish(self) -> Op:
        """Return the op; a pending (trailing) retain is dropped."""
        if self._kind == _RETAIN:
            self._count = 0
        else:
            self._flush()
        return self._out


class _Reader:
    """Walks a valid op piece by piece with an index and an offset into the current component.

    Past the end the op retains forever, as an op implicitly retains the document's tail.
    """

    __slots__ = ("_i", "_off", "_op")

    def __init__(self, op: Op) -> None:
        self._op = op
        self._i = 0
        self._off = 0

    def next_is_insert(self) -> bool:
        return self._i < len(self._op) and isinstance(self._op[self._i], str)

    def take(self, limit: int, by_target: bool) -> tuple[int, int, str]:
        """Take the next piece, at most ``limit`` long: ``(kind, length, inserted text)``.

        ``by_target=False`` measures in the op's base document (transform): retains and
        deletes are split at ``limit``, an insert is taken whole. ``by_target=True``
        measures in its result (compose): retains and inserts are split, a delete is whole.
        """
        op = self._op
        i = self._i
        if i >= len(op):
            return _RETAIN, limit, ""
        c = op[i]
        off = self._off
        if isinstance(c, int):
            kind = _RETAIN
            left = c - off
        elif isinstance(c, str):
            left = len(c) - off
            if not by_target or left <= limit:
                self._i = i + 1
                self._off = 0
                return _INSERT, left, c[off:] if off else c
            self._off = off + limit
            return _INSERT, limit, c[off : off + limit]
        else:
            left = c["d"] - off
            if by_target:
                self._i = i + 1
                self._off = 0
                return _DELETE, left, ""
            kind = _DELETE
        if left <= limit:
            self._i = i + 1
            self._off = 0
            return kind, left, ""
        self._off = off + limit
        return kind, limit, ""

    def drain(self, out: _Builder) -> None:
        """Append everything not taken yet to ``out``."""
        op = self._op
        i = self._i
        if i >= len(op):
            return
        off = self._off
        c = op[i]
        if isinstance(c, int):
            out.retain(c - off)
        elif isinstance(c, str):
            out.insert(c[off:] if off else c)
        else:
            out.delete(c["d"] - off)
        _extend(out, op, i + 1)


def _extend(out: _Builder, op: Op, start: int = 0) -> None:
    """Append ``op[start:]`` to ``out`` without copying the op."""
    for i in range(start, len(op)):
        c = op[i]
        if isinstance(c, int):
            out.retain(c)
        elif isinstance(c, str):
            out.insert(c)
        else:
            out.delete(c["d"])


# --- validation ---------------------------------------------------------------------------


def _component_error(index: int, c: object) -> BadOp:
    """Explain why ``c`` (found at ``index``) is not a component."""
    what = _short.repr(c)
    if type(c) is bool:
        return BadOp(f"component {index} is a bool ({what}); counts must be ints")
    if type(c) is int:
        return BadOp(f"component {index}: retain count must be > 0, got {what}")
    if type(c) is str:
        if not c:
            return BadOp(f"component {index}: an insert must not be empty")
        return BadOp(f"component {index}: insert contains a lone surrogate code point")
    if type(c) is dict:
        if len(c) != 1 or "d" not in c:
            return BadOp(f"component {index}: a delete must be exactly {{'d': n}}, got {what}")
        n = c["d"]
        if type(n) is not int:
            return BadOp(f"component {index}: delete count must be an int, got {_short.repr(n)}")
        return BadOp(f"component {index}: delete count must be > 0, got {n}")
    return BadOp(
        f"component {index} is a {type(c).__name__} ({what}); expected a retain count, "
        "insert text or {'d': n}"
    )


def _text_ok(text: str) -> bool:
    return bool(text) and (text.isascii() or _SURROGATE.search(text) is None)


def _parse(op: object) -> tuple[Op, int]:
    """Validate the structure of untrusted ``op``; return it normalized and its base length."""
    if type(op) is not list:
        raise BadOp(f"an op must be a list of components, got {type(op).__name__}")
    out = _Builder()
    base = 0
    for i, c in enumerate(op):
        t = type(c)
        if t is int:
            if c <= 0:
                raise _component_error(i, c)
            out.retain(c)
            base += c
        elif t is str:
            if not _text_ok(c):
                raise _component_error(i, c)
            out.insert(c)
        elif t is dict and len(c) == 1 and type(n := c.get("d")) is int and n > 0:
            out.delete(n)
            base += n
        else:
            raise _component_error(i, c)
    return out.finish(), base


def check(op: object) -> Op:
    """Check that untrusted ``op`` is a structurally valid op; return it normalized (a new list).

    Rejects, with :class:`BadOp`: a non-list; a component that is not an int, str or dict;
    ``bool`` anywhere a count is expected; zero, negative or non-int counts; empty inserts;
    inserts holding lone surrogates; dicts with keys other than exactly ``"d"``. Does not
    know the document, so cannot check the fit: use :func:`validate` for that.
    """
    return _parse(op)[0]


def validate(op: object, length: int) -> Op:
    """Check untrusted ``op`` against a document of ``length`` code points; return it normalized.

    Everything :func:`check` does, plus: the retains and deletes together must not run past
    the end of the document. What this accepts, :func:`apply` applies to any text of that
    length. The server calls this on every client op.
    """
    if (
        type(op) is list
        and len(op) == 2
        and type(n := op[0]) is int
        and n > 0
        and type(t := op[1]) is str
        and _text_ok(t)
    ):  # the common shape, an insert at a position: checked without the general parse
        if n > length:
            raise BadOp(f"op retains {n} code points but the document has only {length}")
        return [n, t]
    normal, base = _parse(op)
    if base > length:
        raise BadOp(f"op retains and deletes {base} code points but the document has only {length}")
    return normal


def normalize(op: Op) -> Op:
    """Return ``op`` in normal form (see the module docstring); same meaning, a new list.

    Merges adjacent components of one kind and drops trailing retains; never reorders.
    Idempotent. Assumes a structurally valid op:
    on untrusted input call :func:`check`, which validates and normalizes in one pass.
    """
    out = _Builder()
    _extend(out, op)
    return out.finish()


# --- applying -----------------------------------------------------------------------------


def apply(text: str, op: object) -> str:
    """Return ``text`` with ``op`` applied. Time O(len(text) + size of op).

    Safe on untrusted input: raises :class:`BadOp` (and nothing else) if ``op`` is not a
    valid op or runs past the end of ``text``, exactly when ``validate(op, len(text))``
    would. The op need not be normalized.
    """
    edits, _ = _edits(op, len(text))
    return _splice(text, 0, edits) if edits else text


def _splice(text: str, base: int, edits: list[tuple[int, int, str]]) -> str:
    """``text`` (which starts at position ``base`` of the whole) with ``edits`` made."""
    parts: list[str] = []
    at = 0
    for start, end, inserted in edits:
        parts.append(text[at:start - base])
        parts.append(inserted)
        at = end - base
    parts.append(text[at:])
    return "".join(parts)


CHUNK = 16384
"""Code points per piece of a chunked text (``chunks_of``, ``apply_chunks``)."""

Chunks: TypeAlias = tuple[str, ...]
"""A text as consecutive pieces (none empty): ``"".join(chunks)`` is the text."""


def chunks_of(text: str) -> Chunks:
    """``text`` cut into pieces of ``CHUNK`` code points (the last may be shorter)."""
    return tuple(text[i:i + CHUNK] for i in range(0, len(text), CHUNK))


def apply_chunks(chunks: Chunks, size: int, op: object) -> tuple[Chunks, int]:
    """``apply`` on a chunked text of length ``size``: the new chunks and length.

    Time O(number of chunks + the chunks the op touches + size of op), not O(text): only
    the pieces between the op's first and last change are rebuilt, the rest are shared
    with ``chunks``, which is left as it was. Raises :class:`BadOp` exactly when ``apply``
    would, with the same message.
    """
    edits, new_size = _edits(op, size)
    if not edits:
        return chunks, size
    if len(chunks) <= 1:  # a short text: one piece
        return _even(_splice(chunks[0] if chunks else "", 0, edits)), new_size
    ends = list(accumulate(map(len, chunks)))
    last = len(chunks) - 1
    first = min(bisect_right(ends, edits[0][0]), last)
    stop = min(bisect_left(ends, edits[-1][1]), last)
    if ends[stop] - (ends[first - 1] if first else 0) < CHUNK // 2:
        # A small piece is merged with a neighbour: pieces stay between CHUNK/2 and CHUNK.
        if stop < last:
            stop += 1
        elif first > 0:
            first -= 1
    base = ends[first - 1] if first else 0
    changed = _splice("".join(chunks[first:stop + 1]), base, edits)
    return chunks[:first] + _even(changed) + chunks[stop + 1:], new_size


def _even(text: str) -> Chunks:
    """``text`` in the fewest pieces of at most ``CHUNK``, all of about the same length (no
    short remainder left behind)."""
    n = len(text)
    if n <= CHUNK:
        return (text,) if text else ()
    count = -(-n // CHUNK)
    size = -(-n // count)
    return tuple(text[i:i + size] for i in range(0, n, size))


def _edits(op: object, size: int) -> tuple[list[tuple[int, int, str]], int]:
    """The changes ``op`` makes to a text of length ``size``: ``(start, end, inserted)`` in
    the text's positions, ascending and apart; and the new length. Validates untrusted
    ``op`` (``BadOp`` for anything that is not a valid op fitting ``size``)."""
    if type(op) is not list:
        raise BadOp(f"an op must be a list of components, got {type(op).__name__}")
    edits: list[tuple[int, int, str]] = []
    pos = 0
    new_size = size
    for i, c in enumerate(op):
        t = type(c)
        if t is int:
            if c <= 0:
                raise _component_error(i, c)
            pos += c
            if pos > size:
                raise _overrun(i, pos, size)
        elif t is str:
            if not _text_ok(c):
                raise _component_error(i, c)
            new_size += len(c)
            if edits and edits[-1][1] == pos:
                s0, e0, ins = edits[-1]
                edits[-1] = (s0, e0, ins + c)
            else:
                edits.append((pos, pos, c))
        elif t is dict and len(c) == 1 and type(n := c.get("d")) is int and n > 0:
            end = pos + n
            if end > size:
                raise _overrun(i, end, size)
            new_size -= n
            if edits and edits[-1][1] == pos:
                s0, _, ins = edits[-1]
                edits[-1] = (s0, end, ins)
            else:
                edits.append((pos, end, ""))
            pos = end
        else:
            raise _component_error(i, c)
    return edits, new_size


def _overrun(index: int, end: int, size: int) -> BadOp:
    return BadOp(f"component {index} reaches code point {end} but the document has only {size}")


def invert(op: Op, text: str) -> Op:
    """Return the op that undoes ``op``: ``apply(apply(text, op), invert(op, text)) == text``.

    ``text`` is the document ``op`` was (or will be) applied to; it supplies the deleted
    characters, which the ``{"d": n}`` format does not carry. Raises :class:`BadOp` if
    ``op`` does not fit ``text``.
    """
    out = _Builder()
    pos = 0
    for c in op:
        if isinstance(c, int):
            out.retain(c)
            pos += c
        elif isinstance(c, str):
            out.delete(len(c))
        else:
            end = pos + c["d"]
            out.insert(text[pos:end])
            pos = end
    if pos > len(text):
        raise BadOp(f"op spans {pos} code points but the text has only {len(text)}")
    return out.finish()


# --- concurrency --------------------------------------------------------------------------


def _check_side(side: str) -> bool:
    """Return True for "left"; reject anything but "left" and "right"."""
    if side == "left":
        return True
    if side == "right":
        return False
    raise ValueError(f"side must be 'left' or 'right', got {side!r}")


def transform(op: Op, other: Op, side: Side) -> Op:
    """Rewrite ``op`` to apply after ``other``; both were made against the same document.

    When both insert at one position, the insert of the op on the ``"left"`` side comes
    first. Text deleted by both is deleted once; an insert of ``op`` inside text that
    ``other`` deleted survives, at the place of the deletion. Convergence (TP1) holds:
    ``apply(apply(s, a), transform(b, a, "right")) == apply(apply(s, b), transform(a, b,
    "left"))``. Inputs are expected normalized (as :func:`validate` returns them); other valid
    inputs still converge, but an insert inside a region ``other`` replaced may then land on
    the other side of the replacement. Raises ValueError for a bad ``side``.
    """
    left = _check_side(side)
    b = _single(other)
    if b is None:
        return _transform_general(op, other, left)
    a = _single(op)
    if a is not None:
        fast = _transform_single(a, b, left)
        if fast is not None:
            return fast
    if b[0] == _INSERT:
        return _past_insert(op, b[1], len(b[2]), left)  # type: ignore[arg-type]
    return _past_delete(op, b[1], b[2])  # type: ignore[arg-type]


def transform_many(op: Op, others: Sequence[Op], side: Side) -> Op:
    """``op`` transformed past each of ``others`` in turn: equal to a loop of ``transform``.

    The server's hot path: an op made on an old version is transformed past every op
    committed since. While ``op`` only inserts and the others are single inserts or
    deletes (the common case, typing), its inserts are kept as positions and shifted with
    integer arithmetic, without building an op per step; any other shape falls back to
    ``transform`` for that step. A property test checks it equals the loop.
    """
    left = _check_side(side)
    spots = _insert_spots(op)
    for other in others:
        b = _single(other) if spots is not None else None
        if b is None:
            if spots is not None:
                op = _from_spots(spots)
                spots = None
            op = transform(op, other, side)
            spots = _insert_spots(op)
            continue
        kind, q, y = b
        assert spots is not None
        if kind == _INSERT:
            m = len(y)  # type: ignore[arg-type]
            for sp in spots:
                if sp[0] > q or (sp[0] == q and not left):
                    sp[0] += m
        else:
            end = q + y  # type: ignore[operator]
            for sp in spots:
                p = sp[0]
                if p > q:
                    sp[0] = p - y if p >= end else q
    return _from_spots(spots) if spots is not None else op


def _insert_spots(op: Op) -> list[list[Any]] | None:
    """``[[position, text], ...]`` of an op that only retains and inserts, else None."""
    spots: list[list[Any]] = []
    pos = 0
    for c in op:
        if type(c) is int:
            pos += c
        elif type(c) is str:
            spots.append([pos, c])
        else:
            return None
    return spots


def _from_spots(spots: list[list[Any]]) -> Op:
    out: Op = []
    pos = 0
    for p, text in spots:
        if p > pos:
            _push(out, p - pos)
            pos = p
        _push(out, text)
    return out


def _single(op: Op) -> tuple[int, int, str | int] | None:
    """``(kind, position, text or count)`` of an op that is one insert or one delete."""
    n = len(op)
    if n == 1:
        pos, c = 0, op[0]
    elif n == 2 and type(op[0]) is int:
        pos, c = op[0], op[1]
    else:
        return None
    if type(c) is str:
        return _INSERT, pos, c
    if type(c) is dict:
        return _DELETE, pos, c["d"]
    return None


def _edit(kind: int, pos: int, payload: str | int) -> Op:
    """The normalized op of one insert or delete at ``pos``."""
    c: Component = payload if kind == _INSERT else {"d": payload}  # type: ignore[assignment]
    if kind == _DELETE and payload == 0:
        return []
    return [pos, c] if pos else [c]


def _transform_single(
    a: tuple[int, int, str | int], b: tuple[int, int, str | int], left: bool
) -> Op | None:
    """``transform`` of one insert/delete against another, in O(1); None when it splits.

    Gives exactly what the general algorithm gives (a property test checks it); the one
    case it leaves to it is a delete of ``a`` around an insert of ``b``, which splits.
    """
    ka, p, x = a
    kb, q, y = b
    if ka == _INSERT:
        if kb == _INSERT:
            if q < p or (q == p and not left):
                p += len(y)  # type: ignore[arg-type]
            return _edit(ka, p, x)
        j = y  # ``b`` deletes [q, q + j)
        assert isinstance(j, int)
        if p <= q:
            return _edit(ka, p, x)
        return _edit(ka, p - j if p >= q + j else q, x)
    k = x  # ``a`` deletes [p, p + k)
    assert isinstance(k, int)
    if kb == _INSERT:
        if q <= p:
            return _edit(ka, p + len(y), k)  # type: ignore[arg-type]
        if q >= p + k:
            return _edit(ka, p, k)
        return None
    j = y
    assert isinstance(j, int)
    overlap = max(0, min(p + k, q + j) - max(p, q))
    if q < p:
        p -= min(j, p - q)
    return _edit(ka, p, k - overlap)


def _push(out: Op, c: Component) -> None:
    """Append ``c`` to ``out``, merging it into a last component of the same kind."""
    if out:
        last = out[-1]
        if isinstance(c, int) and isinstance(last, int):
            out[-1] = last + c
            return
        if isinstance(c, str) and isinstance(last, str):
            out[-1] = last + c
            return
        if isinstance(c, dict) and isinstance(last, dict):
            out[-1] = {"d": last["d"] + c["d"]}
            return
    out.append(c)


def _rest(out: Op, op: Op, start: int) -> Op:
    """``out`` followed by ``op[start:]``, merged where neighbours are of one kind."""
    for k in range(start, len(op)):
        _push(out, op[k])
    return out


def _finish(out: Op) -> Op:
    if out and type(out[-1]) is int:
        out.pop()
    return out


def _past_insert(op: Op, q: int, m: int, left: bool) -> Op:
    """``transform(op, [q, <m chars>])``: ``op`` with ``m`` more retained at ``q``, in O(len(op)).

    At ``q`` itself ``op``'s inserts go first when ``left``; inside one of ``op``'s deletes
    the inserted text is kept between its two halves. Equal to the general walk (property).
    """
    out: Op = []
    pos = 0
    n = len(op)
    i = 0
    while i < n:
        c = op[i]
        if type(c) is str:
            if pos == q and not left:
                break
            _push(out, c)
            i += 1
            continue
        size: int = c if type(c) is int else c["d"]  # type: ignore[index, assignment]
        if pos >= q:
            break
        if pos + size <= q:
            _push(out, c)
            pos += size
            i += 1
            continue
        k = q - pos  # q falls inside this retain or delete: split it there
        if type(c) is int:
            _push(out, size + m)  # k before, m inserted, size - k after: one retain
        else:
            _push(out, {"d": k})
            out.append(m)
            out.append({"d": size - k})
        return _finish(_rest(out, op, i + 1))
    if i == n:
        return _finish(out)  # ``q`` is past everything ``op`` does: it only retains there
    _push(out, m)
    return _finish(_rest(out, op, i))


def _past_delete(op: Op, q: int, j: int) -> Op:
    """``transform(op, [q, {"d": j}])``: ``op`` without the deleted range, in O(len(op)).

    Retains and deletes lose what falls in ``[q, q + j)``; inserts stay, those inside the
    range land at ``q``. Equal to the general walk (property).
    """
    out: Op = []
    pos = 0
    end = q + j
    for c in op:
        if type(c) is str:
            _push(out, c)
            continue
        size: int = c if type(c) is int else c["d"]  # type: ignore[index, assignment]
        cut = min(pos + size, end) - max(pos, q)
        pos += size
        keep = size - cut if cut > 0 else size
        if keep:
            _push(out, keep if type(c) is int else {"d": keep})
    return _finish(out)


def _transform_general(op: Op, other: Op, left: bool) -> Op:
    """``transform`` by walking both ops (any shape)."""
    out = _Builder()
    mine = _Reader(op)
    for c in other:
        if isinstance(c, int):
            n = c
            while n > 0:
                kind, k, s = mine.take(n, False)
                if kind == _INSERT:
                    out.insert(s)
                    continue
                if kind == _RETAIN:
                    out.retain(k)
                else:
                    out.delete(k)
                n -= k
        elif isinstance(c, str):
            if left:
                while mine.next_is_insert():
                    out.insert(mine.take(0, False)[2])
            out.retain(len(c))
        else:
            n = c["d"]
            while n > 0:
                kind, k, s = mine.take(n, False)
                if kind == _INSERT:
                    out.insert(s)
                else:
                    # Retained text is gone, and text both deleted must not be deleted twice.
                    n -= k
    mine.drain(out)
    return out.finish()


def compose(a: Op, b: Op) -> Op:
    """Return the single op equivalent to applying ``a`` and then ``b``.

    ``b`` is measured against the result of ``a``: ``apply(s, compose(a, b)) ==
    apply(apply(s, a), b)`` for every ``s`` that ``a`` fits and whose result ``b`` fits.
    Text that ``a`` inserts and ``b`` deletes vanishes from the result.
    """
    out = _Builder()
    first = _Reader(a)
    for c in b:
        if isinstance(c, int):
            n = c
            while n > 0:
                kind, k, s = first.take(n, True)
                if kind == _RETAIN:
                    out.retain(k)
                    n -= k
                elif kind == _INSERT:
                    out.insert(s)
                    n -= k
                else:
                    out.delete(k)
        elif isinstance(c, str):
            out.insert(c)
        else:
            n = c["d"]
            while n > 0:
                kind, k, _ = first.take(n, True)
                if kind == _RETAIN:
                    out.delete(k)
                    n -= k
                elif kind == _INSERT:
                    n -= k  # inserted by a, deleted by b: neither appears
                else:
                    out.delete(k)
    first.drain(out)
    return out.finish()


def transform_position(pos: int, op: Op, side: Side = "left") -> int:
    """Return where a cursor at code point ``pos`` (0 <= pos) is after ``op`` is applied.

    The cursor moves with the text around it; a cursor inside deleted text goes to where
    the deletion happened, after any text inserted in its place. For an insert exactly at
    the cursor, ``side`` decides: ``"left"`` (the default, and ShareDB text-unicode's
    ``transformPosition``) keeps the cursor before the inserted text, ``"right"`` moves it
    past. So a "left" cursor keeps the character to its left and a "right" one the
    character to its right, whenever that character survives. This equals the position
    of an insert at ``pos`` transformed by ``op`` with the same ``side``, whatever the
    order of the inserts and deletes in ``op``.
    Raises ValueError for a bad ``side``.
    """
    right = not _check_side(side)
    base = 0  # where the current component starts in the old text
    shift = 0  # new position minus old position, for text before ``base``
    for c in op:
        if isinstance(c, int):
            if pos < base + c:
                return pos + shift
            base += c
        elif isinstance(c, str):
            if pos > base or (pos == base and right):
                shift += len(c)
            else:
                return base + shift
        else:
            n = c["d"]
            if pos < base + n or (pos == base):
                return base + shift
            base += n
            shift -= n
    return pos + shift


# --- measuring ----------------------------------------------------------------------------


def base_length(op: Op) -> int:
    """Return the code points ``op`` walks over in its document (retains plus deletes).

    ``op`` fits any document at least this long.
    """
    total = 0
    for c in op:
        if isinstance(c, int):
            total += c
        elif not isinstance(c, str):
            total += c["d"]
    return total


def target_length(op: Op, length: int) -> int:
    """Return the length of a document of ``length`` code points after ``op``.

    Assumes ``op`` fits (``base_length(op) <= length``), as :func:`validate` ensures.
    """
    return length + inserted_chars(op) - deleted_chars(op)


def inserted_chars(op: Op) -> int:
    """Return how many code points ``op`` inserts."""
    total = 0
    for c in op:
        if isinstance(c, str):
            total += len(c)
    return total


def deleted_chars(op: Op) -> int:
    """Return how many code points ``op`` deletes."""
    total = 0
    for c in op:
        if not isinstance(c, int | str):
            total += c["d"]
    return total
