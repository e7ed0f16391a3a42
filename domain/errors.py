"""The domain's exception tree. Each error carries a stable code from ``schema.codes``."""

from __future__ import annotations

from schema.codes import Code


class DomainError(Exception):
    """Base of every error the domain raises on purpose; ``code`` is shown to clients."""

    code: Code = Code.BAD_MESSAGE

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.message = message


class Invalid(DomainError):
    """A command argument is malformed (wrong type, empty where it must not be)."""

    code = Code.BAD_REQUEST


class BadOp(DomainError):
    """An operation is malformed or does not fit the document's length."""

    code = Code.BAD_OP


class BadVersion(DomainError):
    """A base version that the document never had (negative, or ahead of it)."""

    code = Code.BAD_VERSION


class Forbidden(DomainError):
    """The acting user's role does not allow the command."""

    code = Code.FORBIDDEN


class NotFound(DomainError):
    """No such document, member or item."""

    code = Code.NOT_FOUND


class Conflict(DomainError):
    """The command clashes with current state (e.g. adding the owner as a member)."""

    code = Code.CONFLICT


class TooLarge(DomainError):
    """A value is over its documented size limit."""

    code = Code.TOO_LARGE
