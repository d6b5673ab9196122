"""The worker's hot path: an Insert, Update or Delete frame straight to its `primary_key`, `before` and `after`.

The general path decodes a message into a dataclass of text values (`pgoutput`), applies the tracking rules
(`rules.RowPolicy`), turns each value into JSON text with its column's rule (`values.row_json`) and joins the row.
`RowCodec` does the same in one pass over the frame's bytes, with one function generated per relation: the three
operations, each tuple unrolled into one block per column (a loop with a dispatch per value cost as much as the
conversions) holding the column's treatment: its type rule, pasted from the same `values.TypeRule` the general path
compiles, or its tracking rule (ignored: read past; masked: the marker's JSON, the value never decoded; hashed:
the HMAC of its text). The row is one `%`-format of a per-relation template whose column names are already
JSON-escaped. An update's new row reuses the old row's JSON for every value whose bytes did not change, and the
same comparison decides whether the update is dropped (`drop_noop_updates`, or only ignored columns changed). The
generated source is registered with `linecache`, so a traceback shows its lines.

The output is byte for byte what the general path stores (tests/test_fastpath.py compares the two on real
streams, with and without tracking rules). Anything out of the ordinary (a key-only or missing old row, a malformed
message, a value its rule rejects) returns None, and the worker takes the general path, which also reports
malformed messages.
"""

from __future__ import annotations

import enum
import hashlib
import struct
import textwrap
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Final, TypeAlias

from .jsonb import json_string, key_order
from .pgoutput import (
    DELETE,
    INSERT,
    NEW_TUPLE,
    NULL_VALUE,
    OLD_TUPLE,
    ROW_TUPLE_OFFSET,
    TEXT_VALUE,
    UNCHANGED,
    UNCHANGED_VALUE,
    UPDATE,
    Column,
)
from .rules import RowPolicy
from .stream import XLOG_HEADER_SIZE
from .values import RULE_NAMES, ColumnRule, compile_source, encode_json

__all__ = ["DROPPED", "Dropped", "FastChange", "RowCodec"]

#: (primary_key, before JSON, after JSON, operation)
FastChange: TypeAlias = tuple[str | None, str, str, str]


class Dropped(enum.Enum):
    """Type of `DROPPED`."""

    DROPPED = "dropped"


#: What `RowCodec.change` returns for an update the tracking configuration drops (nothing is stored).
DROPPED: Final = Dropped.DROPPED

_i16: Final = struct.Struct("!h").unpack_from
_u32: Final = struct.Struct("!I").unpack_from

# Where things are in a row change frame: the message type, its first tuple marker, and its first tuple.
_KIND_AT: Final = XLOG_HEADER_SIZE
_MARKER_AT: Final = XLOG_HEADER_SIZE + ROW_TUPLE_OFFSET
_TUPLE_AT: Final = _MARKER_AT + 1


class _Fallback(Exception):
    """The frame needs the general path."""


@dataclass(frozen=True, slots=True)
class _Treatment:
    """What the generated code does with one column's value: exactly one of the four is set."""

    rule: ColumnRule | None = None  # its type rule (stored as is)
    ignored: bool = False  # read past, never stored
    fixed: str | None = None  # the JSON stored for any non-NULL value (masked)
    transform: Callable[[str], str] | None = None  # the stored text is transform(text), as a JSON string (hashed)


class RowCodec:
    """One relation's fast path: built from the Relation message's columns, their type rules, the primary key's
    positions among them and the table's tracking rules (None: stored as is); `change` is called per frame."""

    __slots__ = ("change", "read", "source")

    def __init__(
        self,
        columns: Sequence[Column],
        rules: Sequence[ColumnRule],
        key: Sequence[int],
        policy: RowPolicy | None = None,
    ) -> None:
        treatments = _treatments(rules, policy)
        # The row's keys in jsonb's order, so the row is sent as the destination prints it (`jsonb.py`).
        stored = {columns[i].name: i for i, t in enumerate(treatments) if not t.ignored}
        order = [stored[name] for name in key_order(stored)]
        names = [json_string(columns[i].name).replace("%", "%%") for i in order]
        namespace: dict[str, object] = {
            **RULE_NAMES,
            "_i16": _i16,
            "_u32": _u32,
            "_Fallback": _Fallback,
            "_Errors": (_Fallback, IndexError, ValueError, struct.error, RecursionError),
            "UNCHANGED": UNCHANGED,
            "DROPPED": DROPPED,
            "_encode_json": encode_json,
            "_template": "{" + ", ".join(f"{name}: %s" for name in names) + "}",
        }
        for i, treatment in enumerate(treatments):
            if treatment.rule is not None and treatment.rule[1] is not None:
                namespace[f"a{i}"] = treatment.rule[1]
            if treatment.fixed is not None:
                namespace[f"f{i}"] = treatment.fixed
            if treatment.transform is not None:
                namespace[f"t{i}"] = treatment.transform
        #: The generated functions' source (also in `linecache`).
        self.source = _source(
            treatments, order, tuple(key), drops=policy is not None, drop_noop=bool(policy and policy.drop_noop)
        )
        # Named by its source: relations with the same column treatments share one linecache entry.
        digest = hashlib.sha1(self.source.encode(), usedforsecurity=False).hexdigest()[:16]
        compile_source(self.source, f"<bemi_asgi.worker.fastpath reader {digest}>", namespace)
        #: `read(frame)`: like `change`, but raises what the generated code raises (for tracebacks and tests).
        self.read: Callable[[bytes], FastChange | Dropped | None] = namespace["read"]  # type: ignore[assignment]
        #: `change(frame)`: `frame` is a whole XLogData frame (its header, then the pgoutput message); the stored
        #: change, DROPPED when the tracking rules store nothing, None: use the general path.
        self.change: Callable[[bytes], FastChange | Dropped | None] = namespace["change"]  # type: ignore[assignment]


def _treatments(rules: Sequence[ColumnRule], policy: RowPolicy | None) -> list[_Treatment]:
    """Each column's treatment, in the Relation message's order, from its type rule and the tracking rules."""
    if policy is None:
        return [_Treatment(rule=rule) for rule in rules]
    kept = policy.keep if policy.keep is not None else tuple(range(len(rules)))
    transforms = {kept[position]: transform for position, transform in policy.transforms}
    treatments = []
    for i, rule in enumerate(rules):
        transform = transforms.get(i)
        if i in policy.ignored:
            treatments.append(_Treatment(ignored=True))
        elif transform is None:
            treatments.append(_Treatment(rule=rule))
        elif (constant := getattr(transform, "constant", None)) is not None:
            treatments.append(_Treatment(fixed=json_string(constant)))
        else:
            treatments.append(_Treatment(transform=transform))
    return treatments


# -- the generated code: only positions, protocol bytes and the rules' code enter it, never names or values -------

_VALUE: Final = f"""\
tag = data[pos]
if tag == {TEXT_VALUE}:  # 't': Int32 length, then the text
    end = pos + 5 + _u32(data, pos + 1)[0]
    {{raw}} = data[pos + 5 : end]
    pos = end
{{on_text}}
elif tag == {NULL_VALUE}:  # 'n'
    pos += 1
    {{raw}} = None
{{on_null}}
elif tag == {UNCHANGED_VALUE}:  # 'u': an unchanged TOAST value
    pos += 1
    {{raw}} = UNCHANGED
{{on_unchanged}}
else:
    raise _Fallback
"""

_COUNT: Final = "if _i16(data, pos)[0] != {count}:\n    raise _Fallback\npos += 2\n"


def _convert(i: int, treatment: _Treatment, raw: str, piece: str) -> str:
    """Statements setting `piece` to the JSON of the value whose bytes are in `raw`."""
    if treatment.ignored:
        return "pass"
    if treatment.fixed is not None:
        return f"{piece} = f{i}"  # masked: the value is never decoded
    if treatment.transform is not None:
        return f"{piece} = _string(t{i}({raw}.decode()))"
    assert treatment.rule is not None
    rule, arg = treatment.rule
    set_arg = f"arg = a{i}\n" if arg is not None else ""
    return f"text = {raw}.decode()\n{set_arg}{rule.code}\n{piece} = out"


def _block(code: str, indent: int = 4) -> str:
    return textwrap.indent(code, " " * indent)


def _tuple(treatments: Sequence[_Treatment], raw: str, piece: str) -> str:
    """Read a whole tuple: raws `{raw}i`, pieces `{piece}i` (no piece for an ignored column)."""
    code = [_COUNT.format(count=len(treatments))]
    for i, treatment in enumerate(treatments):
        null = "pass" if treatment.ignored else f'{piece}{i} = "null"'
        code.append(
            _VALUE.format(
                raw=f"{raw}{i}",
                on_text=_block(_convert(i, treatment, f"{raw}{i}", f"{piece}{i}")),
                on_null=_block(null),
                on_unchanged=_block(null),
            )
        )
    return "".join(code)


def _new_tuple(treatments: Sequence[_Treatment], drops: bool) -> str:
    """Read an update's new tuple (raws `r`, pieces `p`) given the old one (raws `o`, pieces `q`): the old piece
    wherever the bytes did not change or the value is an unchanged TOAST value. With `drops`, also note whether a
    stored column changed (`changed`) and whether an ignored one did (`touched`), as `RowPolicy.drops_update`."""
    code = [_COUNT.format(count=len(treatments))]
    for i, treatment in enumerate(treatments):
        flag = ("touched" if treatment.ignored else "changed") if drops else None
        if treatment.ignored:
            on_text = f"if r{i} != o{i}:\n    {flag} = True" if flag else "pass"
            on_null = f"if o{i} is not None:\n    {flag} = True" if flag else "pass"
            on_unchanged = "pass"
        else:
            differs = (f"{flag} = True\n" if flag else "") + _convert(i, treatment, f"r{i}", f"p{i}")
            on_text = f"if r{i} == o{i}:\n    p{i} = q{i}\nelse:\n{_block(differs)}"
            on_null = f'p{i} = "null"' + (f"\nif o{i} is not None:\n    {flag} = True" if flag else "")
            on_unchanged = f"p{i} = q{i}"
        code.append(
            _VALUE.format(
                raw=f"r{i}", on_text=_block(on_text), on_null=_block(on_null), on_unchanged=_block(on_unchanged)
            )
        )
    return "".join(code)


def _key(treatments: Sequence[_Treatment], key: tuple[int, ...], raw: str, old: str | None) -> str:
    """Statements setting `key`, the `primary_key` column: one key column's text (a hashed one's hash), a JSON
    array of texts for a composite key, None without a key. `old`: where an unchanged TOAST key value is."""
    if not key:
        return "key = None"
    code, texts = [], []
    for i in key:
        name = f"{raw}{i}"
        if old is not None:
            code.append(f"k{i} = {name} if {name} is not UNCHANGED else {old}{i}")
            name = f"k{i}"
        transform = treatments[i].transform
        text = f"t{i}({name}.decode())" if transform is not None else f"{name}.decode()"
        texts.append(f"({text} if {name}.__class__ is bytes else None)")
    code.append(f"key = {texts[0]}" if len(texts) == 1 else f"key = _encode_json([{', '.join(texts)}])")
    return "\n".join(code)


def _pieces(order: Sequence[int], piece: str) -> str:
    return "(" + "".join(f"{piece}{i}, " for i in order) + ")"


def _source(
    treatments: Sequence[_Treatment], order: Sequence[int], key: tuple[int, ...], *, drops: bool, drop_noop: bool
) -> str:
    """The relation's `read(data)` (raises on anything unexpected) and `change(data)` (None instead); `order`:
    the stored columns in the row's key order."""
    new, old = _pieces(order, "p"), _pieces(order, "q")
    end = "if pos != len(data):\n    return None\n"
    dropped = ""
    if drops:
        rule = "touched" if not drop_noop else "True"
        dropped = f"if not changed and {rule}:\n    return DROPPED\n"

    def one_row(marker: int, raw: str, piece: str, stored: str) -> str:
        """An insert's or a delete's body: its one tuple, then `return key, {stored}`."""
        return (
            f"if data[{_MARKER_AT}] != {marker}:\n    return None\npos = {_TUPLE_AT}\n"
            + _tuple(treatments, raw, piece)
            + end
            + _key(treatments, key, raw, None)
            + f"\nreturn key, {stored}\n"
        )

    insert = one_row(NEW_TUPLE, "r", "p", f'"{{}}", _template % {new}, "CREATE"')
    update = (
        f"if data[{_MARKER_AT}] != {OLD_TUPLE}:  # only with the whole old row (REPLICA IDENTITY FULL)\n"
        f"    return None\npos = {_TUPLE_AT}\n"
        + _tuple(treatments, "o", "q")
        + f"if data[pos] != {NEW_TUPLE}:\n    return None\npos += 1\n"
        + ("changed = touched = False\n" if drops else "")
        + _new_tuple(treatments, drops)
        + end
        + dropped
        + _key(treatments, key, "r", "o")
        + f'\nreturn key, _template % {old}, _template % {new}, "UPDATE"\n'
    )
    delete = one_row(OLD_TUPLE, "o", "q", f'_template % {old}, "{{}}", "DELETE"')
    return (
        f"def read(data):\n    kind = data[{_KIND_AT}]\n"
        f"    if kind == {INSERT}:\n{_block(insert, 8)}"
        f"    if kind == {UPDATE}:\n{_block(update, 8)}"
        f"    if kind == {DELETE}:\n{_block(delete, 8)}"
        "    return None\n\n\n"
        "def change(data):\n"
        "    try:\n        return read(data)\n"
        "    except _Errors:  # UnicodeDecodeError and a rule's rejection are ValueErrors\n        return None\n"
    )
