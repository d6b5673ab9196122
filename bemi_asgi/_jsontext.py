"""JSON text, fast: one reusable C encoder instead of a new one per call.

`json.dumps` and `JSONEncoder.encode` build a new C encoder on every call, which is most of their cost for a small
value: a tenth of the worker's CPU on small rows, most of a request context's validation, and of each value a
browser page shows. `compact_encoder` and `display_encoder` build the C encoder once, and fall back to the public
API where the accelerator is missing or its (private) signature differs.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Sequence

__all__ = ["compact_encoder", "display_encoder"]

Chunks = Callable[[object, int], Sequence[str]]


def compact_encoder(*, allow_nan: bool, default: Callable[[object], object]) -> Chunks:
    """An encoder called as `encoder(value, 0)`, returning the chunks of `value`'s compact JSON text
    (`","` and `":"` separators, non-ASCII kept as is); `default` converts what JSON has no type for, or raises."""
    return _encoder((",", ":"), allow_nan=allow_nan, default=default)


def display_encoder(default: Callable[[object], object]) -> Chunks:
    """`compact_encoder` with `json.dumps`'s `", "` and `": "` separators (and NaN as `NaN`): JSON text to read."""
    return _encoder((", ", ": "), allow_nan=True, default=default)


def _encoder(separators: tuple[str, str], *, allow_nan: bool, default: Callable[[object], object]) -> Chunks:
    item, key = separators
    make = getattr(json.encoder, "c_make_encoder", None)
    if make is not None:
        try:
            encoder: Chunks = make(
                None, default, json.encoder.encode_basestring, None, key, item, False, False, allow_nan
            )
            expected = f'{{"k"{key}["é"{item}1{item}1.5{item}true{item}null]}}'
            if "".join(encoder({"k": ["é", 1, 1.5, True, None]}, 0)) == expected:
                return encoder
        except TypeError:
            pass
    encode = json.JSONEncoder(ensure_ascii=False, allow_nan=allow_nan, separators=separators, default=default).encode
    return lambda value, _level: (encode(value),)
