"""Settings: one typed object built from ``COSCRIBE_*`` variables and CLI flags.

This is the only module that reads the environment. A flag wins over its variable; the
flag of ``COSCRIBE_DATABASE_URL`` is ``--database-url`` (lowercase, dashes).
"""

from __future__ import annotations

import os
import secrets
from collections.abc import Mapping
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any


@dataclass(frozen=True, slots=True)
class Settings:
    """Every setting, with its default (the embedded mode: SQLite in ./data, no Redis)."""

    host: str = "127.0.0.1"
    port: int = 8080
    data_dir: Path = Path("./data")
    database_url: str | None = None
    database_schema: str | None = None
    redis_url: str | None = None
    redis_prefix: str = "coscribe:"
    secret: str | None = None
    workers: int = 1
    projections: str = "inline"
    """``inline``: this process runs the projection runner; ``off``: another one does
    (``coscribe projections run``). With ``--workers N`` a process of its own runs it."""
    log_level: str = "info"
    max_frame_bytes: int = 1 << 20
    max_buffer_bytes: int = 16 << 20

    @classmethod
    def load(
        cls, env: Mapping[str, str] | None = None, overrides: Mapping[str, Any] | None = None
    ) -> Settings:
        """Settings from ``env`` (default ``os.environ``) with non-None ``overrides`` on top."""
        env = os.environ if env is None else env
        values: dict[str, Any] = {}
        for f in fields(cls):
            raw = env.get(f"COSCRIBE_{f.name.upper()}")
            if overrides and overrides.get(f.name) is not None:
                raw = overrides[f.name]
            if raw is None or raw == "":
                continue
            values[f.name] = _coerce(f.name, raw, f.type)
        return cls(**values)

    def secret_bytes(self) -> bytes:
        """The token secret: ``COSCRIBE_SECRET``, or ``<data dir>/secret`` (made on first use)."""
        if self.secret:
            return self.secret.encode()
        path = self.data_dir / "secret"
        if not path.exists():
            self.data_dir.mkdir(mode=0o700, parents=True, exist_ok=True)
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
            with os.fdopen(fd, "w") as fh:
                fh.write(secrets.token_hex(32))
        return path.read_text().strip().encode()


def _coerce(name: str, raw: Any, kind: Any) -> Any:
    text = str(raw)
    kind = str(kind)
    try:
        if "int" in kind and "str" not in kind:
            return int(text)
        if "Path" in kind:
            return Path(text)
    except ValueError:
        raise SystemExit(f"COSCRIBE_{name.upper()} must be an integer, not {text!r}") from None
    return text
