"""How the change browser and the JSON API name changes, transactions and page positions in links, page anchors,
live stream event ids and API responses.

`Refs` writes the stored numbers as they are: `/transaction/505`, `#c42`, and `find()`'s cursors. Under a scope
those numbers are global counters (every tenant's writes advance the change id, the transaction id and the commit
LSN inside a cursor), so a tenant comparing two of its own could tell how much the others write in between.
`SealedRefs` turns each into an opaque token that only the browser holding the secret can read back.

A token is the deterministic authenticated encryption of a kind byte and the number(s) (the SIV construction,
with HMAC-SHA256 as its PRF): `tag = HMAC(k1, plaintext)[:16]`, `body = plaintext XOR HMAC(k2, tag)`,
token = base64url(tag + body). Reading one back recomputes the tag and compares it in constant time, so a token
that was changed, cut, made with another secret or for another kind of thing reads as nothing, the same as one
naming a change the visitor cannot see. Tokens are deterministic (the same change always gets the same token, so
an anchor written on one page finds its section on another) and reveal only whether two name the same thing.

Note: a token is valid wherever the same secret is: in every process configured with it, for any visitor (each
query still runs within the visitor's scope, so a token of a change outside it finds nothing).
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import hmac
import secrets
import struct
from typing import Literal

from .._exceptions import QueryError
from .._hmac import hmac_sha256
from .filters import Cursor, decode_cursor, encode_cursor
from .models import Change

__all__ = ["MIN_SECRET_BYTES", "Refs", "SealedRefs", "refs_for"]

#: A shorter secret is refused: it could be guessed.
MIN_SECRET_BYTES = 16
#: The length of a transaction's label: enough to tell a page's transactions apart.
LABEL_CHARS = 8

_TAG_BYTES = 16
_CHANGE, _TRANSACTION, _POSITION = b"C", b"T", b"P"
_NUMBER = struct.Struct(">q")
# A cursor: commit LSN, ordinal, order (0 ascending, 1 descending).
_CURSOR = struct.Struct(">qqBi")
_ORDERS: tuple[Literal["asc", "desc"], ...] = ("asc", "desc")


class Refs:
    """The stored numbers, written as they are (a browser without a scope)."""

    def change(self, change: Change) -> str:
        """The change's reference in links and page anchors."""
        return str(change.id)

    def transaction(self, change: Change) -> str:
        """The reference of the change's transaction, as its page's path segment."""
        return str(change.transaction_id)

    def label(self, transaction_ref: str) -> str:
        """How a transaction is named on a page."""
        return transaction_ref

    def cursor(self, cursor: str) -> str:
        """The reference of a `find()` cursor, for a link or an event id."""
        return cursor

    def change_id(self, ref: str) -> int | None:
        """The change id a reference names; None when it names none."""
        return _integer(ref)

    def transaction_id(self, ref: str) -> int | None:
        """The transaction id a reference names; None when it names none."""
        return _integer(ref)

    def find_cursor(self, ref: str) -> str:
        """The `find()` cursor a reference names (`find()` refuses one it did not give, with QueryError)."""
        return ref


class SealedRefs(Refs):
    """Opaque tokens in place of the stored numbers (a browser with a scope); see the module docstring."""

    def __init__(self, secret: bytes) -> None:
        if len(secret) < MIN_SECRET_BYTES:
            raise ValueError(
                f"secret= must be at least {MIN_SECRET_BYTES} bytes, got {len(secret)}: use e.g. "
                "secrets.token_urlsafe(32), the same in every process that serves the change browser"
            )
        # A page seals a hundred tokens, two HMACs each: the keys' blocks are hashed once, here.
        self._tag = hmac_sha256(hmac.digest(secret, b"bemi-asgi ui refs: tag", hashlib.sha256))
        self._pad = hmac_sha256(hmac.digest(secret, b"bemi-asgi ui refs: pad", hashlib.sha256))

    def __repr__(self) -> str:
        return "SealedRefs(secret=<hidden>)"

    def change(self, change: Change) -> str:
        return self._seal(_CHANGE, _NUMBER.pack(change.id))

    def transaction(self, change: Change) -> str:
        return self._seal(_TRANSACTION, _NUMBER.pack(change.transaction_id))

    def label(self, transaction_ref: str) -> str:
        # The token's start is its tag's: a keyed hash, nothing of the number.
        return transaction_ref[:LABEL_CHARS]

    def cursor(self, cursor: str) -> str:
        position = decode_cursor(cursor)
        order = _ORDERS.index(position.order)
        return self._seal(_POSITION, _CURSOR.pack(position.commit_lsn, position.ordinal, order, position.stream))

    def change_id(self, ref: str) -> int | None:
        payload = self._open(_CHANGE, ref, _NUMBER.size)
        return None if payload is None else int(_NUMBER.unpack(payload)[0])

    def transaction_id(self, ref: str) -> int | None:
        payload = self._open(_TRANSACTION, ref, _NUMBER.size)
        return None if payload is None else int(_NUMBER.unpack(payload)[0])

    def find_cursor(self, ref: str) -> str:
        payload = self._open(_POSITION, ref, _CURSOR.size)
        if payload is not None:
            lsn, ordinal, order, stream = _CURSOR.unpack(payload)
            if order < len(_ORDERS):
                return encode_cursor(Cursor(lsn, ordinal, _ORDERS[order], stream))
        raise QueryError(
            "cursor= is not a position this change browser gave: follow its links unchanged (a link made by another "
            "process, or before a restart, needs the same secret= there)"
        )

    def _seal(self, kind: bytes, payload: bytes) -> str:
        plain = kind + payload
        tag = self._tag(plain)[:_TAG_BYTES]
        return _b64(tag + _xor(plain, self._pad(tag)))

    def _open(self, kind: bytes, token: str, size: int) -> bytes | None:
        """The payload of a token of `kind` holding `size` bytes; None for anything else."""
        if len(token) != len(_b64(bytes(_TAG_BYTES + 1 + size))):
            return None
        try:
            raw = base64.urlsafe_b64decode(token + "=" * (-len(token) % 4))
        except (binascii.Error, ValueError):
            return None
        if _b64(raw) != token:  # one spelling per token: unused bits and stray characters are a change
            return None
        tag, body = raw[:_TAG_BYTES], raw[_TAG_BYTES:]
        plain = _xor(body, self._pad(tag))
        expected = self._tag(plain)[:_TAG_BYTES]
        if not hmac.compare_digest(tag, expected) or plain[:1] != kind:
            return None
        return plain[1:]


def refs_for(*, scoped: bool, secret: str | bytes | None) -> Refs:
    """The references of a reader with (`scoped`) or without a scope: sealed under `secret`, or under a random
    per-process key when none is given; the stored numbers without a scope."""
    if not scoped:
        return Refs()
    key = secrets.token_bytes(32) if secret is None else secret
    return SealedRefs(key.encode() if isinstance(key, str) else key)


def _xor(data: bytes, pad: bytes) -> bytes:
    assert len(data) <= len(pad), "a token's plaintext is at most one HMAC-SHA256 output long"
    # As two big integers: a timeline page seals a hundred tokens, and a byte at a time in Python cost more than
    # the HMACs.
    size = len(data)
    return (int.from_bytes(data) ^ int.from_bytes(pad[:size])).to_bytes(size)


def _b64(raw: bytes) -> str:
    return base64.urlsafe_b64encode(raw).decode().rstrip("=")


def _integer(text: str) -> int | None:
    return int(text) if text.isascii() and text.isdigit() else None
