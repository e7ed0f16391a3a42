"""Settings: one typed object built from ``COSCRIBE_*`` variables and CLI flags.

This is the only module that reads the environment. A flag wins over its variable; the
flag of ``COSCRIBE_DATABASE_URL`` is ``--database-url`` (lowercase, dashes). A flag and its
variable are checked alike: a value out of its range, not one of its choices or not of its
type, or a URL its driver would not take, is a :class:`SettingsError` (a bad argument: the
CLI exits 2).
"""

from __future__ import annotations

import os
import secrets
import tempfile
from collections.abc import Mapping
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any
from urllib.parse import SplitResult, unquote, urlsplit

CHOICES: dict[str, tuple[str, ...]] = {
    "projections": ("inline", "off"),
    "log_level": ("debug", "info", "warning", "error"),
}
"""The values an enumerated setting may take (``log_level`` in any case)."""

RANGES: dict[str, tuple[int, int | None]] = {
    "port": (1, 65535),
    "workers": (1, None),
    "max_frame_bytes": (1024, None),
    "max_buffer_bytes": (1024, None),
}
"""Inclusive bounds of the numeric settings (None: no upper bound). Port 0 ("any free
port") is refused: clients, the proxies and ``loadtest --url`` must know the port. Below
1 KiB a frame or a send buffer cannot hold a ``hello`` and its answer."""

URL_SCHEMES: dict[str, tuple[str, ...]] = {
    "database_url": ("postgresql", "postgres"),
    "redis_url": ("redis", "rediss", "unix"),
}
"""The schemes a URL setting may have (followed by ``//``: ``postgresql:foo`` is not a URL to
libpq, nor ``redis:x`` to redis-py)."""


class SettingsError(ValueError):
    """A setting's value is out of its range, not one of its choices or of the wrong type."""


MIN_SECRET_CHARS = 32
"""A shorter ``COSCRIBE_SECRET`` is warned about at start (the made one has 64 hex digits)."""


class DataDirUnusable(Exception):
    """The data directory cannot be made, or the secret in it cannot be made or read (a
    runtime failure, not a bad argument: the message names the path and the cause)."""


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
            source = f"COSCRIBE_{f.name.upper()}"
            if overrides and overrides.get(f.name) is not None:
                raw = overrides[f.name]
                source = "--" + f.name.replace("_", "-")
            if raw == "" and f.name == "secret":
                # Set, but to nothing (an unset shell variable in a unit file, say): falling
                # back to this machine's own secret file would make each machine's tokens
                # fail on the others.
                raise SettingsError(f"{source} is empty: set it to a long random value, or "
                                    "unset it to use the data directory's secret file")
            if raw is None or raw == "":
                continue
            values[f.name] = _checked(f.name, source, _coerce(source, raw, f.type))
        return cls(**values)

    def secret_warning(self) -> str | None:
        """What is weak about the token secret, said once at ``serve``'s start: shorter than
        ``MIN_SECRET_CHARS`` (``COSCRIBE_SECRET``, ``--secret`` or the file), or a secret
        file that other users may read. (Call after ``secret_bytes``, which makes the file.)"""
        if self.secret:
            where, length = "COSCRIBE_SECRET (or --secret)", len(self.secret)
        else:
            path = self.data_dir / "secret"
            try:
                mode = path.stat().st_mode
                length = len(path.read_bytes().strip())
            except OSError:
                return None
            if mode & 0o077:
                return (f"the token secret {path} can be read by other users (mode "
                        f"{mode & 0o777:04o}): chmod 600 it")
            where = f"the token secret {path}"
        if length < MIN_SECRET_CHARS:
            return (f"{where} has {length} characters: tokens can be forged by guessing it; "
                    f"use {MIN_SECRET_CHARS} or more random ones")
        return None

    def secret_bytes(self) -> bytes:
        """The token secret: ``COSCRIBE_SECRET``, or ``<data dir>/secret`` (made on first use).

        The file appears whole or not at all: it is written under another name, synced, then
        linked to ``secret``, which fails if another process linked first (its secret wins).
        Creating and writing it in two steps let a concurrent process read it empty, and a
        crash between them left it empty for good, and an empty HMAC key verified tokens
        anyone can forge. A secret that is empty after all is refused.
        """
        if self.secret:
            return self.secret.encode()
        path = self.data_dir / "secret"
        try:
            if not path.exists():
                self.data_dir.mkdir(mode=0o700, parents=True, exist_ok=True)
                _create_once(path, secrets.token_hex(32).encode())
            secret = path.read_bytes().strip()
        except OSError as exc:
            raise DataDirUnusable(
                f"cannot keep the token secret in {path}: {exc.strerror or exc}"
            ) from exc
        if not secret:
            raise DataDirUnusable(f"the token secret in {path} is empty: delete the file "
                                  "(tokens signed before are then refused) or set COSCRIBE_SECRET")
        return secret


def _create_once(path: Path, data: bytes) -> None:
    """Make ``path`` hold ``data`` (mode 0600) unless it exists: never seen half-written."""
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
    try:
        with os.fdopen(fd, "wb") as fh:  # mkstemp's mode is 0600
            fh.write(data)
            fh.flush()
            os.fsync(fh.fileno())
        try:
            os.link(tmp, path)
        except FileExistsError:
            return  # another process made it first: the caller reads theirs
        dirfd = os.open(path.parent, os.O_RDONLY)
        try:
            os.fsync(dirfd)
        finally:
            os.close(dirfd)
    finally:
        os.unlink(tmp)


def _coerce(source: str, raw: Any, kind: Any) -> Any:
    text = str(raw)
    kind = str(kind)
    try:
        if "int" in kind and "str" not in kind:
            return int(text)
        if "Path" in kind:
            return Path(text)
    except ValueError:
        raise SettingsError(f"{source} must be an integer, not {text!r}") from None
    return text


def _checked(name: str, source: str, value: Any) -> Any:
    """``value`` if it is in the setting's range or choices, or a URL of its schemes that its
    driver takes (``source`` names the flag or variable it came from in the error)."""
    if name in CHOICES:
        value = value.lower() if name == "log_level" else value
        if value not in CHOICES[name]:
            raise SettingsError(
                f"{source} must be one of {', '.join(CHOICES[name])}, not {value!r}"
            )
    if name in RANGES:
        check_range(source, value, *RANGES[name])
    if name in URL_SCHEMES:
        _check_url(name, source, value)
    if name == "secret" and not value.strip():
        raise SettingsError(f"{source} is only whitespace: set it to a long random value")
    return value


def check_range(source: str, value: float, low: float, high: float | None,
                unit: str = "") -> None:
    """Raise :class:`SettingsError` unless ``low <= value <= high`` (``high`` None: no upper
    bound; NaN is in no range). For the settings, and for the commands' flags that are not
    settings (``replay --page``), so that both are refused alike."""
    if not (low <= value and (high is None or value <= high)):
        bounds = f"in {low}..{high}" if high is not None else f"at least {low}"
        raise SettingsError(f"{source} must be {bounds}{unit}, not {value}")


def _check_url(name: str, source: str, url: str) -> None:
    """Raise :class:`SettingsError` unless ``url`` has one of the setting's schemes and its
    driver takes it (the scheme alone let ``redis://h:abc`` through to a traceback)."""
    schemes = URL_SCHEMES[name]
    try:
        parts = urlsplit(url)
    except ValueError as exc:  # "Invalid IPv6 URL": an unclosed [
        raise SettingsError(f"{source} is not a URL: {exc}") from None
    if not url.lower().startswith(tuple(f"{s}://" for s in schemes)):
        wanted = ", ".join(f"{s}://" for s in schemes)
        found = f"{parts.scheme}:" if parts.scheme else repr(url)
        if not parts.scheme and "@" in url:  # user:password@host
            found = "a URL without a scheme"
        if parts.scheme in schemes:
            found += " without //"
        raise SettingsError(f"{source} must start with {wanted}, not {found}")
    problem = _postgres_problem(url, parts) if name == "database_url" else _redis_problem(parts)
    if problem is None and name == "redis_url":
        problem = _redis_client_problem(url)
    if problem is not None:
        raise SettingsError(f"{source} is not usable: {_masked(problem, parts)}")


def _masked(message: str, parts: SplitResult) -> str:
    """``message`` without the URL's password, as written or decoded (a driver's message
    may quote the part it could not read: ``invalid percent-encoded token: "%zzPw..."``)."""
    raw = parts.netloc.rpartition("@")[0].partition(":")[2] if "@" in parts.netloc else ""
    for secret in sorted({raw, unquote(raw)} - {""}, key=len, reverse=True):
        message = message.replace(secret, "***")
    return message


def _redis_client_problem(url: str) -> str | None:
    """Why redis-py would not make a connection of ``url``'s options (without connecting):
    its query arguments (``socket_timeout=abc``; an unknown one, ``nosuch=1``, is a
    TypeError when the first connection is made, and the hub then failed for good)."""
    import redis

    try:
        pool = redis.ConnectionPool.from_url(url)
        pool.make_connection()
    except (ValueError, TypeError, redis.RedisError) as exc:
        return str(exc) or type(exc).__name__
    return None


def _port_problem(parts: SplitResult) -> str | None:
    """What is wrong with the URL's port (it may have none), as ``urlsplit`` reads it."""
    try:
        port = parts.port
    except ValueError:
        port = -1
    if port is None or 1 <= port <= 65535:
        return None
    hostport = parts.netloc.rpartition("@")[2]
    text = hostport.rpartition("]")[2] if hostport.startswith("[") else hostport
    return f"the port must be an integer in 1..65535, not {text.partition(':')[2]!r}"


SSLMODES = ("disable", "allow", "prefer", "require", "verify-ca", "verify-full")
"""libpq's ``sslmode`` values (a query parameter libpq checks only when it connects)."""


def _postgres_problem(url: str, parts: SplitResult) -> str | None:
    """Why libpq (through psycopg) or the event store, which reads the host and port with
    ``urlsplit``, would not take ``url``; None if both would. No host is fine (libpq's
    default socket, or ``?host=/run/postgresql``)."""
    from psycopg import ProgrammingError
    from psycopg.conninfo import conninfo_to_dict

    try:
        params = conninfo_to_dict(url)
    except ProgrammingError as exc:  # libpq's message quotes the URL, password and all
        return str(exc).strip().splitlines()[0].replace(url, "the URL")
    for port in str(params.get("port") or "").split(","):  # an empty one: the default
        if port and not (port.isascii() and port.isdigit() and 1 <= int(port) <= 65535):
            return f"the port must be an integer in 1..65535, not {port!r}"
    sslmode = params.get("sslmode")
    if sslmode is not None and sslmode not in SSLMODES:
        return f"sslmode must be one of {', '.join(SSLMODES)}, not {sslmode!r}"
    problem = _port_problem(parts)
    if problem and "," in parts.netloc:
        return "hosts in a list share one port, after the last (h1,h2:5432)"
    return problem


def _redis_problem(parts: SplitResult) -> str | None:
    """Why the hub and redis-py would not reach a server at ``parts``; None if they would.
    A TCP URL must name its host (redis-py would quietly take localhost), a socket URL
    its path."""
    if parts.scheme == "unix":
        return None if parts.path else "no socket path (unix:///path/to/redis.sock)"
    if not parts.hostname:
        return _port_problem(parts) or f"no host ({parts.scheme}://HOST[:PORT][/DB])"
    return _port_problem(parts)
