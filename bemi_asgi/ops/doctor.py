"""`bemi-asgi doctor`: check that a source database is ready for change capture, and say what is missing.

Two steps, so each can be tested on its own: `collect()` reads the facts from a live server (catalog queries
only, nothing is changed), `diagnose()` turns them into findings, each `ok`, `warning` or `missing`. Anything
`missing` blocks capture (the worker cannot start, or the application's own writes would fail); a `warning`
loses information or disk space but capture works.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

import psycopg
from psycopg.rows import dict_row

from .._exceptions import SourceNotReadyError
from .._pgtext import quote_ident, quote_qualified

__all__ = ["DEFAULT_MAX_LAG_BYTES", "Finding", "SourceFacts", "check_source", "collect", "diagnose", "format_report"]

MIN_SERVER_VERSION = 14
#: A slot further behind than this is reported: the server keeps all that WAL on disk until the worker reads it.
DEFAULT_MAX_LAG_BYTES = 1024**3

Status = Literal["ok", "warning", "missing"]


@dataclass(frozen=True, slots=True)
class Finding:
    status: Status
    message: str

    @property
    def blocking(self) -> bool:
        return self.status == "missing"


@dataclass(frozen=True, slots=True)
class TableFacts:
    schema: str
    name: str
    has_primary_key: bool
    #: pg_class.relreplident: d (default: the primary key), f (full), i (an index), n (nothing)
    replica_identity: str
    #: Published through a partitioned table rather than directly.
    partition: bool = False

    @property
    def qualified(self) -> str:
        return quote_qualified(self.schema, self.name, bare_if_plain=True)


@dataclass(frozen=True, slots=True)
class SlotFacts:
    name: str
    plugin: str
    active: bool
    lag_bytes: int | None
    #: pg_replication_slots.wal_status: reserved, extended, unreserved or lost
    wal_status: str | None


def _shown(name: str) -> str:
    """A name in the SQL of a hint, quoted only when it must be."""
    return quote_ident(name, bare_if_plain=True)


@dataclass(frozen=True, slots=True)
class SourceFacts:
    """What `diagnose` needs to know about a source database."""

    server_version_num: int
    wal_level: str
    max_replication_slots: int
    max_wal_senders: int
    user: str
    #: Replication slots of every database, and WAL senders streaming now: what is left for the worker.
    slots_in_use: int
    senders_in_use: int
    can_replicate: bool
    publication: str
    publication_exists: bool
    publication_all_tables: bool = False
    publication_via_root: bool = True
    published: Sequence[TableFacts] = ()
    tracked_schemas: Sequence[str] = ()
    untracked: Sequence[TableFacts] = ()
    event_trigger: bool = False
    #: Whether the event triggers recording schema changes of tracked tables are installed and enabled.
    schema_triggers: bool = False
    #: Objects the event trigger's code path uses that a role other than a superuser owns ("what (owner)").
    trigger_path_owners: Sequence[str] = ()
    slots: Sequence[SlotFacts] = field(default_factory=tuple)
    #: The worker's slot name, and where a slot of that name lives when it cannot be the worker's (another
    #: database or another plugin): `(database, plugin)`.
    slot: str = "bemi"
    slot_taken: tuple[str, str] | None = None

    @property
    def server_version(self) -> str:
        major, minor = divmod(self.server_version_num, 10000)
        return f"{major}.{minor}"


def _printable(text: str) -> str:
    """`text` with control characters escaped, so a name cannot forge report lines."""
    return text if text.isprintable() else text.encode("unicode_escape").decode("ascii")


def collect(conn: psycopg.Connection[Any], publication: str, slot: str = "bemi") -> SourceFacts:
    """Read the facts about the source behind `conn` (catalog reads only); `slot` is the worker's slot name."""
    with conn.cursor(row_factory=dict_row) as cur:
        settings = cur.execute(
            """
            SELECT current_setting('server_version_num')::int AS version,
                   current_setting('wal_level') AS wal_level,
                   current_setting('max_replication_slots')::int AS max_replication_slots,
                   current_setting('max_wal_senders')::int AS max_wal_senders,
                   current_user AS "user",
                   (SELECT rolreplication OR rolsuper FROM pg_roles WHERE rolname = current_user) AS can_replicate,
                   (SELECT count(*) FROM pg_replication_slots)::int AS slots_in_use,
                   (SELECT count(*) FROM pg_stat_replication)::int AS senders_in_use,
                   (SELECT array[coalesce(database::text, ''), plugin::text] FROM pg_replication_slots
                     WHERE slot_name = %s AND (database IS DISTINCT FROM current_database() OR plugin <> 'pgoutput'))
                       AS slot_taken
            """,
            [slot],
        ).fetchone()
        assert settings is not None
        server = {
            "server_version_num": settings["version"],
            "wal_level": settings["wal_level"],
            "max_replication_slots": settings["max_replication_slots"],
            "max_wal_senders": settings["max_wal_senders"],
            "user": settings["user"],
            "can_replicate": bool(settings["can_replicate"]),
            "slots_in_use": settings["slots_in_use"],
            "senders_in_use": settings["senders_in_use"],
            "publication": publication,
            "slot": slot,
            "slot_taken": tuple(settings["slot_taken"]) if settings["slot_taken"] else None,
        }
        if settings["version"] < MIN_SERVER_VERSION * 10000:
            # Older servers lack catalog columns read below; the version alone is the answer.
            return SourceFacts(**server, publication_exists=False)
        pub = cur.execute(
            "SELECT puballtables, pubviaroot FROM pg_publication WHERE pubname = %s", [publication]
        ).fetchone()
        published: list[TableFacts] = []
        if pub is not None:
            # Every table whose UPDATE/DELETE the publication affects: the published ones, and the partitions of
            # published partitioned tables (each checks its own replica identity).
            rows = cur.execute(
                """
                WITH published AS (
                    SELECT c.oid FROM pg_publication_tables pt
                    JOIN pg_namespace n ON n.nspname = pt.schemaname
                    JOIN pg_class c ON c.relnamespace = n.oid AND c.relname = pt.tablename
                    WHERE pt.pubname = %s
                ), affected AS (
                    SELECT oid, false AS partition FROM published
                    UNION
                    SELECT t.relid, true FROM published p, pg_partition_tree(p.oid) t WHERE t.relid <> p.oid
                )
                SELECT n.nspname AS schema, c.relname AS name, c.relreplident AS replica_identity,
                       EXISTS (SELECT FROM pg_index i WHERE i.indrelid = c.oid AND i.indisprimary) AS has_primary_key,
                       bool_and(a.partition) AS partition
                FROM affected a JOIN pg_class c ON c.oid = a.oid JOIN pg_namespace n ON n.oid = c.relnamespace
                WHERE c.relkind = 'r' OR NOT a.partition
                GROUP BY n.nspname, c.relname, c.relreplident, c.oid
                ORDER BY 1, 2
                """,
                [publication],
            ).fetchall()
            published = [TableFacts(**row) for row in rows]
        tracked_schemas: list[str] = []
        excluded_tables: list[str] = []
        event_trigger = False
        if cur.execute("SELECT to_regclass('bemi.source_publications') IS NOT NULL AS found").fetchone() == {
            "found": True
        }:
            row = cur.execute(
                # excluded_tables (sql-migration --exclude-table) is missing in databases migrated before it existed.
                "SELECT schemas::text[] AS schemas, to_jsonb(sp) -> 'excluded_tables' AS excluded"
                " FROM bemi.source_publications sp WHERE publication = %s",
                [publication],
            ).fetchone()
            tracked_schemas = list(row["schemas"]) if row else []
            excluded_tables = list(row["excluded"] or []) if row else []
        event_trigger = bool(
            cur.execute(
                "SELECT EXISTS (SELECT FROM pg_event_trigger WHERE evtname = 'bemi_track_new_tables' "
                "AND evtenabled <> 'D') AS found"
            ).fetchone()
            == {"found": True}
        )
        schema_triggers = bool(
            cur.execute(
                "SELECT count(*) = 2 AS found FROM pg_event_trigger WHERE evtname IN ('bemi_record_schema_changes', "
                "'bemi_record_dropped_objects') AND evtenabled <> 'D'"
            ).fetchone()
            == {"found": True}
        )
        trigger_path_owners: list[str] = []
        if event_trigger or schema_triggers:
            rows = cur.execute(_TRIGGER_PATH_OWNERS).fetchall()
            trigger_path_owners = [row["what"] for row in rows]
        untracked: list[TableFacts] = []
        if tracked_schemas:
            rows = cur.execute(
                """
                SELECT n.nspname AS schema, c.relname AS name, c.relreplident AS replica_identity,
                       EXISTS (SELECT FROM pg_index i WHERE i.indrelid = c.oid AND i.indisprimary) AS has_primary_key
                FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace
                WHERE n.nspname = ANY (%s) AND c.relkind IN ('r', 'p') AND c.relpersistence = 'p'
                  AND NOT c.relispartition
                  AND NOT EXISTS (SELECT FROM pg_publication_tables pt
                                  WHERE pt.pubname = %s AND pt.schemaname = n.nspname AND pt.tablename = c.relname)
                  AND '"' || replace(n.nspname, '"', '""') || '"."' || replace(c.relname, '"', '""') || '"'
                      <> ALL (%s::text[])
                ORDER BY 1, 2
                """,
                [tracked_schemas, publication, excluded_tables],
            ).fetchall()
            untracked = [TableFacts(**row) for row in rows]
        slot_rows = cur.execute(
            """
            SELECT slot_name AS name, plugin, active, wal_status,
                   pg_wal_lsn_diff(CASE WHEN pg_is_in_recovery() THEN pg_last_wal_replay_lsn()
                                        ELSE pg_current_wal_lsn() END, confirmed_flush_lsn)::bigint AS lag_bytes
            FROM pg_replication_slots
            WHERE slot_type = 'logical' AND database = current_database()
            ORDER BY slot_name
            """
        ).fetchall()
    return SourceFacts(
        **server,
        publication_exists=pub is not None,
        publication_all_tables=bool(pub and pub["puballtables"]),
        publication_via_root=bool(pub is None or pub["pubviaroot"]),
        published=tuple(published),
        tracked_schemas=tuple(tracked_schemas),
        untracked=tuple(untracked),
        event_trigger=event_trigger,
        schema_triggers=schema_triggers,
        trigger_path_owners=tuple(trigger_path_owners),
        slots=tuple(SlotFacts(**row) for row in slot_rows),
    )


# What the event trigger runs with a superuser's rights, owned by a role that is not one (source_guard.sql's rule).
_TRIGGER_PATH_OWNERS = """
SELECT format('%s (owned by %s)', o.what, quote_ident(r.rolname)) AS what
FROM (
    SELECT 'schema bemi' AS what, n.nspowner AS owner FROM pg_namespace n WHERE n.nspname = 'bemi'
    UNION ALL
    SELECT 'function ' || p.oid::regprocedure::text, p.proowner
    FROM pg_proc p JOIN pg_namespace n ON n.oid = p.pronamespace
    WHERE n.nspname = 'bemi' AND p.proname IN ('table_key', 'set_replica_identity_full', 'track_table',
        'create_publication', 'track_schema', 'track_new_tables', 'untrack_table', 'exclude', 'table_definition',
        'records_schema_of', 'record_schema_change', 'record_schema_changes', 'record_dropped_objects',
        'remember_table_definitions')
    UNION ALL
    SELECT 'table ' || c.oid::regclass::text, c.relowner
    FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace
    WHERE n.nspname = 'bemi' AND c.relname IN ('source_publications', 'source_replica_identities',
        'source_table_definitions')
) o JOIN pg_roles r ON r.oid = o.owner
WHERE NOT r.rolsuper
ORDER BY 1
"""


def diagnose(facts: SourceFacts, *, max_lag_bytes: int = DEFAULT_MAX_LAG_BYTES) -> list[Finding]:
    """Turn the facts into findings, in plain words with what to do."""
    findings: list[Finding] = []
    add = findings.append
    migrate = "run `bemi-asgi sql-migration | psql -v ON_ERROR_STOP=1 <source DSN>`"

    if facts.server_version_num >= MIN_SERVER_VERSION * 10000:
        add(Finding("ok", f"PostgreSQL {facts.server_version} ({MIN_SERVER_VERSION} or newer is needed)"))
    else:
        add(Finding("missing", f"PostgreSQL {facts.server_version} is too old: change capture needs "
                    f"{MIN_SERVER_VERSION} or newer (logical decoding messages); upgrade the server"))  # fmt: skip
        return findings

    if facts.wal_level == "logical":
        add(Finding("ok", "wal_level is logical"))
    else:
        add(Finding("missing", f"wal_level is {facts.wal_level!r}, so the WAL cannot be decoded into row changes: set "
                    "wal_level = logical (ALTER SYSTEM SET wal_level = logical; on managed services the provider's "
                    "setting, e.g. rds.logical_replication = 1) and restart the server"))  # fmt: skip

    slot_exists = any(slot.name == facts.slot for slot in facts.slots)
    worker_streams = any(slot.name == facts.slot and slot.active for slot in facts.slots)
    for setting, value, in_use, needed in (
        ("max_replication_slots", facts.max_replication_slots, facts.slots_in_use, not slot_exists),
        ("max_wal_senders", facts.max_wal_senders, facts.senders_in_use, not worker_streams),
    ):
        if value < 1 or (needed and in_use >= value):
            add(Finding("missing", f"{setting} is {value} with {in_use} in use, so the worker cannot stream "
                        f"changes: raise {setting} (10 is the default) and restart, or free one"))  # fmt: skip
        else:
            add(Finding("ok", f"{setting} is {value}, {in_use} in use"))

    if facts.can_replicate:
        add(Finding("ok", f"role {facts.user!r} may stream replication"))
    else:
        add(Finding("missing", f"role {facts.user!r} lacks the REPLICATION privilege the worker needs to stream "
                    f"changes: ALTER ROLE {_shown(facts.user)} REPLICATION (on managed services, grant the provider's "
                    "replication role, e.g. rds_replication), or give the worker a role that has it"))  # fmt: skip

    findings.extend(_publication_findings(facts, migrate))
    findings.extend(_slot_findings(facts, max_lag_bytes))
    return findings


def _publication_findings(facts: SourceFacts, migrate: str) -> list[Finding]:
    findings: list[Finding] = []
    add = findings.append
    pub = facts.publication
    if not facts.publication_exists:
        add(Finding("missing", f"publication {pub!r} does not exist, so no table is tracked: {migrate}"))
        return findings
    if facts.publication_all_tables:
        add(Finding("missing", f"publication {pub!r} is FOR ALL TABLES, which includes bemi's own tables (the worker "
                    "would record its own writes): drop it and " + migrate))  # fmt: skip
    own = [table for table in facts.published if table.schema == "bemi"]
    if own and not facts.publication_all_tables:
        names = ", ".join(table.qualified for table in own)
        add(Finding("missing", f"publication {pub!r} publishes bemi's own table(s) {names} (the worker would record "
                    f"its own writes): ALTER PUBLICATION {_shown(pub)} DROP TABLE {names}"))  # fmt: skip
    if not facts.publication_via_root:
        add(Finding("warning", f"publication {pub!r} sends the changes of partitions under their own names "
                    "(publish_via_partition_root is off), so the history of a partitioned table is split by "
                    f"partition: ALTER PUBLICATION {_shown(pub)} SET (publish_via_partition_root = true), or "
                    + migrate))  # fmt: skip
    tables = [table for table in facts.published if table.schema != "bemi"]
    direct = [table for table in tables if not table.partition]
    if not direct:
        add(Finding("warning", f"publication {pub!r} has no tables, so nothing is tracked: create tables, then "
                    + migrate))  # fmt: skip
    else:
        add(Finding("ok", f"publication {pub!r} tracks {len(direct)} table(s)"))

    full = 0
    for table in tables:
        identity = table.replica_identity
        if identity == "f":
            full += 1
        elif identity == "n" or (identity == "d" and not table.has_primary_key):
            why = "REPLICA IDENTITY NOTHING" if identity == "n" else "no primary key and no REPLICA IDENTITY FULL"
            add(Finding("missing", f"table {table.qualified} has {why}: while it is published, UPDATE and DELETE on "
                        f"it fail; ALTER TABLE {table.qualified} REPLICA IDENTITY FULL (or {migrate})"))  # fmt: skip
        else:
            kind = "the primary key" if identity == "d" else "its replica identity index"
            add(Finding("warning", f"table {table.qualified} does not have REPLICA IDENTITY FULL, so the `before` of "
                        f"its updates and deletes holds only {kind}: ALTER TABLE {table.qualified} REPLICA IDENTITY "
                        f"FULL (or {migrate})"))  # fmt: skip
    if full:
        add(Finding("ok", f"{full} tracked table(s) have REPLICA IDENTITY FULL"))

    if facts.untracked:
        names = ", ".join(table.qualified for table in facts.untracked)
        add(Finding("warning", f"table(s) {names} in tracked schema(s) are not in publication {pub!r}, so their "
                    f"changes are not recorded: {migrate} again"))  # fmt: skip
    if facts.trigger_path_owners:
        add(Finding("missing", "the migration's event triggers run, with a superuser's rights, code "
                    "that other roles can change: " + "; ".join(_printable(w) for w in facts.trigger_path_owners)
                    + ". Any of them can make itself a superuser: run `bemi-asgi sql-migration` as a superuser, "
                    "which refuses and gives the statements that fix the owners"))  # fmt: skip
    elif facts.schema_triggers:
        add(Finding("ok", "schema changes (DDL) of the tracked tables are recorded in the history"))
    elif facts.publication_exists:
        add(Finding("warning", "schema changes (DDL) of the tracked tables are not recorded (the event triggers "
                    f"are missing: creating them needs a superuser): {migrate} as a superuser"))  # fmt: skip
    if facts.tracked_schemas and not facts.trigger_path_owners:
        if facts.event_trigger:
            add(Finding("ok", "tables created later in the tracked schemas are tracked automatically"))
        else:
            add(Finding("warning", "tables created later are not tracked automatically (the event trigger is "
                        f"missing: creating it needs a superuser): {migrate} again after creating tables"))  # fmt: skip
    return findings


def _slot_findings(facts: SourceFacts, max_lag_bytes: int) -> list[Finding]:
    findings: list[Finding] = []
    if facts.slot_taken is not None:
        database, plugin = facts.slot_taken
        where = f"database {database!r}" if database else "the cluster (a physical slot)"
        findings.append(Finding("missing", f"slot {facts.slot!r} is taken: it is a {plugin or 'physical'} slot of "
                                f"{where}, so the worker will refuse it: give the worker (and doctor) another "
                                "name with --slot"))  # fmt: skip
    elif not any(slot.name == facts.slot for slot in facts.slots):
        findings.append(Finding("ok", f"no slot {facts.slot!r} yet: the worker creates it when it first starts"))
    for slot in facts.slots:
        state = "active" if slot.active else "inactive"
        lag = "unknown" if slot.lag_bytes is None else _size(slot.lag_bytes)
        if slot.wal_status == "lost":
            findings.append(Finding("missing", f"slot {slot.name!r} lost WAL it still needed, so it cannot stream "
                                    "any more: stop its worker, drop it with SELECT pg_drop_replication_slot("
                                    f"'{slot.name}') and start the worker again (changes in between are not "
                                    "recorded)"))  # fmt: skip
        elif slot.lag_bytes is not None and slot.lag_bytes > max_lag_bytes:
            findings.append(Finding("warning", f"slot {slot.name!r} ({state}) is {lag} behind, and the server keeps "
                                    "that WAL on disk until it is read: start (or speed up) its worker, or drop an "
                                    f"abandoned slot with SELECT pg_drop_replication_slot('{slot.name}')"))  # fmt: skip
        elif not slot.active:
            # Made by `sql-migration --create-slot`, left by a stopped worker, or abandoned: either way it holds WAL.
            worker = "the worker" if slot.name == facts.slot else f"its worker (--slot {slot.name})"
            findings.append(Finding("warning", f"slot {slot.name!r} is inactive: no worker streams it, so nothing "
                                    f"is captured and the server keeps the WAL since ({lag} behind): start "
                                    f"{worker}, or drop an abandoned slot with SELECT "
                                    f"pg_drop_replication_slot('{slot.name}')"))  # fmt: skip
        else:
            findings.append(Finding("ok", f"slot {slot.name!r} ({slot.plugin}, {state}) is {lag} behind"))
    return findings


def _size(count: int) -> str:
    value = float(count)
    for unit in ("bytes", "KiB", "MiB", "GiB"):
        if value < 1024 or unit == "GiB":
            return f"{count} bytes" if unit == "bytes" else f"{value:.1f} {unit}"
        value /= 1024
    raise AssertionError("unreachable")


def check_source(
    dsn: str, *, publication: str = "bemi", slot: str = "bemi", max_lag_bytes: int = DEFAULT_MAX_LAG_BYTES
) -> list[Finding]:
    """Connect to the source named by `dsn` and return the findings. Raises SourceNotReadyError when it cannot
    connect, psycopg.Error when the role may not read what the checks read."""
    try:
        conn = psycopg.connect(dsn, autocommit=True)
    except psycopg.OperationalError as exc:
        raise SourceNotReadyError(f"cannot connect to the source database: {exc}") from None
    with conn:
        return diagnose(collect(conn, publication, slot), max_lag_bytes=max_lag_bytes)


_LABELS: dict[Status, str] = {"ok": "ok     ", "warning": "warning", "missing": "MISSING"}


def format_report(findings: Sequence[Finding]) -> str:
    """One line per finding, then a verdict."""
    lines = [f"{_LABELS[finding.status]}  {finding.message}" for finding in findings]
    missing = sum(finding.blocking for finding in findings)
    warnings = sum(finding.status == "warning" for finding in findings)
    if missing:
        lines.append(f"\nNot ready: {missing} thing(s) missing for change capture.")
    elif warnings:
        lines.append(f"\nReady for change capture, with {warnings} warning(s).")
    else:
        lines.append("\nAll good: ready for change capture.")
    return "\n".join(lines)
