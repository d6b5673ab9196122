"""PostgreSQL text forms, each written once: LSNs (`pg_lsn`), quoted identifiers, quoted string literals.

A leaf: the worker, the query helpers and the migration all use it, and it imports nothing of ours. Errors are
ValueError; callers that speak to users (the query helpers, the migration) check their input first and raise their
own error with the fix.
"""

from __future__ import annotations

import re
from typing import Final

from psycopg import sql

__all__ = ["format_lsn", "parse_lsn", "quote_ident", "quote_literal", "quote_qualified"]

_LSN: Final = re.compile(r"([0-9A-Fa-f]{1,8})/([0-9A-Fa-f]{1,8})")


def format_lsn(lsn: int) -> str:
    """An LSN as PostgreSQL's pg_lsn writes it: 0x16B374D848 -> '16/B374D848'."""
    return f"{lsn >> 32:X}/{lsn & 0xFFFFFFFF:X}"


def parse_lsn(text: str) -> int:
    """A pg_lsn text ('16/B374D848') as an int; ValueError on anything else."""
    match = _LSN.fullmatch(text)
    if match is None:
        raise ValueError(f"not an LSN: {text!r} (expected two hexadecimal numbers like '16/B374D848')")
    return (int(match[1], 16) << 32) | int(match[2], 16)


def quote_ident(name: str, *, bare_if_plain: bool = False) -> str:
    """An identifier quoted for SQL (`"..."`, inner double quotes doubled), safe for any name.

    `bare_if_plain` is for SQL shown to people in hints and reports: a lower-case ASCII name stays unquoted
    (`public.items` reads better than `"public"."items"`), and a name holding control characters is written in
    SQL's Unicode escape form (`U&"a\\+00000Ab"`), which names the same object and cannot break a line of output.
    SQL that runs always quotes, so keywords need no thought.
    """
    if "\x00" in name:
        raise ValueError(f"identifier {name!r} contains a NUL character, which PostgreSQL names cannot hold")
    if bare_if_plain:
        if name.isidentifier() and name.isascii() and name == name.lower():
            return name
        if not name.isprintable():
            escaped = "".join(ch if ch.isprintable() and ch != "\\" else f"\\+{ord(ch):06X}" for ch in name)
            return 'U&"' + escaped.replace('"', '""') + '"'
    return sql.Identifier(name).as_string()


def quote_qualified(schema: str, name: str, *, bare_if_plain: bool = False) -> str:
    """A schema-qualified name quoted for SQL: `"schema"."name"` (`bare_if_plain` as for `quote_ident`)."""
    return f"{quote_ident(schema, bare_if_plain=bare_if_plain)}.{quote_ident(name, bare_if_plain=bare_if_plain)}"


def quote_literal(value: str) -> str:
    """A string quoted as a SQL expression that is safe anywhere, dollar-quoted function bodies included.

    Quotes are doubled; a value with backslashes becomes an `E'...'` string, whose meaning does not depend on
    `standard_conforming_strings` (PostgreSQL's own `quote_literal` does the same); a `$` is spliced in as
    `chr(36)`, so no value can end a `$$ ... $$` body. (`psycopg.sql.Literal` leaves `$` as is, which is why this
    one is written out.)
    """
    if "\x00" in value:
        raise ValueError(f"{value!r} contains a NUL character, which PostgreSQL text cannot hold")
    parts = []
    for piece in value.split("$"):
        quoted = "'" + piece.replace("'", "''") + "'"
        if "\\" in piece:
            quoted = "E" + quoted.replace("\\", "\\\\")
        parts.append(quoted)
    return parts[0] if len(parts) == 1 else "(" + " || chr(36) || ".join(parts) + ")"
