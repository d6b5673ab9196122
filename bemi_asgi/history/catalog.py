"""What the query helpers need to know about a tracked table from PostgreSQL's catalog: columns, types, key."""

from __future__ import annotations

from dataclasses import dataclass

import asyncpg

__all__ = ["ColumnInfo", "TableInfo", "fetch_table_info"]

_JSON_OIDS = frozenset({114, 3802})  # json, jsonb


@dataclass(frozen=True, slots=True)
class ColumnInfo:
    """One column: its name, its type as SQL (for casts) and how its values are written back."""

    name: str
    type_sql: str  # format_type without the modifier: the assignment applies varchar(n), numeric(p,s) itself
    is_json: bool  # json or jsonb (or a domain over them): values are JSON documents, not text
    is_array: bool
    element_is_json: bool
    generated: bool  # GENERATED ALWAYS AS (...) STORED: never written
    identity_always: bool  # GENERATED ALWAYS AS IDENTITY: inserting it needs OVERRIDING SYSTEM VALUE


@dataclass(frozen=True, slots=True)
class TableInfo:
    schema: str
    name: str
    columns: tuple[ColumnInfo, ...]
    primary_key: tuple[str, ...]  # in key order; empty for a table without a primary key

    def column(self, name: str) -> ColumnInfo | None:
        for column in self.columns:
            if column.name == name:
                return column
        return None


_COLUMNS_SQL = """
SELECT a.attname,
       format_type(a.atttypid, NULL) AS type_sql,
       CASE WHEN t.typtype = 'd' THEN t.typbasetype ELSE t.oid END AS base_oid,
       t.typcategory = 'A' AS is_array,
       COALESCE(CASE WHEN et.typtype = 'd' THEN et.typbasetype ELSE et.oid END, 0) AS element_oid,
       a.attgenerated <> '' AS generated,
       a.attidentity = 'a' AS identity_always,
       (SELECT array_position(i.indkey::int2[], a.attnum)
          FROM pg_index i WHERE i.indrelid = c.oid AND i.indisprimary) AS key_position
  FROM pg_class c
  JOIN pg_namespace n ON n.oid = c.relnamespace
  JOIN pg_attribute a ON a.attrelid = c.oid AND a.attnum > 0 AND NOT a.attisdropped
  JOIN pg_type t ON t.oid = a.atttypid
  LEFT JOIN pg_type et ON et.oid = t.typelem AND t.typcategory = 'A'
 WHERE n.nspname = $1 AND c.relname = $2 AND c.relkind IN ('r', 'p')
 ORDER BY a.attnum
"""


async def fetch_table_info(conn: asyncpg.Connection | asyncpg.Pool, schema: str, name: str) -> TableInfo | None:
    """Read a table's columns and primary key; None when no such table exists in this database."""
    rows = await conn.fetch(_COLUMNS_SQL, schema, name)
    if not rows:
        return None
    columns = tuple(
        ColumnInfo(
            name=row["attname"],
            type_sql=row["type_sql"],
            is_json=row["base_oid"] in _JSON_OIDS,
            is_array=row["is_array"],
            element_is_json=row["element_oid"] in _JSON_OIDS,
            generated=row["generated"],
            identity_always=row["identity_always"],
        )
        for row in rows
    )
    keyed = sorted((row["key_position"], row["attname"]) for row in rows if row["key_position"] is not None)
    return TableInfo(schema, name, columns, tuple(column for _, column in keyed))
