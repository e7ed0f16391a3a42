"""The coordinator's HTTP side: create a step's documents, share them, read them back.

Documents are created by user ``lt0`` (the owner), who adds the step's other users as
editors. A text too large for one request body (413) is created small and grown with
``POST /v1/documents/{id}/ops`` in chunks, halving the chunk on every 413. Initial texts are
deterministic for a seed and contain no ``[`` or ``]``, so every stamp in a final text came
from a writer.
"""

from __future__ import annotations

import asyncio
import random
from dataclasses import dataclass
from typing import Any

import aiohttp
import orjson

SETUP_CONCURRENCY = 32
"""Requests the coordinator has in flight while provisioning."""
_WORDS = (
    "the", "quick", "brown", "fox", "jumps", "over", "a", "lazy", "dog", "while", "seven",
    "editors", "type", "notes", "about", "latency", "and", "throughput", "in", "one",
    "shared", "document", "that", "never", "stops", "changing",
)  # fmt: skip


REQUEST_TIMEOUT_S = 120.0
"""Longest a set-up request (documents, members, read-backs) may take."""


class ProvisionError(Exception):
    """The server refused or failed a setup request; the step cannot run."""


@dataclass(frozen=True, slots=True)
class DocState:
    """A document as ``GET /v1/documents/{id}`` returned it."""

    id: str
    version: int
    text: str


def user_name(index: int) -> str:
    """The name of load-test user ``index`` (0 is every document's owner)."""
    return f"lt{index}"


def client_id(user: int, step: int, session: int) -> str:
    """The client id of session ``session`` of step ``step``, for user ``user``.

    A client id belongs to the first user who says hello with it, for ever, and a server
    keeps them across runs: so the id names its user (another scenario gives a session of
    the same index another user, and would be refused the id of a run before).
    """
    return f"{user_name(user)}-{step}-{session}"


def filler_text(size: int, seed: int) -> str:
    """``size`` code points of lowercase words and spaces, the same for the same seed."""
    if size <= 0:
        return ""
    rng = random.Random(seed)
    words = rng.choices(_WORDS, k=size // 5 + 8)
    text = " ".join(words)
    while len(text) < size:
        text += " " + text
    return text[:size]


class Provisioner:
    """Talks to one server as the owner. Use as ``async with Provisioner(...) as p``."""

    def __init__(self, base_url: str, tokens: dict[str, str]) -> None:
        self.base = base_url.rstrip("/")
        self.tokens = tokens
        self._http: aiohttp.ClientSession | None = None
        self._gate = asyncio.Semaphore(SETUP_CONCURRENCY)

    async def __aenter__(self) -> Provisioner:
        timeout = aiohttp.ClientTimeout(total=REQUEST_TIMEOUT_S, sock_connect=10.0)
        self._http = aiohttp.ClientSession(
            connector=aiohttp.TCPConnector(limit=SETUP_CONCURRENCY), timeout=timeout
        )
        return self

    async def __aexit__(self, *exc: object) -> None:
        if self._http is not None:
            await self._http.close()

    async def _call(
        self, method: str, path: str, body: Any = None, user: str = "lt0"
    ) -> tuple[int, Any]:
        assert self._http is not None
        headers = {"Authorization": f"Bearer {self.tokens[user]}"}
        data = None
        if body is not None:
            headers["Content-Type"] = "application/json"
            data = orjson.dumps(body)
        async with self._gate:
            try:
                async with self._http.request(
                    method, self.base + path, data=data, headers=headers
                ) as resp:
                    raw = await resp.read()
                    status = resp.status
            except (aiohttp.ClientError, OSError, TimeoutError) as exc:
                why = f"{type(exc).__name__}: {exc}"
                if isinstance(exc, TimeoutError) and not str(exc):  # the total's: no message
                    why = f"no answer within {REQUEST_TIMEOUT_S:g} s"
                raise ProvisionError(f"{method} {path}: {why}") from exc
        try:
            return status, orjson.loads(raw) if raw else None
        except orjson.JSONDecodeError:
            return status, raw[:200].decode("utf-8", "replace")

    async def projection_lag(self) -> tuple[float, int] | None:
        """The read models' lag now (``GET /v1/projections``): the age in seconds of the
        oldest event not yet in every model, and how many events that is; None if the
        server does not tell (no read side, or an error)."""
        try:
            status, body = await self._call("GET", "/v1/projections")
        except ProvisionError:
            return None
        if status != 200 or not isinstance(body, dict) or not body.get("projections"):
            return None
        models = body["projections"]
        return (max(float(m.get("lag_seconds") or 0.0) for m in models),
                max(int(m.get("lag") or 0) for m in models))

    async def health(self) -> None:
        """Raise :class:`ProvisionError` unless ``GET /healthz`` answers 200."""
        status, body = await self._call("GET", "/healthz")
        if status != 200:
            raise ProvisionError(f"GET /healthz: {status} {body}")

    async def create(self, title: str, text: str, members: list[str]) -> DocState:
        """Create a document with ``text`` and add ``members`` as editors."""
        status, body = await self._call("POST", "/v1/documents", {"title": title, "text": text})
        grow = ""
        if status == 413:
            chunk = max(1, len(text) // 2)
            while True:
                status, body = await self._call(
                    "POST", "/v1/documents", {"title": title, "text": text[:chunk]}
                )
                if status != 413 or chunk == 1:
                    break
                chunk //= 2
            grow = text[chunk:]
        if status != 201:
            raise ProvisionError(f"POST /v1/documents: {status} {body}")
        doc_id, version = body["id"], body["version"]
        have = len(text) - len(grow)
        chunk = max(1, have)
        while grow:
            piece = grow[:chunk]
            status, resp = await self._call(
                "POST", f"/v1/documents/{doc_id}/ops", {"v": version, "op": [have, piece]}
            )
            if status == 413 and chunk > 1:
                chunk //= 2
                continue
            if status not in (200, 201):
                raise ProvisionError(f"POST /v1/documents/{doc_id}/ops: {status} {resp}")
            version = resp["v"]
            have += len(piece)
            grow = grow[len(piece) :]
        await asyncio.gather(*(self.share(doc_id, user) for user in members))
        return DocState(doc_id, version, text)

    async def share(self, doc_id: str, user: str) -> None:
        """Make ``user`` an editor of the document (already being one is fine)."""
        status, body = await self._call(
            "POST", f"/v1/documents/{doc_id}/members", {"user": user, "role": "editor"}
        )
        if status not in (200, 201, 204, 409):
            raise ProvisionError(f"POST /v1/documents/{doc_id}/members: {status} {body}")

    async def fetch(self, doc_id: str) -> DocState:
        """The document's current text and version."""
        status, body = await self._call("GET", f"/v1/documents/{doc_id}")
        if status != 200:
            raise ProvisionError(f"GET /v1/documents/{doc_id}: {status} {body}")
        return DocState(doc_id, body["version"], body["text"])

    async def create_many(
        self, count: int, title: str, text: str, members: list[str]
    ) -> list[DocState]:
        """``count`` documents with the same text and members, created concurrently."""
        return list(
            await asyncio.gather(
                *(self.create(f"{title} #{i + 1}", text, members) for i in range(count))
            )
        )

    async def fetch_many(self, doc_ids: list[str]) -> list[DocState]:
        """The current state of each document, in order."""
        return list(await asyncio.gather(*(self.fetch(d) for d in doc_ids)))
