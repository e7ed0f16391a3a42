"""Benchmark of WebSocket frames: ``python -m ops.bench.frames [--quick] [--json OUT]``.

Two parts, both through ``schema.frames`` exactly as the gateway uses it:

1. **Codec.** ``encode`` and ``decode`` of the two frames of the hot path, in JSON (orjson)
   and msgpack, with 1, 10 and 100 ops per frame:
   - *ops out*: one ``{"t": "ops", "doc", "ops": [...]}`` message carrying K committed ops
     (what a room sends each subscriber per tick);
   - *op in*: K ``{"t": "op", "doc", "v", "op", "seq"}`` messages in one frame (what a
     client that batches its submissions sends).
2. **Broadcast.** One tick's ``ops`` message (10 ops) sent to N subscribers: encode-once
   (one shared ``Encoded``, each session taking ``get(codec)`` and assembling its frame with
   ``join``, as ``gateway.session`` does) against encoding the message again per subscriber.
   ``mixed`` is half JSON, half msgpack sessions (two encodings when shared).

Ops are typing ops (``[pos, "xxxxxxxx"]``) with the ``by``/``client``/``seq`` fields that a
WebSocket submission carries. The table reports frames/s, messages/s, ops/s and µs/frame
(broadcasts: µs per broadcast and per subscriber, and the speed-up of sharing).
"""

from __future__ import annotations

import argparse
import random
import sys
import uuid
from typing import Any

from ops.bench.harness import (
    float_in,
    load_note,
    machine_facts,
    make_console,
    num,
    output_file,
    print_table,
    time_calls,
    write_json,
)
from schema import frames
from schema.frames import Codec, Encoded

OPS_PER_FRAME = (1, 10, 100)
"""Ops in one frame, for the codec part."""
SUBSCRIBERS = (10, 100, 1000)
"""Subscribers of one document, for the broadcast part."""
BROADCAST_OPS = 10
"""Ops in the message of one broadcast tick."""
CODECS = {"json": Codec.JSON, "msgpack": Codec.MSGPACK}
"""The codecs by the name the table shows."""


def op_entry(rng: random.Random, v: int) -> dict[str, Any]:
    """One committed op as an ``ops`` message lists it (submitted over a WebSocket)."""
    return {
        "v": v,
        "op": [rng.randrange(100_000), "xxxxxxxx"],
        "by": f"user-{rng.randrange(200)}",
        "client": f"c-{rng.getrandbits(64):016x}",
        "seq": rng.randrange(1_000_000),
    }


def ops_out_frame(k: int, rng: random.Random) -> list[dict[str, Any]]:
    """A server-to-client frame: one ``ops`` message with ``k`` ops."""
    doc = str(uuid.UUID(int=rng.getrandbits(128)))
    base = rng.randrange(1, 1_000_000)
    return [{"t": "ops", "doc": doc, "ops": [op_entry(rng, base + i) for i in range(k)]}]


def op_in_frame(k: int, rng: random.Random) -> list[dict[str, Any]]:
    """A client-to-server frame: ``k`` ``op`` submissions on one document."""
    doc = str(uuid.UUID(int=rng.getrandbits(128)))
    base = rng.randrange(1, 1_000_000)
    return [
        {"t": "op", "doc": doc, "v": base + i, "op": [rng.randrange(100_000), "xxxxxxxx"],
         "seq": base + i}
        for i in range(k)
    ]


def codec_rows(seconds: float, seed: int) -> list[dict[str, Any]]:
    """Time encode and decode of both frame kinds, every codec and frame size."""
    rng = random.Random(seed)
    rows: list[dict[str, Any]] = []
    for kind, make in (("ops out", ops_out_frame), ("op in", op_in_frame)):
        for k in OPS_PER_FRAME:
            msgs = make(k, rng)
            n_msgs = len(msgs)
            for cname, codec in CODECS.items():
                data = frames.encode(msgs, codec)
                assert frames.decode(data, codec) == msgs
                for action, fn in (
                    ("encode", lambda _i, m=msgs, c=codec: frames.encode(m, c)),
                    ("decode", lambda _i, d=data, c=codec: frames.decode(d, c)),
                ):
                    calls, elapsed = time_calls(fn, seconds)
                    fps = calls / elapsed
                    rows.append({
                        "frame": kind, "action": action, "codec": cname, "ops_per_frame": k,
                        "messages_per_frame": n_msgs, "bytes": len(data),
                        "frames_s": round(fps, 1), "messages_s": round(fps * n_msgs, 1),
                        "ops_s": round(fps * k, 1), "us_per_frame": round(1e6 / fps, 3),
                    })
    return rows


def _codecs_of(mix: str, n: int) -> list[Codec]:
    if mix == "mixed":
        return [Codec.JSON if i % 2 else Codec.MSGPACK for i in range(n)]
    return [CODECS[mix]] * n


def broadcast_rows(seconds: float, seed: int) -> list[dict[str, Any]]:
    """Time one tick's broadcast to N subscribers, shared encoding against per subscriber."""
    rng = random.Random(seed + 1)
    msg = ops_out_frame(BROADCAST_OPS, rng)[0]
    rows: list[dict[str, Any]] = []
    for n in SUBSCRIBERS:
        for mix in ("json", "msgpack", "mixed"):
            codecs = _codecs_of(mix, n)

            def shared(_i: int, codecs: list[Codec] = codecs) -> int:
                enc = Encoded(msg)  # built once per tick by the room
                size = 0
                for c in codecs:  # each session: deliver() then its writer's join()
                    size += len(frames.join([enc.get(c)], c))
                return size

            def per_subscriber(_i: int, codecs: list[Codec] = codecs) -> int:
                size = 0
                for c in codecs:
                    size += len(frames.join([Encoded(msg).get(c)], c))
                return size

            assert shared(0) == per_subscriber(0)
            once_calls, once_t = time_calls(shared, seconds)
            each_calls, each_t = time_calls(per_subscriber, seconds)
            once_us = once_t / once_calls * 1e6
            each_us = each_t / each_calls * 1e6
            rows.append({
                "subscribers": n, "codecs": mix, "ops_per_message": BROADCAST_OPS,
                "encode_once_broadcasts_s": round(1e6 / once_us, 1),
                "encode_once_us": round(once_us, 2),
                "encode_once_us_per_subscriber": round(once_us / n, 3),
                "per_subscriber_broadcasts_s": round(1e6 / each_us, 1),
                "per_subscriber_us": round(each_us, 2),
                "per_subscriber_us_per_subscriber": round(each_us / n, 3),
                "speedup": round(each_us / once_us, 2),
            })
    return rows


def main(argv: list[str] | None = None) -> int:
    """Parse arguments, run both parts, print the tables (and write JSON when asked)."""
    parser = argparse.ArgumentParser(
        prog="python -m ops.bench.frames", description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--seconds", type=float_in(0, 86_400), default=0.5, help="time per case")
    parser.add_argument("--quick", action="store_true", help="0.02 s per case (a smoke run)")
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--json", dest="json_out", type=output_file, metavar="OUT")
    args = parser.parse_args(argv)
    seconds = 0.02 if args.quick else args.seconds
    if seconds <= 0:
        parser.error("--seconds must be > 0")
    facts = machine_facts()
    console = make_console()
    codec = codec_rows(seconds, args.seed)
    print_table(
        f"schema.frames encode/decode ({load_note(facts)})",
        ["frame", "action", "codec", "ops/frame", "bytes", "frames/s", "msgs/s", "ops/s",
         "µs/frame"],
        [[r["frame"], r["action"], r["codec"], str(r["ops_per_frame"]), num(r["bytes"]),
          num(r["frames_s"]), num(r["messages_s"]), num(r["ops_s"]), num(r["us_per_frame"], 2)]
         for r in codec],
        console,
    )
    bcast = broadcast_rows(seconds, args.seed)
    print_table(
        f"broadcast of one {BROADCAST_OPS}-op 'ops' message to N subscribers",
        ["subscribers", "codecs", "once: bcast/s", "once: µs", "once: µs/sub",
         "per-sub: bcast/s", "per-sub: µs", "per-sub: µs/sub", "speed-up"],
        [[num(r["subscribers"]), r["codecs"], num(r["encode_once_broadcasts_s"]),
          num(r["encode_once_us"], 1), num(r["encode_once_us_per_subscriber"], 3),
          num(r["per_subscriber_broadcasts_s"]), num(r["per_subscriber_us"], 1),
          num(r["per_subscriber_us_per_subscriber"], 3), f"{r['speedup']:.1f}x"]
         for r in bcast],
        console,
    )
    if args.json_out is not None:
        report = {"benchmark": "frames", "seconds_per_case": seconds, "machine": facts,
                  "codec": codec, "broadcast": bcast}
        if not write_json(args.json_out, report, parser.prog):
            return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
