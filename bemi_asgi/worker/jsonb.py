"""jsonb's canonical text: what `jsonb_out` prints for a value, written by the worker without asking the server.

The worker sends `before`, `after` and `context` in this form, so the text it hashes for the chain (`chain.py`) is
the text the destination prints for what it stored. jsonb keeps one value per key (the last), orders an object's
keys by their UTF-8 length and then bytewise, prints `", "` and `": "` between items and no other whitespace, and
prints a number as `numeric_out` prints the numeric its literal reads as: no exponent, the scale the literal
implies, no sign on zero (`1.50e1` -> `15.0`, `1e-5` -> `0.00001`, `-0` -> `0`).
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterable
from decimal import Decimal, InvalidOperation
from typing import Any, Final

__all__ = ["Number", "canonical", "dump", "json_string", "key_order", "loads", "numeric_text"]

#: A JSON string's text for a str (escaped as jsonb escapes: quote, backslash, control characters; non-ASCII kept):
#: the C accelerator when present.
json_string: Final[Callable[[str], str]] = json.encoder.encode_basestring

#: numeric_in refuses exponents beyond this (NUMERIC_MAX_PRECISION): a number reaching farther is refused here
#: rather than written in a form jsonb might print otherwise.
_MAX_EXPONENT: Final = 1000


class Number:
    """A JSON number with a fraction or an exponent, held as its canonical text (what `loads` gives for them, never
    a float)."""

    __slots__ = ("text",)

    def __init__(self, text: str) -> None:
        self.text = text

    def __repr__(self) -> str:
        return f"Number({self.text!r})"


def numeric_text(literal: str) -> str:
    """The canonical text of a JSON number literal (ValueError for one jsonb cannot hold)."""
    try:
        value = Decimal(literal)
    except InvalidOperation:
        raise ValueError(f"not a number: {literal!r}") from None
    exponent = value.as_tuple().exponent
    if not isinstance(exponent, int) or abs(exponent) > _MAX_EXPONENT:
        raise ValueError(f"a number jsonb cannot hold: {literal!r}")
    text = f"{value.copy_abs():.{max(0, -exponent)}f}"  # copy_abs: exact (abs() rounds to 28 digits)
    return "-" + text if value < 0 else text


def _number(literal: str) -> Number:
    return Number(numeric_text(literal))


def _reject_constant(name: str) -> Any:
    raise ValueError(f"{name} is not JSON")


# Integers are parsed as int: str() prints them as jsonb does (`-0` is 0), and the C encoder writes them.
_decode: Final = json.JSONDecoder(parse_float=_number, parse_constant=_reject_constant, object_pairs_hook=dict).decode


def loads(text: str) -> Any:
    """Parse JSON text keeping each number with a fraction or an exponent as its canonical text (a `Number`)."""
    return _decode(text)


def _order(name: str) -> tuple[int, str]:
    return len(name.encode()), name  # UTF-8's byte order is its code points' order


def key_order(names: Iterable[str]) -> list[str]:
    """Object keys in the order jsonb keeps them: by UTF-8 length, then bytewise."""
    return sorted(names, key=_order)


def dump(value: object) -> str:
    """The canonical text of a JSON value (from `loads`, or plain Python values: dict, list, str, int, bool,
    None; floats are refused, their text is not jsonb's)."""
    if isinstance(value, str):
        return json_string(value)
    if isinstance(value, Number):
        return value.text
    if value is None:
        return "null"
    if value is True:
        return "true"
    if value is False:
        return "false"
    if isinstance(value, int):
        return str(value)
    if isinstance(value, dict):
        return "{" + ", ".join(f"{json_string(key)}: {dump(value[key])}" for key in key_order(value)) + "}"
    if isinstance(value, list | tuple):
        return "[" + ", ".join(dump(item) for item in value) + "]"
    raise TypeError(f"no canonical jsonb text for {type(value).__name__}")


def canonical(text: str) -> str:
    """The canonical text of valid JSON text (ValueError when it is not, holds a number jsonb refuses, or nests
    deeper than Python's recursion allows)."""
    try:
        return dump(loads(text))
    except RecursionError:
        raise ValueError("JSON nested too deeply to rewrite") from None
