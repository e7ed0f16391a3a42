"""A multiprocessing pipe used from asyncio without blocking the loop or the pipe's mode.

``loop.add_reader`` is not an option: uvloop switches the descriptor to non-blocking, and
``Connection.send`` of a large pickle then fails half-written. Instead one thread blocks in
``recv`` and hands each message to the loop, and one thread does every ``send`` in order,
so a multi-megabyte result never stalls the loop and messages never interleave.
"""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from multiprocessing.connection import Connection
from typing import Any


class Channel:
    """Both directions of one pipe. Create inside the running loop, then :meth:`start`.

    ``on_message`` runs on the loop for each message received, in order; ``on_close`` runs
    on the loop once when the other end goes away. ``send`` may be called from the loop.
    """

    def __init__(
        self,
        conn: Connection,
        on_message: Callable[[Any], None],
        on_close: Callable[[], None],
        name: str = "channel",
    ) -> None:
        self.conn = conn
        self._on_message = on_message
        self._on_close = on_close
        self._loop = asyncio.get_running_loop()
        self._sender = ThreadPoolExecutor(max_workers=1, thread_name_prefix=f"{name}-send")
        self._reader = threading.Thread(target=self._read, name=f"{name}-recv", daemon=True)

    def start(self) -> None:
        """Start receiving."""
        self._reader.start()

    def _read(self) -> None:
        while True:
            try:
                msg = self.conn.recv()
            except (EOFError, OSError):
                self._post(self._on_close)
                return
            if not self._post(self._on_message, msg):
                return

    def _post(self, fn: Callable[..., None], *args: Any) -> bool:
        try:
            self._loop.call_soon_threadsafe(fn, *args)
        except RuntimeError:  # the loop is closed: nobody is listening any more
            return False
        return True

    def send(self, msg: Any) -> Future[None]:
        """Queue ``msg`` for sending; the future fails if the pipe is broken."""
        return self._sender.submit(self.conn.send, msg)

    async def send_wait(self, msg: Any) -> None:
        """Send ``msg`` and wait until it is written."""
        await asyncio.wrap_future(self.send(msg))

    def close(self) -> None:
        """Stop sending (after what is queued) and close this end of the pipe."""
        self._sender.shutdown(wait=True)
        self.conn.close()
