"""The floor of fan-out: what one socket write to a subscriber costs the sending process.

A commit tick ends in one write per subscriber of each document that changed (the frame is
built once and shared, see ``frames.py``); what is left per subscriber is the write itself,
a system call that on loopback also runs the receiving side's TCP work. This benchmark
opens ``--sockets`` TCP connections to a reader in another process (which only drains
them) and writes ``--size``-byte frames to each, round after round, on uvloop as the gateway
does; it reports the sender's user and system CPU per write.

Server CPU per op of a broadcast is at least ``subscribers x this / ops per write``: with
20 editors per document and one op per tick, 19 writes per op.

    python -m ops.bench.fanout [--sockets 20] [--rounds 5000] [--size 150] [--json OUT]
"""

from __future__ import annotations

import argparse
import asyncio
import multiprocessing
import resource
import time
from typing import Any

from ops.bench import harness


def _drain_all(port: int, sockets: int) -> None:
    """The reader process: connect ``sockets`` times and read until the sender closes."""
    async def main() -> None:
        conns = [await asyncio.open_connection("127.0.0.1", port) for _ in range(sockets)]

        async def drain(reader: asyncio.StreamReader) -> None:
            while await reader.read(1 << 16):
                pass

        await asyncio.gather(*(drain(r) for r, _ in conns))

    _run(main())


def _run(coro: Any) -> Any:
    try:
        import uvloop
    except ImportError:
        return asyncio.run(coro)
    return uvloop.run(coro)


async def _measure(args: argparse.Namespace) -> dict[str, float]:
    writers: list[asyncio.StreamWriter] = []
    ready = asyncio.Event()

    def accepted(_: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
        writers.append(w)
        if len(writers) == args.sockets:
            ready.set()

    server = await asyncio.start_server(accepted, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    reader = multiprocessing.get_context("spawn").Process(
        target=_drain_all, args=(port, args.sockets), daemon=True
    )
    reader.start()
    try:
        await asyncio.wait_for(ready.wait(), 30)
        data = b"x" * args.size
        transports = [w.transport for w in writers]
        r0, t0 = resource.getrusage(resource.RUSAGE_SELF), time.perf_counter()
        for _ in range(args.rounds):
            for t in transports:
                t.write(data)
            await asyncio.sleep(0)  # one loop turn per round, as one commit tick
        r1, t1 = resource.getrusage(resource.RUSAGE_SELF), time.perf_counter()
    finally:
        for w in writers:
            w.close()
        server.close()
        reader.join(5)
        if reader.is_alive():
            reader.terminate()
    n = args.rounds * args.sockets
    return {
        "writes": n,
        "user_us_per_write": round(1e6 * (r1.ru_utime - r0.ru_utime) / n, 2),
        "sys_us_per_write": round(1e6 * (r1.ru_stime - r0.ru_stime) / n, 2),
        "wall_us_per_write": round(1e6 * (t1 - t0) / n, 2),
    }


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m ops.bench.fanout", description=__doc__)
    p.add_argument("--sockets", type=harness.int_at_least(1), default=20)
    p.add_argument("--rounds", type=harness.int_at_least(1), default=5000)
    p.add_argument("--size", type=harness.int_at_least(1), default=150, help="bytes per write")
    p.add_argument("--json", type=harness.output_file)
    args = p.parse_args(argv)
    facts = harness.machine_facts()
    result = _run(_measure(args))
    cpu = result["user_us_per_write"] + result["sys_us_per_write"]
    harness.print_table(
        f"{args.sockets} sockets, {args.size}-byte writes · {harness.load_note(facts)}",
        ["writes", "user µs/write", "sys µs/write", "CPU µs/write", "wall µs/write"],
        [[harness.num(result["writes"]), harness.num(result["user_us_per_write"], 2),
          harness.num(result["sys_us_per_write"], 2), harness.num(cpu, 2),
          harness.num(result["wall_us_per_write"], 2)]],
        harness.make_console(),
    )
    report = {"bench": "fanout", "machine": facts,
              "params": vars(args) | {"json": str(args.json)}, "result": result}
    return 1 if args.json and not harness.write_json(args.json, report, p.prog) else 0


if __name__ == "__main__":
    raise SystemExit(main())
