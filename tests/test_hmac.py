"""The one-key HMAC-SHA256 helper against the standard library's."""

from __future__ import annotations

import hashlib
import hmac

from hypothesis import given
from hypothesis import strategies as st

from bemi_asgi._hmac import hmac_sha256


@given(st.binary(max_size=200), st.lists(st.binary(max_size=150), min_size=1, max_size=4))
def test_digests_are_the_standard_librarys(key: bytes, messages: list[bytes]) -> None:
    """For any key (shorter, as long as and longer than SHA-256's 64-byte block) each message's digest is
    `hmac.digest`'s, also when one key signs several messages in turn."""
    digest = hmac_sha256(key)
    for message in messages:
        assert digest(message) == hmac.digest(key, message, hashlib.sha256)
