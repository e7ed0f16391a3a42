"""Stable error codes: the one source for every code a client can see.

Stdlib only, so that every layer (domain, schema, gateway, ops) may import it. A code is a
contract: add new ones, never rename or reuse one. Each is documented in ``schema/protocol.md``.
"""

from __future__ import annotations

from enum import StrEnum


class Code(StrEnum):
    """Error codes shown to clients as ``{"code": ..., "message": ...}``."""

    BAD_FRAME = "bad_frame"
    """The frame could not be decoded, or is not a list of maps."""
    BAD_MESSAGE = "bad_message"
    """A message is malformed: unknown type ``t``, missing or mistyped field."""
    BAD_REQUEST = "bad_request"
    """An HTTP body or query is malformed (a wrong type, or a value outside its domain)."""
    UNAUTHORIZED = "unauthorized"
    """No token, or a token whose signature or expiry does not check out."""
    FORBIDDEN = "forbidden"
    """The user may not do this to this document (a viewer writing, a non-owner sharing),
    or may not use this client id (it is another user's)."""
    NOT_FOUND = "not_found"
    """No such document (or route, or member)."""
    BAD_OP = "bad_op"
    """The operation is not a valid text operation for the document it targets."""
    BAD_VERSION = "bad_version"
    """A version outside the document's: an op's base or a ``sub``'s ``v`` negative or
    ahead of it, or a read's ``at``/``from``/``to`` past its current version."""
    CONFLICT = "conflict"
    """The request clashes with the current state: sharing with or removing the owner.

    Never for malformed input (a role other than editor/viewer, a bad user name: that is
    ``BAD_REQUEST``); re-sharing with an existing member is no clash (it sets the role).
    """
    TOO_LARGE = "too_large"
    """The frame, body, op or field is over its documented size limit."""
    RATE_LIMITED = "rate_limited"
    """Too many messages on one WebSocket connection; the message was not handled: slow
    down and send it again. (Not sent over HTTP.)"""
    NOT_SUBSCRIBED = "not_subscribed"
    """An op or a presence for a document the connection has not subscribed to."""
    UNAVAILABLE = "unavailable"
    """The event store cannot be reached; the op was not accepted (never acked)."""
    INTERNAL = "internal"
    """A bug on the server. The op was not acknowledged."""


HTTP_STATUS: dict[Code, int] = {
    Code.BAD_FRAME: 400,
    Code.BAD_MESSAGE: 400,
    Code.BAD_REQUEST: 400,
    Code.BAD_OP: 400,
    Code.BAD_VERSION: 400,
    Code.UNAUTHORIZED: 401,
    Code.FORBIDDEN: 403,
    Code.NOT_FOUND: 404,
    Code.NOT_SUBSCRIBED: 409,
    Code.CONFLICT: 409,
    Code.TOO_LARGE: 413,
    Code.RATE_LIMITED: 429,
    Code.INTERNAL: 500,
    Code.UNAVAILABLE: 503,
}
"""The HTTP status that goes with each code."""
