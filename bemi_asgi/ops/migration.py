"""The SQL that prepares a source database for change capture and a destination for the changes, and its rollback.

The SQL lives in `bemi_asgi/ops/sql/`, inside the package. The source script
takes the publication name and the tracked schemas and tables as `{{placeholders}}`, filled here with quoted
literals; the SQL itself quotes every identifier with `format('%I')`, so names with capitals, spaces, quotes or
dollar signs are safe everywhere.

Table and schema names given as options follow SQL's rules: unquoted names are folded to lower case, and a name
with capitals, spaces, dots or quotes is written in double quotes (`'"Sales Data"."Orders"'`).
"""

from __future__ import annotations

import ast
import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from importlib import resources
from pathlib import Path
from typing import Any, Literal, TypeVar
from uuid import uuid4

from .._exceptions import MigrationError
from .._pgtext import quote_ident, quote_literal
from ..worker.schema_changes import SCHEMA_CHANGE_PREFIX

__all__ = [
    "DEFAULT_PUBLICATION",
    "Part",
    "TableName",
    "alembic_revision",
    "load_sql",
    "migration_sql",
    "migration_transaction",
    "parse_identifiers",
    "parse_tables",
    "slot_sql",
    "split_statements",
    "write_alembic_revision",
]

DEFAULT_PUBLICATION = "bemi"
DEFAULT_SCHEMAS = ("public",)
BEMI_SCHEMA = "bemi"
#: PostgreSQL truncates longer identifiers (NAMEDATALEN - 1 bytes); refuse them instead of tracking another name.
MAX_IDENTIFIER_BYTES = 63
#: Schemas of PostgreSQL itself: never tracked.
SYSTEM_SCHEMAS = frozenset({"pg_catalog", "information_schema", "pg_toast"})

#: The destination's upgrade steps, in the order they run (each idempotent, a no-op on a destination that has it).
DESTINATION_UPGRADES = ("destination_upgrade_1_streams.sql",)

Part = Literal["source", "destination"]
PARTS: tuple[Part, ...] = ("source", "destination")


@dataclass(frozen=True, slots=True)
class TableName:
    """A schema-qualified table name, exactly as stored in the catalog (case and all)."""

    schema: str
    name: str

    def __str__(self) -> str:
        return f"{quote_ident(self.schema)}.{quote_ident(self.name)}"


def _name_array(values: Iterable[str], element_type: str) -> str:
    items = [quote_literal(value) for value in values]
    return f"ARRAY[{', '.join(items)}]::{element_type}[]" if items else f"'{{}}'::{element_type}[]"


_UNQUOTED = re.compile(r"[A-Za-z_\u0080-\U0010ffff][A-Za-z0-9_$\u0080-\U0010ffff]*")


def parse_identifiers(text: str) -> list[str]:
    """Split `text` into the dot-separated identifiers of one SQL name, following SQL's rules.

    `public.users` -> ["public", "users"]; `"Sales Data"."Orders"` -> ["Sales Data", "Orders"], a double quote
    inside a quoted name is written twice;
    unquoted names are folded to lower case like PostgreSQL does.
    """
    names: list[str] = []
    pos = 0
    text = text.strip()
    while True:
        if pos < len(text) and text[pos] == '"':
            end = pos + 1
            chars: list[str] = []
            while True:
                close = text.find('"', end)
                if close < 0:
                    raise MigrationError(
                        f'{text!r} has an unterminated double quote: close it, or double a " in a name'
                    )
                chars.append(text[end:close])
                if text.startswith('""', close):
                    chars.append('"')
                    end = close + 2
                    continue
                pos = close + 1
                break
            name = "".join(chars)
            if not name:
                raise MigrationError(f'{text!r} contains an empty quoted name ""')
        else:
            match = _UNQUOTED.match(text, pos)
            if match is None:
                raise MigrationError(
                    f"{text!r} is not a valid name: write letters, digits and _ (lower case), or put a name with "
                    'capitals, spaces or other characters in double quotes, e.g. \'"Sales Data"."Orders"\''
                )
            name = match.group().lower() if match.group().isascii() else _ascii_lower(match.group())
            pos = match.end()
        _check_name(name)
        names.append(name)
        if pos == len(text):
            return names
        if text[pos] != ".":
            raise MigrationError(
                f"{text!r} is not a valid name: unexpected {text[pos]!r} after {names[-1]!r}; put names with "
                "spaces or punctuation in double quotes"
            )
        pos += 1


def _ascii_lower(name: str) -> str:
    # PostgreSQL folds only ASCII letters of unquoted names in UTF-8 databases.
    return "".join(ch.lower() if ch.isascii() else ch for ch in name)


def _check_name(name: str) -> None:
    if not name:
        raise MigrationError("an empty name: give a schema or table name")
    if "\x00" in name:
        raise MigrationError(f"{name!r} contains a NUL character, which PostgreSQL names cannot hold")
    if len(name.encode()) > MAX_IDENTIFIER_BYTES:
        raise MigrationError(
            f"{name!r} is longer than {MAX_IDENTIFIER_BYTES} bytes, so PostgreSQL would truncate it: use a shorter name"
        )


def _split_list(values: Iterable[str], what: str) -> list[str]:
    """Split each value on commas outside double quotes; refuse empty items."""
    values = list(values)
    items: list[str] = []
    for value in values:
        current: list[str] = []
        quoted = False
        for ch in value:
            if ch == '"':
                quoted = not quoted  # a doubled "" toggles twice: still right
            if ch == "," and not quoted:
                items.append("".join(current))
                current = []
            else:
                current.append(ch)
        items.append("".join(current))
    for item in items:
        if not item.strip():
            raise MigrationError(
                f"an empty {what} in {list(values)!r}: give one or more names separated by commas, or leave the "
                "option out"
            )
    return [item.strip() for item in items]


def parse_schemas(values: Iterable[str]) -> list[str]:
    """Parse `--schema` values (each a name or a comma-separated list) into schema names."""
    schemas: list[str] = []
    for item in _split_list(values, "schema name"):
        names = parse_identifiers(item)
        if len(names) != 1:
            raise MigrationError(
                f'{item!r} is not a schema name: a schema is one name (write "My.Schema" in double quotes if it '
                "contains a dot); to track single tables use --table schema.table"
            )
        schemas.append(_trackable_schema(names[0], item))
    return _unique(schemas)


def parse_tables(values: Iterable[str]) -> list[TableName]:
    """Parse `--table` values (each `schema.table` or a comma-separated list of them) into table names."""
    tables: list[TableName] = []
    for item in _split_list(values, "table name"):
        names = parse_identifiers(item)
        if len(names) != 2:
            raise MigrationError(
                f"{item!r} is not a schema-qualified table name: write schema.table, e.g. public.users (names "
                'with capitals, spaces or dots in double quotes: \'"Sales Data"."Orders"\')'
            )
        tables.append(TableName(_trackable_schema(names[0], item), names[1]))
    return _unique(tables)


def _trackable_schema(schema: str, given: str) -> str:
    if schema == BEMI_SCHEMA:
        raise MigrationError(
            f"{given!r} is in the schema {BEMI_SCHEMA!r}, which holds bemi-asgi's own tables and is never tracked "
            "(the worker would record its own writes): track application schemas and tables only"
        )
    if schema in SYSTEM_SCHEMAS or schema.startswith("pg_"):
        raise MigrationError(f"{given!r} is in a PostgreSQL system schema, which cannot be tracked")
    return schema


T = TypeVar("T")


def _unique(items: Iterable[T]) -> list[T]:
    return list(dict.fromkeys(items))


def check_publication(name: str) -> str:
    """Validate a publication name (taken verbatim: it is a single name, quoted wherever it is used)."""
    if not name.strip():
        raise MigrationError("the publication name is empty: give one with --publication (default: bemi)")
    _check_name(name)
    return name


def load_sql(name: str) -> str:
    """Read `bemi_asgi/ops/sql/<name>`, the SQL shipped inside the package."""
    return resources.files(__package__).joinpath("sql", name).read_text(encoding="utf-8")


_PLACEHOLDER = re.compile(r"\{\{(\w+)\}\}")


def _render(template: str, values: dict[str, str]) -> str:
    def fill(match: re.Match[str]) -> str:
        return values[match.group(1)]

    return _PLACEHOLDER.sub(fill, template)


def _plpgsql_block(text: str) -> str:
    """A PL/pgSQL block file, without its comment lines, indented to sit inside a DO block."""
    lines = [line for line in text.splitlines() if not line.startswith("--")]
    return "\n    ".join(lines).strip()


def migration_sql(
    *,
    publication: str = DEFAULT_PUBLICATION,
    schemas: Sequence[str] | None = None,
    tables: Sequence[str] | None = None,
    down: bool = False,
    parts: Sequence[Part] = PARTS,
    exclude_tables: Sequence[str] | None = None,
    exclude_schemas: Sequence[str] | None = None,
    partition_by_month: bool = False,
) -> str:
    """The SQL script preparing (or, with `down=True`, rolling back) the source and/or the destination.

    `schemas` and `tables` take the same text as the command line options: names following SQL's rules, each
    item possibly a comma-separated list. With neither (nor `exclude_schemas`), the schema `public` is tracked.
    The same options must be given to `down` as to the migration (the publication name, at least).

    `exclude_tables` are never tracked (remembered: tables created later under these names are not tracked
    either), `exclude_schemas` stop being tracked; `partition_by_month` creates `bemi.changes` partitioned by
    month of `committed_at` (see `ops.prune`).
    """
    publication = check_publication(publication)
    if not parts:
        raise MigrationError("nothing to migrate: choose the source, the destination or both")
    unknown = [part for part in parts if part not in PARTS]
    if unknown:
        raise MigrationError(f"unknown part(s) {unknown!r}: choose from {list(PARTS)!r}")
    if schemas is not None and not schemas:
        raise MigrationError("the schema list is empty: give one or more schema names, or leave the option out")
    if tables is not None and not tables:
        raise MigrationError("the table list is empty: give one or more schema.table names, or leave the option out")
    schema_names = parse_schemas(schemas) if schemas is not None else []
    table_names = parse_tables(tables) if tables is not None else []
    excluded_tables = parse_tables(exclude_tables) if exclude_tables else []
    excluded_schemas = parse_schemas(exclude_schemas) if exclude_schemas else []
    if not schema_names and not table_names and not excluded_schemas:
        schema_names = list(DEFAULT_SCHEMAS)
    for name, kind in [(str(t), "table") for t in table_names if t in excluded_tables] + [
        (s, "schema") for s in schema_names if s in excluded_schemas
    ]:
        raise MigrationError(f"{name} is both tracked and excluded: give it to --{kind} or to --exclude-{kind}")
    values = {
        "publication": quote_literal(publication),
        "publication_identifier": quote_ident(publication),
        "schemas": _name_array(schema_names, "name"),
        "tables": _name_array((str(table) for table in table_names), "text"),
        "excluded_tables": _name_array((str(table) for table in excluded_tables), "text"),
        "excluded_schemas": _name_array(excluded_schemas, "name"),
        "guard": _plpgsql_block(load_sql("source_guard.sql")),
        "schema_change_prefix": quote_literal(SCHEMA_CHANGE_PREFIX),
    }
    scripts: list[str] = []
    order: Sequence[Part] = ("source", "destination") if down else ("destination", "source")
    for part in order:
        if part in parts:
            if part == "destination" and partition_by_month and not down:
                # The partitioned table first; destination_up.sql then adds the indexes and the worker's state.
                scripts.append(_render(load_sql("destination_partitioned_up.sql"), values))
            if part == "destination" and down:
                scripts.append(load_sql("destination_backfill_down.sql"))
            scripts.append(_render(load_sql(f"{part}_{'down' if down else 'up'}.sql"), values))
            if part == "destination" and not down:
                # Baselines (operation SNAPSHOT) and the progress of `bemi-asgi backfill`.
                scripts.append(load_sql("destination_backfill_up.sql"))
                # What brings a destination made by an earlier version up to the tables above, keeping its rows.
                scripts.extend(load_sql(name) for name in DESTINATION_UPGRADES)
    return "\n".join(script.rstrip("\n") + "\n" for script in scripts)


def migration_transaction(script: str) -> str:
    """`script` as one transaction, for psql and other clients that run a script statement by statement: an error
    leaves the database as it was (psql then rolls back at COMMIT, and with `-v ON_ERROR_STOP=1` exits 3 at once),
    and the notices of objects that already exist stay quiet, so a re-run prints nothing."""
    return (
        "-- One transaction: an error anywhere leaves the database as it was.\n"
        "BEGIN;\n"
        "SET LOCAL client_min_messages = warning;\n"
        f"{script.rstrip()}\n"
        "COMMIT;\n"
    )


def slot_sql(slot: str) -> str:
    """The statement creating the worker's replication slot (pgoutput) unless it exists: capture starts there, so
    changes made before the worker first runs are kept. It must run after the migration's transaction commits:
    PostgreSQL refuses to create a logical slot in a transaction that has written anything."""
    name = quote_literal(check_slot(slot))
    # Slot names are the cluster's: one of this name in another database (or of another plugin) is refused, as the
    # worker would refuse it, rather than taken for this database's.
    return f"""-- The worker's replication slot: changes from here on are kept until a worker streams them
-- (a slot nobody streams keeps the server's WAL: start the worker, or drop the slot).
DO $$
DECLARE
    existing record;
BEGIN
    SELECT database, plugin INTO existing FROM pg_catalog.pg_replication_slots WHERE slot_name = {name};
    IF NOT FOUND THEN
        PERFORM pg_catalog.pg_create_logical_replication_slot({name}, 'pgoutput');
    ELSIF existing.database IS DISTINCT FROM pg_catalog.current_database()
          OR existing.plugin IS DISTINCT FROM 'pgoutput' THEN
        RAISE EXCEPTION 'replication slot % exists but is not a pgoutput slot of this database (database %, plugin %)',
            {name}, existing.database, existing.plugin
            USING HINT = 'Slot names are shared by every database of the server: choose another with --slot.';
    END IF;
END $$;
"""


def check_slot(name: str) -> str:
    """Validate a replication slot name as PostgreSQL does: lower-case letters, digits and underscores."""
    if not re.fullmatch(r"[a-z0-9_]{1,63}", name):
        raise MigrationError(
            f"{name!r} is not a replication slot name: use lower-case letters, digits and underscores (at most 63)"
        )
    return name


def split_statements(script: str) -> list[str]:
    """Split a SQL script into statements, respecting quotes, comments and dollar-quoted bodies.

    Comments between statements are dropped. Needed where each statement is sent on its own (asyncpg prepares
    each query, and a prepared statement holds one command).
    """
    statements: list[str] = []
    current: list[str] = []
    pos = 0
    length = len(script)
    while pos < length:
        ch = script[pos]
        if script.startswith("--", pos):
            end = script.find("\n", pos)
            end = length if end < 0 else end
            if any(part.strip() for part in current):
                current.append(script[pos:end])
            pos = end
        elif script.startswith("/*", pos):
            end = script.find("*/", pos + 2)
            end = length if end < 0 else end + 2
            current.append(script[pos:end])
            pos = end
        elif ch in "'\"":
            end = pos + 1
            while True:
                end = script.find(ch, end)
                if end < 0:
                    end = length
                    break
                if script.startswith(ch * 2, end):
                    end += 2
                    continue
                end += 1
                break
            current.append(script[pos:end])
            pos = end
        elif ch == "$" and (match := re.compile(r"\$(?:[A-Za-z_][A-Za-z0-9_]*)?\$").match(script, pos)):
            if pos > 0 and (script[pos - 1].isalnum() or script[pos - 1] == "_"):
                current.append(ch)  # a $ inside an identifier, not a dollar quote
                pos += 1
                continue
            tag = match.group()
            end = script.find(tag, match.end())
            end = length if end < 0 else end + len(tag)
            current.append(script[pos:end])
            pos = end
        elif ch == ";":
            statement = "".join(current).strip()
            if statement:
                statements.append(statement)
            current = []
            pos += 1
        else:
            current.append(ch)
            pos += 1
    statement = "".join(current).strip()
    if statement:
        statements.append(statement)
    return statements


# --- Alembic ---------------------------------------------------------------------------------------------------

_ALEMBIC_TEMPLATE = '''"""{message}

Generated by `bemi-asgi sql-migration --alembic`{options}.

Revision ID: {revision}
Revises: {down_revision_text}
Create Date: {created}
"""

from alembic import op

revision = {revision!r}
down_revision = {down_revision!r}
branch_labels = None
depends_on = None

# One statement per execute: drivers that prepare statements (asyncpg) accept a single command at a time.
UPGRADE = {upgrade}

DOWNGRADE = {downgrade}


def upgrade() -> None:
    for statement in UPGRADE:
        op.execute(statement)


def downgrade() -> None:
    for statement in DOWNGRADE:
        op.execute(statement)
'''

# `op.execute` runs text through SQLAlchemy's `text()`, where `:name` is a bind parameter; `\\:` escapes it.
_BIND_LIKE = re.compile(r"(?<![:\w\\]):(?=\w)")


def _statement_list(script: str) -> str:
    statements = [_BIND_LIKE.sub(r"\\:", statement) for statement in split_statements(script)]
    return "[\n" + "".join(f"    {_python_string(statement)},\n" for statement in statements) + "]"


def _docstring_safe(text: str) -> str:
    return text.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n")


def _python_string(text: str) -> str:
    """A Python literal for `text`: triple-quoted (readable SQL) when that needs no escapes, else repr()."""
    if "\\" in text or '"""' in text or text.endswith('"') or "\n" not in text:
        return repr(text)
    return '"""' + text + '"""'


def alembic_revision(
    *,
    revision: str | None = None,
    down_revision: str | None = None,
    publication: str = DEFAULT_PUBLICATION,
    schemas: Sequence[str] | None = None,
    tables: Sequence[str] | None = None,
    parts: Sequence[Part] = PARTS,
    options_text: str = "",
    upgrade_only: bool = False,
    **options: Any,
) -> str:
    """The text of an Alembic revision file whose upgrade runs the migration and whose downgrade rolls it back.

    With `upgrade_only`, a revision for a database an earlier revision already migrated: its upgrade runs the
    migration again (which adds what this version has new, `DESTINATION_UPGRADES` among it, and keeps every stored
    row) and its downgrade changes nothing, so stepping back never drops the history the earlier revision keeps.
    `options`: the other keyword arguments of `migration_sql` (exclusions, partitioning).
    """
    revision = revision or uuid4().hex[:12]
    downgrade = (
        "[]"
        if upgrade_only
        else _statement_list(
            migration_sql(publication=publication, schemas=schemas, tables=tables, parts=parts, down=True, **options)
        )
    )
    return _ALEMBIC_TEMPLATE.format(
        message="bemi-asgi: upgrade change capture" if upgrade_only else "bemi-asgi: prepare change capture",
        options=f" ({_docstring_safe(options_text)})" if options_text else "",
        revision=revision,
        down_revision=down_revision,
        down_revision_text=down_revision or "",
        created=datetime.now(UTC).isoformat(sep=" ", timespec="seconds"),
        upgrade=_statement_list(
            migration_sql(publication=publication, schemas=schemas, tables=tables, parts=parts, **options)
        ),
        downgrade=downgrade,
    )


def alembic_head(directory: Path) -> str | None:
    """The single head revision among the revision files in `directory`, or None when there are none."""
    revisions: dict[str, tuple[str, ...]] = {}
    for path in sorted(directory.glob("*.py")):
        found = _revision_ids(path)
        if found is not None:
            revisions[found[0]] = found[1]
    parents = {parent for downs in revisions.values() for parent in downs}
    heads = sorted(rev for rev in revisions if rev not in parents)
    if len(heads) > 1:
        raise MigrationError(
            f"{directory} has several head revisions ({', '.join(heads)}): pass the one to build on with "
            "--down-revision, or merge the heads first (alembic merge heads)"
        )
    return heads[0] if heads else None


def _revision_ids(path: Path) -> tuple[str, tuple[str, ...]] | None:
    try:
        tree = ast.parse(path.read_text(encoding="utf-8"))
    except (SyntaxError, UnicodeDecodeError):
        return None
    found: dict[str, object] = {}
    for node in tree.body:
        target: ast.expr | None = None
        value: ast.expr | None = None
        if isinstance(node, ast.Assign) and len(node.targets) == 1:
            target, value = node.targets[0], node.value
        elif isinstance(node, ast.AnnAssign):
            target, value = node.target, node.value
        if isinstance(target, ast.Name) and target.id in ("revision", "down_revision") and value is not None:
            try:
                found[target.id] = ast.literal_eval(value)
            except ValueError:
                return None
    revision, down = found.get("revision"), found.get("down_revision")
    if not isinstance(revision, str):
        return None
    if isinstance(down, str):
        return revision, (down,)
    if isinstance(down, list | tuple):
        return revision, tuple(str(item) for item in down)
    return revision, ()


def write_alembic_revision(
    directory: str | Path,
    *,
    down_revision: str | None = None,
    publication: str = DEFAULT_PUBLICATION,
    schemas: Sequence[str] | None = None,
    tables: Sequence[str] | None = None,
    parts: Sequence[Part] = PARTS,
    options_text: str = "",
    upgrade_only: bool = False,
    **options: Any,
) -> Path:
    """Write an Alembic revision file into `directory` (the `versions/` folder) and return its path.

    Without `down_revision`, the new revision follows the directory's single head.
    """
    folder = Path(directory)
    if not folder.is_dir():
        raise MigrationError(
            f"{folder} is not a directory: give Alembic's versions folder (for example alembic/versions)"
        )
    parent = down_revision if down_revision is not None else alembic_head(folder)
    revision = uuid4().hex[:12]
    text = alembic_revision(
        revision=revision,
        down_revision=parent,
        publication=publication,
        schemas=schemas,
        tables=tables,
        parts=parts,
        options_text=options_text,
        upgrade_only=upgrade_only,
        **options,
    )
    path = folder / f"{revision}_bemi_asgi_{'upgrade' if upgrade_only else 'change_capture'}.py"
    path.write_text(text, encoding="utf-8")
    return path
