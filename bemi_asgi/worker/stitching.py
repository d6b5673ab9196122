"""Which context each change of a transaction gets: the stitching rule, and reading `_bemi` message payloads.

The pool emits the request context as a transactional logical message with the prefix `_bemi`, at COMMIT, so in
the WAL a transaction's changes normally come first and their context last. A transaction may carry several
messages (work done under different contexts before one COMMIT, a savepoint-heavy job, a hand-written
`pg_logical_emit_message`). The messages cut the transaction's changes into segments; `segment_contexts` is the one
place that decides which message a segment belongs to.
"""

from __future__ import annotations

from collections.abc import Sequence

from . import jsonb

__all__ = [
    "EMPTY_CONTEXT",
    "INVALID_CONTEXT_KEY",
    "context_json",
    "segment_contexts",
]

#: The context of a change no `_bemi` message speaks for.
EMPTY_CONTEXT = "{}"
#: A payload that is not a JSON object is kept, as text, under this key (never dropped, never fatal).
INVALID_CONTEXT_KEY = "_bemi_invalid_context"


def segment_contexts(message_contexts: Sequence[str]) -> list[str]:
    """The stitching rule: the context of each segment of a transaction.

    A transaction with n `_bemi` messages has n + 1 segments of changes: segment i (i < n) holds the changes
    after message i - 1 and before message i, segment n the changes after the last message. A change takes the
    context of the first `_bemi` message after it in the same transaction; if none follows, the last one before
    it; if there is none at all, the empty context. So segment i < n gets message i, and the trailing segment
    gets message n - 1 (or the empty context when n == 0).

    `message_contexts` are the messages' contexts in WAL order, already read by `context_json`.
    """
    trailing = message_contexts[-1] if message_contexts else EMPTY_CONTEXT
    return [*message_contexts, trailing]


def context_json(content: bytes, encoding: str = "utf-8") -> str:
    """The JSON object text to store for one `_bemi` message payload, as jsonb prints it (`jsonb.py`).

    The payload is text in the source server's `encoding` (pgoutput sends message contents as they were written;
    the pool's are ASCII, so any encoding reads them). A payload that is not JSON text holding an object, or holds
    something `jsonb` refuses (NaN, NUL characters, lone surrogates), becomes
    `{"_bemi_invalid_context": "<the payload as text>"}` so it stays visible.
    """
    try:
        text = content.decode(encoding)
    except UnicodeDecodeError:
        text = content.decode(encoding, errors="replace")
        return _invalid(text)
    try:
        value = jsonb.loads(text)
        # Only a \u escape can put NUL or a lone surrogate in a string (the decoder refuses raw control
        # characters, and decoded text holds no surrogates): without one, nothing needs walking.
        if isinstance(value, dict) and ("\\u" not in text or _jsonb_safe(value)):
            return jsonb.dump(value)
    except (ValueError, RecursionError):
        pass
    return _invalid(text)


def _invalid(text: str) -> str:
    return jsonb.dump({INVALID_CONTEXT_KEY: text.replace("\x00", "\ufffd")})


def _jsonb_safe(value: object) -> bool:
    """False when `value` holds a string jsonb cannot store (NUL, unpaired surrogates)."""
    if isinstance(value, str):
        if "\x00" in value:
            return False
        try:
            value.encode("utf-8")
        except UnicodeEncodeError:
            return False
        return True
    if isinstance(value, dict):
        return all(_jsonb_safe(key) and _jsonb_safe(item) for key, item in value.items())
    if isinstance(value, list):
        return all(_jsonb_safe(item) for item in value)
    return True
