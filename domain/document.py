"""The Document aggregate: a collaboratively edited text and who may touch it.

Persisted names are contracts: the event classes below are stored by topic
(``domain.document:Document.Edited`` ...) with every event. Renames and payload changes go
through ``class_version`` and ``upcast_vN_vN+1`` (see ``schema/events.md``).

Versions: ``Document.doc_version`` is the number of accepted text operations (0 when
created): the ``version`` of the protocol. It is not the aggregate's ``version`` (the position
in its event sequence, the store's optimistic-concurrency token), because renames and
membership changes are events too.

Every event carries ``h``, a link of a per-document hash chain: sha256 over the previous
event's ``h`` and this event's canonical content (see ``chain_hash``). Recomputing the chain
from stored events detects an edited or removed row.
"""

from __future__ import annotations

import hashlib
from datetime import datetime
from enum import StrEnum
from typing import Any
from uuid import UUID, uuid4

import orjson
from eventsourcing.domain import Aggregate

from domain import ot
from domain.errors import BadVersion, Conflict, Forbidden, Invalid, NotFound, TooLarge

MAX_TITLE_CHARS = 200
"""Longest title accepted, in code points."""
MAX_USER_CHARS = 128
"""Longest user name accepted in a membership change."""
MAX_TEXT_CHARS = 8 << 20
"""Longest text a document may have (code points): at creation and after every edit."""
GENESIS = b"\x00" * 32
"""The ``h`` that precedes a document's first event."""


class Role(StrEnum):
    """What a member may do. ``owner`` is the creator's and cannot be granted."""

    OWNER = "owner"
    EDITOR = "editor"
    VIEWER = "viewer"


GRANTABLE = frozenset({Role.EDITOR, Role.VIEWER})
"""Roles that ``add_member`` accepts."""


def chain_hash(
    prev: bytes,
    kind: str,
    doc_id: UUID,
    position: int,
    timestamp: datetime,
    payload: dict[str, Any],
) -> bytes:
    """Return the hash-chain link of one event.

    ``kind`` is the event class name, ``position`` the aggregate version of the event and
    ``payload`` its own fields (not ``h``). Canonical JSON (sorted keys, no spaces, UTF-8)
    makes the digest independent of the transcoder that stores the event.
    """
    body = orjson.dumps(
        [kind, str(doc_id), position, timestamp.isoformat(), payload],
        option=orjson.OPT_SORT_KEYS,
    )
    return hashlib.sha256(prev + body).digest()


def check_title(title: object) -> str:
    """Return ``title`` if it is an acceptable document title, else raise."""
    if not isinstance(title, str):
        raise Invalid("title must be a string")
    if len(title) > MAX_TITLE_CHARS:
        raise TooLarge(f"title is longer than {MAX_TITLE_CHARS} characters")
    return check_no_nul("title", title)


def check_no_nul(name: str, value: str) -> str:
    """``value`` if it holds no U+0000, else raise ``Invalid``.

    Names, titles and context items are SQL text in the read models, and PostgreSQL's text
    cannot hold U+0000: one such value would stop every read model at its event. (The
    document's text is not SQL text anywhere: ops may insert it.)
    """
    if "\x00" in value:
        raise Invalid(f"{name} must not contain U+0000")
    return value


class Document(Aggregate):
    """A document. Commands check roles and raise domain errors; events carry the facts.

    Invariants: ``doc_version`` counts ``Edited`` events; ``text`` is the initial text with every
    edit applied in order; ``members`` maps each user with access to a role, the owner
    included; ``clients`` maps a client id to ``(seq, version)`` of its latest accepted op,
    so a resent op is recognised and acked with its original version.
    """

    class Event(Aggregate.Event):
        """Base of this aggregate's events; ``h`` is the hash-chain link."""

        h: bytes

    class Created(Event, Aggregate.Created):
        """The document came into being with a title, an initial text and an owner."""

        title: str
        text: str
        owner: str

    class Edited(Event):
        """An accepted text operation, already transformed to apply at ``v - 1``.

        ``v`` is the document version the op produced; ``client``/``seq`` identify the
        submission (both None for HTTP edits without a client id).
        """

        op: list[Any]
        by: str
        client: str | None
        seq: int | None
        v: int

        def apply(self, aggregate: Aggregate) -> None:
            """Apply the op to the text and advance the version."""
            assert isinstance(aggregate, Document)
            aggregate._apply_edit(self)

    class Renamed(Event):
        """The title changed."""

        title: str
        by: str

        def apply(self, aggregate: Aggregate) -> None:
            """Set the title."""
            assert isinstance(aggregate, Document)
            aggregate.title = self.title
            aggregate._touch(self)

    class MemberAdded(Event):
        """``user`` now has ``role`` (added, or changed from another role)."""

        user: str
        role: str
        by: str

        def apply(self, aggregate: Aggregate) -> None:
            """Grant the role."""
            assert isinstance(aggregate, Document)
            aggregate.members[self.user] = self.role
            aggregate._touch(self)

    class MemberRemoved(Event):
        """``user`` no longer has access."""

        user: str
        by: str

        def apply(self, aggregate: Aggregate) -> None:
            """Revoke access."""
            assert isinstance(aggregate, Document)
            aggregate.members.pop(self.user, None)
            aggregate._touch(self)

    class ContextItemAdded(Event):
        """A note, reference or snippet was attached to the document as ``item``.

        ``position`` orders the items of a document (ties by the order they were added).
        """

        item: str
        kind: str
        title: str
        body: str
        position: int
        by: str

        def apply(self, aggregate: Aggregate) -> None:
            """Attach the item."""
            assert isinstance(aggregate, Document)
            aggregate.context_items[self.item] = {
                "kind": self.kind,
                "title": self.title,
                "body": self.body,
                "position": self.position,
                "created_by": self.by,
                "created_at": self.timestamp,
                "updated_by": self.by,
                "updated_at": self.timestamp,
            }
            aggregate._touch(self)

    class ContextItemUpdated(Event):
        """Some fields of ``item`` changed; a field that is None kept its value."""

        item: str
        kind: str | None
        title: str | None
        body: str | None
        position: int | None
        by: str

        def apply(self, aggregate: Aggregate) -> None:
            """Change the given fields."""
            assert isinstance(aggregate, Document)
            items = aggregate.context_items
            given = {name: getattr(self, name) for name in CONTEXT_FIELDS}
            # A new dict, not changed in place: a room's checkpoint copies the outer one only.
            items[self.item] = {**items[self.item],
                                **{k: v for k, v in given.items() if v is not None},
                                "updated_by": self.by, "updated_at": self.timestamp}
            aggregate._touch(self)

    class ContextItemRemoved(Event):
        """``item`` was detached."""

        item: str
        by: str

        def apply(self, aggregate: Aggregate) -> None:
            """Detach the item."""
            assert isinstance(aggregate, Document)
            aggregate.context_items.pop(self.item, None)
            aggregate._touch(self)

    def __init__(self, title: str, text: str, owner: str, h: bytes) -> None:
        self.title = title
        self._chunks: ot.Chunks = ()
        self._length = 0
        self._text: str | None = None
        self.text = text  # kept in pieces (``ot.apply_chunks``): an edit costs O(piece)
        self.owner = owner
        self.members: dict[str, str] = {owner: Role.OWNER.value}
        self.doc_version = 0
        self.h = h
        self.last_editor: str | None = None
        self.clients: dict[str, tuple[int, int]] = {}

    # -- construction -------------------------------------------------------------------

    @classmethod
    def create(cls, title: str, text: str, owner: str, doc_id: UUID | None = None) -> Document:
        """Create a new document owned by ``owner``; ``text`` is its version-0 text."""
        title = check_title(title)
        if not isinstance(text, str):
            raise Invalid("text must be a string")
        if len(text) > MAX_TEXT_CHARS:
            raise TooLarge(f"text is longer than {MAX_TEXT_CHARS} code points")
        doc_id = doc_id or cls.create_id()
        ts = cls.Created.create_timestamp()
        payload = {"title": title, "text": text, "owner": owner}
        h = chain_hash(GENESIS, "Created", doc_id, cls.INITIAL_VERSION, ts, payload)
        return cls._create(cls.Created, id=doc_id, timestamp=ts, h=h, **payload)

    # -- queries ------------------------------------------------------------------------

    def role_of(self, user: str) -> Role | None:
        """The user's role, or None without access."""
        role = self.members.get(user)
        return Role(role) if role is not None else None

    def can_read(self, user: str) -> bool:
        """Whether ``user`` may read the text and subscribe."""
        return user in self.members

    def can_write(self, user: str) -> bool:
        """Whether ``user`` may edit the text and the title."""
        return self.members.get(user) in (Role.OWNER.value, Role.EDITOR.value)

    def require_write(self, user: str) -> None:
        """Raise ``Forbidden`` (or ``NotFound`` for non-members) unless ``user`` may write."""
        if user not in self.members:
            raise NotFound("no such document")
        if not self.can_write(user):
            raise Forbidden("viewers cannot edit this document")

    @property
    def text(self) -> str:
        """The current text (joined from its pieces once per change, when asked for)."""
        text = self._text
        if text is None:
            text = self._text = "".join(self._chunks)
        return text

    @text.setter
    def text(self, value: str) -> None:
        self._chunks = ot.chunks_of(value)
        self._length = len(value)
        self._text = value

    @property
    def chunks(self) -> ot.Chunks:
        """The text in pieces (``ot.apply_chunks``); immutable, shared by later versions."""
        return self._chunks

    @property
    def length(self) -> int:
        """``len(self.text)``, without joining the text."""
        return self._length

    @property
    def created_at(self) -> datetime:
        """When the document was created."""
        return self.created_on

    @property
    def updated_at(self) -> datetime:
        """When the latest event happened."""
        return self.modified_on

    # -- commands -----------------------------------------------------------------------

    def edit(self, op: ot.Op, by: str, client: str | None = None, seq: int | None = None) -> int:
        """Append an op that applies to the current text (already transformed).

        The caller (the room) has validated ``op`` against ``len(self.text)``; this method
        applies it and raises ``BadOp`` if it does not fit. Returns the new version.
        """
        self.require_write(by)
        self._trigger(self.Edited, op=op, by=by, client=client, seq=seq, v=self.doc_version + 1)
        return self.doc_version

    def rename(self, title: str, by: str) -> None:
        """Change the title (owner and editors)."""
        self.require_write(by)
        self._trigger(self.Renamed, title=check_title(title), by=by)

    def add_member(self, user: str, role: str, by: str) -> None:
        """Give ``user`` the role ``editor`` or ``viewer`` (owner only).

        A malformed user name or any other role (``owner`` included: it is never granted) is
        ``Invalid``; naming the owner is a ``Conflict``; the role ``user`` already has is no
        change and records nothing.
        """
        self._require_owner(by)
        if not isinstance(user, str) or not user or len(user) > MAX_USER_CHARS:
            raise Invalid(f"user must be a non-empty string of at most {MAX_USER_CHARS} chars")
        check_no_nul("user", user)
        if role not in GRANTABLE:
            raise Invalid("role must be 'editor' or 'viewer'")
        if user == self.owner:
            raise Conflict("the owner's role cannot be changed")
        if self.members.get(user) == role:
            return
        self._trigger(self.MemberAdded, user=user, role=role, by=by)

    def remove_member(self, user: str, by: str) -> None:
        """Revoke ``user``'s access (owner only; the owner cannot be removed)."""
        self._require_owner(by)
        if user == self.owner:
            raise Conflict("the owner cannot be removed")
        if user not in self.members:
            raise NotFound(f"{user!r} is not a member")
        self._trigger(self.MemberRemoved, user=user, by=by)

    @property
    def context_items(self) -> dict[str, dict[str, Any]]:
        """The attached context items by id: ``{"kind", "title", "body", "position",
        "created_by", "created_at", "updated_by", "updated_at"}`` each (times as datetimes)."""
        items: dict[str, dict[str, Any]] = self.__dict__.setdefault("_context_items", {})
        return items

    def add_context_item(
        self, kind: str, title: str, body: str, by: str, position: int | None = None
    ) -> str:
        """Attach a note, reference or snippet (owner and editors); returns its new id.

        Without ``position`` the item goes after every other one: one past the highest
        position, or the highest allowed if that is taken (ties keep the order added).
        """
        self.require_write(by)
        if position is None:
            last = max((i["position"] for i in self.context_items.values()), default=-1)
            position = min(last + 1, MAX_CONTEXT_POSITION)
        item = str(uuid4())
        self._trigger(
            self.ContextItemAdded,
            item=item,
            kind=_check_kind(kind),
            title=_check_text("title", title, MAX_TITLE_CHARS),
            body=_check_text("body", body, MAX_CONTEXT_BODY_CHARS),
            position=_check_position(position),
            by=by,
        )
        return item

    def update_context_item(
        self,
        item: str,
        by: str,
        kind: str | None = None,
        title: str | None = None,
        body: str | None = None,
        position: int | None = None,
    ) -> None:
        """Change the fields given of ``item`` (owner and editors).

        The event names only the fields whose value changes; when none does, there is none.
        """
        self.require_write(by)
        current = self.context_items.get(item)
        if current is None:
            raise NotFound("no such context item")
        given = {
            "kind": None if kind is None else _check_kind(kind),
            "title": None if title is None else _check_text("title", title, MAX_TITLE_CHARS),
            "body": None if body is None else _check_text("body", body, MAX_CONTEXT_BODY_CHARS),
            "position": None if position is None else _check_position(position),
        }
        changed = {k: None if v == current[k] else v for k, v in given.items()}
        if any(v is not None for v in changed.values()):
            self._trigger(self.ContextItemUpdated, item=item, **changed, by=by)

    def remove_context_item(self, item: str, by: str) -> None:
        """Detach ``item`` (owner and editors)."""
        self.require_write(by)
        if item not in self.context_items:
            raise NotFound("no such context item")
        self._trigger(self.ContextItemRemoved, item=item, by=by)

    def committed_seq(self, client: str, seq: int) -> int | None:
        """The version an op of ``client`` with ``seq`` produced, if it was the latest one.

        ``None`` when the client never had ``seq`` accepted as its latest op. A ``seq``
        older than the latest is answered by the store (see the room).
        """
        last = self.clients.get(client)
        if last is not None and last[0] == seq:
            return last[1]
        return None

    # -- internals ----------------------------------------------------------------------

    def _require_owner(self, by: str) -> None:
        if by not in self.members:
            raise NotFound("no such document")
        if self.members[by] != Role.OWNER.value:
            raise Forbidden("only the owner can change members")

    def _trigger(self, cls: type[Document.Event], **payload: Any) -> None:
        ts = cls.create_timestamp()
        h = chain_hash(self.h, cls.__name__, self.id, self.version + 1, ts, payload)
        self.trigger_event(cls, timestamp=ts, h=h, **payload)

    def _apply_edit(self, e: Document.Edited) -> None:
        if e.v != self.doc_version + 1:
            raise BadVersion(f"edit produced v{e.v} on a document at v{self.doc_version}")
        self._chunks, self._length = ot.apply_chunks(self._chunks, self._length, e.op)
        self._text = None
        self.doc_version = e.v
        self.last_editor = e.by
        if e.client is not None and e.seq is not None:
            self.clients[e.client] = (e.seq, e.v)
        self._touch(e)

    def _touch(self, e: Document.Event) -> None:
        self.h = e.h


CONTEXT_FIELDS = ("kind", "title", "body", "position")
"""The fields of a context item that its owner and editors set."""
CONTEXT_KINDS = frozenset({"note", "reference", "snippet"})
"""The kinds of context item a document accepts."""
MAX_CONTEXT_BODY_CHARS = 64 << 10
"""Longest context item body accepted, in code points."""
MAX_CONTEXT_POSITION = 1 << 31
"""Positions of context items are in ``0..MAX_CONTEXT_POSITION``."""


def _check_kind(kind: object) -> str:
    if not isinstance(kind, str) or kind not in CONTEXT_KINDS:
        raise Invalid(f"kind must be one of {', '.join(sorted(CONTEXT_KINDS))}")
    return kind


def _check_text(name: str, value: object, limit: int) -> str:
    if not isinstance(value, str):
        raise Invalid(f"{name} must be a string")
    if len(value) > limit:
        raise TooLarge(f"{name} is longer than {limit} characters")
    return check_no_nul(name, value)


def _check_position(position: object) -> int:
    if not isinstance(position, int) or isinstance(position, bool):
        raise Invalid("position must be an integer")
    if not 0 <= position <= MAX_CONTEXT_POSITION:
        raise Invalid(f"position must be in 0..{MAX_CONTEXT_POSITION}")
    return position


__all__ = ["GENESIS", "Document", "NotFound", "Role", "chain_hash"]
