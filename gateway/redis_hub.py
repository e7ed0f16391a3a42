"""The Redis hub: pub/sub fan-out across gateway processes, presence with liveness.

Keys and channels (all under ``prefix``, default ``coscribe:``):

- ``{prefix}d:{doc}``: channel per document; messages of ``gateway.hub``'s wire format.
- ``{prefix}ctl``: control channel; ``{"k": "r", "p": PROC}`` asks every process to re-read
  the store for its open rooms (sent by a process after its Redis connection came back, as
  it may have failed to publish meanwhile).
- ``{prefix}p:{doc}``: hash ``session -> msgpack [user, data, proc]`` of presence.
- ``{prefix}proc:{proc}``: liveness of a process, refreshed every ``HEARTBEAT`` seconds with a
  TTL of ``PROC_TTL``. Presence of a process whose key expired is dead (process death). A
  process that finds its own key gone (it was stopped that long, or Redis lost its keys)
  resyncs as after a reconnect: the others cleared its presence.

Everything queued in one loop turn goes out together: the publishes as one write on the
publisher's own connection, presence writes as one redis-py pipeline. The subscriber and the
publisher speak RESP directly (``gateway.resp``: redis-py costs 45-63 µs of CPU per message
on that path); everything else goes through redis-py. Redis down: publishes are dropped
(rooms fill gaps from the store later), ``healthy`` is False (``/readyz``), and the reader
reconnects with exponential backoff, then triggers a resync everywhere. Presence writes
that could not be made are remembered by document, and ``reset_presence`` (part of every
resync) makes the hashes and the other processes' view of this process's sessions right.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from typing import Any
from uuid import UUID

import redis.asyncio as aioredis
from redis.exceptions import RedisError

from gateway import resp
from gateway.hub import OnMessage, OnResync, PresenceTables, new_proc_id, pack, unpack

log = logging.getLogger(__name__)

HEARTBEAT = 3.0
"""Seconds between liveness refreshes."""
PROC_TTL = 10
"""Seconds after which a silent process counts as dead (its presence is cleared)."""
SEND_TIMEOUT = 5.0
"""Longest wait for the publisher's send buffer to drain (redis-py's socket timeout here)."""
PRESENCE_KEY_TTL = 3600
"""A presence hash nobody touched for this long is removed by Redis."""


class RedisHub:
    """A hub over one Redis server (or a proxy/cluster front with pub/sub)."""

    def __init__(self, url: str, prefix: str = "coscribe:") -> None:
        self.url = url
        self.prefix = prefix
        self.proc = new_proc_id()
        self.healthy = False
        self.client = aioredis.Redis.from_url(
            url, socket_connect_timeout=2, socket_timeout=5, retry_on_timeout=False
        )
        self._ctl = f"{prefix}ctl"
        self._watched: set[UUID] = set()
        self._sub: resp.Connection | None = None
        self._pub: resp.Connection | None = None
        self._pub_task: asyncio.Task[None] | None = None
        self._confirm: dict[str, asyncio.Future[None]] = {}
        self._outbox: list[tuple[str, Any]] = []
        self._flushing = False
        self._tasks: list[asyncio.Task[None]] = []
        self._on_message: OnMessage | None = None
        self._on_resync: OnResync | None = None
        self.published = 0
        self.publish_failures = 0
        self._presence_lost: set[UUID] = set()
        """Documents whose presence hash writes were dropped (Redis down): reset them."""
        self._resets: set[asyncio.Task[None]] = set()
        self._touched: set[tuple[str, str]] = set()
        """(hash, session) written while a reset reads the hashes: the reset leaves them."""

    def channel(self, doc: UUID) -> str:
        """The channel of a document."""
        return f"{self.prefix}d:{doc}"

    # -- lifecycle -----------------------------------------------------------------------

    async def start(self, on_message: OnMessage, on_resync: OnResync) -> None:
        """Start the reader and the heartbeat; returns at once (connects in the background)."""
        self._on_message = on_message
        self._on_resync = on_resync
        self._up = asyncio.Event()
        loop = asyncio.get_running_loop()
        self._tasks = [loop.create_task(self._read_forever()), loop.create_task(self._beat())]
        with contextlib.suppress(TimeoutError):  # asyncio.timeout: see resp.Connection.open
            async with asyncio.timeout(3):
                await self._up.wait()

    def _set_healthy(self, flag: bool) -> None:
        self.healthy = flag
        if flag:
            self._up.set()
        else:
            self._up.clear()

    async def close(self) -> None:
        """Stop tasks, clear our liveness key, disconnect."""
        tasks = [*self._tasks, *self._resets]
        for task in tasks:
            task.cancel()
        for task in tasks:
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await task
        self._drop_publisher()
        with contextlib.suppress(RedisError, OSError):
            await self.client.delete(f"{self.prefix}proc:{self.proc}")
        with contextlib.suppress(Exception):
            await self.client.aclose()

    # -- subscriptions -------------------------------------------------------------------

    async def watch(self, doc: UUID) -> None:
        """Subscribe to ``doc`` and wait (briefly) until Redis confirmed it."""
        self._watched.add(doc)
        sub = self._sub
        if sub is None or not self.healthy:
            return  # the reader subscribes to every watched doc when it reconnects
        name = self.channel(doc)
        fut = self._confirm.get(name)
        if fut is None:
            fut = self._confirm[name] = asyncio.get_running_loop().create_future()
            sub.send(resp.command("SUBSCRIBE", name))
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(2):
                await asyncio.shield(fut)

    def unwatch(self, doc: UUID) -> None:
        """Unsubscribe from ``doc``."""
        self._watched.discard(doc)
        sub = self._sub
        if sub is not None and self.healthy:
            sub.send(resp.command("UNSUBSCRIBE", self.channel(doc)))

    async def _read_forever(self) -> None:
        backoff = 0.05
        first = True
        while True:
            sub: resp.Connection | None = None
            try:
                sub = await resp.Connection.open(self.url)
                sub.send(resp.command("SUBSCRIBE", self._ctl,
                                      *[self.channel(d) for d in self._watched]))
                self._sub = sub
                await self._heartbeat_once()
                self._set_healthy(True)
                backoff = 0.05
                if not first:
                    log.warning("redis hub reconnected; resyncing rooms")
                    self.publish_raw(self._ctl, pack({"k": "r", "p": self.proc}))
                    if self._on_resync is not None:
                        self._on_resync()
                first = False
                await self._read(sub)
            except asyncio.CancelledError:
                if sub is not None:
                    sub.close()
                raise
            except (RedisError, OSError, resp.RespError, TimeoutError) as exc:
                if self.healthy:
                    log.warning("redis hub lost its connection: %s", exc)
                self._set_healthy(False)
                self._sub = None
                for fut in self._confirm.values():
                    if not fut.done():
                        fut.set_result(None)
                self._confirm.clear()
                if sub is not None:
                    sub.close()
                await asyncio.sleep(backoff)
                backoff = min(backoff * 2, 2.0)

    async def _read(self, sub: resp.Connection) -> None:
        """Dispatch what the subscription receives: every message of a read in one go."""
        prefix = f"{self.prefix}d:".encode()
        ctl = self._ctl.encode()
        while True:
            for reply in await sub.read():
                if isinstance(reply, resp.RespError):
                    raise reply
                if not isinstance(reply, list) or len(reply) != 3:
                    continue
                kind, channel, data = reply
                if kind == b"message":
                    self._dispatch(channel, data, prefix, ctl)
                elif kind == b"subscribe":
                    fut = self._confirm.pop(channel.decode(), None)
                    if fut is not None and not fut.done():
                        fut.set_result(None)

    def _dispatch(self, channel: bytes, data: bytes, prefix: bytes, ctl: bytes) -> None:
        try:
            payload = unpack(data)
        except Exception:
            log.warning("dropped an undecodable hub message on %r", channel)
            return
        if payload.get("p") == self.proc:
            return
        if channel == ctl:
            if payload.get("k") == "r" and self._on_resync is not None:
                self._on_resync()
            return
        if not channel.startswith(prefix):
            return
        try:
            doc_id = UUID(channel[len(prefix):].decode())
        except ValueError:
            return
        if self._on_message is not None and doc_id in self._watched:
            self._on_message(doc_id, payload)

    # -- publishing (batched per loop turn) ------------------------------------------------

    def publish(self, doc: UUID, msg: dict[str, Any]) -> None:
        """Queue a message for the document's channel."""
        self.publish_raw(self.channel(doc), pack(msg))

    def publish_raw(self, channel: str, data: bytes) -> None:
        """Queue raw bytes for a channel."""
        self._outbox.append(("publish", (channel, data)))
        self._schedule()

    def set_presence(self, doc: UUID, session: str, entry: list[Any] | None) -> None:
        """Queue the presence hash write (or delete) for ``session``."""
        key = f"{self.prefix}p:{doc}"
        if self._resets:  # a reset is reading the hashes
            self._touched.add((key, session))
        if entry is None:
            self._outbox.append(("hdel", (key, session)))
        else:
            self._outbox.append(("hset", (key, session, pack({"e": entry}))))
        self._schedule()

    def _schedule(self) -> None:
        if not self._flushing:
            self._flushing = True
            asyncio.get_running_loop().call_soon(self._start_flush)

    def _start_flush(self) -> None:
        pub = self._pub
        if (
            pub is not None
            and self.healthy
            and not pub.backlogged()
            and all(op == "publish" for op, _ in self._outbox)
        ):
            # The common turn: publishes only, on an open connection that keeps up. Written
            # here, at the end of this loop turn, not by a task one turn later.
            batch, self._outbox = self._outbox, []
            pub.send(b"".join([resp.command("PUBLISH", *args) for _, args in batch]))
            self.published += len(batch)
            self._flushing = False
            return
        task = asyncio.get_running_loop().create_task(self._flush())
        task.add_done_callback(lambda t: t.cancelled() or t.exception())

    async def _flush(self) -> None:
        try:
            while self._outbox:
                batch, self._outbox = self._outbox, []
                if not self.healthy:
                    self.publish_failures += len(batch)
                    self._lose_presence(batch)
                    continue
                publishes = [resp.command("PUBLISH", *args) for op, args in batch
                             if op == "publish"]
                others = [(op, args) for op, args in batch if op != "publish"]
                if publishes:
                    await self._publish(publishes)
                if others:
                    await self._write_presence(others)
        finally:
            self._flushing = False

    async def _publish(self, commands: list[bytes]) -> None:
        """One write of the batch's PUBLISH commands; their replies are only counted."""
        try:
            pub = self._pub
            if pub is None:
                pub = self._pub = await resp.Connection.open(self.url)
                self._pub_task = asyncio.get_running_loop().create_task(self._replies(pub))
            pub.send(b"".join(commands))
            # A server that stopped reading (stalled, not gone) must not hold the outbox
            # forever: after SEND_TIMEOUT the connection is dropped and remade.
            async with asyncio.timeout(SEND_TIMEOUT):
                await pub.drain()
            self.published += len(commands)
        except (OSError, resp.RespError, TimeoutError) as exc:
            self.publish_failures += len(commands)
            log.warning("redis publish failed (%d dropped): %s", len(commands), exc)
            self._drop_publisher()

    async def _replies(self, pub: resp.Connection) -> None:
        """Read the publisher's replies (receiver counts); an error reply is logged."""
        try:
            while True:
                for reply in await pub.read():
                    if isinstance(reply, resp.RespError):
                        log.warning("redis refused a publish: %s", reply)
        except (OSError, resp.RespError) as exc:
            log.info("redis publisher connection lost: %s", exc)
        if self._pub is pub:
            self._drop_publisher()

    def _drop_publisher(self) -> None:
        pub, self._pub = self._pub, None
        task, self._pub_task = self._pub_task, None
        if task is not None and task is not asyncio.current_task():
            task.cancel()
        if pub is not None:
            pub.close()

    async def _write_presence(self, batch: list[tuple[str, Any]]) -> None:
        pipe = self.client.pipeline(transaction=False)
        for op, args in batch:
            if op == "hset":
                pipe.hset(args[0], args[1], args[2])
                pipe.expire(args[0], PRESENCE_KEY_TTL)
            else:
                pipe.hdel(*args)
        try:
            await pipe.execute()
            self.published += len(batch)
        except (RedisError, OSError) as exc:
            self.publish_failures += len(batch)
            self._lose_presence(batch)
            log.warning("redis presence write failed (%d dropped): %s", len(batch), exc)

    def _lose_presence(self, batch: list[tuple[str, Any]]) -> None:
        for op, args in batch:
            if op != "publish":
                with contextlib.suppress(ValueError):
                    self._presence_lost.add(UUID(args[0].rsplit(":", 1)[1]))

    def reset_presence(self, tables: PresenceTables) -> None:
        """Publish each document's ``P`` message and make its hash hold exactly the entries
        of this process ``tables()`` gives (documents whose writes were lost: none); once
        the hashes are written, publish ``P`` again, from ``tables()`` then: a room opened
        elsewhere while they were written (it read a hash not yet right) is told too."""
        now = self._with_lost(tables())
        self._presence_lost.clear()
        self._publish_all(now)
        if now:
            task = asyncio.get_running_loop().create_task(self._reset_hashes(now, tables))
            self._resets.add(task)
            task.add_done_callback(self._reset_done)

    def _with_lost(self, tables: dict[UUID, dict[str, list[Any]]]) -> dict[UUID, Any]:
        out = dict(tables)
        for doc in self._presence_lost:
            out.setdefault(doc, {})
        return out

    def _publish_all(self, tables: dict[UUID, dict[str, list[Any]]]) -> None:
        for doc, entries in tables.items():
            self.publish(doc, {"k": "P", "p": self.proc, "all": entries})

    def _reset_done(self, task: asyncio.Task[None]) -> None:
        self._resets.discard(task)
        if not self._resets:
            self._touched.clear()

    async def _reset_hashes(
        self, tables: dict[UUID, dict[str, list[Any]]], again: PresenceTables
    ) -> None:
        docs = list(tables)
        keys = [f"{self.prefix}p:{doc}" for doc in docs]
        try:
            read = self.client.pipeline(transaction=False)
            for key in keys:
                read.hgetall(key)
            hashes = await read.execute()
            write = self.client.pipeline(transaction=False)
            for doc, key, held in zip(docs, keys, hashes, strict=True):
                entries = tables[doc]
                for field, value in held.items():
                    sid = field.decode()
                    with contextlib.suppress(Exception):
                        if (unpack(value)["e"][2] == self.proc and sid not in entries
                                and (key, sid) not in self._touched):
                            write.hdel(key, sid)
                for sid, (user, data) in entries.items():
                    if (key, sid) not in self._touched:
                        write.hset(key, sid, pack({"e": [user, data, self.proc]}))
                if entries:
                    write.expire(key, PRESENCE_KEY_TTL)
            await write.execute()
        except (RedisError, OSError) as exc:
            self._presence_lost.update(docs)
            log.warning("redis presence reset failed (%d documents): %s", len(docs), exc)
            return
        fresh = again()
        self._publish_all({doc: fresh.get(doc, {}) for doc in {*docs, *fresh}})

    # -- presence and liveness -----------------------------------------------------------

    async def _heartbeat_once(self) -> bool:
        """Refresh the liveness key; whether it was still there (one round trip; only this
        process writes the key, so nothing comes between the two commands)."""
        key = f"{self.prefix}proc:{self.proc}"
        pipe = self.client.pipeline(transaction=False)
        pipe.exists(key)
        pipe.set(key, b"1", ex=PROC_TTL)
        existed, _ = await pipe.execute()
        return bool(existed)

    async def _beat(self) -> None:
        while True:
            await asyncio.sleep(HEARTBEAT)
            if not self.healthy:
                continue
            try:
                alive = await self._heartbeat_once()
            except (RedisError, OSError):
                continue
            if not alive and self.healthy and self._on_resync is not None:
                # Stopped for longer than the TTL, or Redis lost its keys: the others took
                # this process for dead and cleared its presence.
                log.warning("redis hub: this process's liveness key had expired; resyncing")
                self._on_resync()

    async def live_procs(self, procs: set[str]) -> set[str]:
        """Which of ``procs`` still have a liveness key (all of them if Redis is down)."""
        if not procs or not self.healthy:
            return set(procs)
        order = sorted(procs)
        try:
            flags = await self.client.mget([f"{self.prefix}proc:{p}" for p in order])
        except (RedisError, OSError):
            return set(procs)
        return {p for p, f in zip(order, flags, strict=True) if f is not None}

    async def presence_of(self, doc: UUID) -> dict[str, list[Any]]:
        """Presence of live sessions of other processes on ``doc``."""
        if not self.healthy:
            return {}
        key = f"{self.prefix}p:{doc}"
        try:
            raw = await self.client.hgetall(key)
        except (RedisError, OSError):
            return {}
        entries: dict[str, list[Any]] = {}
        for field, value in raw.items():
            with contextlib.suppress(Exception):
                entry = unpack(value)["e"]
                if entry[2] != self.proc:
                    entries[field.decode()] = entry
        live = await self.live_procs({e[2] for e in entries.values()})
        dead = [s for s, e in entries.items() if e[2] not in live]
        if dead:
            with contextlib.suppress(RedisError, OSError):
                await self.client.hdel(key, *dead)
        return {s: e for s, e in entries.items() if e[2] in live}
