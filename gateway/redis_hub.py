"""The Redis hub: pub/sub fan-out across gateway processes, presence with liveness.

Keys and channels (all under ``prefix``, default ``coscribe:``):

- ``{prefix}d:{doc}``: channel per document; messages of ``gateway.hub``'s wire format.
- ``{prefix}ctl``: control channel; ``{"k": "r", "p": PROC}`` asks every process to re-read
  the store for its open rooms (sent by a process after its Redis connection came back, as
  it may have failed to publish meanwhile).
- ``{prefix}p:{doc}``: hash ``session -> msgpack [user, data, proc]`` of presence.
- ``{prefix}proc:{proc}``: liveness of a process, refreshed every ``HEARTBEAT`` seconds with a
  TTL of ``PROC_TTL``. Presence of a process whose key expired is dead (process death).

Everything queued in one loop turn (publishes, presence writes) goes out as one pipeline.
Redis down: publishes are dropped (rooms fill gaps from the store later), ``healthy`` is
False (``/readyz``), and the reader reconnects with exponential backoff, then triggers a
resync everywhere.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from typing import Any
from uuid import UUID

import redis.asyncio as aioredis
from redis.exceptions import RedisError

from gateway.hub import OnMessage, OnResync, new_proc_id, pack, unpack

log = logging.getLogger(__name__)

HEARTBEAT = 3.0
"""Seconds between liveness refreshes."""
PROC_TTL = 10
"""Seconds after which a silent process counts as dead (its presence is cleared)."""
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
        self._pubsub: Any = None
        self._confirm: dict[str, asyncio.Future[None]] = {}
        self._outbox: list[tuple[str, Any]] = []
        self._flushing = False
        self._tasks: list[asyncio.Task[None]] = []
        self._on_message: OnMessage | None = None
        self._on_resync: OnResync | None = None
        self.published = 0
        self.publish_failures = 0

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
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self._up.wait(), timeout=3)

    def _set_healthy(self, flag: bool) -> None:
        self.healthy = flag
        if flag:
            self._up.set()
        else:
            self._up.clear()

    async def close(self) -> None:
        """Stop tasks, clear our liveness key, disconnect."""
        for task in self._tasks:
            task.cancel()
        for task in self._tasks:
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await task
        with contextlib.suppress(RedisError, OSError):
            await self.client.delete(f"{self.prefix}proc:{self.proc}")
        with contextlib.suppress(Exception):
            await self.client.aclose()

    # -- subscriptions -------------------------------------------------------------------

    async def watch(self, doc: UUID) -> None:
        """Subscribe to ``doc`` and wait (briefly) until Redis confirmed it."""
        self._watched.add(doc)
        pubsub = self._pubsub
        if pubsub is None or not self.healthy:
            return  # the reader subscribes to every watched doc when it reconnects
        name = self.channel(doc)
        fut = self._confirm.get(name)
        if fut is None:
            fut = self._confirm[name] = asyncio.get_running_loop().create_future()
            try:
                await pubsub.subscribe(name)
            except (RedisError, OSError):
                self._confirm.pop(name, None)
                return
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(asyncio.shield(fut), timeout=2)

    def unwatch(self, doc: UUID) -> None:
        """Unsubscribe from ``doc``."""
        self._watched.discard(doc)
        pubsub = self._pubsub
        if pubsub is not None and self.healthy:
            asyncio.get_running_loop().create_task(self._unsubscribe(pubsub, self.channel(doc)))

    async def _unsubscribe(self, pubsub: Any, name: str) -> None:
        with contextlib.suppress(RedisError, OSError):
            await pubsub.unsubscribe(name)

    async def _read_forever(self) -> None:
        backoff = 0.05
        first = True
        while True:
            pubsub = self.client.pubsub()
            try:
                await pubsub.subscribe(self._ctl, *[self.channel(d) for d in self._watched])
                self._pubsub = pubsub
                await self._heartbeat_once()
                self._set_healthy(True)
                backoff = 0.05
                if not first:
                    log.warning("redis hub reconnected; resyncing rooms")
                    self.publish_raw(self._ctl, pack({"k": "r", "p": self.proc}))
                    if self._on_resync is not None:
                        self._on_resync()
                first = False
                await self._read(pubsub)
            except asyncio.CancelledError:
                with contextlib.suppress(Exception):
                    await pubsub.aclose()
                raise
            except (RedisError, OSError) as exc:
                if self.healthy:
                    log.warning("redis hub lost its connection: %s", exc)
                self._set_healthy(False)
                self._pubsub = None
                for fut in self._confirm.values():
                    if not fut.done():
                        fut.set_result(None)
                self._confirm.clear()
                with contextlib.suppress(Exception):
                    await pubsub.aclose()
                await asyncio.sleep(backoff)
                backoff = min(backoff * 2, 2.0)

    async def _read(self, pubsub: Any) -> None:
        while True:
            msg = await pubsub.get_message(ignore_subscribe_messages=False, timeout=1.0)
            if msg is None:
                continue
            kind = msg.get("type")
            channel = msg.get("channel")
            name = channel.decode() if isinstance(channel, bytes) else str(channel)
            if kind == "subscribe":
                fut = self._confirm.pop(name, None)
                if fut is not None and not fut.done():
                    fut.set_result(None)
                continue
            if kind != "message":
                continue
            try:
                payload = unpack(msg["data"])
            except Exception:
                log.warning("dropped an undecodable hub message on %s", name)
                continue
            if payload.get("p") == self.proc:
                continue
            if name == self._ctl:
                if payload.get("k") == "r" and self._on_resync is not None:
                    self._on_resync()
                continue
            doc = name.rsplit(":", 1)[-1]
            try:
                doc_id = UUID(doc)
            except ValueError:
                continue
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
        task = asyncio.get_running_loop().create_task(self._flush())
        task.add_done_callback(lambda t: t.cancelled() or t.exception())

    async def _flush(self) -> None:
        try:
            while self._outbox:
                batch, self._outbox = self._outbox, []
                if not self.healthy:
                    self.publish_failures += len(batch)
                    continue
                pipe = self.client.pipeline(transaction=False)
                for op, args in batch:
                    if op == "publish":
                        pipe.publish(*args)
                    elif op == "hset":
                        pipe.hset(args[0], args[1], args[2])
                        pipe.expire(args[0], PRESENCE_KEY_TTL)
                    else:
                        pipe.hdel(*args)
                try:
                    await pipe.execute()
                    self.published += len(batch)
                except (RedisError, OSError) as exc:
                    self.publish_failures += len(batch)
                    log.warning("redis publish failed (%d dropped): %s", len(batch), exc)
        finally:
            self._flushing = False

    # -- presence and liveness -----------------------------------------------------------

    async def _heartbeat_once(self) -> None:
        await self.client.set(f"{self.prefix}proc:{self.proc}", b"1", ex=PROC_TTL)

    async def _beat(self) -> None:
        while True:
            await asyncio.sleep(HEARTBEAT)
            if not self.healthy:
                continue
            with contextlib.suppress(RedisError, OSError):
                await self._heartbeat_once()

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
