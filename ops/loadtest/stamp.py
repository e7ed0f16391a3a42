"""Latency stamps: the text a load-test writer inserts says when it was typed.

Every edit a writer makes inserts exactly one stamp, ``"[" + 6 base-32 digits + "]"`` (8 code
points), where the digits are the wall-clock time of the edit (``time.time_ns()``) in units of
10 µs, modulo 32**6 (about 2.98 hours). Any receiver, in any load process on this machine,
reads the stamps out of the inserts of the ops it receives and subtracts them from its own
``time.time_ns()``: one clock, and no bookkeeping shared between processes.

Why it stays readable through OT: stamps only ever meet other stamps (documents start without
brackets, writers insert nothing else, and the tool never deletes into text still buffered).
Transforms keep an op's inserts whole; composing buffered edits can put one stamp inside
another (``"[ab" + "[cdefgh]" + "cdef]"``), and random inserts do the same in the document.
Insertions nest but never cross, so a bracket-matching parser recovers every stamp from an op
or from the final text: that is how lost ops are counted.

Ages are exact to 10 µs and unambiguous up to the modulus; an age over an hour can only come
from a clock step backwards and is reported as such by :func:`age_ns` returning -1.
"""

from __future__ import annotations

import re
from collections.abc import Iterable

ALPHABET = "0123456789abcdefghijklmnopqrstuv"
"""The digits of a stamp, in the order ``int(s, 32)`` reads them."""
DIGITS = 6
"""Digits per stamp."""
UNIT_NS = 10_000
"""One unit of a stamp: 10 µs."""
MODULUS = 32**DIGITS
"""Stamps count units modulo this (2**30 units, about 2.98 hours)."""
OPEN = "["
CLOSE = "]"
WIDTH = DIGITS + 2
"""Code points one stamp inserts."""
MAX_AGE_NS = 3600 * 1_000_000_000
"""Older than this means the clock went backwards: see :func:`age_ns`."""

_PAIRS = tuple(a + b for a in ALPHABET for b in ALPHABET)  # 1024 two-digit strings
_MASK = MODULUS - 1
_STAMP = re.compile(r"\[([0-9a-v]{6})\]")


def encode(t_ns: int) -> str:
    """The stamp for the wall-clock time ``t_ns`` (nanoseconds since the epoch)."""
    u = (t_ns // UNIT_NS) & _MASK
    return OPEN + _PAIRS[u >> 20] + _PAIRS[(u >> 10) & 1023] + _PAIRS[u & 1023] + CLOSE


def units(digits: str) -> int:
    """The time of a stamp's digits (as :func:`find` returns them), in units modulo MODULUS."""
    return int(digits, 32)


def age_ns(digits: str, now_ns: int) -> int:
    """How long before ``now_ns`` the stamp was made, in ns (a multiple of 10 µs).

    Returns -1 when the stamp appears to be in the future or over an hour old: the wall clock
    stepped backwards between the two readings, so the sample must be dropped.
    """
    age = ((now_ns // UNIT_NS - int(digits, 32)) & _MASK) * UNIT_NS
    return age if age <= MAX_AGE_NS else -1


def find(text: str) -> list[str]:
    """The digit strings of every stamp in ``text``, nested ones included, in no set order.

    Text outside stamps, unmatched brackets and bracketed runs that are not exactly six
    digits once inner stamps are taken out are ignored.
    """
    found = _STAMP.findall(text)
    opens = text.count(OPEN)
    if opens == len(found) and text.count(CLOSE) == opens:
        return found  # the common case: stamps side by side, none split
    return _find_nested(text)


def _find_nested(text: str) -> list[str]:
    found: list[str] = []
    stack: list[list[str]] = []
    # Only brackets and the characters inside a stamp matter; jump between them.
    for m in re.finditer(r"[\[\]]|[^\[\]]+", text):
        piece = m.group()
        if piece == OPEN:
            stack.append([])
        elif piece == CLOSE:
            if stack:
                digits = "".join(stack.pop())
                if len(digits) == DIGITS and _STAMP.fullmatch(OPEN + digits + CLOSE):
                    found.append(digits)
        elif stack:
            stack[-1].append(piece)
    return found


def in_op(op: Iterable[object]) -> list[str]:
    """The digit strings of the stamps an op's inserts carry (see :func:`find`)."""
    inserts = [c for c in op if type(c) is str]
    if not inserts:
        return []
    return find(inserts[0] if len(inserts) == 1 else "".join(inserts))
