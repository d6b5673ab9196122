"""Replication frames, status updates and connection options of the transport (pure)."""

from __future__ import annotations

import struct

from psycopg.conninfo import conninfo_to_dict

from bemi_asgi.worker.stream import (
    SESSION_OPTIONS,
    Keepalive,
    XLogData,
    _with_session_options,
    parse_frame,
    status_update,
)


def test_xlogdata_frame_gives_the_record_lsn_and_the_payload() -> None:
    """A 'w' frame splits into its start LSN, end LSN and the pgoutput payload after the 25-byte header."""
    frame = b"w" + struct.pack(">QQq", 0x1_0000_0010, 0x1_0000_0020, 123) + b"B payload"
    parsed = parse_frame(memoryview(frame))
    assert isinstance(parsed, XLogData)
    assert (parsed.start_lsn, parsed.end_lsn, bytes(parsed.payload)) == (0x1_0000_0010, 0x1_0000_0020, b"B payload")


def test_keepalive_frame_gives_the_position_and_the_reply_flag() -> None:
    """A 'k' frame gives the walsender's position and whether it wants a status update now."""
    frame = b"k" + struct.pack(">Qq?", 4242, 99, True)
    assert parse_frame(memoryview(frame)) == Keepalive(wal_end=4242, reply_requested=True)


def test_status_update_reports_the_flush_lsn_for_all_three_positions() -> None:
    """The standby status update carries the flush LSN as written, flushed and applied, and the reply flag."""
    message = status_update(0xABCDEF, reply_requested=True)
    kind, written, flushed, applied, _clock, reply = struct.unpack(">cQQQqB", message)
    assert (kind, written, flushed, applied, reply) == (b"r", 0xABCDEF, 0xABCDEF, 0xABCDEF, 1)


def test_session_options_keep_the_users_own() -> None:
    """The walsender's UTC/ISO settings are added after the user's options, which are kept."""
    dsn = _with_session_options(
        "postgresql://u@h/db?options=-c%20work_mem%3D64MB%20-c%20timezone%3DEST", replication="database"
    )
    params = conninfo_to_dict(dsn)
    assert params["replication"] == "database"
    assert params["options"].startswith("-c work_mem=64MB -c timezone=EST")
    assert params["options"].endswith(SESSION_OPTIONS)
    assert "-c timezone=UTC" in SESSION_OPTIONS
