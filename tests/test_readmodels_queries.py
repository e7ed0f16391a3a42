"""The read side's queries answer alike on SQLite and Postgres, and say when they lag."""

from __future__ import annotations

from urllib.parse import quote

from gateway.store import StoreConfig
from tests.readside import gateway


async def test_q_ignores_case_in_every_script(store_config: StoreConfig) -> None:
    """``q`` matches titles whatever the case of non-ASCII letters, on both databases."""
    titles = ["Été report", "ÉTÉ SUMMARY", "ĞÜŞ türkçe", "straße", "İstanbul", "plain"]
    async with gateway(store_config) as api:
        for title in titles:
            await api.create(title)

        async def found(q: str) -> set[str]:
            page = await api.call("GET", f"/v1/documents?limit=50&q={quote(q)}")
            return {i["title"] for i in page["items"]}

        for q in ("été", "ÉTÉ", "éTé"):
            assert await found(q) == {"Été report", "ÉTÉ SUMMARY"}, q
        assert await found("ğüş") == await found("ĞÜŞ") == {"ĞÜŞ türkçe"}
        assert await found("STRAßE") == {"straße"}
        assert await found("İST") == await found("İstanbul") == {"İstanbul"}
        assert await found("PLAIN") == {"plain"}
