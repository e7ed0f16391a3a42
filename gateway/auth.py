"""Signed bearer tokens: ``v1.<payload>.<signature>``, both parts base64url without padding.

Both parts must be canonical (what ``sign_token`` writes): other characters, padding or
unused bits set make a token malformed, as does an ``exp`` that is not null or a finite
number.

The payload is JSON ``{"u": user, "iat": issued, "exp": expiry|null}`` (seconds since the
epoch); the signature is HMAC-SHA256 over ``v1.<payload>`` with the server secret. A token
names a user; it grants nothing by itself (documents grant roles to users).
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import math
import time

import orjson

PREFIX = "v1"
MAX_TOKEN_CHARS = 2048


class BadToken(Exception):
    """The token is malformed, its signature does not check out, or it has expired."""


def _b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode("ascii")


def _unb64(text: str) -> bytes:
    """Decode canonical base64url without padding (what ``_b64`` gives); else ValueError.

    Strict: a character outside the alphabet, padding, or unused low bits that are not
    zero make a different string than the one signed, so they are refused, not skipped.
    """
    data = base64.b64decode(text + "=" * (-len(text) % 4), altchars=b"-_", validate=True)
    if _b64(data) != text:
        raise ValueError("not canonical base64url")
    return data


def _expiry(exp: object) -> float | None:
    """The payload's ``exp``: None (never) or a finite number; else ``BadToken``."""
    if exp is None:
        return None
    if isinstance(exp, bool) or not isinstance(exp, int | float):
        raise BadToken("malformed token")
    try:
        seconds = float(exp)
    except OverflowError:
        raise BadToken("malformed token") from None
    if not math.isfinite(seconds):
        raise BadToken("malformed token")
    return seconds


def sign_token(secret: bytes, user: str, ttl: float | None = None) -> str:
    """A token for ``user``; it expires after ``ttl`` seconds, or never when None."""
    if not user or "\x00" in user:
        raise ValueError("user must be non-empty, without U+0000")
    now = int(time.time())
    payload = {"u": user, "iat": now, "exp": None if ttl is None else now + int(ttl)}
    body = f"{PREFIX}.{_b64(orjson.dumps(payload))}"
    sig = hmac.new(secret, body.encode("ascii"), hashlib.sha256).digest()
    return f"{body}.{_b64(sig)}"


def verify_token(secret: bytes, token: str, now: float | None = None) -> str:
    """The user a valid token names; raise ``BadToken`` otherwise. Constant-time compare."""
    return _verify(secret, token, now)[0]


def verify_token_until(secret: bytes, token: str) -> tuple[str, float | None]:
    """``verify_token``, also giving the expiry (seconds since the epoch; None: never)."""
    return _verify(secret, token, None)


def _verify(secret: bytes, token: str, now: float | None) -> tuple[str, float | None]:
    """``verify_token``, also giving the expiry (None: never)."""
    if not isinstance(token, str) or len(token) > MAX_TOKEN_CHARS:
        raise BadToken("malformed token")
    parts = token.split(".")
    if len(parts) != 3 or parts[0] != PREFIX:
        raise BadToken("malformed token")
    body = f"{parts[0]}.{parts[1]}"
    try:
        sig = _unb64(parts[2])
        payload = orjson.loads(_unb64(parts[1]))
    except (ValueError, orjson.JSONDecodeError):
        raise BadToken("malformed token") from None
    expected = hmac.new(secret, body.encode("ascii"), hashlib.sha256).digest()
    if not hmac.compare_digest(sig, expected):
        raise BadToken("bad token signature")
    if not isinstance(payload, dict) or not isinstance(payload.get("u"), str) or not payload["u"]:
        raise BadToken("malformed token")
    if "\x00" in payload["u"]:  # a user name is SQL text in the read models
        raise BadToken("malformed token")
    exp = _expiry(payload.get("exp"))
    if exp is not None and (now if now is not None else time.time()) >= exp:
        raise BadToken("token expired")
    return str(payload["u"]), exp


class TokenCache:
    """``verify_token`` with memory: each distinct token is checked (HMAC, base64, JSON) once.

    A hit still enforces the expiry on every call, and only tokens that verified are kept, so
    the answers are the ones ``verify_token`` gives (a bad token is re-checked each time and
    raises the same ``BadToken``). At most ``size`` tokens are kept; past that the oldest
    half is dropped. One cache per secret; not thread-safe (use it from the event loop).
    """

    def __init__(self, secret: bytes, size: int = 10_000) -> None:
        self.secret = secret
        self.size = size
        self._users: dict[str, tuple[str, float | None]] = {}

    def verify(self, token: str, now: float | None = None) -> str:
        """The user a valid token names; raise ``BadToken`` otherwise."""
        hit = self._users.get(token)
        if hit is None:
            hit = _verify(self.secret, token, now)
            if len(self._users) >= self.size:
                for old in list(self._users)[: self.size // 2]:  # dicts keep insertion order
                    del self._users[old]
            self._users[token] = hit
            return hit[0]
        user, exp = hit
        if exp is not None and (now if now is not None else time.time()) >= exp:
            del self._users[token]
            raise BadToken("token expired")
        return user
