"""The test harness's PostgreSQL is real and ready for logical decoding."""

from __future__ import annotations

import asyncpg


async def test_server_has_logical_wal_level(database: str) -> None:
    """The session server runs with wal_level=logical."""
    conn = await asyncpg.connect(database)
    try:
        assert await conn.fetchval("SHOW wal_level") == "logical"
    finally:
        await conn.close()


async def test_pgoutput_slot_decodes_a_logical_message(database: str) -> None:
    """A pgoutput slot can be created in a per-test database and sees a transactional logical message."""
    conn = await asyncpg.connect(database)
    try:
        await conn.execute("SELECT pg_create_logical_replication_slot('smoke', 'pgoutput')")
        await conn.execute("CREATE TABLE t (id int PRIMARY KEY)")
        await conn.execute("CREATE PUBLICATION smoke_pub FOR TABLE t")
        async with conn.transaction():
            await conn.execute("INSERT INTO t VALUES (1)")
            await conn.execute("SELECT pg_logical_emit_message(true, '_bemi', '{\"user\": 1}')")
        rows = await conn.fetch(
            "SELECT data FROM pg_logical_slot_peek_binary_changes('smoke', NULL, NULL, 'proto_version', '1', "
            "'publication_names', 'smoke_pub', 'messages', 'true')"
        )
        kinds = [bytes(row["data"][:1]) for row in rows]
        assert kinds[0] == b"B"
        assert b"I" in kinds
        assert b"M" in kinds
        assert kinds[-1] == b"C"
    finally:
        await conn.close()
