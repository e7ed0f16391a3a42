"""Benchmark of the OT type on large documents: ``python -m ops.bench.ot``.

Times ``domain.ot`` apply, transform, compose, validate and transform_position on a 1 MB
text (``--size``) with two kinds of op: a *typing* op (one short insert or delete at a random
place, what an editor sends) and a *scattered* op (``--edits`` short edits spread over the
whole text, what a paste, a find-and-replace or a long offline session produces). Each case
runs for ``--seconds`` over pre-built random inputs; the table reports ops/s and µs per op.
``--json OUT`` writes the same figures.
"""

from __future__ import annotations

import argparse
import os
import platform
import random
import sys
from collections.abc import Callable
from typing import Any

from rich.console import Console
from rich.table import Table

from domain import ot
from ops.bench.harness import output_file, time_calls, write_json

INPUTS = 64
"""Distinct random inputs per case, cycled through while timing."""


def random_text(size: int, rng: random.Random) -> str:
    """ASCII text of ``size`` code points: words of lowercase letters and spaces."""
    letters = "abcdefghijklmnopqrstuvwxyz     "
    return "".join(rng.choices(letters, k=size))


def typing_op(length: int, rng: random.Random) -> ot.Op:
    """One insert (3 in 4) or delete of 1-8 code points at a random position."""
    if length > 8 and rng.random() < 0.25:
        n = rng.randint(1, 8)
        pos = rng.randrange(length - n + 1)
        return ot.normalize([pos, {"d": n}])
    pos = rng.randrange(length + 1)
    return ot.normalize([pos, "x" * rng.randint(1, 8)])


def scattered_op(length: int, edits: int, rng: random.Random) -> ot.Op:
    """``edits`` short inserts and deletes at distinct random places over the whole text."""
    gap = max(1, length // max(1, edits))
    op: ot.Op = []
    pos = 0
    for _ in range(edits):
        step = rng.randrange(gap)
        if pos + step >= length:
            break
        if step:
            op.append(step)
            pos += step
        if rng.random() < 0.5 and pos + 8 < length:
            n = rng.randint(1, 8)
            op.append({"d": n})
            pos += n
        else:
            op.append("y" * rng.randint(1, 8))
    return ot.normalize(op)


def cases(size: int, edits: int, seed: int) -> list[tuple[str, Callable[[int], object]]]:
    """The benchmark cases, each a name and a function of the iteration number."""
    rng = random.Random(seed)
    text = random_text(size, rng)
    n = len(text)
    typing = [typing_op(n, rng) for _ in range(INPUTS)]
    typing_b = [typing_op(n, rng) for _ in range(INPUTS)]
    scattered = [scattered_op(n, edits, rng) for _ in range(INPUTS // 8)]
    scattered_b = [scattered_op(n, edits, rng) for _ in range(INPUTS // 8)]
    after_typing = [typing_op(ot.target_length(op, n), rng) for op in typing]
    after_scattered = [scattered_op(ot.target_length(op, n), edits, rng) for op in scattered]
    positions = [rng.randrange(n + 1) for _ in range(INPUTS)]
    k, ks = INPUTS, len(scattered)
    chunks = ot.chunks_of(text)
    return [
        ("apply · typing op", lambda i: ot.apply(text, typing[i % k])),
        ("apply · scattered op", lambda i: ot.apply(text, scattered[i % ks])),
        ("apply_chunks · typing op (a Document's edit)",
         lambda i: ot.apply_chunks(chunks, n, typing[i % k])),
        ("apply_chunks · scattered op", lambda i: ot.apply_chunks(chunks, n, scattered[i % ks])),
        ("validate · scattered op", lambda i: ot.validate(scattered[i % ks], n)),
        (
            "transform · typing vs typing",
            lambda i: ot.transform(typing[i % k], typing_b[i % k], "left"),
        ),
        (
            "transform · typing vs scattered",
            lambda i: ot.transform(typing[i % k], scattered[i % ks], "left"),
        ),
        (
            "transform · scattered vs typing",
            lambda i: ot.transform(scattered[i % ks], typing[i % k], "left"),
        ),
        (
            "transform · scattered vs scattered",
            lambda i: ot.transform(scattered[i % ks], scattered_b[i % ks], "right"),
        ),
        ("compose · typing then typing", lambda i: ot.compose(typing[i % k], after_typing[i % k])),
        (
            "compose · scattered then scattered",
            lambda i: ot.compose(scattered[i % ks], after_scattered[i % ks]),
        ),
        (
            "transform_position · scattered op",
            lambda i: ot.transform_position(positions[i % k], scattered[i % ks]),
        ),
    ]


def run(size: int, edits: int, seconds: float, seed: int) -> list[dict[str, Any]]:
    """Time every case; one row per case with ops/s and µs/op."""
    rows = []
    for name, fn in cases(size, edits, seed):
        fn(0)  # warm up (and fail fast on a broken case)
        calls, elapsed = time_calls(fn, seconds)
        rows.append(
            {
                "case": name,
                "ops_s": round(calls / elapsed, 1),
                "us_per_op": round(elapsed / calls * 1e6, 2),
                "calls": calls,
            }
        )
    return rows


def main(argv: list[str] | None = None) -> int:
    """Parse arguments, run, print the table (and write JSON when asked)."""
    parser = argparse.ArgumentParser(prog="python -m ops.bench.ot", description=__doc__)
    parser.add_argument("--size", type=int, default=1_000_000, help="text size in code points")
    parser.add_argument("--edits", type=int, default=1000, help="edits in a scattered op")
    parser.add_argument("--seconds", type=float, default=0.5, help="time per case")
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--json", dest="json_out", type=output_file, metavar="OUT")
    args = parser.parse_args(argv)
    if args.size < 16 or args.edits < 1 or args.seconds <= 0:
        parser.error("--size >= 16, --edits >= 1 and --seconds > 0, please")
    rows = run(args.size, args.edits, args.seconds, args.seed)
    table = Table(
        title=f"domain.ot on a {args.size:,}-code-point text "
        f"(scattered ops: {args.edits:,} edits; Python {platform.python_version()})",
        title_justify="left",
    )
    table.add_column("case")
    table.add_column("ops/s", justify="right")
    table.add_column("µs/op", justify="right")
    for r in rows:
        table.add_row(r["case"], f"{r['ops_s']:,.0f}", f"{r['us_per_op']:,.2f}")
    Console().print(table)
    if args.json_out is not None:
        report = {
            "benchmark": "ot",
            "size": args.size,
            "edits": args.edits,
            "seconds_per_case": args.seconds,
            "python": platform.python_version(),
            "cpus": os.cpu_count(),
            "load_avg": [round(x, 2) for x in os.getloadavg()],
            "cases": rows,
        }
        if not write_json(args.json_out, report, parser.prog):
            return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
