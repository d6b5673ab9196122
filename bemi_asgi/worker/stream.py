"""The replication transport: a pgoutput stream over psycopg's COPY_BOTH, driven by the asyncio event loop.

asyncpg cannot speak the replication protocol and psycopg has no replication API, but a `replication=database`
psycopg connection answers `START_REPLICATION` with a COPY_BOTH result; from there `conn.pgconn` (libpq) is driven
directly: `get_copy_data(async_=1)` while data is buffered, the event loop's reader callback when it is not,
`put_copy_data` + `flush` for standby status updates. This module knows frames and LSNs, not pgoutput: the payloads
it returns are decoded by `_pgoutput`.

Also here: `SourceCatalog`, the ordinary (non-replication) connection to the source the worker needs for
readiness checks, slot creation, primary keys and lag.
"""

from __future__ import annotations

import asyncio
import struct
import time
from dataclasses import dataclass

import psycopg
from psycopg import errors, sql
from psycopg._encodings import pg2pyenc
from psycopg.conninfo import conninfo_to_dict, make_conninfo
from psycopg.pq import ConnStatus, ExecStatus

from .._exceptions import SourceNotReadyError
from .._pgtext import format_lsn
from .values import TypeInfo

__all__ = [
    "KEEPALIVE",
    "XLOG_DATA",
    "XLOG_HEADER_SIZE",
    "Keepalive",
    "ReplicationStream",
    "SourceCatalog",
    "XLogData",
    "parse_frame",
    "status_update",
    "xlog_start_lsn",
]

#: Session settings for the walsender: pgoutput prints values with them, and the decoder expects UTC timestamps,
#: ISO dates and hex bytea whatever the server's or the role's defaults say.
SESSION_OPTIONS = "-c timezone=UTC -c datestyle=ISO,MDY -c intervalstyle=postgres -c bytea_output=hex"
#: Values, names and prefixes arrive in UTF-8 whatever the server's encoding (the walsender converts them).
CLIENT_ENCODING = "UTF8"

# PostgreSQL's clock starts at 2000-01-01 UTC; status updates carry microseconds since then.
_PG_EPOCH_OFFSET_US = 946_684_800 * 1_000_000
_STATUS = struct.Struct(">cQQQqB")
_XLOG_HEADER = struct.Struct(">QQq")  # start LSN, end of WAL on the server, server clock
_KEEPALIVE = struct.Struct(">Qq?")  # end of WAL sent, server clock, reply requested

#: A frame's first byte: XLogData ('w': a pgoutput message) or a primary keepalive ('k').
XLOG_DATA, KEEPALIVE = b"wk"
#: An XLogData frame's pgoutput message starts after its type byte and header (its start LSN comes first).
XLOG_HEADER_SIZE = 1 + _XLOG_HEADER.size
_start_lsn = struct.Struct(">Q").unpack_from


def xlog_start_lsn(frame: bytes) -> int:
    """The start LSN of an XLogData frame: the WAL position of the record its message comes from."""
    lsn: int = _start_lsn(frame, 1)[0]
    return lsn


@dataclass(frozen=True, slots=True)
class XLogData:
    """A 'w' frame: one pgoutput message and the LSN of the WAL record it comes from."""

    start_lsn: int
    end_lsn: int
    payload: memoryview


@dataclass(frozen=True, slots=True)
class Keepalive:
    """A 'k' frame: the walsender has sent everything before `wal_end`; `reply_requested` asks for a status."""

    wal_end: int
    reply_requested: bool


def parse_frame(data: memoryview) -> XLogData | Keepalive:
    """Split one CopyData frame of the replication stream into its header and payload."""
    kind = data[0]
    if kind == XLOG_DATA:
        start, end, _clock = _XLOG_HEADER.unpack_from(data, 1)
        return XLogData(start, end, data[XLOG_HEADER_SIZE:])
    if kind == KEEPALIVE:
        wal_end, _clock, reply = _KEEPALIVE.unpack_from(data, 1)
        return Keepalive(wal_end, reply)
    raise psycopg.OperationalError(f"unexpected replication frame type {bytes([kind])!r}")


def status_update(flush_lsn: int, *, reply_requested: bool = False) -> bytes:
    """A Standby Status Update ('r'): written = flushed = applied = `flush_lsn`, the position the slot may advance
    to (everything committed before it is safely stored)."""
    now_us = time.time_ns() // 1000 - _PG_EPOCH_OFFSET_US
    return _STATUS.pack(b"r", flush_lsn, flush_lsn, flush_lsn, now_us, reply_requested)


def _with_session_options(dsn: str, **extra: str) -> str:
    """`dsn` plus the walsender session settings, after any `options` the user gave (so ours win: the decoder
    relies on them)."""
    params = conninfo_to_dict(dsn)
    options = f"{params.get('options') or ''} {SESSION_OPTIONS}".strip()
    return make_conninfo(dsn, options=options, client_encoding=CLIENT_ENCODING, **extra)


class ReplicationStream:
    """A started pgoutput stream on a logical replication slot.

    `read_frames()` returns the frames available now (waiting up to a timeout when none are), `send_status()`
    acknowledges a flush LSN. Use `open()` to connect and start; `close()` ends the stream without acknowledging
    anything more.
    """

    def __init__(self, conn: psycopg.AsyncConnection[tuple[object, ...]]) -> None:
        self._conn = conn
        self._pgconn = conn.pgconn
        self._fd = conn.pgconn.socket
        #: True while `read_frames` waits for the server: everything sent so far has been read.
        self.waiting = False

    @classmethod
    async def open(cls, dsn: str, *, slot: str, publication: str, start_lsn: int = 0) -> ReplicationStream:
        """Connect in replication mode and `START_REPLICATION` on `slot` (which must exist) for `publication`.

        `start_lsn` 0 resumes where the slot's confirmed flush position is.
        """
        conn = await psycopg.AsyncConnection.connect(
            _with_session_options(dsn, replication="database"), autocommit=True
        )
        try:
            # pgoutput reads publication_names as a list of identifiers, so each name is quoted as one.
            names = sql.Identifier(publication).as_string(conn).replace("'", "''")
            slot_name = sql.Identifier(slot).as_string(conn)
            await conn.execute(
                f"START_REPLICATION SLOT {slot_name} LOGICAL {format_lsn(start_lsn)}"
                f" (proto_version '1', publication_names '{names}', messages 'true')"
            )
        except BaseException:
            await conn.close()
            raise
        return cls(conn)

    async def read_frames(self, wait: float, limit: int = 4096) -> list[memoryview]:
        """Return up to `limit` frames already received; if there are none, wait up to `wait` seconds for some
        (an empty list means none came). Raises psycopg.OperationalError when the stream ends or fails."""
        frames: list[memoryview] = []
        pgconn = self._pgconn
        while len(frames) < limit:
            nbytes, data = pgconn.get_copy_data(1)
            if nbytes > 0:
                frames.append(data)
                continue
            if nbytes == 0:
                if frames:
                    break
                if not await self._wait_readable(wait):
                    break
                pgconn.consume_input()
                wait = 0.0  # after one wake-up, return what arrived
                continue
            self._raise_stream_end(nbytes)
        return frames

    async def send_status(self, flush_lsn: int, *, reply_requested: bool = False) -> None:
        """Acknowledge `flush_lsn` to the walsender (the slot's confirmed_flush_lsn follows)."""
        pgconn = self._pgconn
        message = status_update(flush_lsn, reply_requested=reply_requested)
        while pgconn.put_copy_data(message) == 0:
            await self._wait_writable()
        while pgconn.flush() != 0:
            await self._wait_writable()

    async def close(self) -> None:
        """End the stream and the connection (best effort: the connection may already be gone)."""
        try:
            if self._pgconn.status == ConnStatus.OK:
                self._pgconn.put_copy_end()
                self._pgconn.flush()
        except psycopg.Error:
            pass
        await self._conn.close()

    def _raise_stream_end(self, nbytes: int) -> None:
        pgconn = self._pgconn
        message = pgconn.get_error_message() if nbytes == -2 else "the server ended the replication stream"
        while (result := pgconn.get_result()) is not None:
            if result.status not in (ExecStatus.COMMAND_OK, ExecStatus.COPY_BOTH):
                message = (result.error_message or b"").decode(errors="replace") or message
        raise psycopg.OperationalError(f"replication stream lost: {message.strip()}")

    async def _wait_readable(self, seconds: float) -> bool:
        if seconds <= 0:
            return False
        loop = asyncio.get_running_loop()
        waiter: asyncio.Future[bool] = loop.create_future()

        def wake(ready: bool) -> None:
            if not waiter.done():
                waiter.set_result(ready)

        loop.add_reader(self._fd, wake, True)
        timer = loop.call_later(seconds, wake, False)
        self.waiting = True
        try:
            return await waiter
        finally:
            self.waiting = False
            timer.cancel()
            loop.remove_reader(self._fd)

    async def _wait_writable(self) -> None:
        loop = asyncio.get_running_loop()
        waiter: asyncio.Future[None] = loop.create_future()

        def wake() -> None:
            if not waiter.done():
                waiter.set_result(None)

        loop.add_writer(self._fd, wake)
        try:
            await waiter
        finally:
            loop.remove_writer(self._fd)


@dataclass(slots=True)
class SourceInfo:
    database: str
    server_version: int
    #: The source cluster's `pg_control_system().system_identifier`: with the database and the slot, the stream.
    system_identifier: int
    confirmed_flush_lsn: int  # the slot's: where streaming resumes
    encoding: str = "utf-8"  # the server's encoding as a Python codec: logical message contents arrive in it
    slot_created: bool = False  # this start created the slot


def python_encoding(server_encoding: str) -> str:
    """The Python codec for a PostgreSQL server encoding; UTF-8 for SQL_ASCII (bytes of no declared encoding) and
    for an encoding Python lacks."""
    if server_encoding.upper() in ("UTF8", "SQL_ASCII"):
        return "utf-8"
    try:
        return pg2pyenc(server_encoding.encode())
    except psycopg.NotSupportedError:
        return "utf-8"


# Every type reachable from the given ones through domains and arrays: kind, array element and its delimiter,
# domain base.
_TYPES_QUERY = """
WITH RECURSIVE wanted(oid) AS (
    SELECT unnest(%s::oid[])
    UNION
    SELECT next.oid FROM wanted JOIN pg_type t ON t.oid = wanted.oid,
        LATERAL (VALUES (t.typbasetype),
                        (CASE WHEN t.typsubscript = 'array_subscript_handler'::regproc THEN t.typelem END)) next(oid)
    WHERE next.oid IS NOT NULL AND next.oid <> 0
)
SELECT t.oid::bigint, t.typtype::text,
       CASE WHEN t.typsubscript = 'array_subscript_handler'::regproc THEN t.typelem ELSE 0 END::bigint,
       coalesce(e.typdelim, ',')::text, t.typbasetype::bigint
FROM wanted JOIN pg_type t ON t.oid = wanted.oid LEFT JOIN pg_type e ON e.oid = t.typelem
"""


class SourceCatalog:
    """An ordinary connection to the source: readiness checks, the slot, primary keys, the current WAL position."""

    def __init__(self, conn: psycopg.AsyncConnection[tuple[object, ...]]) -> None:
        self._conn = conn

    @classmethod
    async def connect(cls, dsn: str) -> SourceCatalog:
        return cls(await psycopg.AsyncConnection.connect(_with_session_options(dsn), autocommit=True))

    async def close(self) -> None:
        await self._conn.close()

    async def prepare(self, *, slot: str, publication: str) -> SourceInfo:
        """Check the source can be captured (`check`) and create the slot if it is missing (it is never dropped)."""
        info, slot_row = await self.check(slot=slot, publication=publication)
        if slot_row is None:
            try:
                await self._conn.execute("SELECT pg_create_logical_replication_slot(%s, 'pgoutput')", [slot])
                info.slot_created = True
            except errors.DuplicateObject:
                pass  # another worker created it a moment ago
            except errors.ObjectNotInPrerequisiteState as exc:
                raise SourceNotReadyError(f"cannot create replication slot {slot!r}: {exc}") from exc
            except errors.ConfigurationLimitExceeded as exc:
                raise SourceNotReadyError(
                    f"cannot create replication slot {slot!r}: {exc}; raise max_replication_slots or drop an "
                    "unused slot"
                ) from exc
            slot_row = await self._slot(slot)
            assert slot_row is not None
        info.confirmed_flush_lsn = slot_row[2]
        return info

    async def _slot(self, slot: str) -> tuple[str, str, int] | None:
        row = await (
            await self._conn.execute(
                "SELECT plugin::text, database::text, coalesce(confirmed_flush_lsn - '0/0'::pg_lsn, 0)::bigint"
                " FROM pg_replication_slots WHERE slot_name = %s",
                [slot],
            )
        ).fetchone()
        return None if row is None else (str(row[0]), str(row[1]), int(str(row[2])))

    async def check(self, *, slot: str, publication: str) -> tuple[SourceInfo, tuple[str, str, int] | None]:
        """Check the source can be captured, changing nothing: the facts, and the slot `(plugin, database,
        confirmed flush LSN)` when it exists. Raises SourceNotReadyError naming the fix for `wal_level`, a missing
        publication and a slot of that name that another database or plugin owns."""
        row = await (
            await self._conn.execute(
                "SELECT current_setting('wal_level'), current_database(), current_setting('server_version_num')::int,"
                " (SELECT count(*) FROM pg_publication WHERE pubname = %s), current_setting('server_encoding'),"
                " (SELECT system_identifier FROM pg_control_system())",
                [publication],
            )
        ).fetchone()
        assert row is not None
        wal_level, database, version, publications, encoding, system_identifier = row
        if wal_level != "logical":
            raise SourceNotReadyError(
                f"the source database has wal_level={wal_level}; change capture needs wal_level=logical: "
                "run `ALTER SYSTEM SET wal_level = logical` and restart PostgreSQL (`bemi-asgi doctor` checks "
                "every setting capture needs)"
            )
        if not publications:
            raise SourceNotReadyError(
                f"the source database {database!r} has no publication {publication!r}: create it with "
                "`bemi-asgi sql-migration` (or name an existing one with --publication); `bemi-asgi doctor` "
                "checks the setup"
            )
        slot_row = await self._slot(slot)
        if slot_row is not None and (slot_row[0] != "pgoutput" or slot_row[1] != database):
            raise SourceNotReadyError(
                f"replication slot {slot!r} exists but is not a pgoutput slot of database {database!r} "
                f"(plugin {slot_row[0]!r}, database {slot_row[1]!r}): choose another name with --slot"
            )
        info = SourceInfo(
            str(database), int(str(version)), int(str(system_identifier)), 0, python_encoding(str(encoding))
        )
        return info, slot_row

    async def drop_slot(self, slot: str) -> None:
        """Drop a slot this start created, when the start fails before anything streamed: a new slot nobody reads
        holds WAL on the source."""
        await self._conn.execute("SELECT pg_drop_replication_slot(%s)", [slot])

    async def primary_key(self, relation_oid: int) -> list[str] | None:
        """The relation's primary key column names in key order; None when the relation no longer exists,
        an empty list when it has no primary key."""
        cursor = await self._conn.execute(
            "SELECT c.oid, array(SELECT a.attname::text"
            "  FROM pg_index i CROSS JOIN LATERAL unnest(i.indkey::int2[]) WITH ORDINALITY AS k(attnum, n)"
            "  JOIN pg_attribute a ON a.attrelid = i.indrelid AND a.attnum = k.attnum"
            "  WHERE i.indrelid = c.oid AND i.indisprimary ORDER BY k.n)"
            " FROM pg_class c WHERE c.oid = %s",
            [relation_oid],
        )
        row = await cursor.fetchone()
        if row is None:
            return None
        names = row[1]
        assert isinstance(names, list)
        return [str(name) for name in names]

    async def partition_ancestors(self, relation_oid: int) -> list[str]:
        """The partitioned tables `relation_oid` is a partition of (`schema.table`, nearest first); [] for none."""
        cursor = await self._conn.execute(
            "SELECT n.nspname::text || '.' || c.relname::text FROM pg_partition_ancestors(%s::oid) a"
            " JOIN pg_class c ON c.oid = a.relid JOIN pg_namespace n ON n.oid = c.relnamespace"
            " WHERE a.relid <> %s::oid",
            [relation_oid, relation_oid],
        )
        return [str(row[0]) for row in await cursor.fetchall()]

    async def current_wal_lsn(self) -> int:
        row = await (await self._conn.execute("SELECT (pg_current_wal_lsn() - '0/0'::pg_lsn)::bigint")).fetchone()
        assert row is not None
        return int(str(row[0]))

    async def types(self, oids: list[int]) -> dict[int, TypeInfo]:
        """What the catalog says about these types and those they refer to (domain bases, array elements)."""
        cursor = await self._conn.execute(_TYPES_QUERY, [oids])
        return {
            int(str(oid)): TypeInfo(int(str(oid)), str(kind), int(str(element)), str(delimiter), int(str(base)))
            for oid, kind, element, delimiter, base in await cursor.fetchall()
        }
