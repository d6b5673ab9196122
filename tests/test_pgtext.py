"""PostgreSQL text forms (`bemi_asgi._pgtext`): LSNs and quoting, checked against the server itself."""

from __future__ import annotations

import psycopg
import pytest

from bemi_asgi._pgtext import format_lsn, parse_lsn, quote_ident, quote_qualified


def test_lsn_text_matches_pg_lsn(database: str) -> None:
    """format_lsn formats like the server's pg_lsn, and parse_lsn parses its output back."""
    values = [0, 1, 0xFFFFFFFF, 0x1_0000_0000, 0x16_B374D848, 2**64 - 1]
    with psycopg.connect(database) as conn:
        for value in values:
            row = conn.execute("SELECT ('0/0'::pg_lsn + %s::numeric)::text", [value]).fetchone()
            assert row is not None
            assert format_lsn(value) == row[0]
            assert parse_lsn(row[0]) == value


@pytest.mark.parametrize("text", ["", "1", "/1", "1/", "G/1", "1/123456789", " 1/2", "-1/2", "1/+2"])
def test_parse_lsn_rejects_non_lsn_text(text: str) -> None:
    """parse_lsn raises ValueError for text pg_lsn would not produce."""
    with pytest.raises(ValueError, match="not an LSN"):
        parse_lsn(text)


def test_quote_ident_reads_back_as_the_same_name(database: str) -> None:
    """Any name quoted by quote_ident names exactly itself, capitals, quotes, dots and dollars included."""
    names = ["plain", "Mixed Case", 'quo"te', "dot.ted", "$$", "select", "é"]
    with psycopg.connect(database) as conn:
        for name in names:
            row = conn.execute(f"SELECT 1 AS {quote_ident(name)}").fetchone()
            assert row is not None
            assert conn.execute(f"SELECT {quote_ident(name)} FROM (SELECT 1 AS {quote_ident(name)}) AS t").fetchone()
    assert quote_qualified("public", "items") == '"public"."items"'
    assert quote_qualified("public", "Items", bare_if_plain=True) == 'public."Items"'
    with pytest.raises(ValueError, match="NUL"):
        quote_ident("a\x00b")
